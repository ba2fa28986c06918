//! The node simulator of the lab: what a kubelet and a container runtime do, on one machine.
//!
//! A [`Fabric`] is the network between nodes: a bridge in its own namespace. Each [`SimNode`]
//! is a network namespace plugged into it (address 172.30.0.<n+1>, routes to every other
//! node's pod CIDR), a cgroup, and a Kubernetes Node object (pod CIDR 10.244.<n>.0/24, Ready,
//! heartbeated). It watches the pods bound to it and, for each, does what the kubelet and the
//! CNI would: a network namespace, a veth with an address from the pod CIDR and a /32 host
//! route (a routed CNI), a cgroup under the node's, each container's command (image names map
//! to local binaries) run as the kubelet runs them — init containers, native sidecars, restarts
//! with back-off and probes ([`crate::containers`]) — and the pod status (podIP, phase,
//! container states, conditions). A pod is Ready when its containers are ready **and** every
//! condition named in `spec.readinessGates` is True — exactly the kubelet's rule. A pod being deleted gets SIGTERM, up to its grace period to
//! exit, then SIGKILL; its namespace and cgroup are removed and the object deleted for good
//! (grace period 0), as the kubelet does.
//!
//! Where each pod lives is written to `<state_dir>/pods/<namespace>_<name>` (namespace name and
//! cgroup path), which `cargo xtask lab exec` reads.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::watcher,
};
use serde_json::json;
use tokio::sync::watch;

use cortexflow_testkit::net::{Netns, sh, try_wire_pod};

/// `sh -c` script that puts itself into cgroup `$0`, then runs `$2…` in network namespace `$1`
/// (joining the cgroup first: `ip netns exec` remounts /sys).
const SANDBOX: &str =
    "echo $$ > \"$0/cgroup.procs\" && ns=\"$1\" && shift && exec ip netns exec \"$ns\" \"$@\"";

/// As [`SANDBOX`] for a container: `$2` is a script run first inside the namespace (its own
/// mount namespace, from `ip netns exec`: the volume mounts), which ends by exec'ing `$3…`.
const CONTAINER_SANDBOX: &str = "echo $$ > \"$0/cgroup.procs\" && ns=\"$1\" && inner=\"$2\" && shift 2 && exec ip netns exec \"$ns\" sh -c \"$inner\" sh \"$@\"";

/// The cluster DNS (the kube-dns Service of `lab/manifests/cluster-dns.yaml`).
pub const CLUSTER_DNS: &str = "10.96.0.10";

/// The cgroup v2 root the lab's cgroups live under.
pub const CGROUP_ROOT: &str = cortexflow_testkit::net::CGROUP2_ROOT;

/// The network between the nodes.
pub struct Fabric {
    pub ns: Netns,
}

impl Fabric {
    pub fn new() -> anyhow::Result<Self> {
        let ns = Netns::new("cfn");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Ok(Self { ns })
    }
}

/// How the simulator runs containers: image name (without tag) → local binary.
#[derive(Clone, Debug, Default)]
pub struct Images(pub BTreeMap<String, PathBuf>);

impl Images {
    /// Reads image map files (see `lab/images.map`): `<image> <package>:<binary>` (built with
    /// `build(package, binary)`) or `<image> /absolute/path`; `#` comments. A later entry for
    /// the same image wins. Errors name the file and line.
    pub fn load(
        files: &[PathBuf],
        build: &mut dyn FnMut(&str, &str) -> anyhow::Result<PathBuf>,
    ) -> anyhow::Result<Self> {
        let mut map = BTreeMap::new();
        for f in files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("image map {}", f.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.split('#').next().unwrap_or("").trim();
                if line.is_empty() {
                    continue;
                }
                let at = || format!("{}:{}", f.display(), n + 1);
                let mut words = line.split_whitespace();
                let (Some(image), Some(target), None) = (words.next(), words.next(), words.next())
                else {
                    anyhow::bail!(
                        "{}: want `<image> <package>:<binary>` or `<image> /path`, got {line:?}",
                        at()
                    );
                };
                anyhow::ensure!(
                    !image.contains(':')
                        || image.rsplit_once(':').is_some_and(|(_, t)| t.contains('/')),
                    "{}: image {image:?}: give the name without a tag",
                    at()
                );
                let program = if target.starts_with('/') {
                    let p = PathBuf::from(target);
                    anyhow::ensure!(p.is_file(), "{}: {target} is not a file", at());
                    p
                } else {
                    let (pkg, bin) = target.split_once(':').with_context(|| {
                        format!("{}: {target:?} is neither /path nor package:binary", at())
                    })?;
                    build(pkg, bin).with_context(|| format!("{}: build {target}", at()))?
                };
                map.insert(image.to_string(), program);
            }
        }
        Ok(Self(map))
    }

    fn binary(&self, image: &str) -> Option<&PathBuf> {
        let name = image.rsplit_once(':').map_or(image, |(n, _)| n);
        self.0.get(name)
    }
}

/// The CNI hook: the plugin the simulator runs for every new pod (as a container runtime does
/// after the pod network's plugin), and the agent's socket it talks to.
#[derive(Clone, Debug)]
pub struct Cni {
    pub plugin: PathBuf,
    pub socket: PathBuf,
}

impl Cni {
    /// `ADD` for a pod whose host-side interface is `host_if` with address `ip`: returns once
    /// the node's agent guards the interface.
    fn add(&self, host_if: &str, ip: Ipv4Addr, netns: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "lab",
            "type": "cortexflow-cni",
            "socket": self.socket,
            "timeoutSeconds": 30,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": host_if}, {"name": "eth0", "sandbox": format!("/var/run/netns/{netns}")}],
                "ips": [{"address": format!("{ip}/32"), "interface": 1}]
            }
        });
        let mut child = Command::new(&self.plugin)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", netns)
            .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/opt/cni/bin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {}", self.plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(conf.to_string().as_bytes())?;
        }
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "CNI ADD for {host_if}: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(())
    }
}

/// A variable of a container's environment.
enum EnvValue {
    Set(String),
    /// `status.podIP`: known once the sandbox has its address.
    PodIp,
}

/// What one container runs.
struct Run {
    bin: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, EnvValue)>,
    /// The container's volume mounts.
    mounts: Vec<crate::volumes::Mount>,
    log: PathBuf,
}

