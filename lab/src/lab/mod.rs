//! The lab: a local mesh on a real control plane — etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on loopback, simulated nodes ([`crate::sim`]) each
//! with its real agent, the real operator, and the demo of `examples/lab/` (Deployments,
//! Services, ServiceIdentities, MeshPolicies). [`Lab::matrix`] probes who can reach whom from
//! inside the pods and takes each verdict and reason from the agents' flow events.
//!
//! Dropping a [`Lab`] removes everything it made: agents (and their pins), the operator, pods,
//! namespaces, cgroups, links, the control plane and its state.
//!
//! This module is the life cycle (start, stop, what the lab prints, `exec`); [`probe`] runs
//! probes inside pods and collects the agents' flow events; [`matrix`] is the demo's matrix.
pub mod gateway;
mod matrix;
mod probe;
mod service;

pub use matrix::{Cell, Expected, Probe, TargetKind, demo_matrix, render};
pub use probe::{FlowLog, Load, LoadCount, probe_command};
pub use service::OperatorService;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cortexflow_testkit::{
    node::{Agent, Control},
    process::{Daemon, Operator, OperatorOptions, binary, free_port, http_get},
    workspace_root,
};
use kube::Client;

use crate::{
    cluster::{Cluster, Lifetime},
    kubectl,
    sim::{self, Fabric, Images, SimNode},
};

/// The operator's namespace in the lab.
pub const SYSTEM_NAMESPACE: &str = "cortexflow";

/// How to run a lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub nodes: usize,
    /// Where the control plane, logs and pod records live (created; removed on drop).
    pub state_dir: PathBuf,
    /// The demo to apply (`examples/lab`), or none.
    pub demo: Option<PathBuf>,
    /// Image map files, after `lab/images.map` (later entries win): see that file.
    pub image_maps: Vec<PathBuf>,
}

impl LabOptions {
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            nodes: 2,
            state_dir,
            demo: Some(workspace_root().join("examples/lab")),
            image_maps: std::env::var_os("CORTEXFLOW_LAB_IMAGES")
                .map(|v| std::env::split_paths(&v).collect())
                .unwrap_or_default(),
        }
    }
}

