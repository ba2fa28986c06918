//! Root-only tests of the agent process: the real `cortexflow-agent` binary, the real kernel,
//! pods in network namespaces, and an in-process fake operator (a tonic `AgentConfig` server
//! whose config stream the test scripts and whose status reports it reads).
//!
//! * config pushed → pinned maps hold it → traffic allowed and denied accordingly; `/readyz`
//!   only after the first config; `/metrics`; `Flows.Observe` names a dropped flow;
//! * an invalid message → last good state kept, the error reported, a new snapshot asked for;
//!   a config too large for the maps → refused whole and reported; the next good one applies;
//! * 20 agent restarts (SIGTERM and SIGKILL) under ≥ 200 new connections per second plus
//!   long-lived connections: no failed connection, no reset, no verdict change;
//! * the operator gone: the datapath keeps its state; the operator back: resync time.
//!
//! Switched on by `CORTEXFLOW_KERNEL_TESTS=1` (what `cargo xtask test` sets in its kernel
//! stage); otherwise every test is reported as ignored.
mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::Path,
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Server, Topology, tcp_try};
use cortexflow_agent::datapath::Pinned;
use cortexflow_domain::{
    self as domain, Action, Direction, EndpointPolicy, IdentityInfo, Mode, Peer, Peers,
    PolicyGeneration, PortRange, Protocol, Rule, RuleRef,
};
use cortexflow_proto::{
    agent::v1,
    flows::v1::{ObserveRequest, flows_client::FlowsClient},
};
use cortexflow_testkit::{net::enter, node::AgentNode, scripted_operator::ScriptedOperator};
use libtest_mimic::{Arguments, Failed, Trial};

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        (
            "config_reaches_the_kernel_and_enforces",
            config_reaches_the_kernel,
        ),
        (
            "invalid_and_oversized_configs_keep_the_last_good_state",
            invalid_and_oversized,
        ),
        (
            "twenty_restarts_under_traffic_lose_nothing",
            restarts_under_traffic,
        ),
        ("operator_down_fails_static_then_resyncs", operator_down),
    ];
    let enabled = common::enabled();
    let trials = tests
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                std::panic::catch_unwind(f).map_err(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic".into());
                    Failed::from(msg)
                })
            })
            .with_ignored_flag(!enabled)
        })
        .collect();
    if enabled {
        common::sweep_stale();
    } else {
        eprintln!(
            "kernel tests need root: run them with CORTEXFLOW_KERNEL_TESTS=1 (cargo xtask test does)"
        );
    }
    libtest_mimic::run(&args, trials).exit_code()
}

// ---- the node ------------------------------------------------------------------------------------

const NS: &str = "shop";
const NODE: &str = "node-a";

fn identity(pod: usize) -> u32 {
    1001 + pod as u32
}

/// Pod 1's ingress policy: allow TCP `port` from `from`.
struct Policy {
    from: Vec<usize>,
    port: u16,
    generation: i64,
}

/// The config of the node: its pods, pod 1 guarded by `p`, every pod address in the ipcache
/// plus `extra` remote addresses (10.250.x.y, identity 5000).
fn node_config(topo: &Topology, p: &Policy, extra: u32) -> domain::NodeConfig {
    let open = Arc::new(EndpointPolicy::default());
    let guarded = Arc::new(EndpointPolicy {
        ingress: vec![Rule {
            id: 1,
            action: Action::Allow,
            mode: Mode::Enforce,
            peers: Peers::Only(
                p.from
                    .iter()
                    .map(|i| Peer::Identity(identity(*i)))
                    .collect(),
            ),
            ports: vec![PortRange {
                protocol: Protocol::Tcp,
                first: p.port,
                last: p.port,
            }],
        }],
        egress: vec![],
    });
    let endpoints = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| domain::Endpoint {
            namespace: NS.into(),
            name: format!("p{i}"),
            ip: pod.ip,
            identity: identity(i),
            policy_set: if i == 1 { 2 } else { 1 },
        })
        .collect();
    let mut ipcache: Vec<(Ipv4Addr, u32)> = topo
        .pods
        .iter()
        .enumerate()
        .map(|(i, pod)| (pod.ip, identity(i)))
        .collect();
    ipcache.extend((0..extra).map(|n| (Ipv4Addr::from(0x0afa_0000 + n), 5000)));
    domain::NodeConfig {
        version: 0,
        full: true,
        node: Some(domain::NodeInfo {
            name: NODE.into(),
            addresses: vec![topo.node_ip],
            pod_cidr: None,
        }),
        endpoints: Some(domain::Endpoints {
            policy_sets: BTreeMap::from([(1, open), (2, guarded)]),
            endpoints,
            rules: BTreeMap::from([(
                1,
                RuleRef {
                    namespace: NS.into(),
                    policy: "p1-ingress".into(),
                    direction: Direction::Ingress,
                    index: 0,
                },
            )]),
            policies: [PolicyGeneration {
                namespace: NS.into(),
                name: "p1-ingress".into(),
                generation: p.generation,
            }]
            .into(),
        }),
        ipcache: Some(domain::Ipcache {
            full: true,
            upserts: ipcache,
            removals: vec![],
        }),
        services: Some(vec![]),
        identities: Some(
            (0..topo.pods.len())
                .map(|i| IdentityInfo {
                    id: identity(i),
                    namespace: NS.into(),
                    name: format!("p{i}"),
                    kind: "sa".into(),
                })
                .collect(),
        ),
    }
}