/// A pod's containers before its sandbox exists.
struct Prepared {
    pod: crate::containers::Pod,
    runs: Vec<Run>,
    volumes: crate::volumes::Volumes,
}

/// A pod the node runs.
struct SimPod {
    /// The pod's own network namespace, held for its drop (deleting it removes the veth too);
    /// `None` for a host-network pod, which runs in the node's.
    own_netns: Option<Netns>,
    /// The namespace its containers run in.
    netns: String,
    ip: Ipv4Addr,
    cgroup: PathBuf,
    /// `namespace/name`, for logs.
    key: String,
    pod: crate::containers::Pod,
    runs: Vec<Run>,
    /// Each container's current process.
    children: Vec<Option<Child>>,
    /// Each container's last start and exit (RFC 3339).
    /// Each container's current (or last) run and the run before it: start and exit, RFC 3339.
    times: Vec<[Option<String>; 4]>,
    state_file: PathBuf,
    /// What the status last written said (without timestamps).
    reported: Option<serde_json::Value>,
    /// The pod's volumes (removed with the pod).
    volumes: crate::volumes::Volumes,
}

impl SimPod {
    /// A pod whose sandbox is ready (`netns`: the namespace its containers run in, and the
    /// pod's own namespace to hold, if it has one); no container runs yet.
    fn new(
        key: String,
        netns: (String, Option<Netns>),
        ip: Ipv4Addr,
        cgroup: PathBuf,
        state_file: PathBuf,
        prepared: Prepared,
    ) -> Self {
        let n = prepared.runs.len();
        Self {
            netns: netns.0,
            own_netns: netns.1,
            ip,
            cgroup,
            key,
            children: (0..n).map(|_| None).collect(),
            times: vec![[None, None, None, None]; n],
            pod: prepared.pod,
            runs: prepared.runs,
            state_file,
            reported: None,
            volumes: prepared.volumes,
        }
    }

    /// Whether any container still runs.
    fn running(&mut self) -> bool {
        self.children
            .iter_mut()
            .flatten()
            .any(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The pod's record for `lab exec` and the tests: its namespace, cgroup, address and the
    /// first app container's process (the sandbox script execs into it: the same pid; 0 until
    /// it runs).
    fn write_state_file(&self, pid: u32) -> std::io::Result<()> {
        std::fs::write(
            &self.state_file,
            format!(
                "{}\n{}\n{}\n{}\n{pid}\n",
                self.key,
                self.netns,
                self.cgroup.display(),
                self.ip
            ),
        )
    }

    /// Starts container `i` in the pod's namespace and cgroup.
    fn spawn(&self, i: usize) -> anyhow::Result<Child> {
        let r = &self.runs[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&r.log)?;
        let (ns_name, name) = self.key.split_once('/').unwrap_or(("", &self.key));
        for m in &r.mounts {
            crate::volumes::ensure_target(m)?;
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", "sh", "-c"])
            .arg(CONTAINER_SANDBOX)
            .arg(&self.cgroup)
            .arg(&self.netns)
            .arg(format!(
                "{}exec \"$@\"",
                crate::volumes::mount_script(&r.mounts)
            ))
            .arg(&r.bin)
            .args(&r.argv)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", ns_name)
            .env("HOSTNAME", name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &r.env {
            match v {
                EnvValue::Set(v) => cmd.env(k, v),
                EnvValue::PodIp => cmd.env(k, self.ip.to_string()),
            };
        }
        cmd.spawn()
            .with_context(|| format!("run {}", r.bin.display()))
    }

    /// The status to write, and what it says without timestamps (to know when it changed).
    fn status(
        &self,
        node_ip: Ipv4Addr,
        gates_true: bool,
        old: &k8s_openapi::api::core::v1::PodStatus,
    ) -> (serde_json::Value, serde_json::Value) {
        use crate::containers::Kind;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let tf = |b: bool| if b { "True" } else { "False" };
        let phase = self.pod.phase();
        let containers_ready = self.pod.containers_ready();
        let ready = containers_ready && gates_true;
        let mut init = Vec::new();
        let mut apps = Vec::new();
        let mut keys = Vec::new();
        for (i, (spec, st)) in self.pod.specs.iter().zip(&self.pod.states).enumerate() {
            let [started, finished, prev_started, prev_finished] = &self.times[i];
            let terminated = |code: i32, from: &Option<String>, to: &Option<String>| {
                json!({"terminated": {"exitCode": code,
                    "reason": if code == 0 { "Completed" } else { "Error" },
                    "startedAt": from, "finishedAt": to}})
            };
            let (state, state_key) = if st.running {
                (
                    json!({"running": {"startedAt": started}}),
                    "running".to_string(),
                )
            } else if st.next_start.is_some() {
                (
                    json!({"waiting": {"reason": "CrashLoopBackOff",
                        "message": format!("back-off restarting the failed container {}", spec.name)}}),
                    "backoff".to_string(),
                )
            } else if let Some(code) = st.last_exit {
                (
                    terminated(code, started, finished),
                    format!("exited {code}"),
                )
            } else {
                let reason = if spec.kind == Kind::App {
                    "PodInitializing"
                } else {
                    "Waiting"
                };
                (
                    json!({"waiting": {"reason": reason}}),
                    "waiting".to_string(),
                )
            };
            // The run before this one (a restarted container, or one waiting to restart).
            let last_state = match st.last_exit {
                Some(code) if st.running && st.restarts > 0 => {
                    terminated(code, prev_started, prev_finished)
                }
                Some(code) if st.next_start.is_some() => terminated(code, started, finished),
                _ => json!({}),
            };
            let c_ready = st.running && st.ready && spec.kind != Kind::Init
                || spec.kind == Kind::Init && st.completed;
            let entry = json!({
                "name": spec.name, "image": spec.image, "imageID": "",
                "ready": c_ready, "started": st.running, "restartCount": st.restarts,
                "state": state, "lastState": last_state,
            });
            keys.push(json!([spec.name, state_key, st.restarts, c_ready]));
            if spec.kind == Kind::App {
                apps.push(entry);
            } else {
                init.push(entry);
            }
        }
        let key = json!({"phase": phase, "ready": ready, "containersReady": containers_ready,
            "initialized": self.pod.initialized, "containers": keys, "ip": self.ip.to_string()});
        let patch = json!({"status": {
            "phase": phase,
            "hostIP": node_ip.to_string(),
            "hostIPs": [{"ip": node_ip.to_string()}],
            "podIP": self.ip.to_string(),
            "podIPs": [{"ip": self.ip.to_string()}],
            "startTime": old.start_time.as_ref().map(|t| t.0.to_string()).unwrap_or_else(|| now.clone()),
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": tf(self.pod.initialized), "lastTransitionTime": now},
                {"type": "ContainersReady", "status": tf(containers_ready), "lastTransitionTime": now},
                {"type": "Ready", "status": tf(ready), "lastTransitionTime": now,
                 "reason": if ready { "" } else if containers_ready { "ReadinessGatesNotReady" } else { "ContainersNotReady" }},
            ],
            "initContainerStatuses": init,
            "containerStatuses": apps,
        }});
        (key, patch)
    }
}

impl Drop for SimPod {
    fn drop(&mut self) {
        for c in self.children.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_cgroup(&self.cgroup);
        let _ = std::fs::remove_file(&self.state_file);
        let _ = std::fs::remove_dir_all(&self.volumes.dir);
        if self.own_netns.is_some() {
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.netns));
        }
        // The namespace (and the veth with it) goes when `ns` drops.
    }
}

/// A probe from the node's network namespace `node_ns` to the pod at `ip`: a TCP connection,
/// or an HTTP GET answered 200–399, within `timeout`. On a thread of its own (it enters the
/// namespace; never a pooled thread).
async fn probe_from(
    node_ns: &str,
    ip: Ipv4Addr,
    check: &crate::containers::Check,
    timeout: Duration,
) -> bool {
    use std::io::{Read as _, Write as _};
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = Path::new("/var/run/netns").join(node_ns);
    let check = check.clone();
    std::thread::spawn(move || {
        let result = (|| -> anyhow::Result<bool> {
            cortexflow_testkit::net::enter(&path)?;
            let port = match &check {
                crate::containers::Check::Http { port, .. }
                | crate::containers::Check::Tcp { port } => *port,
            };
            let mut s = std::net::TcpStream::connect_timeout(&(ip, port).into(), timeout)?;
            let crate::containers::Check::Http { path, .. } = &check else {
                return Ok(true);
            };
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/lab\r\nConnection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head)?;
            let line = String::from_utf8_lossy(&head[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            Ok((200..400).contains(&code))
        })();
        let _ = tx.send(result.unwrap_or(false));
    });
    tokio::time::timeout(timeout + Duration::from_secs(1), rx)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(false)
}

/// Removes a cgroup after moving what is left in it to the root.
fn remove_cgroup(path: &Path) {
    if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = std::fs::write(Path::new(CGROUP_ROOT).join("cgroup.procs"), pid);
        }
    }
    let _ = std::fs::remove_dir(path);
}

