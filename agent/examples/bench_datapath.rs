//! `cargo xtask bench datapath [--json FILE]`: the datapath against no mesh and against a
//! sidecar mesh, on one network-namespace topology, in one run.
//!
//! * **no mesh** — pod A talks to pod B's address; nothing attached.
//! * **mesh** — CortexFlow: TC policy on both veths with 1 000 policy rules installed, and the
//!   client addressing a ClusterIP that the socket load balancer translates to pod B; flow
//!   events for allowed flows on and drained, as the agent runs by default.
//! * **sidecar** — the sidecar pattern: iptables REDIRECT in both pods to a userspace TCP proxy
//!   (haproxy) on each side.
//!
//! Per scenario: TCP request/response latency p50/p99 (sockperf ping-pong), connection rate
//! (connect + 1-byte request + 1-byte response + close, per second) and single-stream
//! throughput (iperf3), each as a ratio to no mesh (median of the rounds, scenarios interleaved
//! round by round). Then the per-packet cost of the TC programs (kernel run-time statistics)
//! with 10 and with 10 000 policy rules under the connection-rate workload.
//!
//! Needs root. Everything it creates is removed on exit, also on failure.
#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use common::{Cgroup, TestDatapath, Topology};
use cortexflow_agent::{
    compile::{Backend, DesiredState, Endpoint, Frontend},
    datapath::{Capacity, TcMode},
    policy::{Action, EndpointPolicy, Mode, Peer, Peers, PortRange, Protocol, Rule},
};
use cortexflow_common::IDENTITY_HOST;

const LAT_PORT: u16 = 11111;
const TPUT_PORT: u16 = 5201;
const CONN_PORT: u16 = 7000;
const PORTS: [u16; 3] = [LAT_PORT, TPUT_PORT, CONN_PORT];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const ID_A: u32 = 301;
const ID_B: u32 = 302;
const PROXY_UID: &str = "1337";

struct Args {
    json: Option<PathBuf>,
    seconds: u64,
    rounds: usize,
    /// Also measure the mesh's parts alone, to see where its cost is.
    breakdown: bool,
}

/// Which parts of the mesh a scenario runs.
#[derive(Clone, Copy)]
struct Parts {
    /// TC policy programs on both veths.
    tc: bool,
    /// The socket load balancer (the client addresses the ClusterIP).
    socket_lb: bool,
    /// Flow events for allowed flows (drained).
    events: bool,
}

const FULL: Parts = Parts {
    tc: true,
    socket_lb: true,
    events: true,
};

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        seconds: 3,
        rounds: 5,
        breakdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => a.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--seconds" => {
                a.seconds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--seconds needs a number")?
            }
            "--rounds" => {
                a.rounds = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--rounds needs a number")?
            }
            "--breakdown" => a.breakdown = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--connrate-client") {
        return connrate_client();
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench datapath: {e}");
            return ExitCode::from(2);
        }
    };
    for tool in ["sockperf", "iperf3", "haproxy", "iptables"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!("bench datapath: `{tool}` is missing; run `cargo xtask setup`");
            return ExitCode::FAILURE;
        }
    }
    common::sweep_stale();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench datapath failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Servers run on CPU 1 and clients on CPU 0, so that scheduling noise between the two does not
/// drown differences of a few per cent.
const SERVER_CPU: &str = "1";
const CLIENT_CPU: &str = "0";

fn spawn_in(ns: &common::Netns, args: &[&str]) -> Result<Proc, String> {
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
struct Target<'a> {
    ns: &'a common::Netns,
    addr: Ipv4Addr,
    cgroup: Option<&'a Cgroup>,
}

