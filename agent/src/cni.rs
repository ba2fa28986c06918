//! The CNI hook: a new pod's interface is guarded before its container starts.
//!
//! `cortexflow-cni` is a chained CNI plugin: the container runtime runs it after the pod
//! network's plugin (which created the veth and the route), with that plugin's result as
//! `prevResult`. On `ADD` it asks the node's agent, over a Unix socket, to guard the pod's
//! host-side interface — an endpoint of identity `unknown`, no policy, anti-spoofing — and
//! returns only once the agent has attached it, so the pod's first packet is already checked.
//! When the agent cannot be reached within `timeoutSeconds` (default 30) the `ADD` fails and
//! the runtime retries: a pod does not start unguarded. `DEL` does nothing (the agent drops the
//! endpoint with its interface), `CHECK` guards again (idempotent), `VERSION` answers.
//!
//! The wire protocol is one line each way: `GUARD <ifname> <ipv4>` → `OK` | `ERR <why>`.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::daemon::Ctx;

/// How long one request may take on the agent's side.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the hook's socket (a stale file from an earlier agent is replaced), readable by root
/// only.
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("bind the CNI socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves the hook until the drain; removes the socket file at the end.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    ctx: Arc<Ctx>,
) -> anyhow::Result<()> {
    let result = loop {
        let (conn, _) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => break Err(anyhow::anyhow!("accept on the CNI socket: {e}")),
            },
            () = ctx.shutdown.signaled() => break Ok(()),
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, &ctx)).await {
                tracing::warn!(error = %e, "a CNI request took too long");
            }
        });
    };
    let _ = std::fs::remove_file(&path);
    result
}

async fn answer(conn: tokio::net::UnixStream, ctx: &Ctx) {
    let (r, mut w) = conn.into_split();
    let mut line = String::new();
    if tokio::io::BufReader::new(r)
        .read_line(&mut line)
        .await
        .is_err()
    {
        return;
    }
    let reply = match parse_request(&line) {
        Ok((ifname, ip)) => match ctx.worker.guard(ifname.clone(), ip).await {
            Ok(()) => "OK\n".to_string(),
            Err(e) => {
                tracing::warn!(interface = %ifname, %ip, error = %e, "the CNI hook could not guard an interface");
                format!("ERR {e}\n")
            }
        },
        Err(e) => format!("ERR {e}\n"),
    };
    let _ = w.write_all(reply.as_bytes()).await;
}

/// `GUARD <ifname> <ipv4>`.
pub fn parse_request(line: &str) -> Result<(String, Ipv4Addr), String> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("GUARD"), Some(ifname), Some(ip), None) if !ifname.is_empty() => ip
            .parse()
            .map(|ip| (ifname.to_string(), ip))
            .map_err(|e| format!("{ip}: {e}")),
        _ => Err(format!("not a request: {:?}", line.trim())),
    }
}