/// A node running the agent binary under test.
fn node(pods: usize, net: u8, extra_args: &[&str]) -> AgentNode {
    AgentNode::new(
        Path::new(env!("CARGO_BIN_EXE_cortexflow-agent")),
        NODE,
        pods,
        net,
        extra_args,
    )
    .expect("node")
}

fn pinned(node: &AgentNode) -> Pinned {
    Pinned::open(node.pin_dir()).expect("open pinned maps")
}

/// TCP from pod `from` to pod `to`: the server's tag, or why not.
fn tcp(node: &AgentNode, from: usize, to: usize, port: u16) -> Result<String, std::io::ErrorKind> {
    tokio::task::block_in_place(|| tcp_try(&node.topo.pods[from].ns, node.topo.pods[to].ip, port))
}

/// Checks the verdicts of policy `p` (from pods `p.from` to pod 1 on `p.port` only).
fn assert_enforces(node: &AgentNode, p: &Policy, ports: &[u16]) {
    for from in [0, 2] {
        for &port in ports {
            let got = tcp(node, from, 1, port);
            if p.from.contains(&from) && port == p.port {
                assert_eq!(got, Ok(format!("s{port}")), "p{from} → p1:{port} allowed");
            } else {
                assert!(got.is_err(), "p{from} → p1:{port} denied, got {got:?}");
            }
        }
    }
    // Pod 0 has no policy: everyone reaches it.
    assert_eq!(tcp(node, 2, 0, ports[0]), Ok(format!("s{}", ports[0])));
}