struct NodeState {
    pods: BTreeMap<String, SimPod>,
    /// Pods being stopped (their grace period runs).
    terminating: std::collections::BTreeSet<String>,
    /// Addresses of stopped pods whose sandboxes are not removed yet: not handed out again.
    draining: std::collections::BTreeSet<Ipv4Addr>,
    /// The host part of the address handed out last: addresses go round the CIDR (as
    /// host-local IPAM does), so a freed address is the last to be reused.
    last_host: u8,
    /// The tasks stopping pods (each holds its pod until the container exited): aborted, and
    /// their pods removed, on shutdown.
    stopping: Vec<tokio::task::JoinHandle<()>>,
    /// Pods whose sandbox failed: when to try again, and the back-off after that.
    retry: BTreeMap<String, (std::time::Instant, Duration)>,
    next_if: u32,
}

/// A simulated node.
pub struct SimNode {
    pub name: String,
    pub index: u8,
    pub ns: Netns,
    /// The node's address on the fabric (its InternalIP).
    pub ip: Ipv4Addr,
    /// A second address of the node, on its loopback, that `Node.status.addresses` does not
    /// list (as a real node has addresses on other interfaces): still the host.
    pub extra_ip: Ipv4Addr,
    /// The pod CIDR, 10.244.<index>.0/24.
    pub pod_cidr: String,
    /// The node's cgroup; every pod's cgroup is below it.
    pub cgroup: PathBuf,
    state: Arc<Mutex<NodeState>>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    uplink: String,
    fabric: String,
    /// The kubelet API's loopback port (0 until [`SimNode::serve_kubelet`]).
    kubelet_port: Arc<std::sync::atomic::AtomicU16>,
}

