//! Root-only tests of the kernel datapath: `BPF_PROG_TEST_RUN` on crafted packets for every
//! verdict path, a property test against the reference model, capacity, restarts, and real
//! TCP/UDP traffic between network namespaces, Service load balancing at the socket.
//!
//! Switched on by `CORTEXFLOW_KERNEL_TESTS=1` (what `cargo xtask test` sets in its kernel
//! stage); otherwise every test is reported as ignored.
mod capacity;
#[path = "../common/mod.rs"]
mod common;
mod conntrack;
mod netns;
mod pins;
mod property;
mod services;
mod verdicts;

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use aya::{
    TestRun, TestRunOptions,
    maps::{MapData, RingBuf},
};
use common::{Cgroup, Server, TestDatapath, Topology, sh, tcp_try, udp_try};
use cortexflow_agent::{
    compile::{Backend, DesiredState, Endpoint, Frontend},
    datapath::{Capacity, DatapathError, TcMode},
    policy::{
        self, Action, Cidr, Direction, EndpointPolicy, Mode, Peer, PeerAddr, Peers, PortRange,
        Protocol, Rule,
    },
};
use cortexflow_common::{
    DIR_EGRESS, DIR_INGRESS, FlowEvent, IDENTITY_HOST, Reason, VERDICT_ALLOWED, VERDICT_AUDIT,
    VERDICT_DROPPED, programs,
};
use libtest_mimic::Arguments;
use rand::{
    Rng, SeedableRng,
    rngs::SmallRng,
    seq::{IndexedRandom, SliceRandom},
};

use conntrack::{
    conntrack, conntrack_frees_closed_tcp_flows, counters, policy_change_re_evaluates,
    same_node_delivery,
};
use netns::{netns_clsact, netns_restart, netns_tcp_udp, netns_two_datapaths};
use pins::{
    capacity_refused_whole, pinned_capacity_mismatch, pinned_layout_mismatch, restart_reopens_pins,
};
use property::property_kernel_matches_model;
use services::{helper, service_no_backend, service_udp, service_weights};
use verdicts::{
    an_endpoint_of_unknown_identity_is_enforced, loads_and_passes_the_verifier, verdict_paths,
};

const PASS: i32 = -1;
const DROP: i32 = 2;

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var("CF_HELPER") {
        return helper(&mode);
    }
    let args = Arguments::from_args();
    let tests: Vec<(&str, fn())> = vec![
        (
            "loads_and_passes_the_verifier",
            loads_and_passes_the_verifier,
        ),
        ("verdict_paths", verdict_paths),
        (
            "an_endpoint_of_unknown_identity_is_enforced",
            an_endpoint_of_unknown_identity_is_enforced,
        ),
        (
            "icmp_errors_of_tracked_flows_pass",
            verdicts::icmp_errors_of_tracked_flows_pass,
        ),
        (
            "conntrack_passes_later_packets_and_replies_without_events",
            conntrack,
        ),
        (
            "conntrack_frees_closed_tcp_flows",
            conntrack_frees_closed_tcp_flows,
        ),
        (
            "same_node_delivery_decides_both_ends_in_one_run",
            same_node_delivery,
        ),
        (
            "policy_change_re_evaluates_established_flows",
            policy_change_re_evaluates,
        ),
        (
            "counters_count_packets_and_bytes_by_verdict_and_reason",
            counters,
        ),
        (
            "property_kernel_matches_reference_model_100k",
            property_kernel_matches_model,
        ),
        ("config_too_large_is_refused_whole", capacity_refused_whole),
        (
            "a_write_that_fails_half_way_is_rolled_back",
            capacity::a_write_that_fails_half_way_is_rolled_back,
        ),
        (
            "maps_near_capacity_under_churn_apply_whole_or_refuse_whole",
            capacity::maps_near_capacity_under_churn_apply_whole_or_refuse_whole,
        ),
        (
            "pinned_maps_with_other_capacity_are_refused",
            pinned_capacity_mismatch,
        ),
        (
            "pinned_maps_with_another_layout_are_refused",
            pinned_layout_mismatch,
        ),
        (
            "restart_reopens_pins_with_the_same_state",
            restart_reopens_pins,
        ),
        ("netns_tcp_and_udp_allowed_and_denied", netns_tcp_udp),
        ("netns_clsact_mode_enforces_too", netns_clsact),
        ("netns_two_datapaths_side_by_side", netns_two_datapaths),
        ("netns_links_survive_agent_exit_and_restart", netns_restart),
        (
            "service_balances_by_weight_over_5000_connects",
            service_weights,
        ),
        (
            "service_without_backend_refuses_at_once",
            service_no_backend,
        ),
        (
            "service_udp_replies_come_from_the_service_address",
            service_udp,
        ),
    ];
    common::run(args, tests)
}

// ---- helpers ---------------------------------------------------------------------------------

const EP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const EP_ID: u32 = 300;

fn test_run(t: &mut TestDatapath, prog: &str, pkt: &[u8]) -> i32 {
    let mut out = vec![0u8; pkt.len() + 256];
    let p = t.dp().classifier(prog).expect("program");
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| {
            panic!(
                "BPF_PROG_TEST_RUN of {prog} on a {}-byte packet {:02x?}: {e}",
                pkt.len(),
                &pkt[..pkt.len().min(40)]
            )
        });
    r.return_value as i32
}

fn events(rb: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        out.push(FlowEvent::from_bytes(&item).expect("event"));
    }
    out
}

/// State with one endpoint at ifindex 1 (test runs happen on `lo`).
fn state(policy: EndpointPolicy, ipcache: &[(Ipv4Addr, u32)]) -> DesiredState {
    DesiredState {
        endpoints: BTreeMap::from([(
            1,
            Endpoint {
                ip: EP_IP,
                identity: EP_ID,
                policy,
            },
        )]),
        ipcache: ipcache.iter().copied().collect(),
        services: BTreeMap::new(),
    }
}

fn rule(id: u32, action: Action, mode: Mode, peers: Peers, ports: Vec<PortRange>) -> Rule {
    Rule {
        id,
        action,
        mode,
        peers,
        ports,
    }
}

/// An Enforce-mode Allow rule for identity `identity` on TCP port `port`.
fn allow_tcp(id: u32, identity: u32, port: u16) -> Rule {
    rule(
        id,
        Action::Allow,
        Mode::Enforce,
        ids(&[identity]),
        vec![tcp_ports(port, port)],
    )
}

fn tcp_ports(first: u16, last: u16) -> PortRange {
    PortRange {
        protocol: Protocol::Tcp,
        first,
        last,
    }
}

fn ids(list: &[u32]) -> Peers {
    Peers::Only(list.iter().map(|i| Peer::Identity(*i)).collect())
}

fn open() -> (TestDatapath, RingBuf<MapData>) {
    let mut t = TestDatapath::new();
    t.dp().set_events_allowed(true).expect("config");
    let rb = t.dp().take_events().expect("events");
    (t, rb)
}
