//! A real local Kubernetes control plane on loopback.
//!
//! [`Cluster::start`] runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler —
//! the real binaries of [`tools::KUBERNETES_VERSION`](cortexflow_testkit::tools::KUBERNETES_VERSION) — on
//! free loopback ports, with certificates and a service-account key generated for the run, and
//! waits until all four are healthy. Everything the cluster writes (certificates, kubeconfigs,
//! etcd data, logs) lives in one state directory.
//!
//! Two lifetimes:
//! * [`Lifetime::Owned`]: the test harness. The processes die with the harness (they get
//!   `SIGKILL` from the kernel if the harness dies, via `setpriv --pdeathsig`) and dropping the
//!   [`Cluster`] kills them and removes the state directory, also when a test panicked.
//! * [`Lifetime::Detached`]: `cargo xtask cluster up`. The processes run in their own session
//!   until [`stop_detached`] (`cargo xtask cluster down`) stops them and removes the directory.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{Api, Client, config::KubeConfigOptions};
use serde_json::json;

use cortexflow_testkit::tools;

use crate::pki;

/// Service CIDR of the local cluster (ClusterIPs of Services).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Address of the `kubernetes` Service in [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Name of the file, in the state directory, that records a detached cluster.
const STATE_FILE: &str = "cluster.json";
/// Common name of the cluster CA.
const CA_NAME: &str = "cortexflow-local-ca";
/// How long start-up may take before it is declared failed.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Who owns the control-plane processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// The processes die with this process; dropping the [`Cluster`] stops them and removes
    /// the state directory.
    Owned,
    /// The processes outlive this process; [`stop_detached`] stops them.
    Detached,
}

/// The loopback ports a cluster listens on.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
}

impl Ports {
    /// Free loopback ports, each one different (`free_port` never repeats in a process).
    fn free() -> anyhow::Result<Self> {
        let p = (0..5)
            .map(|_| cortexflow_testkit::process::free_port())
            .collect::<anyhow::Result<Vec<_>>>()
            .context("choose loopback ports")?;
        Ok(Self {
            etcd_client: p[0],
            etcd_peer: p[1],
            apiserver: p[2],
            controller_manager: p[3],
            scheduler: p[4],
        })
    }
}

struct Process {
    name: &'static str,
    child: Child,
}

/// A running local control plane.
pub struct Cluster {
    dir: PathBuf,
    lifetime: Lifetime,
    ports: Ports,
    processes: Vec<Process>,
    controller_manager: bool,
}

impl Cluster {
    /// Starts a control plane whose state lives in `dir` (created; must not hold a running
    /// cluster) and waits until it is ready.
    pub async fn start(dir: &Path, lifetime: Lifetime) -> anyhow::Result<Self> {
        Self::start_with(dir, lifetime, true).await
    }

    /// As [`Cluster::start`]; without `controller_manager` the control plane runs only etcd,
    /// the apiserver and the scheduler (benchmarks that create thousands of objects for
    /// nodes nobody heartbeats do not want the node lifecycle controller reacting to them).
    pub async fn start_with(
        dir: &Path,
        lifetime: Lifetime,
        controller_manager: bool,
    ) -> anyhow::Result<Self> {
        tools::ensure_present()?;
        fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        fs::write(dir.join("owner.pid"), std::process::id().to_string())?;
        let ports = Ports::free()?;
        let mut cluster = Self {
            dir,
            lifetime,
            ports,
            processes: Vec::new(),
            controller_manager,
        };
        cluster.write_pki()?;
        if let Err(e) = cluster.start_components().await {
            let logs = cluster.log_tails(30);
            cluster.kill_all();
            let _ = fs::remove_dir_all(&cluster.dir);
            return Err(e.context(format!("control plane did not become ready; logs:\n{logs}")));
        }
        if lifetime == Lifetime::Detached {
            // Ownership of the processes passes to the state file.
            cluster.processes.clear();
        }
        Ok(cluster)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports the cluster listens on.
    pub fn ports(&self) -> Ports {
        self.ports
    }

    /// The admin kubeconfig (user `cortexflow-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The apiserver URL.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// A client authenticated as the admin.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_for(&self.kubeconfig()).await
    }