impl Target<'_> {
    /// A command run in the client namespace (and, for the mesh, in its cgroup from the start:
    /// the shell joins the cgroup, then execs the client).
    fn command(&self, args: &[&str]) -> Command {
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

    fn output(&self, args: &[&str]) -> Result<String, String> {
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
struct Sample {
    p50_us: f64,
    p99_us: f64,
    conns_per_s: f64,
    gbit_per_s: f64,
}

fn measure(t: &Target<'_>, seconds: u64) -> Result<Sample, String> {
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
fn connrate_client() -> ExitCode {
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
fn connrate_server(ns: &common::Netns) {
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

/// Policies: B admits A on the benchmark ports plus `extra` rules for other identities and
/// ports (installed, never matched by the benchmark traffic); A may open anything to B.
fn mesh_state(topo: &Topology, extra: u32) -> DesiredState {
    let mut ingress = vec![Rule {
        id: 1,
        action: Action::Allow,
        mode: Mode::Enforce,
        peers: Peers::Only(vec![Peer::Identity(ID_A)]),
        ports: PORTS
            .iter()
            .map(|p| PortRange {
                protocol: Protocol::Tcp,
                first: *p,
                last: *p,
            })
            .collect(),
    }];
    for i in 0..extra {
        ingress.push(Rule {
            id: 10 + i,
            action: if i % 10 == 9 {
                Action::Deny
            } else {
                Action::Allow
            },
            mode: Mode::Enforce,
            peers: Peers::Only(vec![Peer::Identity(5000 + i)]),
            ports: vec![PortRange {
                protocol: if i % 2 == 0 {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                first: 20000 + (i % 40000) as u16,
                last: 20000 + (i % 40000) as u16,
            }],
        });
    }
    let b_policy = EndpointPolicy {
        ingress,
        egress: vec![],
    };
    let a_policy = EndpointPolicy {
        ingress: vec![],
        egress: vec![Rule {
            id: 2,
            action: Action::Allow,
            mode: Mode::Enforce,
            peers: Peers::Only(vec![Peer::Identity(ID_B)]),
            ports: vec![],
        }],
    };
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    let mut s = DesiredState::default();
    s.endpoints.insert(
        a.ifindex,
        Endpoint {
            ip: a.ip,
            identity: ID_A,
            policy: a_policy,
        },
    );
    s.endpoints.insert(
        b.ifindex,
        Endpoint {
            ip: b.ip,
            identity: ID_B,
            policy: b_policy,
        },
    );
    s.ipcache.insert(a.ip, ID_A);
    s.ipcache.insert(b.ip, ID_B);
    s.ipcache.insert(topo.node_ip, IDENTITY_HOST);
    for i in 0..extra.min(2000) {
        s.ipcache.insert(
            Ipv4Addr::new(10, 250, (i / 250) as u8, (i % 250) as u8 + 1),
            5000 + i,
        );
    }
    for p in PORTS {
        s.services.insert(
            Frontend {
                vip: VIP,
                port: p,
                protocol: Protocol::Tcp,
            },
            vec![Backend {
                ip: b.ip,
                port: p,
                weight: 1,
            }],
        );
    }
    s
}

/// The mesh, attached for the life of the value, as the agent runs it by default: flow events
/// for allowed new flows on, and the ring buffer drained as the agent's flow pump does (every
/// 20 ms, or when the kernel wakes it at a quarter full).
struct Mesh {
    dp: Option<TestDatapath>,
    cgroup: Cgroup,
    node: PathBuf,
    drain: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<u64>,
    )>,
}

impl Mesh {
    fn up(topo: &Topology, rules: u32, parts: Parts) -> Result<Self, String> {
        let cgroup = Cgroup::create();
        let node = topo.node.path();
        let ifs: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
        let state = mesh_state(topo, rules);
        let cg = cgroup.path.clone();
        let n = node.clone();
        let dp = std::thread::spawn(
            move || -> Result<(TestDatapath, aya::maps::RingBuf<aya::maps::MapData>), String> {
                cortexflow_agent::netns::enter(&n).map_err(|e| e.to_string())?;
                let mut t = TestDatapath::with(Capacity::default(), TcMode::Auto);
                if parts.tc {
                    for i in &ifs {
                        t.dp().attach_interface(i).map_err(|e| e.to_string())?;
                    }
                }
                if parts.socket_lb {
                    t.dp().attach_cgroup(&cg).map_err(|e| e.to_string())?;
                }
                t.dp()
                    .set_events_allowed(parts.events)
                    .map_err(|e| e.to_string())?;
                t.dp().apply(&state).map_err(|e| e.to_string())?;
                let ring = t.dp().take_events().map_err(|e| e.to_string())?;
                Ok((t, ring))
            },
        )
        .join()
        .map_err(|_| "mesh setup panicked".to_string())??;
        let (dp, mut ring) = dp;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let drain = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                while ring.next().is_some() {
                    n += 1;
                }
                std::thread::sleep(cortexflow_agent::flows::DRAIN_EVERY);
            }
            n
        });
        Ok(Self {
            dp: Some(dp),
            cgroup,
            node,
            drain: Some((stop, drain)),
        })
    }

    /// Average ns per run of the TC programs since the last call.
    fn stats(&self) -> Result<(u64, u64), String> {
        let dp = self.dp.as_ref().ok_or("no datapath")?;
        let stats = dp
            .dp
            .as_ref()
            .ok_or("no datapath")?
            .program_stats()
            .map_err(|e| e.to_string())?;
        Ok(stats.iter().fold((0, 0), |(t, n), s| (t + s.1, n + s.2)))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some((stop, t)) = self.drain.take() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = t.join();
        }
        // Detach inside the node namespace: the pins go, the links with them.
        let dp = self.dp.take();
        let node = self.node.clone();
        let _ = std::thread::spawn(move || {
            let _ = cortexflow_agent::netns::enter(&node);
            drop(dp);
        })
        .join();
    }
}

/// The sidecar reference, set up for the life of the value.
struct Sidecars<'a> {
    topo: &'a Topology,
    _proxies: Vec<Proc>,
    _dir: Tempdir,
}

