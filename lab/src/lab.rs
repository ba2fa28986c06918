//! The lab: a local mesh on a real control plane — etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on loopback, simulated nodes ([`crate::sim`]) each
//! with its real agent, the real operator, and the demo of `examples/lab/` (Deployments,
//! Services, ServiceIdentities, MeshPolicies). [`Lab::matrix`] probes who can reach whom from
//! inside the pods and takes each verdict and reason from the agents' flow events.
//!
//! Dropping a [`Lab`] removes everything it made: agents (and their pins), the operator, pods,
//! namespaces, cgroups, links, the control plane and its state.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cortexflow_proto::flows::v1::{self, flows_client::FlowsClient};
use kube::Client;

use cortexflow_testkit::{
    node::Agent,
    process::{Daemon, Operator, OperatorOptions, binary, free_port, http_get},
    workspace_root,
};

use crate::{
    cluster::{Cluster, Lifetime},
    kubectl,
    sim::{self, Fabric, Images, SimNode},
};

/// The operator's namespace in the lab.
pub const SYSTEM_NAMESPACE: &str = "cortexflow-system";

/// How to run a lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub nodes: usize,
    /// Where the control plane, logs and pod records live (created; removed on drop).
    pub state_dir: PathBuf,
    /// The demo to apply (`examples/lab`), or none.
    pub demo: Option<PathBuf>,
}

impl LabOptions {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            nodes: 2,
            state_dir,
            demo: Some(workspace_root().join("examples/lab")),
        }
    }
}