fn servers(node: &AgentNode, ports: &[u16]) -> Vec<Server> {
    let mut out = Vec::new();
    for pod in &node.topo.pods {
        for &port in ports {
            let tag: &'static str = Box::leak(format!("s{port}").into_boxed_str());
            out.push(Server::start(&pod.ns, port, tag));
        }
    }
    out
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn metric(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
}

// ---- tests ---------------------------------------------------------------------------------------

fn config_reaches_the_kernel() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 71, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        node.start_agent(&op.url()).expect("start agent");
        // Not ready before the first config (the operator has none to give yet).
        let deadline = Instant::now() + Duration::from_secs(20);
        let not_ready = loop {
            if let Some((code, _)) = node.admin("/readyz").await {
                break code;
            }
            assert!(Instant::now() < deadline, "{}", node.agent().log_tail(30));
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(not_ready, 503, "/readyz before the first config");
        assert_eq!(node.admin("/healthz").await.map(|r| r.0), Some(200));

        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v = op.set(&node_config(&node.topo, &policy, 100));
        node.wait_ready(Duration::from_secs(10))
            .await
            .expect("ready");
        let r = op
            .report("applied", Duration::from_secs(10), |r| {
                r.applied_version == v
            })
            .await;
        assert_eq!(r.node, NODE);
        assert_eq!(r.failed_version, 0);
        assert_eq!(r.policies.len(), 1);
        assert_eq!(r.policies[0].generation, 1);

        // The pinned maps hold the config.
        let pinned = pinned(&node);
        let eps = pinned.endpoints().expect("endpoints");
        assert_eq!(eps.len(), 3);
        for (i, pod) in node.topo.pods.iter().enumerate() {
            assert_eq!(eps.get(&pod.ip), Some(&(pod.ifindex, identity(i))), "p{i}");
        }
        let ipc = pinned.ipcache().expect("ipcache");
        // The pods, 100 remote addresses, and the node's own address (the host identity).
        assert_eq!(ipc.len(), 104);
        assert_eq!(ipc.get(&node.topo.node_ip), Some(&1));
        assert_eq!(ipc.get(&node.topo.pods[2].ip), Some(&identity(2)));
        assert_eq!(ipc.get(&Ipv4Addr::new(10, 250, 0, 99)), Some(&5000));

        // Flows.Observe: a dropped flow into p1, with names.
        let mut flows = FlowsClient::connect(format!("http://{}", node.grpc))
            .await
            .expect("connect Flows");
        let mut stream = flows
            .observe(ObserveRequest {
                namespace: NS.into(),
                pod: "p1".into(),
                verdicts: vec!["dropped".into()],
                direction: String::new(),
                limit: 1,
            })
            .await
            .expect("observe")
            .into_inner();
        assert_enforces(&node, &policy, &[8080, 9090]);
        let flow = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("a flow within 5 s")
            .expect("stream")
            .expect("a flow");
        let (src, dst) = (flow.source.expect("src"), flow.destination.expect("dst"));
        assert_eq!(flow.node, NODE);
        assert_eq!(flow.verdict, "dropped");
        assert_eq!(flow.direction, "ingress");
        assert_eq!((dst.namespace.as_str(), dst.pod.as_str()), (NS, "p1"));
        assert_eq!(dst.identity_name, "shop/p1");
        assert!(
            ["p0", "p2"].contains(&src.pod.as_str()),
            "source {src:?} is a denied peer"
        );
        eprintln!(
            "flow: {} {} {}:{} ({}) → {}:{} ({}) reason {}",
            flow.direction,
            flow.verdict,
            Ipv4Addr::from(src.ip),
            src.port,
            src.identity_name,
            Ipv4Addr::from(dst.ip),
            dst.port,
            dst.identity_name,
            flow.reason
        );

        // A policy change: now p2 may connect on 9090 instead.
        let changed = Policy {
            from: vec![2],
            port: 9090,
            generation: 2,
        };
        let gen_before = pinned.generation().expect("generation");
        let v2 = op.set(&node_config(&node.topo, &changed, 100));
        let r = op
            .report("applied v2", Duration::from_secs(10), |r| {
                r.applied_version == v2
            })
            .await;
        assert_eq!(r.policies[0].generation, 2);
        assert!(pinned.generation().expect("generation") > gen_before);
        assert_enforces(&node, &changed, &[8080, 9090]);

        // Metrics (after the usage loop's first round).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let (code, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(code, 200);
        for (name, label, want) in [
            ("cortexflow_agent_config_version", "", Some(v2 as f64)),
            (
                "cortexflow_agent_endpoints",
                "state=\"programmed\"",
                Some(3.0),
            ),
            (
                "cortexflow_agent_map_entries",
                "map=\"CF_IPCACHE\"",
                Some(104.0),
            ),
            ("cortexflow_agent_operator_connected", "", Some(1.0)),
            (
                "cortexflow_agent_configs_total",
                "result=\"applied\"",
                Some(2.0),
            ),
        ] {
            assert_eq!(metric(&text, name, label), want, "{name}{{{label}}}");
        }
        for name in [
            "cortexflow_agent_map_capacity",
            "cortexflow_agent_config_apply_duration_seconds_bucket",
            "cortexflow_agent_flows_total",
            "cortexflow_agent_packets_total",
            "cortexflow_agent_drops_total",
            "cortexflow_agent_policy_generation",
        ] {
            assert!(text.contains(name), "/metrics has {name}:\n{text}");
        }
        assert!(
            metric(&text, "cortexflow_agent_drops_total", "").unwrap_or(0.0) > 0.0,
            "drops counted"
        );
        op.stop().await;
    });
}