impl SimNode {
    /// Creates node `index` (0-based) on `fabric`. Call [`SimNode::route_to`] for the other
    /// nodes and [`SimNode::run`] to register it and run its pods.
    pub fn new(fabric: &Fabric, name: &str, index: u8) -> anyhow::Result<Self> {
        let ns = Netns::new("cfn");
        ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let ip = Ipv4Addr::new(172, 30, 0, index + 1);
        let uplink = format!("cfu{}x{index}", std::process::id());
        sh(&[
            "ip",
            "link",
            "add",
            &uplink,
            "netns",
            &fabric.ns.name,
            "type",
            "veth",
            "peer",
            "name",
            "uplink",
            "netns",
            &ns.name,
        ]);
        fabric.ns.ip(&["link", "set", &uplink, "master", "br0"]);
        fabric.ns.ip(&["link", "set", &uplink, "up"]);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "uplink"]);
        let extra_ip = Ipv4Addr::new(192, 168, 250, index + 1);
        ns.ip(&["addr", "add", &format!("{extra_ip}/32"), "dev", "lo"]);
        ns.ip(&["link", "set", "uplink", "up"]);
        let cgroup = Path::new(CGROUP_ROOT).join(cortexflow_testkit::net::unique("cftest-"));
        std::fs::create_dir_all(&cgroup)
            .with_context(|| format!("create cgroup {}", cgroup.display()))?;
        Ok(Self {
            name: name.to_string(),
            index,
            ns,
            ip,
            extra_ip,
            pod_cidr: format!("10.244.{index}.0/24"),
            cgroup,
            state: Arc::new(Mutex::new(NodeState {
                pods: BTreeMap::new(),
                terminating: Default::default(),
                draining: Default::default(),
                last_host: 0,
                retry: BTreeMap::new(),
                stopping: Vec::new(),
                next_if: 0,
            })),
            stop: watch::channel(false).0,
            tasks: Vec::new(),
            uplink,
            fabric: fabric.ns.name.clone(),
            kubelet_port: Default::default(),
        })
    }

    /// Where this node's host paths are ([`crate::volumes::NodePaths`]), under `state_dir`.
    pub fn node_paths(&self, state_dir: &Path) -> crate::volumes::NodePaths {
        crate::volumes::NodePaths {
            root: state_dir.join("node-roots").join(&self.name),
        }
    }

    /// Serves this node's kubelet API ([`crate::kubelet`]) and publishes its port in the Node's
    /// status: `kubectl logs` of its pods works from then on.
    pub async fn serve_kubelet(
        &mut self,
        client: &Client,
        tls: &crate::kubelet::KubeletTls,
        state_dir: &Path,
    ) -> anyhow::Result<()> {
        let mut stop = self.stop.subscribe();
        let (port, task) = crate::kubelet::start(
            client.clone(),
            &self.name,
            state_dir.join("pods"),
            tls,
            async move {
                let _ = stop.changed().await;
            },
        )
        .await?;
        self.tasks.push(task);
        self.kubelet_port
            .store(port, std::sync::atomic::Ordering::Relaxed);
        register(client, &self.name, self.ip, &self.pod_cidr, port).await
    }

    /// Routes `other`'s pod CIDR through its fabric address.
    pub fn route_to(&self, other: &SimNode) {
        self.ns.ip(&[
            "route",
            "replace",
            &other.pod_cidr,
            "via",
            &other.ip.to_string(),
        ]);
    }

    /// Registers the Node object (Ready, heartbeated every 10 s) and starts running the pods
    /// bound to it.
    pub async fn run(
        &mut self,
        client: &Client,
        images: Images,
        state_dir: &Path,
        cni: Option<Cni>,
    ) -> anyhow::Result<()> {
        register(client, &self.name, self.ip, &self.pod_cidr, 0).await?;
        std::fs::create_dir_all(state_dir.join("pods"))?;
        // The node's handle for `lab exec node/<name>`: its network namespace.
        std::fs::create_dir_all(state_dir.join("nodes"))?;
        std::fs::write(
            state_dir.join("nodes").join(&self.name),
            format!("{}\n{}\n", self.ns.name, self.ip),
        )?;
        let ctx = Arc::new(PodCtx {
            client: client.clone(),
            node: self.name.clone(),
            node_ip: self.ip,
            node_ns: self.ns.name.clone(),
            index: self.index,
            cgroup: self.cgroup.clone(),
            images,
            state_dir: state_dir.to_path_buf(),
            state: self.state.clone(),
            cni,
            node_paths: self.node_paths(state_dir),
        });
        let mut stop = self.stop.subscribe();
        let (c, name, ip, cidr, kubelet) = (
            client.clone(),
            self.name.clone(),
            self.ip,
            self.pod_cidr.clone(),
            self.kubelet_port.clone(),
        );
        self.tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = stop.changed() => return,
                }
                let port = kubelet.load(std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = register(&c, &name, ip, &cidr, port).await {
                    tracing::warn!(node = %name, error = %format!("{e:#}"), "node heartbeat failed");
                }
            }
        }));
        let mut stop = self.stop.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let api: Api<Pod> = Api::all(ctx.client.clone());
            let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node));
            let mut events = std::pin::pin!(watcher::watcher(api, cfg));
            // Processes whose pods' objects are gone, and container exits, are noticed by a
            // periodic pass too.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut known: BTreeMap<String, Pod> = BTreeMap::new();
            loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                            known.insert(p.uid().unwrap_or_default(), p.clone());
                            ctx.sync(&p).await;
                        }
                        Some(Ok(watcher::Event::Delete(p))) => {
                            let uid = p.uid().unwrap_or_default();
                            known.remove(&uid);
                            ctx.forget(&uid);
                        }
                        Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "pod watch error (retrying)");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        None => return,
                    },
                    _ = tick.tick() => {
                        for p in known.values() {
                            ctx.sync(p).await;
                        }
                    }
                    _ = stop.changed() => return,
                }
            }
        }));
        Ok(())
    }

    /// The pods this node runs: `namespace/name → address`.
    pub fn pods(&self) -> BTreeMap<String, Ipv4Addr> {
        self.state
            .lock()
            .map(|s| {
                s.pods
                    .values()
                    .filter_map(|p| {
                        let f = std::fs::read_to_string(&p.state_file).ok()?;
                        Some((f.lines().next()?.to_string(), p.ip))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Stops watching and removes every pod (processes, namespaces, cgroups).
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        // Pods being stopped: their tasks hold them; aborting drops them (SIGKILL, namespace
        // and cgroup removed) before this returns.
        let stopping = match self.state.lock() {
            Ok(mut s) => {
                s.pods.clear();
                std::mem::take(&mut s.stopping)
            }
            Err(_) => Vec::new(),
        };
        for t in stopping {
            t.abort();
            let _ = t.await;
        }
        crate::volumes::remove_created_targets();
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(mut s) = self.state.lock() {
            s.pods.clear();
            for t in s.stopping.drain(..) {
                t.abort();
            }
        }
        remove_cgroup(&self.cgroup);
        crate::volumes::remove_created_targets();
        let _ = Command::new("ip")
            .args(["-n", &self.fabric, "link", "del", &self.uplink])
            .status();
    }
}

/// Creates or refreshes the Node object and its status (Ready, addresses, capacity, and the
/// kubelet API's port once it serves: `kubelet_port` 0 is none yet).
async fn register(
    client: &Client,
    name: &str,
    ip: Ipv4Addr,
    pod_cidr: &str,
    kubelet_port: u16,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "cortexflow.io/lab": "true"}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    }))?;
    match api.create(&PostParams::default(), &n).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("create node"),
    }
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let resources = json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
    let mut addresses = vec![
        json!({"type": "InternalIP", "address": ip.to_string()}),
        json!({"type": "Hostname", "address": name}),
    ];
    if kubelet_port != 0 {
        // Where the apiserver reaches the kubelet API (on the machine's loopback).
        addresses.push(json!({"type": "InternalDNS", "address": "localhost"}));
    }
    let status = json!({"status": {
        "addresses": addresses,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "cortexflow lab node simulator",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "nodeInfo": {"kubeletVersion": "v1.37.1-cortexflow-sim", "operatingSystem": "linux",
                     "architecture": "amd64", "containerRuntimeVersion": "cortexflow-sim://0.1",
                     "kernelVersion": "", "osImage": "", "kubeProxyVersion": "",
                     "machineID": "", "systemUUID": "", "bootID": ""},
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .context("set node status")?;
    Ok(())
}

struct PodCtx {
    client: Client,
    node: String,
    node_ip: Ipv4Addr,
    node_ns: String,
    index: u8,
    cgroup: PathBuf,
    images: Images,
    state_dir: PathBuf,
    state: Arc<Mutex<NodeState>>,
    cni: Option<Cni>,
    node_paths: crate::volumes::NodePaths,
}

impl PodCtx {
    /// Brings the pod's sandbox and status in line with its object.
    async fn sync(&self, p: &Pod) {
        let uid = p.uid().unwrap_or_default();
        let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
        if p.metadata.deletion_timestamp.is_some() {
            self.terminate(p, &uid);
            return;
        }
        let started = self
            .state
            .lock()
            .map(|s| s.pods.contains_key(&uid))
            .unwrap_or(false);
        if !started {
            let now = std::time::Instant::now();
            let waiting = self
                .state
                .lock()
                .ok()
                .and_then(|s| s.retry.get(&uid).map(|(at, _)| *at > now))
                .unwrap_or(false);
            if waiting {
                return;
            }
            let started = match self.prepare(p).await {
                Ok(prepared) => self.start(p, &uid, prepared),
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                // A kubelet backs off a failing sandbox (1 s doubling to 30 s) and says why once
                // per attempt: never a retry storm.
                let delay = self.state.lock().ok().map(|mut s| {
                    let next = s
                        .retry
                        .get(&uid)
                        .map(|(_, d)| (*d * 2).min(Duration::from_secs(30)))
                        .unwrap_or(Duration::from_secs(1));
                    s.retry.insert(uid.clone(), (now + next, next));
                    next
                });
                tracing::warn!(pod = %format!("{ns}/{name}"), error = %format!("{e:#}"), retry_in = ?delay, "pod sandbox failed");
                let _ = self.failed(p, &format!("{e:#}")).await;
                return;
            }
            if let Ok(mut s) = self.state.lock() {
                s.retry.remove(&uid);
            }
        }
        self.advance(&uid);
        self.refresh_tokens(p, &uid).await;
        self.run_probes(&uid).await;
        if let Err(e) = self.report(p, &uid).await {
            tracing::warn!(pod = %format!("{ns}/{name}"), error = %format!("{e:#}"), "pod status update failed (retrying)");
        }
    }

    fn forget(&self, uid: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.pods.remove(uid);
            s.terminating.remove(uid);
            s.retry.remove(uid);
        }
    }

    /// What the kubelet does for a pod being deleted: SIGTERM, up to the grace period for the
    /// container to exit, SIGKILL, the sandbox removed, then the object deleted for good.
    fn terminate(&self, p: &Pod, uid: &str) {
        let taken = match self.state.lock() {
            Ok(mut s) => {
                if !s.terminating.insert(uid.to_string()) {
                    return;
                }
                s.retry.remove(uid);
                let sp = s.pods.remove(uid);
                if let Some(sp) = &sp {
                    s.draining.insert(sp.ip);
                }
                sp
            }
            Err(_) => return,
        };
        let state = self.state.clone();
        let grace = p
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .clamp(0, 300) as u64;
        let (client, ns, name, uid) = (
            self.client.clone(),
            p.namespace().unwrap_or_default(),
            p.name_any(),
            uid.to_string(),
        );
        let task = tokio::spawn(async move {
            if let Some(mut sp) = taken {
                // SIGTERM to every container at once (the kubelet stops app containers, then
                // sidecars in reverse order; the lab does not order them).
                for c in sp.children.iter().flatten() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(c.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let deadline = std::time::Instant::now() + Duration::from_secs(grace);
                while std::time::Instant::now() < deadline && sp.running() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // SIGKILL if still there, cgroup and namespace removed.
                let ip = sp.ip;
                drop(sp);
                if let Ok(mut s) = state.lock() {
                    s.draining.remove(&ip);
                }
            }
            // The object goes for good; a failed request is retried (a pod left Terminating
            // with no sandbox would still be listed as Running, and reached at an address that
            // is gone).
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(kube::api::Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let mut delay = Duration::from_millis(100);
            for attempt in 1..=30 {
                match api.delete(&name, &params).await {
                    Ok(_) => break,
                    // Gone already, or a new pod of that name (the precondition): done.
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => break,
                    Err(e) => {
                        tracing::warn!(pod = %format!("{ns}/{name}"), attempt, error = %e, "deleting a stopped pod failed (retrying)");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                }
            }
        });
        if let Ok(mut s) = self.state.lock() {
            s.stopping.retain(|t| !t.is_finished());
            s.stopping.push(task);
        }
    }

    /// The container's environment as the kubelet builds it: `envFrom` (ConfigMaps and
    /// Secrets, every key), then `env` — plain values, the downward API (`fieldRef`), ConfigMap
    /// and Secret keys. A source the lab cannot provide (a missing non-optional ConfigMap or
    /// key, `resourceFieldRef`, an unknown field path) fails the pod with the reason, never a
    /// silently missing variable. `status.podIP` is filled in once the address is chosen.
    async fn resolve_env(
        &self,
        p: &Pod,
        c: &k8s_openapi::api::core::v1::Container,
    ) -> anyhow::Result<Vec<(String, EnvValue)>> {
        let ns = p.namespace().unwrap_or_default();
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let config_map = |name: String, optional: bool| {
            let cms = cms.clone();
            async move {
                match cms.get_opt(&name).await? {
                    Some(cm) => Ok(Some(cm.data.unwrap_or_default())),
                    None if optional => Ok(None),
                    None => anyhow::bail!("ConfigMap {name:?} not found"),
                }
            }
        };
        let secret = |name: String, optional: bool| {
            let secrets = secrets.clone();
            async move {
                match secrets.get_opt(&name).await? {
                    Some(s) => Ok(Some(
                        s.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                            .collect::<BTreeMap<_, _>>(),
                    )),
                    None if optional => Ok(None),
                    None => anyhow::bail!("Secret {name:?} not found"),
                }
            }
        };
        let mut out: Vec<(String, EnvValue)> = Vec::new();
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            let data = if let Some(r) = &from.config_map_ref {
                config_map(r.name.clone(), r.optional.unwrap_or(false)).await?
            } else if let Some(r) = &from.secret_ref {
                secret(r.name.clone(), r.optional.unwrap_or(false)).await?
            } else {
                anyhow::bail!("envFrom without configMapRef or secretRef");
            };
            for (k, v) in data.into_iter().flatten() {
                out.push((format!("{prefix}{k}"), EnvValue::Set(v)));
            }
        }
        for e in c.env.iter().flatten() {
            let value = match (&e.value, &e.value_from) {
                (Some(v), _) => Some(EnvValue::Set(v.clone())),
                (None, None) => Some(EnvValue::Set(String::new())),
                (None, Some(from)) => {
                    if let Some(f) = &from.field_ref {
                        Some(self.field(p, &f.field_path).with_context(|| {
                            format!("env {}: fieldRef {}", e.name, f.field_path)
                        })?)
                    } else if let Some((kind, name, key, optional)) =
                        match (&from.config_map_key_ref, &from.secret_key_ref) {
                            (Some(r), _) => Some(("ConfigMap", &r.name, &r.key, r.optional)),
                            (None, Some(r)) => Some(("Secret", &r.name, &r.key, r.optional)),
                            (None, None) => None,
                        }
                    {
                        let optional = optional.unwrap_or(false);
                        let data = if kind == "ConfigMap" {
                            config_map(name.clone(), optional).await
                        } else {
                            secret(name.clone(), optional).await
                        };
                        let v = data
                            .with_context(|| format!("env {}", e.name))?
                            .and_then(|d| d.get(key).cloned());
                        anyhow::ensure!(
                            v.is_some() || optional,
                            "env {}: key {key:?} not in {kind} {name:?}",
                            e.name
                        );
                        v.map(EnvValue::Set)
                    } else {
                        anyhow::bail!("env {}: this source is not supported by the lab", e.name);
                    }
                }
            };
            if let Some(v) = value {
                out.retain(|(k, _)| *k != e.name);
                out.push((e.name.clone(), v));
            }
        }
        Ok(out)
    }

    /// A downward-API field of the pod.
    fn field(&self, p: &Pod, path: &str) -> anyhow::Result<EnvValue> {
        let spec = p.spec.as_ref();
        let quoted = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_suffix("']"))
                .map(str::to_string)
        };
        Ok(EnvValue::Set(match path {
            "metadata.name" => p.name_any(),
            "metadata.namespace" => p.namespace().unwrap_or_default(),
            "metadata.uid" => p.uid().unwrap_or_default(),
            "spec.nodeName" => self.node.clone(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.hostIP" => self.node_ip.to_string(),
            "status.podIP" => return Ok(EnvValue::PodIp),
            _ => {
                if let Some(k) = quoted("metadata.labels['") {
                    p.labels().get(&k).cloned().unwrap_or_default()
                } else if let Some(k) = quoted("metadata.annotations['") {
                    p.annotations().get(&k).cloned().unwrap_or_default()
                } else {
                    anyhow::bail!("field path {path:?} is not supported by the lab");
                }
            }
        }))
    }

    /// Everything the pod's containers need before its sandbox exists: their order and
    /// probes, the local program of each image, the arguments and environment. A container the
    /// lab cannot run fails the pod with the reason.
    async fn prepare(&self, p: &Pod) -> anyhow::Result<Prepared> {
        let (pod, containers) = crate::containers::Pod::of(p)?;
        let (ns_name, name) = (p.namespace().unwrap_or_default(), p.name_any());
        let field = |path: &str| match self.field(p, path)? {
            EnvValue::Set(v) => Ok(v),
            EnvValue::PodIp => anyhow::bail!("{path} is not available in a volume"),
        };
        let volumes = crate::volumes::make(
            &self.client,
            p,
            &self
                .state_dir
                .join("pods")
                .join(format!("{ns_name}_{name}.volumes")),
            &self.node_paths,
            &field,
        )
        .await?;
        let mut runs = Vec::new();
        let mut first_app = true;
        for (spec, c) in pod.specs.iter().zip(&containers) {
            let bin = self
                .images
                .binary(&spec.image)
                .with_context(|| format!("image {:?} is not one the lab can run", spec.image))?
                .clone();
            // The `kubernetes` Service, as the kubelet tells every container (the container's
            // own variables come after and win).
            let mut env = vec![
                (
                    "KUBERNETES_SERVICE_HOST".to_string(),
                    EnvValue::Set(crate::cluster::KUBERNETES_SERVICE_IP.to_string()),
                ),
                (
                    "KUBERNETES_SERVICE_PORT".into(),
                    EnvValue::Set("443".into()),
                ),
                (
                    "KUBERNETES_SERVICE_PORT_HTTPS".into(),
                    EnvValue::Set("443".into()),
                ),
            ];
            env.extend(
                self.resolve_env(p, c)
                    .await
                    .with_context(|| format!("container {}", c.name))?,
            );
            let mounts = crate::volumes::mounts(c, &volumes)?;
            let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
            argv.extend(c.args.clone().unwrap_or_default());
            // The first app container's log keeps the pod's name (as before init containers
            // and sidecars existed); the others are named after their container.
            let first = spec.kind == crate::containers::Kind::App && first_app;
            first_app &= !first;
            let log = crate::kubelet::log_file(&ns_name, &name, &c.name, first);
            runs.push(Run {
                bin,
                argv,
                env,
                mounts,
                log: self.state_dir.join("pods").join(log),
            });
        }
        Ok(Prepared { pod, runs, volumes })
    }

    /// A new pod's cgroup (made) and its state file's path.
    fn pod_files(&self, ns_name: &str, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let cgroup = self.cgroup.join(cortexflow_testkit::net::unique("cfpod"));
        std::fs::create_dir_all(&cgroup)?;
        let state_file = self
            .state_dir
            .join("pods")
            .join(format!("{ns_name}_{name}"));
        Ok((cgroup, state_file))
    }

    /// The sandbox: network namespace, address, interface (guarded by the CNI hook), cgroup and
    /// the pod's state file. Its containers are started by [`PodCtx::advance`].
    fn start(&self, p: &Pod, uid: &str, prepared: Prepared) -> anyhow::Result<()> {
        let (ns_name, name) = (p.namespace().unwrap_or_default(), p.name_any());
        let mut st = self
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("state poisoned"))?;
        let host_network = p
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if host_network {
            // The node's own network: its namespace and address, no interface of its own (and
            // so nothing for the CNI hook, and the host's resolv.conf).
            let (cgroup, state_file) = self.pod_files(&ns_name, &name)?;
            let sp = SimPod::new(
                format!("{ns_name}/{name}"),
                (self.node_ns.clone(), None),
                self.node_ip,
                cgroup,
                state_file,
                prepared,
            );
            sp.write_state_file(0)
                .context("write the pod's state file")?;
            st.pods.insert(uid.to_string(), sp);
            tracing::info!(pod = %format!("{ns_name}/{name}"), node = %self.node, "host-network pod ready");
            return Ok(());
        }
        let used: Vec<Ipv4Addr> = st
            .pods
            .values()
            .filter(|p| p.own_netns.is_some())
            .map(|p| p.ip)
            .collect();
        // Hosts 2..=254, starting after the last one handed out.
        let start = st.last_host.checked_sub(2).map_or(252, u16::from);
        let host = (1..=253u16)
            .map(|i| 2 + ((start + i) % 253) as u8)
            .find(|h| {
                let a = Ipv4Addr::new(10, 244, self.index, *h);
                !used.contains(&a) && !st.draining.contains(&a)
            })
            .context("pod CIDR exhausted")?;
        st.last_host = host;
        let ip = Ipv4Addr::new(10, 244, self.index, host);
        let host_if = format!("cfv{}", st.next_if);
        st.next_if += 1;
        let pod_ns = Netns::new("cfp");
        let node_ns = Netns {
            name: self.node_ns.clone(),
        };
        let wired = try_wire_pod(&node_ns, &pod_ns, ip, &host_if);
        // `node_ns` only borrows the node's namespace: it must not delete it.
        std::mem::forget(node_ns);
        wired.with_context(|| format!("wiring {host_if} ({ip})"))?;
        // The pod's interface is guarded before anything of the pod runs.
        // (On this thread, not `block_in_place`: the pod's processes die with the thread that
        // started them — `--pdeathsig` — and a thread given to the blocking pool ends when idle.)
        if let Some(cni) = &self.cni {
            cni.add(&host_if, ip, &pod_ns.name)?;
        }
        let (cgroup, state_file) = self.pod_files(&ns_name, &name)?;
        // The pod's resolv.conf (dnsPolicy ClusterFirst): `ip netns exec` mounts the files of
        // /etc/netns/<namespace>/ over /etc for every process of the pod (removed with it).
        let etc = Path::new("/etc/netns").join(&pod_ns.name);
        let resolv = crate::volumes::create_dir_noted(&etc).and_then(|()| {
            Ok(std::fs::write(
                etc.join("resolv.conf"),
                format!(
                    "search {ns_name}.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5\n"
                ),
            )?)
        });
        if let Err(e) = resolv {
            let _ = std::fs::remove_dir_all(&etc);
            remove_cgroup(&cgroup);
            return Err(e).context("write the pod's resolv.conf");
        }
        let sp = SimPod::new(
            format!("{ns_name}/{name}"),
            (pod_ns.name.clone(), Some(pod_ns)),
            ip,
            cgroup,
            state_file,
            prepared,
        );
        if let Err(e) = sp.write_state_file(0) {
            return Err(e).context("write the pod's state file");
        }
        st.pods.insert(uid.to_string(), sp);
        tracing::info!(pod = %format!("{ns_name}/{name}"), %ip, node = %self.node, "pod sandbox ready");
        Ok(())
    }

    /// Notices the containers that exited and starts those due (in the kubelet's order).
    fn advance(&self, uid: &str) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let Some(sp) = st.pods.get_mut(uid) else {
            return;
        };
        let now = std::time::Instant::now();
        let stamp = || k8s_openapi::jiff::Timestamp::now().to_string();
        for i in 0..sp.children.len() {
            let exited = sp.children[i]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                use std::os::unix::process::ExitStatusExt as _;
                let code = status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
                sp.children[i] = None;
                sp.pod.exited(i, code, now);
                sp.times[i][1] = Some(stamp());
                tracing::info!(pod = %sp.key, container = %sp.pod.specs[i].name, code, "container exited");
            }
        }
        for i in sp.pod.to_start(now) {
            match sp.spawn(i) {
                Ok(child) => {
                    let pid = child.id();
                    sp.children[i] = Some(child);
                    sp.pod.started(i, now);
                    let [s0, f0, _, _] = std::mem::take(&mut sp.times[i]);
                    sp.times[i] = [Some(stamp()), None, s0, f0];
                    let first_app = sp
                        .pod
                        .specs
                        .iter()
                        .position(|s| s.kind == crate::containers::Kind::App);
                    if first_app == Some(i)
                        && let Err(e) = sp.write_state_file(pid)
                    {
                        tracing::warn!(pod = %sp.key, error = %e, "writing the pod's state file failed");
                    }
                    tracing::info!(pod = %sp.key, container = %sp.pod.specs[i].name, restarts = sp.pod.states[i].restarts, "container started");
                }
                Err(e) => {
                    // As a runtime that cannot exec the program: the container exits at once.
                    tracing::warn!(pod = %sp.key, container = %sp.pod.specs[i].name, error = %format!("{e:#}"), "container did not start");
                    sp.pod.started(i, now);
                    sp.pod.exited(i, 127, now);
                }
            }
        }
    }

    /// Requests the pod's projected tokens again at 80 % of their lifetime (the kubelet's
    /// rule); a failure is retried on the next pass.
    async fn refresh_tokens(&self, p: &Pod, uid: &str) {
        let due: Vec<(usize, crate::volumes::Token)> = match self.state.lock() {
            Ok(st) => st
                .pods
                .get(uid)
                .map(|sp| {
                    let now = std::time::Instant::now();
                    sp.volumes
                        .tokens
                        .iter()
                        .enumerate()
                        .filter(|(_, t)| crate::volumes::due(t, now))
                        .map(|(i, t)| (i, t.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => return,
        };
        for (i, t) in due {
            match crate::volumes::request_token(
                &self.client,
                p,
                t.audience.as_deref(),
                t.expiration,
            )
            .await
            {
                Ok(token) => {
                    let tmp = t.file.with_extension("cf-tmp");
                    if std::fs::write(&tmp, token)
                        .and_then(|()| std::fs::rename(&tmp, &t.file))
                        .is_ok()
                        && let Ok(mut st) = self.state.lock()
                        && let Some(sp) = st.pods.get_mut(uid)
                        && let Some(tok) = sp.volumes.tokens.get_mut(i)
                    {
                        tok.requested = std::time::Instant::now();
                    }
                }
                Err(e) => {
                    tracing::warn!(pod = %p.name_any(), error = %format!("{e:#}"), "renewing a projected token failed (retrying)")
                }
            }
        }
    }

    /// Runs the probes that are due (from the node's network namespace, at the pod's address,
    /// as the kubelet does); kills a container whose liveness probe failed enough.
    async fn run_probes(&self, uid: &str) {
        let (due, ip) = {
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let Some(sp) = st.pods.get_mut(uid) else {
                return;
            };
            (sp.pod.due_probes(std::time::Instant::now()), sp.ip)
        };
        for d in due {
            let ok = probe_from(&self.node_ns, ip, &d.check, d.timeout).await;
            let Ok(mut st) = self.state.lock() else {
                return;
            };
            let Some(sp) = st.pods.get_mut(uid) else {
                return;
            };
            if sp.pod.probed(&d, ok) {
                tracing::info!(pod = %sp.key, container = %sp.pod.specs[d.container].name, "liveness probe failed: killing the container");
                if let Some(c) = sp.children[d.container].as_mut() {
                    let _ = c.kill();
                }
            }
        }
    }

    /// Writes the status a kubelet would: phase, addresses, every container's state, restarts
    /// and readiness, and the conditions; Ready only when every app container and sidecar is
    /// ready and every readiness gate is True. Patched only when something changed.
    async fn report(&self, p: &Pod, uid: &str) -> anyhow::Result<()> {
        let status = p.status.clone().unwrap_or_default();
        let conditions = status.conditions.clone().unwrap_or_default();
        let gates_true = p
            .spec
            .as_ref()
            .and_then(|s| s.readiness_gates.clone())
            .unwrap_or_default()
            .iter()
            .all(|g| {
                conditions
                    .iter()
                    .any(|c| c.type_ == g.condition_type && c.status == "True")
            });
        let (key, patch) = {
            let mut st = self
                .state
                .lock()
                .map_err(|_| anyhow::anyhow!("state poisoned"))?;
            let Some(sp) = st.pods.get_mut(uid) else {
                return Ok(());
            };
            let (key, patch) = sp.status(self.node_ip, gates_true, &status);
            if sp.reported.as_ref() == Some(&key)
                && status.pod_ip.as_deref() == Some(&sp.ip.to_string())
            {
                return Ok(());
            }
            (key, patch)
        };
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
        api.patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .context("pod status")?;
        if let Ok(mut st) = self.state.lock()
            && let Some(sp) = st.pods.get_mut(uid)
        {
            sp.reported = Some(key);
        }
        Ok(())
    }

    async fn failed(&self, p: &Pod, why: &str) -> anyhow::Result<()> {
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &p.namespace().unwrap_or_default());
        let patch = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "Ready", "status": "False", "reason": "SandboxFailed", "message": why}]}});
        api.patch_status(
            &p.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
        Ok(())
    }
}