/// A running lab. Fields drop in order: agents (their pins uninstalled), the operator, the
/// nodes (pods, namespaces, cgroups), the fabric, the control plane.
pub struct Lab {
    /// Prometheus, scraping the operator and every agent.
    pub prometheus: Daemon,
    pub prometheus_addr: std::net::SocketAddr,
    pub agents: Vec<Agent>,
    pub operator: Operator,
    pub nodes: Vec<SimNode>,
    pub fabric: Fabric,
    pub cluster: Cluster,
    pub client: Client,
    operator_opts: OperatorOptions,
    pub state_dir: PathBuf,
    pub workload_bin: PathBuf,
    /// How long each phase of the start took.
    pub timings: Vec<(&'static str, Duration)>,
}

impl Lab {
    /// Starts everything and, with a demo, applies it and waits for its Deployments.
    pub async fn start(o: &LabOptions) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=20).contains(&o.nodes), "--nodes must be 1..=20");
        cortexflow_testkit::net::sweep_stale();
        let mut timings = Vec::new();
        let mut t = Instant::now();
        let mut lap = |what: &'static str, timings: &mut Vec<(&'static str, Duration)>| {
            timings.push((what, t.elapsed()));
            t = Instant::now();
        };
        std::fs::create_dir_all(o.state_dir.join("logs"))?;
        std::fs::write(
            o.state_dir.join("owner.pid"),
            std::process::id().to_string(),
        )?;
        let agent_bin = binary("cortexflow-agent", "cortexflow-agent")?;
        let workload_bin = binary("cortexflow-lab", "cortexflow-workload")?;
        binary("cortexflow-operator", "cortexflow-operator")?;
        lap("build", &mut timings);
        let cluster = Cluster::start(&o.state_dir.join("cluster"), Lifetime::Owned).await?;
        let kubeconfig = cluster.kubeconfig();
        kubectl::install_crds(&kubeconfig)?;
        kubectl::ok(&kubeconfig, &["create", "namespace", SYSTEM_NAMESPACE])?;
        let client = cluster.client().await?;
        lap("control plane", &mut timings);

        let fabric = Fabric::new()?;
        let mut nodes = Vec::new();
        for i in 0..o.nodes {
            nodes.push(SimNode::new(
                &fabric,
                &format!("lab-node-{}", i + 1),
                i as u8,
            )?);
        }
        for a in &nodes {
            for b in &nodes {
                if a.name != b.name {
                    a.route_to(b);
                }
            }
        }
        let images = Images(BTreeMap::from([(
            "cortexflow/workload".to_string(),
            workload_bin.clone(),
        )]));
        for n in &mut nodes {
            n.run(&client, images.clone(), &o.state_dir).await?;
        }
        lap("nodes", &mut timings);

        let operator_opts = OperatorOptions {
            kubeconfig: kubeconfig.clone(),
            namespace: SYSTEM_NAMESPACE.into(),
            identity: "operator-0".into(),
            lease_duration_secs: 15,
            log_dir: o.state_dir.join("logs"),
            env: Vec::new(),
        };
        let mut operator = Operator::start(&operator_opts)?;
        operator.wait_ready(Duration::from_secs(60)).await?;
        let mut agents = Vec::new();
        for n in &nodes {
            let mut a = Agent::new(&agent_bin, &n.name, &n.ns.path(), &n.cgroup, &[])?;
            a.start_agent(&format!("http://{}", operator.grpc))?;
            agents.push(a);
        }
        for a in &mut agents {
            a.wait_ready(Duration::from_secs(60)).await?;
        }
        lap("operator and agents", &mut timings);
        let (prometheus, prometheus_addr) = start_prometheus(&o.state_dir, &operator, &agents)?;

        let lab = Self {
            prometheus,
            prometheus_addr,
            agents,
            operator,
            nodes,
            fabric,
            cluster,
            client,
            operator_opts,
            state_dir: o.state_dir.clone(),
            workload_bin,
            timings,
        };
        if let Some(demo) = &o.demo {
            lab.kubectl(&["apply", "-f", &demo.to_string_lossy()])?;
            for ns in ["shop", "batch"] {
                lab.kubectl(&[
                    "wait",
                    "--for=condition=Available",
                    "deployment",
                    "--all",
                    "-n",
                    ns,
                    "--timeout=120s",
                ])?;
            }
        }
        let mut lab = lab;
        lab.timings.push(("demo", t.elapsed()));
        Ok(lab)
    }

    /// Stops the operator (SIGTERM); the agents keep their state and retry.
    pub fn stop_operator(&mut self) {
        let _ = self.operator.daemon.stop(Duration::from_secs(10));
    }

    /// Starts the operator again where the agents expect it, and waits until it is ready.
    pub async fn start_operator(&mut self) -> anyhow::Result<()> {
        self.operator =
            Operator::start_at(&self.operator_opts, self.operator.grpc, self.operator.admin)?;
        self.operator.wait_ready(Duration::from_secs(60)).await
    }

    /// `kubectl` against the lab.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl::ok(&self.cluster.kubeconfig(), args)
    }

    /// The pods of `namespace` labelled `app=<app>`: `(name, address)`, Running ones only.
    pub fn pods(&self, namespace: &str, app: &str) -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
        Ok(self
            .placed_pods(namespace, app)?
            .into_iter()
            .map(|(name, ip, _)| (name, ip))
            .collect())
    }

    /// As [`Lab::pods`], with the node each runs on: `(name, address, node)`.
    pub fn placed_pods(
        &self,
        namespace: &str,
        app: &str,
    ) -> anyhow::Result<Vec<(String, Ipv4Addr, String)>> {
        let out = self.kubectl(&[
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            &format!("app={app}"),
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, ip, node) = (f.next()?, f.next()?.parse().ok()?, f.next()?);
                Some((name.to_string(), ip, node.to_string()))
            })
            .collect())
    }

    /// A Service's ClusterIP.
    pub fn cluster_ip(&self, namespace: &str, name: &str) -> anyhow::Result<Ipv4Addr> {
        let ip = self.kubectl(&[
            "get",
            "service",
            "-n",
            namespace,
            name,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        ip.trim()
            .parse()
            .with_context(|| format!("service {namespace}/{name} has no ClusterIP ({ip:?})"))
    }

    /// Runs the workload's `probe` inside a pod: `success NAME`, `refused`, `timeout`, ….
    pub fn probe(
        &self,
        namespace: &str,
        pod: &str,
        protocol: &str,
        target: &str,
    ) -> anyhow::Result<String> {
        let (netns, cgroup) = sim::locate(&self.state_dir, namespace, pod)?;
        self.probe_in(&netns, &cgroup, protocol, target)
    }

    /// Runs the workload's `probe` on simulated node `index` itself (its network namespace and
    /// cgroup): the source is the node's fabric address, which is `host` on that node and an
    /// address outside the cluster's pods (`world`, or an `ipBlock`) everywhere else.
    pub fn probe_from_node(
        &self,
        index: usize,
        protocol: &str,
        target: &str,
    ) -> anyhow::Result<String> {
        let n = self
            .nodes
            .get(index)
            .with_context(|| format!("no node {index}"))?;
        self.probe_in(&n.ns.name, &n.cgroup, protocol, target)
    }

    fn probe_in(
        &self,
        netns: &str,
        cgroup: &Path,
        protocol: &str,
        target: &str,
    ) -> anyhow::Result<String> {
        let out = probe_command(&self.workload_bin, netns, cgroup, protocol, target)
            .output()
            .context("run the probe")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The verdict and reason the agents reported for the connection `source` opened with
    /// `protocol` at `started` (waits for the events to arrive).
    pub async fn verdict_since(
        &self,
        log: &FlowLog,
        started: Instant,
        source: Ipv4Addr,
        protocol: &str,
    ) -> (String, String) {
        // Flow events reach the observers within tens of milliseconds.
        tokio::time::sleep(Duration::from_millis(300)).await;
        decisive(&log.since(started, source, protocol))
    }

    /// Streams every agent's flows into a shared list until the returned guard drops.
    pub async fn observe_flows(&self) -> anyhow::Result<FlowLog> {
        let flows = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for a in &self.agents {
            let mut c = FlowsClient::connect(format!("http://{}", a.grpc))
                .await
                .with_context(|| format!("connect to the Flows API of {}", a.name))?;
            let mut stream = c.observe(v1::ObserveRequest::default()).await?.into_inner();
            let flows = flows.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok(Some(f)) = stream.message().await {
                    if let Ok(mut v) = flows.lock() {
                        v.push((Instant::now(), f));
                    }
                }
            }));
        }
        Ok(FlowLog { flows, tasks })
    }

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

    /// `kubectl apply` of a YAML text.
    pub fn apply_yaml(&self, yaml: &str) -> anyhow::Result<String> {
        let f = self.state_dir.join(format!(
            "apply-{}.yaml",
            cortexflow_testkit::net::unique("")
        ));
        std::fs::write(&f, yaml)?;
        let out = self.kubectl(&["apply", "-f", &f.to_string_lossy()]);
        let _ = std::fs::remove_file(&f);
        out
    }

    /// Prometheus's answer to an instant query (the JSON text).
    pub async fn prometheus_query(&self, query: &str) -> anyhow::Result<String> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) =
            http_get(self.prometheus_addr, &format!("/api/v1/query?query={q}")).await?;
        anyhow::ensure!(code == 200, "prometheus answered {code}: {body}");
        Ok(body)
    }

    /// The lines a user needs: KUBECONFIG, Prometheus, metrics endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        let mut out = vec![format!(
            "export KUBECONFIG={}",
            self.cluster.kubeconfig().display()
        )];
        out.push(format!(
            "prometheus: http://{}  (scrapes the operator and every agent every 5 s)",
            self.prometheus_addr
        ));
        out.push(format!(
            "operator metrics: http://{}/metrics",
            self.operator.admin
        ));
        for a in &self.agents {
            out.push(format!(
                "agent {} metrics: http://{}/metrics   flows (gRPC): {}",
                a.name, a.admin, a.grpc
            ));
        }
        out
    }

    /// Stops the nodes' pod handling before everything is dropped (so that no pod is restarted
    /// while the control plane goes).
    pub async fn shutdown(mut self) {
        for n in &mut self.nodes {
            n.shutdown().await;
        }
        drop(self);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.state_dir.join("owner.pid"));
    }
}