fn invalid_and_oversized() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        // Room for 50 ipcache entries only.
        let mut node = node(3, 72, &["--map-ipcache", "50"]);
        let _srv = servers(&node, &[8080, 9090]);
        let good = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v1 = op.set(&node_config(&node.topo, &good, 10));
        node.start_agent(&op.url()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v1
        })
        .await;
        let pinned = pinned(&node);
        let (eps, ipc, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.ipcache().expect("ipcache"),
            pinned.generation().expect("generation"),
        );

        // An invalid message: an endpoint with identity 0 (and a policy change with it).
        let subs = op.subscriptions();
        let mut bad = v1::NodeConfig::from(&node_config(
            &node.topo,
            &Policy {
                from: vec![2],
                port: 9090,
                generation: 2,
            },
            10,
        ));
        bad.full = false;
        if let Some(e) = bad.endpoints.as_mut() {
            e.endpoints[2].identity = 0;
        }
        let vbad = op.push_raw(bad);
        let r = op
            .report("refusal", Duration::from_secs(10), |r| {
                r.failed_version == vbad
            })
            .await;
        assert!(r.error.contains("identity 0"), "error: {}", r.error);
        assert_eq!(r.applied_version, v1, "the last good version stays applied");
        // The agent starts over with a new snapshot, which it applies (again v1's content).
        let deadline = Instant::now() + Duration::from_secs(10);
        while op.subscriptions() <= subs {
            assert!(Instant::now() < deadline, "no new subscription");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc);
        assert_eq!(pinned.generation().expect("generation"), generation);
        assert_enforces(&node, &good, &[8080, 9090]);
        eprintln!("invalid message v{vbad} refused: {}", r.error);

        // Too large: 61 ipcache entries (with the node's) for a 50-entry map (and a policy change with it).
        let vbig = op.set(&node_config(
            &node.topo,
            &Policy {
                from: vec![2],
                port: 9090,
                generation: 3,
            },
            57,
        ));
        let r = op
            .report("capacity refusal", Duration::from_secs(10), |r| {
                r.failed_version == vbig
            })
            .await;
        assert!(
            r.error.contains("CF_IPCACHE") && r.error.contains("61"),
            "error names the map and the need: {}",
            r.error
        );
        assert_eq!(r.applied_version, v1);
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc, "nothing written");
        assert_eq!(pinned.generation().expect("generation"), generation);
        assert_enforces(&node, &good, &[8080, 9090]);
        eprintln!("oversized config v{vbig} refused: {}", r.error);
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(
                &text,
                "cortexflow_agent_configs_total",
                "result=\"invalid\""
            ),
            Some(1.0)
        );
        assert_eq!(
            metric(
                &text,
                "cortexflow_agent_configs_total",
                "result=\"refused\""
            ),
            Some(1.0)
        );

        // The next config that fits applies.
        let next = Policy {
            from: vec![2],
            port: 9090,
            generation: 4,
        };
        let vok = op.set(&node_config(&node.topo, &next, 40));
        let r = op
            .report("applied after refusals", Duration::from_secs(10), |r| {
                r.applied_version == vok
            })
            .await;
        assert_eq!(r.failed_version, 0, "the refusal is cleared");
        assert_eq!(pinned.ipcache().expect("ipcache").len(), 44);
        assert_enforces(&node, &next, &[8080, 9090]);
        op.stop().await;
    });
}

