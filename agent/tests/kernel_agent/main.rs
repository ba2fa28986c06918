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
#[path = "../common/mod.rs"]
mod common;
mod config;
mod operator_down;
mod restarts;
mod revisions;
mod spoofing;
mod supervision;

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
use libtest_mimic::Arguments;

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
        (
            "an_older_snapshot_never_replaces_the_kernels_state",
            an_older_snapshot_never_replaces_the_kernels_state,
        ),
        (
            "forged_sources_are_dropped_at_the_senders_veth_also_for_pods_not_in_the_config",
            spoofing::forged_sources_are_dropped_at_the_senders_veth,
        ),
        (
            "any_dead_task_ends_the_agent_naming_it_and_the_kernel_keeps_enforcing",
            dead_task_ends_the_agent,
        ),
    ];
    common::run(args, tests)
}

use config::{config_reaches_the_kernel, invalid_and_oversized};
use operator_down::operator_down;
use restarts::restarts_under_traffic;
use revisions::an_older_snapshot_never_replaces_the_kernels_state;
use supervision::dead_task_ends_the_agent;

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
        revision: 0,
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