/// Where a lab pod lives: `(network namespace, cgroup)`, from the state directory.
pub fn locate(state_dir: &Path, namespace: &str, name: &str) -> anyhow::Result<(String, PathBuf)> {
    let f = state_dir.join("pods").join(format!("{namespace}_{name}"));
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("no lab pod {namespace}/{name} ({} missing)", f.display()))?;
    let mut lines = text.lines().skip(1);
    let ns = lines.next().context("state file: netns")?.to_string();
    let cg = PathBuf::from(lines.next().context("state file: cgroup")?);
    Ok((ns, cg))
}

/// The network namespace of lab node `name`, from the state directory.
pub fn locate_node(state_dir: &Path, name: &str) -> anyhow::Result<String> {
    let f = state_dir.join("nodes").join(name);
    let text = std::fs::read_to_string(&f)
        .with_context(|| format!("no lab node {name} ({} missing)", f.display()))?;
    Ok(text.lines().next().context("node file: netns")?.to_string())
}

/// A command that runs `argv` inside a lab pod (its network namespace and cgroup).
pub fn exec_command(netns: &str, cgroup: &Path, argv: &[String]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(SANDBOX).arg(cgroup).arg(netns).args(argv);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> anyhow::Result<Images> {
        let dir = std::env::temp_dir().join(cortexflow_testkit::net::unique("cftest-images-"));
        std::fs::create_dir_all(&dir)?;
        let paths: Vec<PathBuf> = files
            .iter()
            .map(|(name, text)| {
                let p = dir.join(name);
                std::fs::write(&p, text).map(|()| p)
            })
            .collect::<Result<_, _>>()?;
        let r = Images::load(&paths, &mut |pkg, bin| {
            anyhow::ensure!(pkg != "missing", "no package {pkg}");
            Ok(PathBuf::from(format!("/built/{pkg}/{bin}")))
        });
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn image_maps_build_packages_take_paths_and_later_files_win() {
        let images = load(&[
            ("a.map", "# comment\n\ncortexflow/workload  cortexflow-lab:cortexflow-workload\nregistry.local:5000/suite/agnhost  cortexflow-lab:cortexflow-workload  # trailing\n"),
            ("b.map", "cortexflow/workload /bin/sh\n"),
        ])
        .unwrap();
        assert_eq!(
            images.binary("cortexflow/workload:1.0"),
            Some(&PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            images.binary("registry.local:5000/suite/agnhost:2.40"),
            Some(&PathBuf::from("/built/cortexflow-lab/cortexflow-workload"))
        );
        assert_eq!(images.binary("nginx:1.27"), None);
    }

    #[test]
    fn bad_image_map_lines_are_errors_naming_file_and_line() {
        for (text, want) in [
            ("cortexflow/workload\n", "a.map:1"),
            ("x y z\n", "a.map:1"),
            ("# c\ncortexflow/workload:1.0 a:b\n", "without a tag"),
            ("img relative/path\n", "neither /path nor package:binary"),
            ("img /no/such/program\n", "is not a file"),
            ("img missing:bin\n", "a.map:1: build missing:bin"),
        ] {
            let e = format!("{:#}", load(&[("a.map", text)]).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