/// Traffic from pod 0 to pod 1 (allowed) and from pod 2 to pod 1 (denied) while the agent is
/// restarted: counts what went wrong.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// New connections that completed an exchange, and those that failed.
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// Round trips on long-lived connections, and their errors (resets, timeouts).
    long_rtts: Arc<AtomicU64>,
    long_errors: Arc<AtomicU64>,
    /// Denied connection attempts, and those that got through.
    denied_tries: Arc<AtomicU64>,
    denied_through: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl Traffic {
    fn start(node: &AgentNode, port: u16, rate: u32, long_lived: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: [Arc<AtomicU64>; 6] = Default::default();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        let dst = SocketAddrV4::new(node.topo.pods[1].ip, port);
        let note = |errors: &Arc<Mutex<Vec<String>>>, e: String| {
            if let Ok(mut v) = errors.lock()
                && v.len() < 20
            {
                v.push(e);
            }
        };
        // New connections at `rate` per second from 4 threads: connect, read the tag, send and
        // read back, close.
        for _ in 0..4 {
            let (stop, ok, failed, errors) = (
                stop.clone(),
                counters[0].clone(),
                counters[1].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[0].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                let period = Duration::from_secs(4) / rate;
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    match exchange(dst) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            note(&errors, format!("new connection: {e}"));
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    next += period;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                }
            }));
        }
        // Long-lived connections: a round trip every 20 ms each.
        for _ in 0..long_lived {
            let (stop, rtts, errs, errors) = (
                stop.clone(),
                counters[2].clone(),
                counters[3].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[0].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                let conn = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(2))
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.set_nodelay(true)?;
                        let mut r = BufReader::new(s.try_clone()?);
                        let mut tag = String::new();
                        r.read_line(&mut tag)?;
                        Ok((s, r))
                    });
                let (mut s, mut r) = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        note(&errors, format!("long-lived connect: {e}"));
                        errs.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                let mut n = 0u64;
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    line.clear();
                    let rt = s
                        .write_all(format!("{n}\n").as_bytes())
                        .and_then(|_| r.read_line(&mut line));
                    match rt {
                        Ok(_) if line.trim() == n.to_string() => {
                            rtts.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {
                            note(&errors, format!("long-lived: echo {line:?} for {n}"));
                            errs.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            note(&errors, format!("long-lived: {e}"));
                            errs.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }));
        }
        // Denied: pod 2 tries every 50 ms; a dropped SYN times out after 150 ms.
        {
            let (stop, tries, through, errors) = (
                stop.clone(),
                counters[4].clone(),
                counters[5].clone(),
                errors.clone(),
            );
            let ns = node.topo.pods[2].ns.path();
            threads.push(std::thread::spawn(move || {
                enter(&ns).expect("enter");
                while !stop.load(Ordering::Relaxed) {
                    tries.fetch_add(1, Ordering::Relaxed);
                    if TcpStream::connect_timeout(&dst.into(), Duration::from_millis(150)).is_ok() {
                        note(&errors, "denied connection got through".into());
                        through.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        let [
            ok,
            failed,
            long_rtts,
            long_errors,
            denied_tries,
            denied_through,
        ] = counters;
        Self {
            stop,
            threads,
            ok,
            failed,
            long_rtts,
            long_errors,
            denied_tries,
            denied_through,
            errors,
        }
    }

    fn finish(mut self) -> Self {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One short connection: connect, read the server's tag, one round trip, close.
fn exchange(dst: SocketAddrV4) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    s.write_all(b"ping\n")?;
    line.clear();
    r.read_line(&mut line)?;
    if line != "ping\n" {
        return Err(std::io::Error::other(format!("echo {line:?}")));
    }
    Ok(())
}

fn restarts_under_traffic() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let mut node = node(3, 73, &[]);
        let _srv = servers(&node, &[8080]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let v = op.set(&node_config(&node.topo, &policy, 1000));
        node.start_agent(&op.url()).expect("start agent");
        node.wait_ready(Duration::from_secs(20)).await.expect("ready");
        op.report("applied", Duration::from_secs(10), |r| r.applied_version == v)
            .await;
        let pinned = pinned(&node);
        let (eps, ipc, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.ipcache().expect("ipcache"),
            pinned.generation().expect("generation"),
        );
        let before = pinned.counters().expect("counters");

        let traffic = Traffic::start(&node, 8080, 300, 8);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let ok_at_start = Traffic::get(&traffic.ok);
        let mut downtime = Vec::new();
        let mut ready_times = Vec::new();
        for i in 0..20 {
            let t0 = Instant::now();
            let graceful = i % 2 == 0;
            assert!(node.stop_agent(graceful), "SIGTERM exits cleanly");
            downtime.push(t0.elapsed());
            let t1 = Instant::now();
            node.start_agent(&op.url()).expect("start agent");
            node.wait_ready(Duration::from_secs(20)).await.expect("ready");
            ready_times.push(t1.elapsed());
            assert_eq!(
                pinned.generation().expect("generation"),
                generation,
                "restart {i} changed the policy generation"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The last agent applied the same config without changing anything.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let elapsed = started.elapsed();
        let ok_during = Traffic::get(&traffic.ok) - ok_at_start;
        let traffic = tokio::task::block_in_place(|| traffic.finish());
        let after = pinned.counters().expect("counters");
        let log = std::fs::read_to_string(node.log_path(node.starts())).unwrap_or_default();

        let get = Traffic::get;
        let (ok, failed) = (get(&traffic.ok), get(&traffic.failed));
        let (rtts, long_errors) = (get(&traffic.long_rtts), get(&traffic.long_errors));
        let (tries, through) = (get(&traffic.denied_tries), get(&traffic.denied_through));
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let max_ready = ready_times.iter().map(ms).fold(0.0, f64::max);
        let mean_ready = ready_times.iter().map(ms).sum::<f64>() / ready_times.len() as f64;
        let dropped = |c: &cortexflow_agent::datapath::Counters| {
            c.samples
                .iter()
                .filter(|s| s.verdict == cortexflow_common::VERDICT_DROPPED)
                .map(|s| s.packets)
                .sum::<u64>()
        };
        eprintln!(
            "20 restarts (10 SIGTERM, 10 SIGKILL) in {:.1} s: {ok_during} new connections during \
             them ({:.0}/s), {ok} in all, {failed} failed; {rtts} round trips on 8 long-lived connections, {long_errors} \
             errors; {tries} denied attempts, {through} got through; kernel drops {} (denied \
             SYNs and their retries); generation {generation} unchanged; agent ready after \
             restart: mean {mean_ready:.0} ms, max {max_ready:.0} ms; stop took max {:.0} ms",
            elapsed.as_secs_f64(),
            ok_during as f64 / elapsed.as_secs_f64(),
            dropped(&after) - dropped(&before),
            downtime.iter().map(ms).fold(0.0, f64::max),
        );
        let errors = traffic.errors.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(failed, 0, "failed new connections: {errors:?}");
        assert_eq!(long_errors, 0, "long-lived connection errors: {errors:?}");
        assert_eq!(through, 0, "denied connections got through: {errors:?}");
        assert!(
            ok_during as f64 / elapsed.as_secs_f64() >= 200.0,
            "at least 200 new connections per second"
        );
        assert!(rtts > 0 && tries > 0);
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);
        assert_eq!(pinned.ipcache().expect("ipcache"), ipc);
        assert!(
            log.contains("written=0") && log.contains("deleted=0"),
            "the last agent found the maps as they should be:\n{log}"
        );
        op.stop().await;
    });
}

fn operator_down() {
    runtime().block_on(async {
        let op = ScriptedOperator::start("127.0.0.1:0".parse().expect("addr"), 1).await;
        let addr = op.addr;
        let mut node = node(3, 74, &[]);
        let _srv = servers(&node, &[8080, 9090]);
        let policy = Policy {
            from: vec![0],
            port: 8080,
            generation: 1,
        };
        let cfg = node_config(&node.topo, &policy, 1000);
        let v = op.set(&cfg);
        node.start_agent(&op.url()).expect("start agent");
        node.wait_ready(Duration::from_secs(20))
            .await
            .expect("ready");
        op.report("applied", Duration::from_secs(10), |r| {
            r.applied_version == v
        })
        .await;
        let pinned = pinned(&node);
        let (eps, generation) = (
            pinned.endpoints().expect("endpoints"),
            pinned.generation().expect("generation"),
        );

        let (_, text) = node.admin("/metrics").await.expect("metrics");
        let first_sync = metric(&text, "cortexflow_agent_resync_duration_seconds_sum", "");
        // The operator goes away for 5 s: the datapath keeps enforcing, the agent stays up and
        // ready (it serves the last state), and says it is disconnected.
        op.stop().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(node.agent().running(), "{}", node.agent().log_tail(20));
        assert_enforces(&node, &policy, &[8080, 9090]);
        assert_eq!(node.admin("/readyz").await.map(|r| r.0), Some(200));
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        assert_eq!(
            metric(&text, "cortexflow_agent_operator_connected", ""),
            Some(0.0)
        );
        assert_eq!(pinned.endpoints().expect("endpoints"), eps);

        // Back on the same address, with the same config under a new version (as a restarted
        // operator numbers from its start time).
        let back = Instant::now();
        let op = ScriptedOperator::start(addr, 1 << 40).await;
        let v2 = op.set(&cfg);
        op.report("resynced", Duration::from_secs(15), |r| {
            r.applied_version == v2
        })
        .await;
        let resync = back.elapsed();
        assert_eq!(
            pinned.generation().expect("generation"),
            generation,
            "resyncing the same config changes nothing"
        );
        assert_enforces(&node, &policy, &[8080, 9090]);
        let (_, text) = node.admin("/metrics").await.expect("metrics");
        let sum = metric(&text, "cortexflow_agent_resync_duration_seconds_sum", "");
        let count = metric(&text, "cortexflow_agent_resync_duration_seconds_count", "");
        assert_eq!(count, Some(2.0), "two syncs: the first and the resync");
        eprintln!(
            "operator back → config re-applied and reported in {:.0} ms (reconnect backoff \
             capped at 500 ms); agent-side resync (stream open → programmed) {:.1} ms",
            resync.as_secs_f64() * 1e3,
            (sum.unwrap_or(0.0) - first_sync.unwrap_or(0.0)) * 1e3,
        );
        op.stop().await;
    });
}