/// A running lab. Fields drop in order: agents (their pins uninstalled), the operator, the
/// nodes (pods, namespaces, cgroups), the fabric, the control plane.
pub struct Lab {
    /// Prometheus, scraping the operator, every agent and the injected proxies.
    pub prometheus: Daemon,
    /// The proxies' targets file, kept by a watch of the pods.
    pub pod_targets: PodTargets,
    pub prometheus_addr: std::net::SocketAddr,
    pub agents: Vec<Agent>,
    pub operator: Operator,
    /// The operator's Service: what the agents subscribe to.
    pub operator_service: OperatorService,
    /// How pods reach the control plane ([`gateway`]).
    pub gateway: gateway::Gateway,
    pub nodes: Vec<SimNode>,
    pub fabric: Fabric,
    pub cluster: Cluster,
    pub client: Client,
    operator_opts: OperatorOptions,
    pub state_dir: PathBuf,
    pub workload_bin: PathBuf,
    /// How long each phase of the start took.
    pub timings: Vec<(&'static str, Duration)>,
    /// A token of [`FLOWS_READER`], for `Flows.Observe` on the agents' network port.
    pub flows_token: String,
    /// The first operator's admission webhook (HTTPS, a certificate for `localhost`).
    pub webhook: std::net::SocketAddr,
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
        let cni_bin = binary("cortexflow-agent", "cortexflow-cni")?;
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
        // Pods reach the apiserver at the `kubernetes` Service, relayed by the gateway.
        let mut gateway = gateway::Gateway::start(
            &fabric.ns,
            &nodes
                .iter()
                .map(|n| (n.pod_cidr.clone(), n.ip))
                .collect::<Vec<_>>(),
            &[(
                443,
                (std::net::Ipv4Addr::LOCALHOST, cluster.ports().apiserver).into(),
            )],
        )?;
        apply_json(&kubeconfig, &o.state_dir, &gateway::kubernetes_endpoints())?;
        let mut maps = vec![workspace_root().join("lab/images.map")];
        maps.extend(o.image_maps.iter().cloned());
        let mut images = Images::load(&maps, &mut |pkg, bin| binary(pkg, bin))?;
        // The cluster DNS's image runs the CoreDNS `cargo xtask setup` built.
        let coredns = cortexflow_testkit::tools::coredns_bin();
        anyhow::ensure!(
            coredns.is_file(),
            "{} is missing: run `cargo xtask setup`",
            coredns.display()
        );
        images
            .0
            .insert("registry.k8s.io/coredns/coredns".into(), coredns);
        // Each node's agent serves the CNI hook; the node simulator runs the plugin for every
        // pod, as a container runtime would after the pod network's plugin.
        let cni_socket = |n: &SimNode| o.state_dir.join("cni").join(format!("{}.sock", n.name));
        for n in &mut nodes {
            let cni = crate::sim::Cni {
                plugin: cni_bin.clone(),
                socket: cni_socket(n),
            };
            n.run(&client, images.clone(), &o.state_dir, Some(cni))
                .await?;
            n.serve_kubelet(&client, &cluster.kubelet_tls(), &o.state_dir)
                .await?;
        }
        lap("nodes", &mut timings);

        // The operator runs as the chart's ServiceAccount under the chart's RBAC (a token from
        // the TokenRequest API), never with the admin's credentials.
        let operator_kubeconfig = o.state_dir.join("operator.kubeconfig");
        crate::chart::operator_kubeconfig(
            &kubeconfig,
            "cortexflow",
            SYSTEM_NAMESPACE,
            &operator_kubeconfig,
        )?;
        let webhook: std::net::SocketAddr = (
            std::net::Ipv4Addr::LOCALHOST,
            cortexflow_testkit::process::free_port()?,
        )
            .into();
        let operator_opts = OperatorOptions {
            kubeconfig: operator_kubeconfig,
            namespace: SYSTEM_NAMESPACE.into(),
            identity: "operator-0".into(),
            lease_duration_secs: 15,
            log_dir: o.state_dir.join("logs"),
            // Short-lived certificates: every lab run renews every leaf every ~30 s under its
            // traffic, and a rotation test waits one lifetime before a root may go.
            env: vec![
                (
                    "CORTEXFLOW_CERT_LIFETIME_SECS".into(),
                    CERT_LIFETIME_SECS.to_string(),
                ),
                ("CORTEXFLOW_CA_POLL_SECS".into(), "1".into()),
                ("CORTEXFLOW_WEBHOOK_ADDR".into(), webhook.to_string()),
                ("CORTEXFLOW_WEBHOOK_DNS_NAMES".into(), "localhost".into()),
                // Injection on (the tests that install the chart's webhook configuration see it);
                // the proxy's image maps to the proxy built here (lab/images.map), and it asks
                // for its certificate at the operator's Service, as the chart sets it.
                ("CORTEXFLOW_INJECT_PROXY".into(), "true".into()),
                (
                    "CORTEXFLOW_PROXY_IMAGE".into(),
                    "ghcr.io/cortexflow/cortexflow-proxy:lab".into(),
                ),
                (
                    "CORTEXFLOW_PROXY_CA_ADDR".into(),
                    format!("{OPERATOR_SERVICE}.{SYSTEM_NAMESPACE}.svc:{OPERATOR_GRPC_PORT}"),
                ),
            ],
        };
        let mut operator = Operator::start(&operator_opts)?;
        operator.wait_ready(Duration::from_secs(60)).await?;
        let operator_service = OperatorService::start(vec![operator.grpc]).await?;
        // Pods reach the operator's gRPC port (the CA) at its Service, relayed by the gateway.
        gateway.forward(&fabric.ns, OPERATOR_GRPC_PORT, operator_service.addr)?;
        apply_json(
            &kubeconfig,
            &o.state_dir,
            &serde_json::json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": OPERATOR_SERVICE, "namespace": SYSTEM_NAMESPACE},
                "spec": {"ports": [{"name": "grpc", "port": OPERATOR_GRPC_PORT, "protocol": "TCP"}]},
            }),
        )?;
        apply_json(
            &kubeconfig,
            &o.state_dir,
            &gateway::endpoints(
                SYSTEM_NAMESPACE,
                OPERATOR_SERVICE,
                "grpc",
                OPERATOR_GRPC_PORT,
            ),
        )?;
        // What the agent DaemonSet's pods mount: the trust bundle the operator publishes, and a
        // token for the agent's ServiceAccount with the CA's audience, bound to the node (the
        // agents run as host processes in the nodes' namespaces; a pod's projected token would be
        // bound to its pod).
        let bundle_file = o.state_dir.join("ca.crt");
        wait_for_bundle(&kubeconfig, &bundle_file, Duration::from_secs(30)).await?;
        // The agents' API access (the DaemonSet's pods get it mounted): their ServiceAccount,
        // for authorizing Flows.Observe callers.
        let agent_kubeconfig = o.state_dir.join("agent.kubeconfig");
        crate::chart::account_kubeconfig(
            &kubeconfig,
            SYSTEM_NAMESPACE,
            AGENT_ACCOUNT,
            &agent_kubeconfig,
        )?;
        let agent_kubeconfig = agent_kubeconfig.to_string_lossy().into_owned();
        let flows_token = flows_reader_token(&kubeconfig)?;
        let mut agents = Vec::new();
        for n in &nodes {
            agent_token(&kubeconfig, &n.name, &o.state_dir)?;
            let socket = cni_socket(n).to_string_lossy().into_owned();
            let mut a = Agent::new(
                &agent_bin,
                &n.name,
                &n.ns.path(),
                &n.cgroup,
                &["--cni-socket", &socket, "--kubeconfig", &agent_kubeconfig],
            )?;
            a.start_agent(&control(&operator_service, &o.state_dir, &n.name))?;
            agents.push(a);
        }
        for a in &mut agents {
            a.wait_ready(Duration::from_secs(60)).await?;
        }
        lap("operator and agents", &mut timings);
        // Cluster DNS (CoreDNS behind kube-dns); the tests that use it wait for it.
        kubectl::ok(
            &kubeconfig,
            &[
                "apply",
                "-f",
                &workspace_root()
                    .join("lab/manifests/cluster-dns.yaml")
                    .to_string_lossy(),
            ],
        )?;
        // Prometheus scrapes the injected proxies at their pod addresses, through the gateway's
        // way into the pod network; the pods are found as the chart's PodMonitor finds them
        // (a container port named cf-admin), by a watch of the lab's (Debian's Prometheus is
        // built without kubernetes_sd).
        let pod_scrapes = gateway
            .pod_scrapes(&fabric.ns, (Ipv4Addr::new(10, 244, 0, 0), 16))
            .await?;
        let pods_sd = PodDiscovery {
            file: o.state_dir.join("prometheus").join("proxies.json"),
            proxy_url: format!("http://{pod_scrapes}"),
        };
        let pod_targets = PodTargets::start(client.clone(), pods_sd.file.clone())?;
        let (prometheus, prometheus_addr) =
            start_prometheus(&o.state_dir, &operator, &agents, &pods_sd)?;

        let lab = Self {
            prometheus,
            prometheus_addr,
            pod_targets,
            agents,
            operator,
            operator_service,
            gateway,
            nodes,
            fabric,
            cluster,
            client,
            operator_opts,
            state_dir: o.state_dir.clone(),
            workload_bin,
            timings,
            flows_token,
            webhook,
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

    /// How the agent of `node` reaches the control plane. The bundle file is refreshed from the
    /// `cortexflow-ca-bundle` ConfigMap first, as the kubelet keeps a mounted ConfigMap current
    /// (after a root rotation a restarted agent must bootstrap from the current bundle).
    pub fn control(&self, node: &str) -> Control {
        let c = control(&self.operator_service, &self.state_dir, node);
        if let Ok(pem) = kubectl::ok(
            &self.cluster.kubeconfig(),
            &[
                "get",
                "configmap",
                "-n",
                SYSTEM_NAMESPACE,
                "cortexflow-ca-bundle",
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ],
        ) && pem.contains("BEGIN CERTIFICATE")
        {
            let _ = std::fs::write(&c.bundle_file, pem);
        }
        c
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

    /// Kills the operator (SIGKILL: no drain, no Lease release) and starts it again at once
    /// where the agents expect it; waits until it is ready.
    pub async fn kill_and_restart_operator(&mut self) -> anyhow::Result<()> {
        restart(&self.operator_opts, &mut self.operator, true).await
    }

    /// Starts another operator replica (`identity`) behind the operator Service; waits until
    /// it is ready.
    pub async fn start_replica(&self, identity: &str) -> anyhow::Result<Operator> {
        let mut o = self.replica_opts();
        o.identity = identity.into();
        let mut op = Operator::start(&o)?;
        op.wait_ready(Duration::from_secs(60)).await?;
        self.operator_service.add(op.grpc);
        Ok(op)
    }

    /// Restarts replica `op` where it was (same identity, same addresses): SIGTERM, or SIGKILL
    /// when `kill`; waits until the new process is ready.
    pub async fn restart_replica(&self, op: &mut Operator, kill: bool) -> anyhow::Result<()> {
        restart(&self.replica_opts(), op, kill).await
    }

    /// How further replicas run: as the first, but with their webhook on a port of their own
    /// (the environment's last value wins).
    fn replica_opts(&self) -> OperatorOptions {
        let mut o = self.operator_opts.clone();
        o.env
            .push(("CORTEXFLOW_WEBHOOK_ADDR".into(), "127.0.0.1:0".into()));
        o
    }

    /// Restarts the first replica gracefully (SIGTERM), where it was.
    pub async fn restart_operator(&mut self) -> anyhow::Result<()> {
        restart(&self.operator_opts, &mut self.operator, false).await
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
            "jsonpath={range .items[*]}{.metadata.name} {.status.podIP} {.spec.nodeName} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ])?;
        // Terminating pods (a deletion timestamp) are going: never a target.
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (name, ip, node) = (f.next()?, f.next()?.parse().ok()?, f.next()?);
                f.next()
                    .is_none()
                    .then(|| (name.to_string(), ip, node.to_string()))
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
        out.push(format!(
            "mesh trust bundle: {}   flows reader token: kubectl create token -n {SYSTEM_NAMESPACE} {FLOWS_READER}",
            self.state_dir.join("ca.crt").display()
        ));
        for a in &self.agents {
            out.push(format!(
                "agent {} metrics: http://{}/metrics   flows: {} (TLS, bearer token) or {}",
                a.name,
                a.admin,
                a.grpc,
                a.flows_socket().display()
            ));
        }
        let agents: String = self
            .agents
            .iter()
            .map(|a| format!(" --agent {}={}", a.name, a.grpc))
            .collect();
        out.push(format!(
            "cfcli: cargo run -q -p cfcli --{agents} --token \"$(kubectl create token -n {SYSTEM_NAMESPACE} {FLOWS_READER})\" flows --last 20   (or: explain <ns/pod> <ns/pod> <port/proto>)"
        ));
        let agent_metrics: String = self
            .agents
            .iter()
            .map(|a| format!(" --agent-metrics {}={}", a.name, a.admin))
            .collect();
        out.push(format!(
            "cfcli: cargo run -q -p cfcli -- check --operator-metrics {}{agent_metrics} --prometheus http://{}   (or: status with the same flags; identities)",
            self.operator.admin, self.prometheus_addr
        ));
        for n in &self.nodes {
            out.push(format!(
                "node {}: {} in network namespace {}  (cargo xtask lab exec node/{} -- <cmd…>)",
                n.name, n.ip, n.ns.name, n.name
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

/// Stops `op` (SIGTERM, or SIGKILL when `kill`) and starts it again with its identity and
/// addresses; waits until it is ready.
async fn restart(opts: &OperatorOptions, op: &mut Operator, kill: bool) -> anyhow::Result<()> {
    if kill {
        op.daemon.kill();
    } else {
        op.daemon.stop(Duration::from_secs(15));
    }
    let mut o = opts.clone();
    o.identity = op.identity.clone();
    *op = Operator::start_at(&o, op.grpc, op.admin)?;
    op.wait_ready(Duration::from_secs(60)).await
}

/// Starts the Debian `prometheus` with the operator and the agents as static targets.
/// How the lab's Prometheus finds and reaches pods: the file [`PodTargets`] keeps, and the
/// gateway's HTTP proxy into the pod network.
struct PodDiscovery {
    file: PathBuf,
    proxy_url: String,
}

/// The injected proxies as Prometheus file_sd targets: every running pod with a container
/// port named `cf-admin` (what the chart's PodMonitor for proxies selects), with `namespace`,
/// `pod` and `node` labels; the file is rewritten (atomically) on every change. Stops on drop.
pub struct PodTargets(tokio::task::JoinHandle<()>);

impl PodTargets {
    fn start(client: Client, file: PathBuf) -> anyhow::Result<Self> {
        use futures::StreamExt as _;
        use k8s_openapi::api::core::v1::Pod;
        use kube::runtime::watcher;
        if let Some(d) = file.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&file, "[]")?;
        Ok(Self(tokio::spawn(async move {
            let api: kube::Api<Pod> = kube::Api::all(client);
            let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
            let mut pods: std::collections::BTreeMap<String, serde_json::Value> =
                Default::default();
            let mut written = String::new();
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        let key = format!(
                            "{}/{}",
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default()
                        );
                        match proxy_target(&p) {
                            Some(t) => pods.insert(key, t),
                            None => pods.remove(&key),
                        };
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        pods.remove(&format!(
                            "{}/{}",
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default()
                        ));
                    }
                    Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "pod targets: watch error (retrying)");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
                let text = serde_json::Value::Array(pods.values().cloned().collect()).to_string();
                if text != written {
                    let tmp = file.with_extension("json.tmp");
                    if std::fs::write(&tmp, &text)
                        .and_then(|()| std::fs::rename(&tmp, &file))
                        .is_ok()
                    {
                        written = text;
                    }
                }
            }
        })))
    }
}

impl Drop for PodTargets {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The file_sd target of a running pod with a `cf-admin` container port.
fn proxy_target(p: &k8s_openapi::api::core::v1::Pod) -> Option<serde_json::Value> {
    let ip = p.status.as_ref()?.pod_ip.clone()?;
    if p.status.as_ref()?.phase.as_deref() != Some("Running")
        || p.metadata.deletion_timestamp.is_some()
    {
        return None;
    }
    let spec = p.spec.as_ref()?;
    let port = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some("cf-admin"))?
        .container_port;
    Some(serde_json::json!({
        "targets": [format!("{ip}:{port}")],
        "labels": {
            "namespace": p.metadata.namespace.clone().unwrap_or_default(),
            "pod": p.metadata.name.clone().unwrap_or_default(),
            "node": spec.node_name.clone().unwrap_or_default(),
        },
    }))
}

fn start_prometheus(
    state_dir: &Path,
    operator: &Operator,
    agents: &[Agent],
    pods: &PodDiscovery,
) -> anyhow::Result<(Daemon, std::net::SocketAddr)> {
    let dir = state_dir.join("prometheus");
    std::fs::create_dir_all(dir.join("data"))?;
    // Each agent with its node's name as the `node` label (the chart's PodMonitor relabels
    // the pod's node name to it), which the dashboards' node variable selects on.
    let agent_targets: String = agents
        .iter()
        .map(|a| {
            format!(
                "      - targets: ['{}']\n        labels: {{node: '{}'}}\n",
                a.admin, a.name
            )
        })
        .collect();
    // The injected proxies ([`PodTargets`]), scraped through the gateway's HTTP proxy.
    let proxies = format!(
        "  - job_name: cortexflow-proxy\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 5s\n    proxy_url: {}\n",
        pods.file.display(),
        pods.proxy_url,
    );
    let config = format!(
        "global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\nscrape_configs:\n  - job_name: cortexflow-operator\n    static_configs:\n      - targets: ['{}']\n  - job_name: cortexflow-agent\n    static_configs:\n{}{proxies}",
        operator.admin, agent_targets
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

/// `cargo xtask lab exec <ns>/<pod>|node/<name> -- <cmd…>`: the command that runs `argv`
/// inside a lab pod (its network namespace and cgroup) or a lab node (its network namespace).
pub fn exec_command(
    state_dir: &Path,
    target: &str,
    argv: &[String],
) -> anyhow::Result<std::process::Command> {
    let Some((ns, name)) = target.split_once('/') else {
        bail!("{target:?}: expected <namespace>/<pod> or node/<name>");
    };
    if argv.is_empty() {
        bail!("nothing to run: cargo xtask lab exec <ns>/<pod>|node/<name> -- <cmd…>");
    }
    Ok(if ns == "node" {
        // A node: its network namespace (the host's view: the agent's links, routes, maps).
        let netns = sim::locate_node(state_dir, name)?;
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &netns]).args(argv);
        c
    } else {
        let (netns, cgroup) = sim::locate(state_dir, ns, name)?;
        sim::exec_command(&netns, &cgroup, argv)
    })
}

/// The operator's Service (the chart's name for release `cortexflow`) and its gRPC port.
pub const OPERATOR_SERVICE: &str = "cortexflow-operator";
pub const OPERATOR_GRPC_PORT: u16 = 8090;

/// `kubectl apply` of one object.
fn apply_json(kubeconfig: &Path, dir: &Path, object: &serde_json::Value) -> anyhow::Result<()> {
    let file = dir.join("apply.json");
    std::fs::write(&file, object.to_string())?;
    let r = kubectl::ok(kubeconfig, &["apply", "-f", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    r.map(drop)
}

/// Lifetime of the lab's certificates (the operator's minimum).
pub const CERT_LIFETIME_SECS: u64 = 60;

/// The agents' ServiceAccount (the chart's, release `cortexflow`).
pub const AGENT_ACCOUNT: &str = "cortexflow-agent";

/// The lab's reader of flows: a ServiceAccount bound to the chart's `cortexflow-flows-reader`
/// ClusterRole, as a user of `cfcli flows` would be.
pub const FLOWS_READER: &str = "cortexflow-lab-flows";

fn flows_reader_token(kubeconfig: &Path) -> anyhow::Result<String> {
    kubectl::ok(
        kubeconfig,
        &[
            "create",
            "serviceaccount",
            "-n",
            SYSTEM_NAMESPACE,
            FLOWS_READER,
        ],
    )?;
    kubectl::ok(
        kubeconfig,
        &[
            "create",
            "clusterrolebinding",
            FLOWS_READER,
            "--clusterrole=cortexflow-flows-reader",
            &format!("--serviceaccount={SYSTEM_NAMESPACE}:{FLOWS_READER}"),
        ],
    )?;
    Ok(kubectl::ok(
        kubeconfig,
        &[
            "create",
            "token",
            "-n",
            SYSTEM_NAMESPACE,
            FLOWS_READER,
            "--duration=24h",
        ],
    )?
    .trim()
    .to_string())
}

fn control(service: &OperatorService, state_dir: &Path, node: &str) -> Control {
    Control {
        url: service.url(),
        bundle_file: state_dir.join("ca.crt"),
        token_file: state_dir.join("tokens").join(node),
    }
}

/// A token of the agents' ServiceAccount for the CA (audience `cortexflow-ca`), bound to the
/// Node `node`, in `<state>/tokens/<node>`.
fn agent_token(kubeconfig: &Path, node: &str, state_dir: &Path) -> anyhow::Result<()> {
    let token = kubectl::ok(
        kubeconfig,
        &[
            "create",
            "token",
            "-n",
            SYSTEM_NAMESPACE,
            AGENT_ACCOUNT,
            // The only audience the operator's CA accepts (`cortexflow_trust::TOKEN_AUDIENCE`).
            "--audience",
            "cortexflow-ca",
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            node,
            "--duration=24h",
        ],
    )?;
    let dir = state_dir.join("tokens");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(node), token.trim())?;
    Ok(())
}

/// Waits until the operator published the trust bundle, and writes it to `file`.
async fn wait_for_bundle(
    kubeconfig: &std::path::Path,
    file: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pem = kubectl::ok(
            kubeconfig,
            &[
                "get",
                "configmap",
                "-n",
                SYSTEM_NAMESPACE,
                "cortexflow-ca-bundle",
                "--ignore-not-found",
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ],
        )?;
        if pem.contains("BEGIN CERTIFICATE") {
            std::fs::write(file, pem)?;
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the operator did not publish the trust bundle (ConfigMap cortexflow-ca-bundle) within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