/// Asks the agent at `socket` to guard `ifname` (address `ip`), retrying the connection until
/// `deadline` (the agent may be starting).
pub fn request_guard(
    socket: &Path,
    ifname: &str,
    ip: Ipv4Addr,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        let last = match UnixStream::connect(socket) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(1)));
                s.write_all(format!("GUARD {ifname} {ip}\n").as_bytes())
                    .map_err(|e| format!("write to {}: {e}", socket.display()))?;
                let mut reply = String::new();
                BufReader::new(s)
                    .read_line(&mut reply)
                    .map_err(|e| format!("read from {}: {e}", socket.display()))?;
                let reply = reply.trim();
                return match reply.strip_prefix("ERR ") {
                    Some(why) => Err(why.to_string()),
                    None if reply == "OK" => Ok(()),
                    None => Err(format!("unexpected reply {reply:?}")),
                };
            }
            Err(e) => format!("connect to {}: {e}", socket.display()),
        };
        if Instant::now() >= deadline {
            return Err(format!("the agent did not answer in time ({last})"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the plugin reads from its network configuration.
#[derive(Debug)]
pub struct PluginConfig {
    pub cni_version: String,
    pub socket: PathBuf,
    pub timeout: Duration,
    /// The previous plugin's result, passed through unchanged.
    pub prev_result: Option<serde_json::Value>,
}

/// Default socket path of the hook (the agent's `--cni-socket` in the Helm chart).
pub const DEFAULT_SOCKET: &str = "/run/cortexflow/cni.sock";

impl PluginConfig {
    pub fn parse(json: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("network configuration: {e}"))?;
        Ok(Self {
            cni_version: v["cniVersion"].as_str().unwrap_or("1.0.0").to_string(),
            socket: v["socket"]
                .as_str()
                .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from),
            timeout: Duration::from_secs(v["timeoutSeconds"].as_u64().unwrap_or(30)),
            prev_result: v.get("prevResult").cloned(),
        })
    }
}

/// The host-side interface and the IPv4 address of the pod, from a previous plugin's result:
/// the first interface without a `sandbox`, the first IPv4 address.
pub fn pod_interface(prev: &serde_json::Value) -> Result<(String, Ipv4Addr), String> {
    let ifname = prev["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .and_then(|i| i["name"].as_str())
        .ok_or("prevResult names no host-side interface")?
        .to_string();
    let ip = prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
        .next()
        .ok_or("prevResult has no IPv4 address")?;
    Ok((ifname, ip))
}

/// The plugin: `CNI_COMMAND` from the environment, the network configuration on stdin, the
/// result (or a CNI error object) on stdout. Returns the exit code.
pub fn plugin(command: &str, stdin: &mut dyn Read, stdout: &mut dyn Write) -> i32 {
    let error = |out: &mut dyn Write, version: &str, code: u32, msg: &str| {
        let _ = writeln!(
            out,
            "{}",
            serde_json::json!({"cniVersion": version, "code": code, "msg": msg})
        );
        1
    };
    if command == "VERSION" {
        let _ = writeln!(
            stdout,
            "{}",
            serde_json::json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]})
        );
        return 0;
    }
    let mut input = String::new();
    if let Err(e) = stdin.read_to_string(&mut input) {
        return error(stdout, "1.0.0", 4, &format!("read stdin: {e}"));
    }
    let cfg = match PluginConfig::parse(&input) {
        Ok(c) => c,
        Err(e) => return error(stdout, "1.0.0", 6, &e),
    };
    match command {
        "DEL" => 0,
        "ADD" | "CHECK" => {
            let Some(prev) = &cfg.prev_result else {
                return error(
                    stdout,
                    &cfg.cni_version,
                    7,
                    "cortexflow-cni is a chained plugin: it needs a prevResult",
                );
            };
            let (ifname, ip) = match pod_interface(prev) {
                Ok(x) => x,
                Err(e) => return error(stdout, &cfg.cni_version, 7, &e),
            };
            if let Err(e) = request_guard(&cfg.socket, &ifname, ip, Instant::now() + cfg.timeout) {
                // 11: try again later.
                return error(stdout, &cfg.cni_version, 11, &e);
            }
            if command == "ADD" {
                let _ = writeln!(stdout, "{prev}");
            }
            0
        }
        other => error(
            stdout,
            &cfg.cni_version,
            4,
            &format!("unknown CNI_COMMAND {other:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_are_refused() {
        assert_eq!(
            parse_request("GUARD cali12 10.0.0.5\n"),
            Ok(("cali12".into(), Ipv4Addr::new(10, 0, 0, 5)))
        );
        for bad in [
            "",
            "GUARD",
            "GUARD cali12",
            "GUARD cali12 nope",
            "GUARD a 1.2.3.4 x",
            "HELLO a 1.2.3.4",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_pod_interface_comes_from_the_previous_result() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "eth0", "sandbox": "/var/run/netns/pod"},
                {"name": "cali1234", "mac": "ee:ee:ee:ee:ee:ee"}
            ],
            "ips": [{"address": "fd00::5/128"}, {"address": "10.244.1.7/32", "interface": 0}]
        });
        assert_eq!(
            pod_interface(&prev),
            Ok(("cali1234".into(), Ipv4Addr::new(10, 244, 1, 7)))
        );
        assert!(pod_interface(&serde_json::json!({"interfaces": [], "ips": []})).is_err());
    }

    #[test]
    fn the_plugin_answers_version_refuses_without_prev_result_and_fails_closed() {
        let mut out = Vec::new();
        assert_eq!(plugin("VERSION", &mut "".as_bytes(), &mut out), 0);
        assert!(String::from_utf8_lossy(&out).contains("supportedVersions"));
        let mut out = Vec::new();
        let cfg = r#"{"cniVersion":"1.0.0","name":"k8s","type":"cortexflow-cni"}"#;
        assert_eq!(plugin("ADD", &mut cfg.as_bytes(), &mut out), 1);
        assert!(String::from_utf8_lossy(&out).contains("prevResult"));
        // No agent at the socket: the ADD fails (the pod does not start unguarded).
        let dir = std::env::temp_dir().join(format!("cf-cni-test-{}", std::process::id()));
        let cfg = serde_json::json!({
            "cniVersion": "1.0.0", "name": "k8s", "type": "cortexflow-cni",
            "socket": dir.join("none.sock"), "timeoutSeconds": 0,
            "prevResult": {"interfaces": [{"name": "cali1"}], "ips": [{"address": "10.0.0.2/32"}]}
        })
        .to_string();
        let mut out = Vec::new();
        assert_eq!(plugin("ADD", &mut cfg.as_bytes(), &mut out), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["code"], 11, "{v}");
        assert_eq!(plugin("DEL", &mut cfg.as_bytes(), &mut Vec::new()), 0);
    }
}
