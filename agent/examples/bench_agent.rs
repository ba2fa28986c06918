//! `cargo xtask bench agent [--json FILE]`: the real agent binary (release) on a node of 110 pods
//! in network namespaces, fed by a scripted operator over gRPC, with a cluster-wide
//! address→identity table of 50 000 entries.
//!
//! * **memory** — the agent's resident set (VmRSS) idle before its first config (the baseline:
//!   runtime, loaded programs, servers) and after the full config, and its peak (VmHWM).
//! * **full apply** — a whole config (every endpoint, 50 policy sets, 50 000 ipcache entries)
//!   from the moment the operator sends it to the agent's report that it is in the kernel, and
//!   the agent's own apply time (`agent_config_apply_duration_seconds`).
//! * **one-policy change** — an update that changes one MeshPolicy (one policy set, the pods it
//!   selects), the way the operator sends it (only the endpoints section), measured the same
//!   way; p50 and max over `--changes` changes, and the ratio to the full apply.
//!
//! * **resync and restart** — the unchanged full config sent again (an operator restart), and
//!   an agent restart (SIGTERM, a new process) until it is ready again.
//!
//! Targets: RSS ≤ 40 MiB with the full config; a one-policy change applied in ≤ 50 ms.
//! Needs root. Everything it creates is removed on exit, also on failure.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant},
};

use cortexflow_domain::{
    self as domain, Action, Direction, EndpointPolicy, IdentityInfo, Mode, Peer, Peers,
    PolicyGeneration, PortRange, Protocol, Rule, RuleRef,
};
use cortexflow_testkit::{node::AgentNode, scripted_operator::ScriptedOperator};

const APPS: u32 = 50;
const IDENTITIES: u32 = 200;

struct Args {
    json: Option<PathBuf>,
    pods: usize,
    ipcache: u32,
    changes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        pods: 110,
        ipcache: 50_000,
        changes: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--json" => a.json = Some(val()?.into()),
            "--pods" => a.pods = val()?.parse().map_err(|e| format!("--pods: {e}"))?,
            "--ipcache" => a.ipcache = val()?.parse().map_err(|e| format!("--ipcache: {e}"))?,
            "--changes" => a.changes = val()?.parse().map_err(|e| format!("--changes: {e}"))?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.pods == 0 || a.pods > 250 {
        return Err("--pods must be 1..=250".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench agent: {e}");
            return ExitCode::from(2);
        }
    };
    cortexflow_testkit::net::sweep_stale();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench agent: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench agent failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// App `a`'s identity; pods of the node run apps round-robin.
fn app_identity(a: u32) -> u32 {
    1001 + a
}

/// App `a`'s policy: ingress from three other apps on 8080 (`port`) and 9000-9100, egress to
/// four apps on 5432 and 6379 and to DNS (UDP 53).
fn app_policy(a: u32, port: u16, rule_base: u32) -> EndpointPolicy {
    let ids = |offsets: &[u32]| {
        Peers::Only(
            offsets
                .iter()
                .map(|o| Peer::Identity(app_identity((a + o) % APPS)))
                .collect(),
        )
    };
    let tcp = |first, last| PortRange {
        protocol: Protocol::Tcp,
        first,
        last,
    };
    let rule = |n: u32, peers, ports| Rule {
        id: rule_base + n,
        action: Action::Allow,
        mode: Mode::Enforce,
        peers,
        ports,
    };
    EndpointPolicy {
        ingress: vec![
            rule(0, ids(&[1, 2, 3]), vec![tcp(port, port)]),
            rule(1, ids(&[1, 2, 3]), vec![tcp(9000, 9100)]),
        ],
        egress: vec![
            rule(
                2,
                ids(&[4, 5, 6, 7]),
                vec![tcp(5432, 5432), tcp(6379, 6379)],
            ),
            rule(
                3,
                ids(&[10]),
                vec![PortRange {
                    protocol: Protocol::Udp,
                    first: 53,
                    last: 53,
                }],
            ),
        ],
    }
}

/// The endpoints section: one policy set per app (app `a` → set `a + 1`), `ports[a]` its
/// ingress port.
fn endpoints(node: &AgentNode, ports: &[u16]) -> domain::Endpoints {
    let mut policy_sets = BTreeMap::new();
    let mut rules = BTreeMap::new();
    let mut policies = std::collections::BTreeSet::new();
    for a in 0..APPS {
        let base = a * 4 + 1;
        policy_sets.insert(a + 1, Arc::new(app_policy(a, ports[a as usize], base)));
        let name = format!("app{a}");
        for (n, dir) in [
            Direction::Ingress,
            Direction::Ingress,
            Direction::Egress,
            Direction::Egress,
        ]
        .into_iter()
        .enumerate()
        {
            rules.insert(
                base + n as u32,
                RuleRef {
                    namespace: format!("ns{}", a % 5),
                    policy: name.clone(),
                    direction: dir,
                    index: n as u32 % 2,
                },
            );
        }
        policies.insert(PolicyGeneration {
            namespace: format!("ns{}", a % 5),
            name,
            generation: i64::from(ports[a as usize]),
        });
    }
    let endpoints = node
        .topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let a = i as u32 % APPS;
            domain::Endpoint {
                namespace: format!("ns{}", a % 5),
                name: format!("app{a}-{i}"),
                ip: p.ip,
                identity: app_identity(a),
                policy_set: a + 1,
            }
        })
        .collect();
    domain::Endpoints {
        policy_sets,
        endpoints,
        rules,
        policies,
    }
}