    /// Writes a kubeconfig for a further user of this cluster, with a client certificate signed
    /// by the cluster CA, and returns its path.
    pub fn add_user(&self, name: &str, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let pair = self.client_pair(user, groups)?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        fs::write(&path, self.kubeconfig_yaml(user, &pair))?;
        Ok(path)
    }

    /// A client certificate of the cluster CA for `user` in `groups`.
    pub fn client_pair(&self, user: &str, groups: &[&str]) -> anyhow::Result<pki::CertPair> {
        self.load_ca()?.client(user, groups)
    }

    /// What the simulated nodes' kubelet API serves with.
    pub fn kubelet_tls(&self) -> crate::kubelet::KubeletTls {
        crate::kubelet::KubeletTls {
            cert: self.dir.join("kubelet-serving.crt"),
            key: self.dir.join("kubelet-serving.key"),
            ca: self.dir.join("ca.crt"),
        }
    }

    fn load_ca(&self) -> anyhow::Result<pki::Ca> {
        pki::Ca::load(
            CA_NAME,
            &fs::read_to_string(self.dir.join("ca.crt"))?,
            &fs::read_to_string(self.dir.join("ca.key"))?,
        )
    }

    fn write_pki(&self) -> anyhow::Result<()> {
        let d = &self.dir;
        let ca = pki::Ca::new(CA_NAME)?;
        fs::write(d.join("ca.crt"), &ca.cert_pem)?;
        fs::write(d.join("ca.key"), ca.key_pem())?;
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let apiserver = ca.serving(
            "kube-apiserver",
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &[loopback, IpAddr::V4(KUBERNETES_SERVICE_IP)],
        )?;
        write_pair(d, "apiserver", &apiserver)?;
        write_pair(
            d,
            "controller-manager-serving",
            &ca.serving("kube-controller-manager", &["localhost"], &[loopback])?,
        )?;
        // The kubelet API of the simulated nodes (on loopback, `localhost`), and the apiserver's
        // client certificate towards it.
        write_pair(
            d,
            "kubelet-serving",
            &ca.serving("cortexflow-lab-kubelet", &["localhost"], &[loopback])?,
        )?;
        write_pair(
            d,
            "apiserver-kubelet-client",
            &ca.client(crate::kubelet::APISERVER_CLIENT, &[])?,
        )?;
        write_pair(
            d,
            "scheduler-serving",
            &ca.serving("kube-scheduler", &["localhost"], &[loopback])?,
        )?;
        // The aggregation layer's front proxy, configured as kubeadm does: without it the
        // controller manager and scheduler cannot complete their authentication config.
        let front_proxy = pki::Ca::new("cortexflow-front-proxy-ca")?;
        fs::write(d.join("front-proxy-ca.crt"), &front_proxy.cert_pem)?;
        write_pair(
            d,
            "front-proxy-client",
            &front_proxy.client("front-proxy-client", &[])?,
        )?;
        let (sa_private, sa_public) = pki::service_account_key()?;
        fs::write(d.join("sa.key"), sa_private)?;
        fs::write(d.join("sa.pub"), sa_public)?;
        for (file, user, groups) in [
            ("admin", "cortexflow-admin", &["system:masters"][..]),
            (
                "controller-manager",
                "system:kube-controller-manager",
                &[][..],
            ),
            ("scheduler", "system:kube-scheduler", &[][..]),
        ] {
            let pair = ca.client(user, groups)?;
            fs::write(
                d.join(format!("{file}.kubeconfig")),
                self.kubeconfig_yaml(user, &pair),
            )?;
        }
        Ok(())
    }