struct Tempdir(PathBuf);
impl Drop for Tempdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl<'a> Sidecars<'a> {
    fn up(topo: &'a Topology) -> Result<Self, String> {
        let (a, b) = (&topo.pods[0], &topo.pods[1]);
        let dir = Tempdir(std::env::temp_dir().join(common::unique("cfbench-")));
        std::fs::create_dir_all(&dir.0).map_err(|e| e.to_string())?;
        let global = format!(
            "global\n  maxconn 4096\n  uid {PROXY_UID}\n  gid {PROXY_UID}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
        );
        let mut client_cfg = global.clone();
        let mut server_cfg = global;
        for (k, p) in PORTS.iter().enumerate() {
            let out_port = 15000 + k as u16;
            let in_port = 16000 + k as u16;
            client_cfg.push_str(&format!(
                "listen out{p}\n  bind 127.0.0.1:{out_port}\n  server s {}:{p}\n",
                b.ip
            ));
            server_cfg.push_str(&format!(
                "listen in{p}\n  bind 0.0.0.0:{in_port}\n  server s 127.0.0.1:{p}\n"
            ));
            // Outbound capture in the client pod (the proxy's own connections excepted) and
            // inbound capture in the server pod, as sidecar meshes install them.
            a.ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                &b.ip.to_string(),
                "--dport",
                &p.to_string(),
                "-m",
                "owner",
                "!",
                "--uid-owner",
                PROXY_UID,
                "-j",
                "REDIRECT",
                "--to-ports",
                &out_port.to_string(),
            ]);
            b.ns.exec(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "--dport",
                &p.to_string(),
                "-j",
                "REDIRECT",
                "--to-ports",
                &in_port.to_string(),
            ]);
        }
        let ccfg = dir.0.join("client.cfg");
        let scfg = dir.0.join("server.cfg");
        std::fs::write(&ccfg, client_cfg).map_err(|e| e.to_string())?;
        std::fs::write(&scfg, server_cfg).map_err(|e| e.to_string())?;
        let proxies = vec![
            spawn_in(
                &a.ns,
                &["haproxy", "-db", "-f", &ccfg.display().to_string()],
            )?,
            spawn_in(
                &b.ns,
                &["haproxy", "-db", "-f", &scfg.display().to_string()],
            )?,
        ];
        std::thread::sleep(Duration::from_millis(500));
        Ok(Self {
            topo,
            _proxies: proxies,
            _dir: dir,
        })
    }
}