fn full_config(node: &AgentNode, ports: &[u16], ipcache: u32) -> domain::NodeConfig {
    let mut upserts: Vec<(Ipv4Addr, u32)> = node
        .topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, p)| (p.ip, app_identity(i as u32 % APPS)))
        .collect();
    let remote = ipcache.saturating_sub(upserts.len() as u32);
    // Pods of the other nodes: 10.64.0.0 onwards.
    upserts.extend((0..remote).map(|n| (Ipv4Addr::from(0x0a40_0000 + n), 1001 + n % IDENTITIES)));
    domain::NodeConfig {
        version: 0,
        revision: 0,
        full: true,
        node: Some(domain::NodeInfo {
            name: node.name.clone(),
            addresses: vec![node.topo.node_ip],
            pod_cidr: None,
        }),
        endpoints: Some(endpoints(node, ports)),
        ipcache: Some(domain::Ipcache {
            full: true,
            upserts,
            removals: vec![],
        }),
        services: Some(vec![]),
        identities: Some(
            (0..IDENTITIES)
                .map(|n| IdentityInfo {
                    id: 1001 + n,
                    namespace: format!("ns{}", n % 5),
                    name: format!("sa{n}"),
                    kind: "sa".into(),
                })
                .collect(),
        ),
    }
}

