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
#[path = "../../tests/common/mod.rs"]
mod common;
mod scenarios;
mod workload;

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

use scenarios::*;
use workload::*;

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