    fn kubeconfig_yaml(&self, user: &str, pair: &pki::CertPair) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let ca = fs::read_to_string(self.dir.join("ca.crt")).unwrap_or_default();
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cortexflow-local", "cluster": {
                "server": self.server_url(),
                "certificate-authority-data": b64(&ca),
            }}],
            "users": [{"name": user, "user": {
                "client-certificate-data": b64(&pair.cert_pem),
                "client-key-data": b64(&pair.key_pem),
            }}],
            "contexts": [{"name": "cortexflow-local", "context": {"cluster": "cortexflow-local", "user": user}}],
            "current-context": "cortexflow-local",
        });
        // JSON is valid YAML; kubectl and kube-rs both read it.
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }

    /// etcd and the apiserver first; the controller manager and the scheduler once the
    /// apiserver answers (they exit when they cannot read their configuration from it).
    async fn start_components(&mut self) -> anyhow::Result<()> {
        self.spawn_storage_and_apiserver()?;
        self.write_state()?;
        let client = self.client().await?;
        self.wait_until("kube-apiserver /readyz", || async {
            get_text(&client, "/readyz").await.map(|_| ())
        })
        .await?;
        self.spawn_controllers()?;
        self.write_state()?;
        self.wait_until("every component healthy", || self.check_ready())
            .await
    }

    fn spawn_storage_and_apiserver(&mut self) -> anyhow::Result<()> {
        let d = self.dir.clone();
        let p = self.ports;
        let path = |name: &str| d.join(name).display().to_string();
        let etcd_client = format!("http://127.0.0.1:{}", p.etcd_client);
        let etcd_peer = format!("http://127.0.0.1:{}", p.etcd_peer);
        self.spawn(
            "etcd",
            &tools::etcd_bin(),
            &[
                "--name=default".into(),
                format!("--data-dir={}", path("etcd")),
                format!("--listen-client-urls={etcd_client}"),
                format!("--advertise-client-urls={etcd_client}"),
                format!("--listen-peer-urls={etcd_peer}"),
                format!("--initial-advertise-peer-urls={etcd_peer}"),
                format!("--initial-cluster=default={etcd_peer}"),
                "--log-level=warn".into(),
                // A throw-away cluster: durability buys nothing and fsync costs seconds.
                "--unsafe-no-fsync".into(),
            ],
        )?;
        self.spawn(
            "kube-apiserver",
            &tools::kube_bin("kube-apiserver"),
            &[
                format!("--etcd-servers={etcd_client}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                // A loopback address cannot back the `kubernetes` Service endpoints; nothing
                // here reaches the apiserver through that Service.
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={}", p.apiserver),
                format!("--tls-cert-file={}", path("apiserver.crt")),
                format!("--tls-private-key-file={}", path("apiserver.key")),
                format!("--client-ca-file={}", path("ca.crt")),
                format!(
                    "--kubelet-client-certificate={}",
                    path("apiserver-kubelet-client.crt")
                ),
                format!(
                    "--kubelet-client-key={}",
                    path("apiserver-kubelet-client.key")
                ),
                format!("--kubelet-certificate-authority={}", path("ca.crt")),
                // The simulated nodes' kubelet API is on loopback (`InternalDNS: localhost`).
                "--kubelet-preferred-address-types=InternalDNS,InternalIP,Hostname".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", path("sa.pub")),
                format!("--service-account-signing-key-file={}", path("sa.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=Node,RBAC".into(),
                format!(
                    "--requestheader-client-ca-file={}",
                    path("front-proxy-ca.crt")
                ),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!(
                    "--proxy-client-cert-file={}",
                    path("front-proxy-client.crt")
                ),
                format!("--proxy-client-key-file={}", path("front-proxy-client.key")),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
            ],
        )?;
        Ok(())
    }

    fn spawn_controllers(&mut self) -> anyhow::Result<()> {
        let d = self.dir.clone();
        let p = self.ports;
        let path = |name: &str| d.join(name).display().to_string();
        let kcm_kubeconfig = path("controller-manager.kubeconfig");
        if self.controller_manager {
            self.spawn_controller_manager(&kcm_kubeconfig, &path, p)?;
        }
        self.spawn_scheduler(&path, p)
    }

    fn spawn_controller_manager(
        &mut self,
        kcm_kubeconfig: &str,
        path: &dyn Fn(&str) -> String,
        p: Ports,
    ) -> anyhow::Result<()> {
        self.spawn(
            "kube-controller-manager",
            &tools::kube_bin("kube-controller-manager"),
            &[
                format!("--kubeconfig={kcm_kubeconfig}"),
                format!("--authentication-kubeconfig={kcm_kubeconfig}"),
                format!("--authorization-kubeconfig={kcm_kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", p.controller_manager),
                format!("--tls-cert-file={}", path("controller-manager-serving.crt")),
                format!(
                    "--tls-private-key-file={}",
                    path("controller-manager-serving.key")
                ),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=true".into(),
                format!("--service-account-private-key-file={}", path("sa.key")),
                format!("--root-ca-file={}", path("ca.crt")),
                format!("--cluster-signing-cert-file={}", path("ca.crt")),
                format!("--cluster-signing-key-file={}", path("ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--profiling=false".into(),
            ],
        )?;
        Ok(())
    }

    fn spawn_scheduler(&mut self, path: &dyn Fn(&str) -> String, p: Ports) -> anyhow::Result<()> {
        let sched_kubeconfig = path("scheduler.kubeconfig");
        self.spawn(
            "kube-scheduler",
            &tools::kube_bin("kube-scheduler"),
            &[
                format!("--kubeconfig={sched_kubeconfig}"),
                format!("--authentication-kubeconfig={sched_kubeconfig}"),
                format!("--authorization-kubeconfig={sched_kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", p.scheduler),
                format!("--tls-cert-file={}", path("scheduler-serving.crt")),
                format!("--tls-private-key-file={}", path("scheduler-serving.key")),
                "--leader-elect=false".into(),
                "--profiling=false".into(),
            ],
        )?;
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, bin: &Path, args: &[String]) -> anyhow::Result<()> {
        let log = fs::File::create(self.dir.join("logs").join(format!("{name}.log")))?;
        let mut cmd = match self.lifetime {
            // The kernel kills the process when its parent thread dies, even by SIGKILL.
            Lifetime::Owned => {
                let mut c = Command::new("setpriv");
                c.args(["--pdeathsig", "KILL", "--"]).arg(bin);
                c
            }
            // Its own session: survives the terminal and the command that started it.
            Lifetime::Detached => {
                let mut c = Command::new("setsid");
                c.arg(bin);
                c
            }
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        self.processes.push(Process { name, child });
        Ok(())
    }

    /// Records the processes of a detached cluster (a no-op for owned ones).
    fn write_state(&self) -> anyhow::Result<()> {
        if self.lifetime != Lifetime::Detached {
            return Ok(());
        }
        let procs: Vec<_> = self
            .processes
            .iter()
            .map(|p| json!({"name": p.name, "pid": p.child.id()}))
            .collect();
        let state = json!({
            "kubeconfig": self.kubeconfig(),
            "server": self.server_url(),
            "processes": procs,
        });
        fs::write(
            self.dir.join(STATE_FILE),
            serde_json::to_vec_pretty(&state)?,
        )?;
        Ok(())
    }

    /// Polls `check` until it succeeds, failing early when a component exits.
    async fn wait_until<F, Fut>(&self, what: &str, check: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = anyhow::anyhow!("not checked yet");
        while Instant::now() < deadline {
            for p in &self.processes {
                if let Some(status) = process_exit_status(p.child.id()) {
                    bail!("{} exited during start-up: {status}", p.name);
                }
            }
            match check().await {
                Ok(()) => return Ok(()),
                Err(e) => last_err = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last_err.context(format!("{what}: not ready after {READY_TIMEOUT:?}")))
    }

    /// Every component healthy: apiserver `/readyz`, controller-manager and scheduler
    /// `/healthz`, and the `default` ServiceAccount (created by the controller manager) exists.
    async fn check_ready(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        get_text(&client, "/readyz")
            .await
            .context("kube-apiserver /readyz")?;
        let mut components = vec![("kube-scheduler", self.ports.scheduler)];
        if self.controller_manager {
            components.push(("kube-controller-manager", self.ports.controller_manager));
        }
        for (name, port) in components {
            let mut cfg = kube::Config::new(format!("https://127.0.0.1:{port}").parse()?);
            cfg.accept_invalid_certs = true;
            let c = Client::try_from(cfg)?;
            get_text(&c, "/healthz")
                .await
                .with_context(|| format!("{name} /healthz"))?;
        }
        if self.controller_manager {
            Api::<ServiceAccount>::namespaced(client, "default")
                .get("default")
                .await
                .context("ServiceAccount default/default (made by kube-controller-manager)")?;
        }
        Ok(())
    }

    /// The last `n` lines of every component's log.
    pub fn log_tails(&self, n: usize) -> String {
        let mut out = String::new();
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            let text = fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name} (last {n} lines) ---\n"));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn kill_all(&mut self) {
        // Reverse start order: schedulers and controllers first, etcd last.
        for p in self.processes.iter_mut().rev() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        self.processes.clear();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.lifetime == Lifetime::Owned {
            self.kill_all();
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The exit status of a child of this process that has exited (reaped here), if it has.
fn process_exit_status(pid: u32) -> Option<String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    match waitpid(
        nix::unistd::Pid::from_raw(pid as i32),
        Some(WaitPidFlag::WNOHANG),
    ) {
        Ok(WaitStatus::StillAlive) | Err(_) => None,
        Ok(status) => Some(format!("{status:?}")),
    }
}

fn write_pair(dir: &Path, name: &str, pair: &pki::CertPair) -> anyhow::Result<()> {
    fs::write(dir.join(format!("{name}.crt")), &pair.cert_pem)?;
    fs::write(dir.join(format!("{name}.key")), &pair.key_pem)?;
    Ok(())
}

async fn get_text(client: &Client, path: &str) -> anyhow::Result<String> {
    let req = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(req).await?)
}

/// A client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// What `cargo xtask cluster status` reports about a detached cluster.
#[derive(Debug)]
pub struct DetachedStatus {
    pub kubeconfig: PathBuf,
    pub server: String,
    /// `(component, pid, running)`.
    pub processes: Vec<(String, u32, bool)>,
}

/// Reads the state of a detached cluster in `dir`, if there is one.
pub fn detached_status(dir: &Path) -> anyhow::Result<Option<DetachedStatus>> {
    let path = dir.join(STATE_FILE);
    let Ok(bytes) = fs::read(&path) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))?;
    let processes = v["processes"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let name = p["name"].as_str()?.to_string();
            let pid = u32::try_from(p["pid"].as_u64()?).ok()?;
            let running = process_runs(pid, &name);
            Some((name, pid, running))
        })
        .collect();
    Ok(Some(DetachedStatus {
        kubeconfig: PathBuf::from(v["kubeconfig"].as_str().unwrap_or_default()),
        server: v["server"].as_str().unwrap_or_default().to_string(),
        processes,
    }))
}

/// Whether `pid` is alive and still the named component (not a recycled pid).
fn process_runs(pid: u32, name: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(name))
        .unwrap_or(false)
}

/// Stops a detached cluster (SIGTERM, then SIGKILL after 10 s) and removes its directory.
/// Returns whether there was anything to stop.
pub fn stop_detached(dir: &Path) -> anyhow::Result<bool> {
    use nix::{sys::signal, unistd::Pid};
    let Some(status) = detached_status(dir)? else {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
            return Ok(true);
        }
        return Ok(false);
    };
    let running: Vec<_> = status
        .processes
        .iter()
        .filter(|(_, _, r)| *r)
        .cloned()
        .collect();
    for (_, pid, _) in running.iter().rev() {
        let _ = signal::kill(Pid::from_raw(*pid as i32), signal::Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (name, pid, _) in running.iter().rev() {
        while process_runs(*pid, name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if process_runs(*pid, name) {
            let _ = signal::kill(Pid::from_raw(*pid as i32), signal::Signal::SIGKILL);
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(true)
}

/// Removes the state directories of owned clusters under `parent` whose owner process is gone
/// (a harness killed by SIGKILL cannot clean up; its processes died with it).
pub fn sweep_stale(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let owner = fs::read_to_string(e.path().join("owner.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}
