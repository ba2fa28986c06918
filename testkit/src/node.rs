//! The real `cortexflow-agent` process for a node on one machine ([`Agent`]: its pin directory,
//! ports and logs), and a ready-made node for it ([`AgentNode`]: pods in network namespaces
//! routed by a node namespace, a cgroup for socket load balancing). Several run side by side
//! (each has its own namespace, cgroup, pins and ports). On drop the agent is killed, the pins
//! are removed with `cortexflow-agent --uninstall` (detaching every program), then the cgroup
//! and the namespaces go.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use crate::scripted_operator::Control;
use crate::{
    net::{Cgroup, Topology, unique},
    process::{Daemon, free_port, http_get},
};

/// A pin directory, uninstalled on drop.
struct Pins {
    dir: PathBuf,
    agent_bin: PathBuf,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(&self.agent_bin)
            .arg("--uninstall")
            .arg("--pin-dir")
            .arg(&self.dir)
            .env("CORTEXFLOW_LOG", "warn")
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The agent of one node: started, stopped and restarted on demand; its pins are uninstalled on
/// drop.
pub struct Agent {
    daemon: Option<Daemon>,
    pins: Pins,
    /// Kubernetes node name the agent serves.
    pub name: String,
    netns: PathBuf,
    cgroup: PathBuf,
    /// Agent logs, `agent-<n>.log` for the n-th start (removed on drop).
    pub logs: PathBuf,
    /// The agent's `Flows` gRPC and admin (metrics, health) addresses.
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    starts: usize,
    extra_args: Vec<String>,
}

impl Agent {
    /// An agent for node `name` whose network namespace is at `netns` and whose pods' cgroups
    /// are under `cgroup`; `extra_args` go to every start. Not started yet.
    pub fn new(
        agent_bin: &Path,
        name: &str,
        netns: &Path,
        cgroup: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let pins = Pins {
            dir: PathBuf::from("/sys/fs/bpf").join(unique("cftest-")),
            agent_bin: agent_bin.to_path_buf(),
        };
        let logs = std::env::temp_dir().join(unique("cftest-logs-"));
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
        Ok(Self {
            daemon: None,
            pins,
            name: name.to_string(),
            netns: netns.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
            logs,
            grpc: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?)),
            starts: 0,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The bpffs directory of the node's maps and links.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// The agent's local `Flows.Observe` socket (root on the node, no token).
    pub fn flows_socket(&self) -> PathBuf {
        self.logs.join("flows.sock")
    }

    /// A `Flows` client on the local socket.
    pub async fn local_flows(
        &self,
    ) -> anyhow::Result<
        cortexflow_proto::flows::v1::flows_client::FlowsClient<tonic::transport::Channel>,
    > {
        let path = self.flows_socket();
        let channel = tonic::transport::Endpoint::from_static("http://local-socket")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await?;
        Ok(cortexflow_proto::flows::v1::flows_client::FlowsClient::new(
            channel,
        ))
    }

    /// Starts an agent subscribed to `operator`.
    pub fn start_agent(&mut self, operator: &Control) -> anyhow::Result<()> {
        self.start_agent_with(operator, &[])
    }

    /// [`Agent::start_agent`] with more environment (e.g. the supervisor's test hook).
    pub fn start_agent_with(
        &mut self,
        operator: &Control,
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        if self.daemon.is_some() {
            bail!("an agent already runs on {}", self.name);
        }
        self.starts += 1;
        let mut args: Vec<String> = [
            "--node-name",
            &self.name,
            "--operator",
            &operator.url,
            "--trust-bundle",
            &operator.bundle_file.to_string_lossy(),
            "--token-file",
            &operator.token_file.to_string_lossy(),
            "--grpc-addr",
            &self.grpc.to_string(),
            "--admin-addr",
            &self.admin.to_string(),
            "--pin-dir",
            &self.pins.dir.to_string_lossy(),
            "--cgroup-root",
            &self.cgroup.to_string_lossy(),
            "--netns",
            &self.netns.to_string_lossy(),
            "--flows-socket",
            &self.flows_socket().to_string_lossy(),
            "--report-interval-secs",
            "1",
            "--max-backoff-ms",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra_args.iter().cloned());
        let mut all_env = vec![("RUST_LOG", "info".to_string())];
        all_env.extend(env.iter().cloned());
        self.daemon = Some(Daemon::start(
            &format!("agent-{}", self.name),
            &self.pins.agent_bin,
            &args,
            &all_env,
            self.log_path(self.starts),
        )?);
        Ok(())
    }

    /// The agent process, once started (it may have exited since).
    pub fn daemon(&mut self) -> Option<&mut Daemon> {
        self.daemon.as_mut()
    }

    /// Forgets the agent process (after it exited by itself), so that another can start.
    pub fn forget_agent(&mut self) {
        self.daemon = None;
    }

    /// The running agent. Panics when none runs.
    pub fn agent(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("no agent runs on this node")
    }

    /// Whether an agent process runs.
    pub fn running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Daemon::running)
    }

    /// Stops the agent: SIGTERM when `graceful` (else SIGKILL). Returns whether a graceful stop
    /// exited with success.
    pub fn stop_agent(&mut self, graceful: bool) -> bool {
        match self.daemon.take() {
            Some(mut a) if graceful => a.stop(Duration::from_secs(10)).is_some_and(|s| s.success()),
            Some(mut a) => {
                a.kill();
                true
            }
            None => true,
        }
    }

    /// The log of the n-th agent started here.
    pub fn log_path(&self, n: usize) -> PathBuf {
        self.logs.join(format!("agent-{n}.log"))
    }

    /// How many agents were started here.
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// GET on the admin server; `None` while it does not answer.
    pub async fn admin(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, path).await.ok()
    }

    /// Waits until `/readyz` answers 200 (the first config is in the kernel).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((200, _)) = self.admin("/readyz").await {
                return Ok(());
            }
            let agent = self.agent();
            if !agent.running() {
                bail!("the agent exited:\n{}", agent.log_tail(30));
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent is not ready after {timeout:?}:\n{}",
                    agent.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(a) = &self.daemon
        {
            eprintln!("---- agent log ({}) ----\n{}", self.name, a.log_tail(40));
        }
        if let Some(mut a) = self.daemon.take() {
            a.kill();
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

/// A node made of a [`Topology`] and a cgroup, with its [`Agent`] (reached through `Deref`).
/// Fields drop in order: the agent (and its pins) first, then the cgroup and the namespaces.
pub struct AgentNode {
    agent: Agent,
    pub cgroup: Cgroup,
    pub topo: Topology,
}

impl AgentNode {
    /// A node `name` with `pods` pods at 10.<net>.0.2 … (see [`Topology::new`]); `extra_args`
    /// go to every agent started on it.
    pub fn new(
        agent_bin: &Path,
        name: &str,
        pods: usize,
        net: u8,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        let topo = Topology::new(pods, net);
        let cgroup = Cgroup::create();
        let agent = Agent::new(agent_bin, name, &topo.node.path(), &cgroup.path, extra_args)?;
        Ok(Self {
            agent,
            cgroup,
            topo,
        })
    }
}

impl std::ops::Deref for AgentNode {
    type Target = Agent;
    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl std::ops::DerefMut for AgentNode {
    fn deref_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }
}
