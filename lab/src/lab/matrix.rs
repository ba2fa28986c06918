//! The demo's matrix: who should reach whom in `examples/lab/`, probed one cell at a time and
//! described with the decisive flow event of each connection.
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::{FlowLog, Lab};

impl Lab {
    /// Probes the demo's matrix (see [`demo_matrix`]), one probe at a time, and describes each
    /// with the flow events the agents reported for it.
    pub async fn matrix(&self) -> anyhow::Result<Vec<Cell>> {
        let log = self.observe_flows().await?;
        // The streams are open once the agents accept them; give them a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut cells = Vec::new();
        for p in demo_matrix() {
            cells.push(self.check(&log, &p).await?);
        }
        Ok(cells)
    }

    /// Runs one probe and describes it with the flow events the agents reported for it (`log`
    /// must be observing).
    pub async fn check(&self, log: &FlowLog, p: &Probe) -> anyhow::Result<Cell> {
        let (from_ns, from_app) = p.from;
        let (client, client_ip) = self
            .pods(from_ns, from_app)?
            .into_iter()
            .next()
            .with_context(|| format!("no running {from_ns}/{from_app} pod"))?;
        let (to_ns, to_name) = p.to;
        let target_ip = match p.kind {
            TargetKind::Service => self.cluster_ip(to_ns, to_name)?,
            TargetKind::Pod => {
                self.pods(to_ns, to_name)?
                    .into_iter()
                    .next()
                    .with_context(|| format!("no running {to_ns}/{to_name} pod"))?
                    .1
            }
        };
        let started = Instant::now();
        let target = format!("{target_ip}:{}", p.port);
        let result =
            tokio::task::block_in_place(|| self.probe(from_ns, &client, p.protocol, &target))?;
        let (verdict, reason) = self
            .verdict_since(log, started, client_ip, p.protocol)
            .await;
        Ok(Cell {
            from: format!("{from_ns}/{from_app}"),
            to: format!(
                "{to_ns}/{to_name}{} {}/{}",
                if p.kind == TargetKind::Service {
                    " (svc)"
                } else {
                    ""
                },
                p.protocol,
                p.port
            ),
            result: result.split_whitespace().next().unwrap_or("").to_string(),
            responder: result.split_whitespace().nth(1).unwrap_or("").to_string(),
            verdict,
            reason,
            expected: p.expect.clone(),
        })
    }
}

/// What a probe targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Service,
    Pod,
}

/// One probe of the demo's matrix.
#[derive(Clone, Debug)]
pub struct Probe {
    /// Client: `(namespace, app)`; the first running pod is used.
    pub from: (&'static str, &'static str),
    /// A Service `(namespace, name)` or pods `(namespace, app)`.
    pub to: (&'static str, &'static str),
    pub kind: TargetKind,
    pub protocol: &'static str,
    pub port: u16,
    pub expect: Expected,
}

/// The expected outcome of a probe: the workload's result, the verdict and the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub result: &'static str,
    pub verdict: &'static str,
    pub reason: &'static str,
}

/// One observed cell of the matrix.
#[derive(Clone, Debug)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub result: String,
    /// Who answered (the pod name a successful probe printed).
    pub responder: String,
    pub verdict: String,
    pub reason: String,
    pub expected: Expected,
}

impl Cell {
    pub fn as_expected(&self) -> bool {
        self.result == self.expected.result
            && self.verdict == self.expected.verdict
            && self.reason == self.expected.reason
    }
}

/// The demo's matrix and what `examples/lab/` makes of it.
pub fn demo_matrix() -> Vec<Probe> {
    let e = |result, verdict, reason| Expected {
        result,
        verdict,
        reason,
    };
    let allowed = || e("success", "allowed", "policy_allow");
    let p = |from, to, kind, protocol, port, expect| Probe {
        from,
        to,
        kind,
        protocol,
        port,
        expect,
    };
    use TargetKind::{Pod, Service};
    vec![
        // The frontend may reach the backend (TCP and UDP), through its Service.
        p(
            ("shop", "frontend"),
            ("shop", "backend"),
            Service,
            "tcp",
            80,
            allowed(),
        ),
        p(
            ("shop", "frontend"),
            ("shop", "backend"),
            Service,
            "udp",
            53,
            allowed(),
        ),
        // The batch job may not: the backend's policy makes it default-deny.
        p(
            ("batch", "etl"),
            ("shop", "backend"),
            Service,
            "tcp",
            80,
            e("timeout", "dropped", "default_deny"),
        ),
        p(
            ("batch", "etl"),
            ("shop", "backend"),
            Service,
            "udp",
            53,
            e("timeout", "dropped", "default_deny"),
        ),
        // The frontend's Audit policy admits only the backend. No policy enforces anything on
        // the frontend, so the backend passes as `no_policy`; the batch job passes too, but
        // reported as "audit": the policy would have dropped it.
        p(
            ("shop", "backend"),
            ("shop", "frontend"),
            Service,
            "tcp",
            80,
            e("success", "allowed", "no_policy"),
        ),
        p(
            ("batch", "etl"),
            ("shop", "frontend"),
            Service,
            "tcp",
            80,
            e("success", "audit", "default_deny"),
        ),
        // No policy selects the batch job: everyone reaches it.
        p(
            ("shop", "frontend"),
            ("batch", "etl"),
            Pod,
            "tcp",
            8080,
            e("success", "allowed", "no_policy"),
        ),
    ]
}

/// The matrix as a table.
pub fn render(cells: &[Cell]) -> String {
    let mut out = format!(
        "{:<15} {:<30} {:<8} {:<8} {:<14} {}\n",
        "FROM", "TO", "RESULT", "VERDICT", "REASON", "EXPECTED"
    );
    for c in cells {
        out.push_str(&format!(
            "{:<15} {:<30} {:<8} {:<8} {:<14} {}\n",
            c.from,
            c.to,
            c.result,
            c.verdict,
            c.reason,
            if c.as_expected() {
                "yes".to_string()
            } else {
                format!(
                    "NO (expected {} {} {})",
                    c.expected.result, c.expected.verdict, c.expected.reason
                )
            }
        ));
    }
    out
}
