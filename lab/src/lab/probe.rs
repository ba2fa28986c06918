//! Probes from inside the pods (the workload's `probe` in a pod's network namespace and
//! cgroup, so the socket load balancer applies) and the agents' flow events that describe them.
use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use cortexflow_proto::flows::v1::{self, flows_client::FlowsClient};

use super::Lab;

/// The lab's trust domain (the operator's and agents' default).
pub const TRUST_DOMAIN: &str = "cluster.local";
use crate::sim;

impl Lab {
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

    /// Runs the workload with `args` inside a pod (its network namespace and cgroup); returns
    /// what it printed.
    pub fn workload(&self, namespace: &str, pod: &str, args: &[&str]) -> anyhow::Result<String> {
        let (netns, cgroup) = sim::locate(&self.state_dir, namespace, pod)?;
        self.workload_in(&netns, &cgroup, args)
    }

    /// Runs the workload with `args` on simulated node `index` itself.
    pub fn workload_on_node(&self, index: usize, args: &[&str]) -> anyhow::Result<String> {
        let n = self
            .nodes
            .get(index)
            .with_context(|| format!("no node {index}"))?;
        self.workload_in(&n.ns.name, &n.cgroup, args)
    }

    fn workload_in(&self, netns: &str, cgroup: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec![self.workload_bin.to_string_lossy().into_owned()];
        argv.extend(args.iter().map(|a| a.to_string()));
        let out = sim::exec_command(netns, cgroup, &argv)
            .output()
            .context("run the workload")?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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

    /// A `Flows` client of agent `a`'s network port, as `cfcli` would be: TLS verifying the
    /// agent's node id with the trust bundle, `token` as the bearer token.
    pub async fn flows_client(
        &self,
        a: &cortexflow_testkit::node::Agent,
        token: Option<&str>,
    ) -> anyhow::Result<
        FlowsClient<
            tonic::service::interceptor::InterceptedService<
                tonic::transport::Channel,
                impl tonic::service::Interceptor + use<>,
            >,
        >,
    > {
        let bundle =
            cortexflow_trust::Bundle::from_pem(&std::fs::read(self.state_dir.join("ca.crt"))?)?;
        let trust = cortexflow_trust::TrustStore::new(TRUST_DOMAIN, bundle);
        let tls = cortexflow_trust::tls::client_config(
            None,
            trust,
            &cortexflow_domain::spiffe::node_agent(TRUST_DOMAIN, &a.name),
        )?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.grpc))?
            .connect_with_connector(cortexflow_trust::tls::connector(tls))
            .await?;
        let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
            token.map(|t| format!("Bearer {t}").parse()).transpose()?;
        Ok(FlowsClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                if let Some(h) = &header {
                    req.metadata_mut().insert("authorization", h.clone());
                }
                Ok(req)
            },
        ))
    }

    /// Streams every agent's flows into a shared list until the returned guard drops.
    pub async fn observe_flows(&self) -> anyhow::Result<FlowLog> {
        let flows = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for a in &self.agents {
            let mut c = self
                .flows_client(a, Some(&self.flows_token))
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

/// A load generator running inside a pod (the workload's `load`): new connections at a fixed
/// rate until [`Load::finish`]. Killed on drop.
pub struct Load {
    child: Option<std::process::Child>,
    what: String,
}

/// What a [`Load`] counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadCount {
    pub ok: u64,
    pub refused: u64,
    pub timeout: u64,
    pub error: u64,
    /// Up to ten failure lines.
    pub failures: Vec<String>,
}

impl LoadCount {
    /// Attempts that did not succeed.
    pub fn failed(&self) -> u64 {
        self.refused + self.timeout + self.error
    }
}

impl Load {
    /// Stops the generator (SIGTERM), waits for the attempts in flight, and reads the counts.
    pub fn finish(mut self) -> anyhow::Result<LoadCount> {
        let child = self.child.take().context("finished twice")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let head = lines
            .next()
            .with_context(|| format!("{}: no summary ({text:?})", self.what))?;
        let mut count = LoadCount::default();
        for field in head.split_whitespace() {
            let (k, v) = field.split_once('=').context("a field")?;
            let v: u64 = v.parse()?;
            match k {
                "ok" => count.ok = v,
                "refused" => count.refused = v,
                "timeout" => count.timeout = v,
                "error" => count.error = v,
                _ => {}
            }
        }
        count.failures = lines.map(str::to_string).collect();
        Ok(count)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Lab {
    /// Starts `rate` new `protocol` connections per second from pod `namespace/pod` to `target`
    /// (`ip:port`).
    pub fn load(
        &self,
        namespace: &str,
        pod: &str,
        protocol: &str,
        target: &str,
        rate: u32,
    ) -> anyhow::Result<Load> {
        let (netns, cgroup) = sim::locate(&self.state_dir, namespace, pod)?;
        let child = sim::exec_command(
            &netns,
            &cgroup,
            &[
                self.workload_bin.to_string_lossy().into_owned(),
                "load".into(),
                protocol.into(),
                target.into(),
                "--rate".into(),
                rate.to_string(),
                "--timeout-ms".into(),
                "1000".into(),
            ],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("start the load generator")?;
        Ok(Load {
            child: Some(child),
            what: format!("load from {namespace}/{pod} to {target}"),
        })
    }
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