impl Drop for Sidecars<'_> {
    fn drop(&mut self) {
        for p in &self.topo.pods {
            let _ = Command::new("ip")
                .args(["netns", "exec", &p.ns.name, "iptables", "-t", "nat", "-F"])
                .status();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn run(args: &Args) -> Result<(), String> {
    let topo = Topology::new(2, 210);
    let (a, b) = (&topo.pods[0], &topo.pods[1]);
    a.ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=1024 65000",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    let _servers = [
        spawn_in(
            &b.ns,
            &[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                "0.0.0.0",
                "-p",
                &LAT_PORT.to_string(),
            ],
        )?,
        spawn_in(&b.ns, &["iperf3", "-s", "-p", &TPUT_PORT.to_string()])?,
    ];
    connrate_server(&b.ns);
    std::thread::sleep(Duration::from_millis(500));

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    // Scenario names in the order they first ran, for the table.
    let mut order: Vec<&str> = Vec::new();
    let mut record = |name: &'static str, s: Sample| {
        if !samples.contains_key(name) {
            order.push(name);
        }
        samples.entry(name).or_default().push(s);
    };
    for round in 0..args.rounds {
        eprintln!("round {}/{}: no mesh", round + 1, args.rounds);
        let s = measure(
            &Target {
                ns: &a.ns,
                addr: b.ip,
                cgroup: None,
            },
            args.seconds,
        )?;
        record("no-mesh", s);

        let mut meshes = vec![("mesh", "mesh (1000 rules, ClusterIP via socket LB)", FULL)];
        if args.breakdown {
            meshes.extend([
                (
                    "tc-only",
                    "TC policy only, pod address, events on",
                    Parts {
                        socket_lb: false,
                        ..FULL
                    },
                ),
                (
                    "tc-noevt",
                    "TC policy only, pod address, events off",
                    Parts {
                        socket_lb: false,
                        events: false,
                        ..FULL
                    },
                ),
                (
                    "lb-only",
                    "socket LB only, no TC programs",
                    Parts { tc: false, ..FULL },
                ),
            ]);
        }
        for (name, what, parts) in meshes {
            eprintln!("round {}/{}: {what}", round + 1, args.rounds);
            let mesh = Mesh::up(&topo, 1000, parts)?;
            let s = measure(
                &Target {
                    ns: &a.ns,
                    addr: if parts.socket_lb { VIP } else { b.ip },
                    cgroup: Some(&mesh.cgroup),
                },
                args.seconds,
            )?;
            drop(mesh);
            record(name, s);
        }

        eprintln!(
            "round {}/{}: sidecar (iptables REDIRECT + haproxy pair)",
            round + 1,
            args.rounds
        );
        let side = Sidecars::up(&topo)?;
        let s = measure(
            &Target {
                ns: &a.ns,
                addr: b.ip,
                cgroup: None,
            },
            args.seconds,
        )?;
        drop(side);
        record("sidecar", s);
    }
    let agg = |name: &str| -> Sample {
        let v = &samples[name];
        Sample {
            p50_us: median(v.iter().map(|s| s.p50_us).collect()),
            p99_us: median(v.iter().map(|s| s.p99_us).collect()),
            conns_per_s: median(v.iter().map(|s| s.conns_per_s).collect()),
            gbit_per_s: median(v.iter().map(|s| s.gbit_per_s).collect()),
        }
    };

    // Per-packet program cost, 10 vs 10 000 rules, under the connection-rate workload. Run-time
    // statistics cost a clock read per program run, so they are on only here.
    let _stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| format!("enable bpf stats: {e}"))?;
    let exe = std::env::current_exe()
        .map_err(|e| e.to_string())?
        .display()
        .to_string();

    // Interleaved (10, 10 000, 10, …) so that drifts of the machine hit both alike.
    let mut per_rules: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for _ in 0..args.rounds.max(3) {
        for rules in [10u32, 10_000] {
            let mesh = Mesh::up(&topo, rules, FULL)?;
            let t = Target {
                ns: &a.ns,
                addr: VIP,
                cgroup: Some(&mesh.cgroup),
            };
            let (t0, n0) = mesh.stats()?;
            t.output(&[
                &exe,
                "--connrate-client",
                &format!("{VIP}:{CONN_PORT}"),
                &args.seconds.to_string(),
            ])?;
            let (t1, n1) = mesh.stats()?;
            if n1 > n0 {
                per_rules
                    .entry(rules)
                    .or_default()
                    .push((t1 - t0) as f64 / (n1 - n0) as f64);
            }
        }
    }
    let cost: BTreeMap<u32, f64> = per_rules.into_iter().map(|(k, v)| (k, median(v))).collect();

    // Ratios are paired: each round's scenario against the same round's no-mesh run (they ran
    // seconds apart), then the median over rounds.
    let ratio_of = |name: &str| {
        let pairs: Vec<(&Sample, &Sample)> =
            samples[name].iter().zip(&samples["no-mesh"]).collect();
        let med =
            |f: &dyn Fn(&Sample) -> f64| median(pairs.iter().map(|(s, b)| f(s) / f(b)).collect());
        (
            med(&|s| s.p50_us),
            med(&|s| s.p99_us),
            med(&|s| s.conns_per_s),
            med(&|s| s.gbit_per_s),
        )
    };
    println!();
    println!(
        "datapath benchmark: {} rounds × {} s per measurement; values: median of rounds; ratios: median of per-round ratios to no mesh",
        args.rounds, args.seconds
    );
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>10} | {:>8} {:>8} {:>9} {:>9}",
        "scenario", "p50 µs", "p99 µs", "conns/s", "Gbit/s", "p50 ×", "p99 ×", "conn ×", "tput ×"
    );
    let mut json_scen = serde_json::Map::new();
    for &name in &order {
        let s = agg(name);
        let r = ratio_of(name);
        println!(
            "{name:<10} {:>10.2} {:>10.2} {:>12.0} {:>10.2} | {:>8.3} {:>8.3} {:>9.3} {:>9.3}",
            s.p50_us, s.p99_us, s.conns_per_s, s.gbit_per_s, r.0, r.1, r.2, r.3
        );
        json_scen.insert(
            name.into(),
            serde_json::json!({
                "p50_us": s.p50_us, "p99_us": s.p99_us, "conns_per_s": s.conns_per_s, "gbit_per_s": s.gbit_per_s,
                "ratio_p50": r.0, "ratio_p99": r.1, "ratio_conn_rate": r.2, "ratio_throughput": r.3,
                "rounds": samples[name].iter().map(|s| serde_json::json!({"p50_us": s.p50_us, "p99_us": s.p99_us, "conns_per_s": s.conns_per_s, "gbit_per_s": s.gbit_per_s})).collect::<Vec<_>>(),
            }),
        );
    }
    let c10 = cost[&10];
    let c10k = cost[&10_000];
    let cost_ratio = c10k / c10;
    println!(
        "per-packet TC program cost: {c10:.1} ns with 10 rules, {c10k:.1} ns with 10 000 rules (× {cost_ratio:.3})"
    );
    let m = ratio_of("mesh");
    let targets = serde_json::json!({
        "p50_le_1_03": m.0 <= 1.03,
        "p99_le_1_10": m.1 <= 1.10,
        "conn_rate_ge_0_95": m.2 >= 0.95,
        "throughput_ge_0_97": m.3 >= 0.97,
        "cost_ratio_le_1_1": cost_ratio <= 1.1,
    });
    println!("targets (mesh vs no mesh): {targets}");
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "benchmark": "datapath",
            "seconds": args.seconds,
            "rounds": args.rounds,
            "scenarios": json_scen,
            "mesh_ratio": {"p50": m.0, "p99": m.1, "conn_rate": m.2, "throughput": m.3},
            "program_cost_ns_per_packet": {"rules_10": c10, "rules_10000": c10k, "ratio": cost_ratio},
            "targets_met": targets,
        });
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&doc).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