/// `(VmRSS, VmHWM)` of a process, in KiB.
fn memory(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The sum of the agent's apply-duration histogram, in seconds.
async fn apply_seconds(node: &AgentNode) -> anyhow::Result<f64> {
    let (_, text) = node
        .admin("/metrics")
        .await
        .ok_or_else(|| anyhow::anyhow!("no /metrics"))?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("cortexflow_agent_config_apply_duration_seconds_sum"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

/// Sends with `send`, waits for the report of the version it returns; `(end to end, the
/// agent's own apply time)`.
async fn measure(
    op: &ScriptedOperator,
    node: &AgentNode,
    send: impl FnOnce() -> u64,
) -> anyhow::Result<(Duration, Duration)> {
    let before = apply_seconds(node).await?;
    let t0 = Instant::now();
    let v = send();
    let r = op
        .report("applied", Duration::from_secs(60), |r| {
            r.applied_version == v || r.failed_version == v
        })
        .await;
    let e2e = t0.elapsed();
    anyhow::ensure!(r.applied_version == v, "version {v} refused: {}", r.error);
    // The histogram is updated before the report is sent.
    let own = apply_seconds(node).await? - before;
    Ok((e2e, Duration::from_secs_f64(own.max(0.0))))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let bin = cortexflow_testkit::process::binary("cortexflow-agent", "cortexflow-agent")?;
    eprintln!(
        "bench agent: {} pods in network namespaces, {} ipcache entries, {} one-policy changes; agent {}",
        args.pods,
        args.ipcache,
        args.changes,
        bin.display()
    );
    let t = Instant::now();
    let mut node = AgentNode::new(&bin, "bench-node", args.pods, 90, &[])?;
    eprintln!(
        "  node with {} pods set up in {:.1} s",
        args.pods,
        t.elapsed().as_secs_f64()
    );
    let op = ScriptedOperator::start("127.0.0.1:0".parse()?, 1).await;
    node.start_agent(&op.control())?;
    // Idle: up, serving, no config yet.
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.admin("/readyz").await.is_none() {
        anyhow::ensure!(Instant::now() < deadline, "the agent did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = node
        .agent()
        .pid()
        .ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let (idle_rss, _) = memory(pid)?;

    let mut ports: Vec<u16> = vec![8080; APPS as usize];
    let cfg = full_config(&node, &ports, args.ipcache);
    let (full_e2e, full_own) = measure(&op, &node, || op.set(&cfg)).await?;
    node.wait_ready(Duration::from_secs(10)).await?;
    // Let the usage loop and allocator settle, then sample memory.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (full_rss, _) = memory(pid)?;

    let mut change_e2e = Vec::new();
    let mut change_own = Vec::new();
    for i in 0..args.changes {
        let app = (i * 7) % APPS as usize;
        ports[app] += 1;
        let update = domain::NodeConfig {
            version: 0,
            full: false,
            endpoints: Some(endpoints(&node, &ports)),
            ..Default::default()
        };
        let msg = cortexflow_proto::agent::v1::NodeConfig::from(&update);
        let (e2e, own) = measure(&op, &node, || op.push_raw(msg)).await?;
        change_e2e.push(e2e);
        change_own.push(own);
    }
    let (end_rss, hwm) = memory(pid)?;

    // The same full config again (what a resync after an operator restart sends): a diff with
    // nothing to write.
    let cfg = full_config(&node, &ports, args.ipcache);
    let (resync_e2e, resync_own) = measure(&op, &node, || op.set(&cfg)).await?;
    // An agent restart: SIGTERM, a new process reopens the pins, swaps its programs into the
    // links and applies the snapshot; time from start to ready.
    anyhow::ensure!(node.stop_agent(true), "the agent did not stop cleanly");
    let t = Instant::now();
    node.start_agent(&op.control())?;
    node.wait_ready(Duration::from_secs(60)).await?;
    let restart_ready = t.elapsed();

    change_e2e.sort();
    change_own.sort();
    let p50 = |v: &[Duration]| v[v.len() / 2];
    let max = |v: &[Duration]| v[v.len() - 1];
    let mib = |k: u64| k as f64 / 1024.0;

    println!();
    println!(
        "agent, {} local pods, {} ipcache entries, {} policy sets",
        args.pods, args.ipcache, APPS
    );
    println!(
        "  memory      idle (no config) {:.1} MiB   full config {:.1} MiB ({:.2}× idle)   after changes {:.1} MiB   peak {:.1} MiB   target ≤ 40 MiB: {}",
        mib(idle_rss),
        mib(full_rss),
        full_rss as f64 / idle_rss as f64,
        mib(end_rss),
        mib(hwm),
        if full_rss <= 40 * 1024 && end_rss <= 40 * 1024 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  full apply  send→reported {:.1} ms   agent apply {:.1} ms",
        ms(full_e2e),
        ms(full_own)
    );
    println!(
        "  one-policy change ({}×)  send→reported p50 {:.2} ms max {:.2} ms   agent apply p50 {:.2} ms max {:.2} ms   ({:.3}× full apply)   target ≤ 50 ms: {}",
        args.changes,
        ms(p50(&change_e2e)),
        ms(max(&change_e2e)),
        ms(p50(&change_own)),
        ms(max(&change_own)),
        ms(p50(&change_e2e)) / ms(full_e2e),
        if max(&change_e2e) <= Duration::from_millis(50) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "  unchanged full config (resync)  send→reported {:.1} ms   agent apply {:.1} ms",
        ms(resync_e2e),
        ms(resync_own)
    );
    println!(
        "  agent restart (SIGTERM, new process) → ready {:.1} ms",
        ms(restart_ready)
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "bench": "agent",
            "pods": args.pods,
            "ipcache": args.ipcache,
            "policy_sets": APPS,
            "memory_kib": {"idle": idle_rss, "full": full_rss, "after_changes": end_rss, "peak": hwm},
            "full_apply_ms": {"send_to_report": ms(full_e2e), "agent": ms(full_own)},
            "one_policy_change_ms": {
                "send_to_report": change_e2e.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "agent": change_own.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "p50_send_to_report": ms(p50(&change_e2e)),
                "max_send_to_report": ms(max(&change_e2e)),
            },
            "resync_unchanged_ms": {"send_to_report": ms(resync_e2e), "agent": ms(resync_own)},
            "restart_to_ready_ms": ms(restart_ready),
            "targets": {"rss_mib": 40, "one_policy_change_ms": 50},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("  wrote {}", path.display());
    }
    op.stop().await;
    Ok(())
}