/// Starts the Debian `prometheus` with the operator and the agents as static targets.
fn start_prometheus(
    state_dir: &Path,
    operator: &Operator,
    agents: &[Agent],
) -> anyhow::Result<(Daemon, std::net::SocketAddr)> {
    let dir = state_dir.join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    let agent_targets: Vec<String> = agents.iter().map(|a| format!("'{}'", a.admin)).collect();
    let config = format!(
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n  - job_name: cortexflow-operator\n    static_configs:\n      - targets: ['{}']\n  - job_name: cortexflow-agent\n    static_configs:\n      - targets: [{}]\n",
        operator.admin,
        agent_targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config)?;
    let addr = std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let bin = which("prometheus").context("prometheus is missing: run `cargo xtask setup`")?;
    let daemon = Daemon::start(
        "prometheus",
        &bin,
        &[
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
        ],
        &[],
        state_dir.join("logs/prometheus.log"),
    )?;
    Ok((daemon, addr))
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// Flow events collected from every agent.
pub struct FlowLog {
    flows: Arc<Mutex<Vec<(Instant, v1::Flow)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FlowLog {
    /// The flows from `source` of `protocol` seen since `t`.
    pub fn since(&self, t: Instant, source: Ipv4Addr, protocol: &str) -> Vec<v1::Flow> {
        self.flows
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|(at, f)| {
                        *at >= t
                            && f.protocol.eq_ignore_ascii_case(protocol)
                            && f.source.as_ref().map(|s| s.ip) == Some(u32::from(source))
                    })
                    .map(|(_, f)| f.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The workload's `probe` of `target` (one attempt, 1 s timeout) inside a network namespace and
/// cgroup; it prints `success NAME` | `refused` | `timeout` | `error WHAT`.
pub fn probe_command(
    workload_bin: &Path,
    netns: &str,
    cgroup: &Path,
    protocol: &str,
    target: &str,
) -> std::process::Command {
    sim::exec_command(
        netns,
        cgroup,
        &[
            workload_bin.to_string_lossy().into_owned(),
            "probe".into(),
            protocol.into(),
            target.into(),
            "--timeout-ms".into(),
            "1000".into(),
        ],
    )
}

/// The verdict that decided a connection: a drop if any, else an audit, else the destination's
/// (ingress) allow, else the source's.
fn decisive(flows: &[v1::Flow]) -> (String, String) {
    let pick = flows
        .iter()
        .find(|f| f.verdict == "dropped")
        .or_else(|| flows.iter().find(|f| f.verdict == "audit"))
        .or_else(|| flows.iter().find(|f| f.direction == "ingress"))
        .or_else(|| flows.first());
    match pick {
        Some(f) => (f.verdict.clone(), f.reason.clone()),
        None => ("-".into(), "no flow event".into()),
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

/// The state directory of the lab that `cargo xtask lab` runs (one per machine).
pub fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("cortexflow-lab")
}

/// Whether a live lab owns `state_dir`.
pub fn running(state_dir: &Path) -> bool {
    std::fs::read_to_string(state_dir.join("owner.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

/// `cargo xtask lab exec <ns>/<pod> -- <cmd…>`: runs a command inside a lab pod; returns its
/// exit code.
pub fn exec(state_dir: &Path, target: &str, argv: &[String]) -> anyhow::Result<i32> {
    let Some((ns, pod)) = target.split_once('/') else {
        bail!("{target:?}: expected <namespace>/<pod>");
    };
    if argv.is_empty() {
        bail!("nothing to run: cargo xtask lab exec <ns>/<pod> -- <cmd…>");
    }
    let (netns, cgroup) = sim::locate(state_dir, ns, pod)?;
    let status = sim::exec_command(&netns, &cgroup, argv)
        .status()
        .context("run the command")?;
    Ok(status.code().unwrap_or(1))
}
