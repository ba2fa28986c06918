//! The workloads: processes pinned to a CPU inside a network namespace, latency (sockperf),
//! throughput (iperf3) and the connection-rate client and server.
use super::*;

/// A child process killed on drop.
pub(crate) struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Servers run on CPU 1 and clients on CPU 0, so that scheduling noise between the two does not
/// drown differences of a few per cent.
pub(crate) const SERVER_CPU: &str = "1";
pub(crate) const CLIENT_CPU: &str = "0";

pub(crate) fn spawn_in(ns: &common::Netns, args: &[&str]) -> Result<Proc, String> {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "taskset", "-c", SERVER_CPU])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Proc)
        .map_err(|e| format!("spawn {args:?}: {e}"))
}

/// Where the client runs and what it addresses.
pub(crate) struct Target<'a> {
    pub(crate) ns: &'a common::Netns,
    pub(crate) addr: Ipv4Addr,
    pub(crate) cgroup: Option<&'a Cgroup>,
}

impl Target<'_> {
    /// A command run in the client namespace (and, for the mesh, in its cgroup from the start:
    /// the shell joins the cgroup, then execs the client).
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        // `ip netns exec` mounts a fresh /sys, hiding the cgroup tree: join the cgroup first.
        let mut c = match self.cgroup {
            Some(cg) => {
                let procs = cg.path.join("cgroup.procs");
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    &format!("echo $$ > {} && exec \"$@\"", procs.display()),
                    "sh",
                    "ip",
                ]);
                c
            }
            None => Command::new("ip"),
        };
        c.args(["netns", "exec", &self.ns.name, "taskset", "-c", CLIENT_CPU]);
        c.args(args);
        c
    }

    pub(crate) fn output(&self, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(args)
            .output()
            .map_err(|e| format!("{args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) conns_per_s: f64,
    pub(crate) gbit_per_s: f64,
}

pub(crate) fn measure(t: &Target<'_>, seconds: u64) -> Result<Sample, String> {
    let secs = seconds.to_string();
    let addr = t.addr.to_string();
    let lat = t.output(&[
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &addr,
        "-p",
        &LAT_PORT.to_string(),
        "-t",
        &secs,
        "-m",
        "64",
    ])?;
    let pct = |p: &str| -> Result<f64, String> {
        lat.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| format!("no percentile {p} in sockperf output:\n{lat}"))
    };
    let p50_us = pct("50.000")?;
    let p99_us = pct("99.000")?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let exe = exe.display().to_string();
    let conn = t.output(&[
        &exe,
        "--connrate-client",
        &format!("{addr}:{CONN_PORT}"),
        &secs,
    ])?;
    let conns_per_s: f64 = conn
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("bad connrate output {conn:?}"))?;
    let tput = t.output(&[
        "iperf3",
        "-c",
        &addr,
        "-p",
        &TPUT_PORT.to_string(),
        "-t",
        &secs,
        "-J",
    ])?;
    let v: serde_json::Value =
        serde_json::from_str(&tput).map_err(|e| format!("iperf3 json: {e}"))?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3: no bits_per_second")?;
    Ok(Sample {
        p50_us,
        p99_us,
        conns_per_s,
        gbit_per_s: bps / 1e9,
    })
}

/// The connection-rate client: connects, sends one byte, reads one byte and the close, for the
/// given time; prints the rate.
pub(crate) fn connrate_client() -> ExitCode {
    let target: SocketAddrV4 = match std::env::args().nth(2).and_then(|s| s.parse().ok()) {
        Some(t) => t,
        None => return ExitCode::from(2),
    };
    let secs: u64 = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let start = Instant::now();
    let mut n = 0u64;
    let mut errors = 0u64;
    let mut buf = [0u8; 8];
    while start.elapsed() < Duration::from_secs(secs) {
        match TcpStream::connect_timeout(&target.into(), Duration::from_secs(1)) {
            Ok(mut s) => {
                if s.write_all(b"x").is_ok() && s.read(&mut buf).is_ok_and(|k| k == 1) {
                    let _ = s.read(&mut buf);
                    n += 1;
                } else {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.1} conns/s ({errors} errors)");
    ExitCode::SUCCESS
}

/// One-byte echo server for the connection-rate workload; the server closes first, so the
/// client's ports do not pile up in TIME_WAIT.
pub(crate) fn connrate_server(ns: &common::Netns) {
    let path = ns.path();
    std::thread::spawn(move || {
        cortexflow_agent::netns::enter(&path).expect("enter");
        let mut cpus = nix::sched::CpuSet::new();
        let _ = cpus.set(1);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus);
        let l = TcpListener::bind(("0.0.0.0", CONN_PORT)).expect("bind");
        let mut buf = [0u8; 8];
        for mut c in l.incoming().flatten() {
            if c.read(&mut buf).is_ok_and(|k| k > 0) {
                let _ = c.write_all(b"y");
            }
        }
    });
}
