//! The project's own daemons as real processes: built once per test run with cargo, started with
//! `setpriv --pdeathsig KILL` (they die with the test binary, even on SIGKILL), stopped
//! gracefully (SIGTERM) or killed (SIGKILL) on demand, and always killed on drop.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

pub use crate::cargo::binary;

/// The ports `free_port` hands out: below the kernel's ephemeral range (32768–60999), so no
/// outgoing connection of any process takes one between the pick and the daemon's bind.
const PORTS: std::ops::Range<u32> = 20_000..32_000;

/// A free loopback port, never the same twice in one process. Asking the kernel for port 0
/// and closing it is not enough: the kernel may hand that port to the next caller (or to an
/// outgoing connection) before the daemon binds it, and an operator once died at start-up
/// with "Address already in use" on a port another test daemon had been given too.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    // Spread concurrent test processes over the range by their pid.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = PORTS.end - PORTS.start;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port)?;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free loopback port in {PORTS:?}")
}

/// A running daemon.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `bin args…` with `env`, logging to `log`.
    pub fn start(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM, then wait up to `grace` for it to exit (SIGKILL after).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL: the process dies without cleaning anything up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit by itself; its status, or `None`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.child.as_mut()?.try_wait().ok().flatten();
            if let Some(st) = st {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The long-running tasks its supervisor registered, from the `supervising` line of its log
    /// (`cortexflow_runtime::Supervisor`); empty when the line is not there (yet).
    pub fn supervised_tasks(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("supervising"))
            .and_then(|l| {
                let list = l.split("tasks=[").nth(1)?.split(']').next()?;
                Some(
                    list.split(", ")
                        .map(|n| n.trim_matches('"').to_string())
                        .filter(|n| !n.is_empty())
                        .collect(),
                )
            })
            .unwrap_or_default()
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An operator process.
pub struct Operator {
    pub daemon: Daemon,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub identity: String,
}

/// How to run an operator.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    pub kubeconfig: PathBuf,
    /// The operator's namespace (Lease, id table).
    pub namespace: String,
    pub identity: String,
    pub lease_duration_secs: u64,
    /// Directory for the log file.
    pub log_dir: PathBuf,
    /// More environment (e.g. the supervisor's test hook).
    pub env: Vec<(String, String)>,
}

impl Operator {
    /// Builds (once) and starts an operator on free loopback ports.
    pub fn start(o: &OperatorOptions) -> anyhow::Result<Self> {
        let grpc: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()?).into();
        let admin: SocketAddr = (Ipv4Addr::LOCALHOST, free_port()?).into();
        Self::start_at(o, grpc, admin)
    }

    /// Starts an operator on the given addresses (a restart where the agents expect it).
    pub fn start_at(
        o: &OperatorOptions,
        grpc: SocketAddr,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        let bin = binary("cortexflow-operator", "cortexflow-operator")?;
        let args = vec![
            format!("--grpc-addr={grpc}"),
            format!("--admin-addr={admin}"),
            format!("--namespace={}", o.namespace),
            format!("--identity={}", o.identity),
            format!("--lease-duration-secs={}", o.lease_duration_secs),
        ];
        let mut env = vec![
            ("KUBECONFIG", o.kubeconfig.display().to_string()),
            (
                "RUST_LOG",
                "info,cortexflow_operator=debug,kube=warn,tower=warn,hyper=warn".to_string(),
            ),
        ];
        env.extend(o.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
        let log = o.log_dir.join(format!("operator-{}.log", o.identity));
        let daemon = Daemon::start(&o.identity, &bin, &args, &env, log)?;
        Ok(Self {
            daemon,
            grpc,
            admin,
            identity: o.identity.clone(),
        })
    }

    /// GET on the admin server: `(status code, body)`.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.admin, path).await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.daemon.running() {
                bail!(
                    "operator {} exited:\n{}",
                    self.identity,
                    self.daemon.log_tail(40)
                );
            }
            if let Ok((200, _)) = self.admin_get("/readyz").await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "operator {} not ready after {timeout:?}:\n{}",
            self.identity,
            self.daemon.log_tail(40)
        )
    }

    /// The value of a metric sample whose line starts with `prefix` (summed over matches).
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        let (_, body) = self.admin_get("/metrics").await?;
        Ok(body
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// A minimal HTTP/1.1 GET over TCP (the admin servers are plain HTTP on loopback).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies keep their chunk sizes; callers look for lines, which survive.
    Ok((code, body))
}

/// A directory under the system's temporary directory, removed (with what it holds) on drop.
#[derive(Debug)]
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(crate::net::unique(prefix));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
