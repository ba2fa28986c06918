//! Root-only tests of the kernel datapath: `BPF_PROG_TEST_RUN` on crafted packets for every
//! verdict path, a property test against the reference model, capacity, restarts, and real
//! TCP/UDP traffic between network namespaces, Service load balancing at the socket.
//!
//! Switched on by `CORTEXFLOW_KERNEL_TESTS=1` (what `cargo xtask test` sets in its kernel
//! stage); otherwise every test is reported as ignored.
mod common;

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
use libtest_mimic::{Arguments, Failed, Trial};
use rand::{Rng, SeedableRng, rngs::SmallRng, seq::IndexedRandom};

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

// ---- BPF_PROG_TEST_RUN -----------------------------------------------------------------------

fn loads_and_passes_the_verifier() {
    let mut t = TestDatapath::new();
    for name in [programs::FROM_POD, programs::TO_POD] {
        t.dp().classifier(name).expect("classifier loaded");
    }
    assert!(t.pin_dir.join("maps/CF_POLICY").exists(), "maps are pinned");
}

struct Case {
    name: &'static str,
    policy: EndpointPolicy,
    prog: &'static str,
    pkt: Vec<u8>,
    ret: i32,
    /// (verdict, reason, rule) of the one event expected, if any.
    event: Option<(u8, Reason, u32)>,
}

fn verdict_paths() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let node = Ipv4Addr::new(10, 0, 255, 1);
    let ext = Ipv4Addr::new(192, 168, 7, 7);
    let ipcache = [(peer, 301), (node, IDENTITY_HOST), (EP_IP, EP_ID)];
    let allow_301_80 = EndpointPolicy {
        ingress: vec![allow_tcp(11, 301, 80)],
        egress: vec![allow_tcp(12, 301, 80)],
    };
    let deny_any = EndpointPolicy {
        ingress: vec![
            rule(20, Action::Allow, Mode::Enforce, Peers::Any, vec![]),
            rule(
                21,
                Action::Deny,
                Mode::Enforce,
                ids(&[301]),
                vec![tcp_ports(1, 1024)],
            ),
        ],
        egress: vec![],
    };
    let audit = EndpointPolicy {
        ingress: vec![
            rule(30, Action::Allow, Mode::Audit, ids(&[302]), vec![]),
            rule(
                31,
                Action::Deny,
                Mode::Audit,
                ids(&[301]),
                vec![tcp_ports(443, 443)],
            ),
        ],
        egress: vec![],
    };
    let block = EndpointPolicy {
        ingress: vec![],
        egress: vec![rule(
            40,
            Action::Allow,
            Mode::Enforce,
            Peers::Only(vec![Peer::IpBlock {
                cidr: "192.168.0.0/16".parse().unwrap(),
                except: vec!["192.168.7.0/24".parse().unwrap()],
            }]),
            vec![],
        )],
    };
    let none = EndpointPolicy::default();
    use common::{arp, bad_ihl, fragment, icmp, ipv6, tcp, udp};
    let cases = vec![
        Case {
            name: "no policy: passes",
            policy: none.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4000, EP_IP, 80),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::NoPolicy, 0)),
        },
        Case {
            name: "allow rule matches",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4001, EP_IP, 80),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::PolicyAllow, 11)),
        },
        Case {
            name: "default deny: other port",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4002, EP_IP, 81),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "default deny: other protocol",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: udp(peer, 4003, EP_IP, 80),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "egress allow",
            policy: allow_301_80.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(EP_IP, 4004, peer, 80),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::PolicyAllow, 12)),
        },
        Case {
            name: "egress default deny: world",
            policy: allow_301_80.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(EP_IP, 4005, ext, 80),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "host always reaches the pod",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: tcp(node, 4006, EP_IP, 10250),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::Host, 0)),
        },
        Case {
            name: "deny beats allow",
            policy: deny_any.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4007, EP_IP, 22),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::PolicyDeny, 21)),
        },
        Case {
            name: "deny does not cover the port",
            policy: deny_any.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4008, EP_IP, 8080),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::PolicyAllow, 20)),
        },
        Case {
            name: "audit deny reports, passes",
            policy: audit.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4009, EP_IP, 443),
            ret: PASS,
            event: Some((VERDICT_AUDIT, Reason::PolicyDeny, 31)),
        },
        Case {
            name: "audit default deny reports, passes",
            policy: audit.clone(),
            prog: programs::TO_POD,
            pkt: tcp(peer, 4010, EP_IP, 80),
            ret: PASS,
            event: Some((VERDICT_AUDIT, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "ipBlock allows",
            policy: block.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(EP_IP, 4011, Ipv4Addr::new(192, 168, 1, 1), 443),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::PolicyAllow, 40)),
        },
        Case {
            name: "ipBlock except drops",
            policy: block.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(EP_IP, 4012, ext, 443),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "ipBlock never matches pods",
            policy: block.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(EP_IP, 4013, peer, 443),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "icmp: matched by a rule without ports",
            policy: deny_any.clone(),
            prog: programs::TO_POD,
            pkt: icmp(peer, EP_IP),
            ret: PASS,
            event: None,
        },
        Case {
            name: "icmp: not matched by a port rule",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: icmp(peer, EP_IP),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "ipv6 to an enforced endpoint drops",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: ipv6(),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::Ipv6, 0)),
        },
        Case {
            name: "ipv6 under audit only is reported",
            policy: audit.clone(),
            prog: programs::TO_POD,
            pkt: ipv6(),
            ret: PASS,
            event: Some((VERDICT_AUDIT, Reason::Ipv6, 0)),
        },
        Case {
            name: "ipv6 without policy passes",
            policy: none.clone(),
            prog: programs::TO_POD,
            pkt: ipv6(),
            ret: PASS,
            event: None,
        },
        Case {
            name: "fragment to an enforced endpoint drops",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: fragment(peer, EP_IP),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::Fragment, 0)),
        },
        Case {
            name: "fragment without policy passes",
            policy: none.clone(),
            prog: programs::TO_POD,
            pkt: fragment(peer, EP_IP),
            ret: PASS,
            event: None,
        },
        Case {
            name: "spoofed source drops",
            policy: none.clone(),
            prog: programs::FROM_POD,
            pkt: tcp(peer, 4014, ext, 80),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::Spoofed, 0)),
        },
        Case {
            name: "malformed drops",
            policy: none.clone(),
            prog: programs::TO_POD,
            pkt: bad_ihl(),
            ret: DROP,
            event: None,
        },
        Case {
            name: "arp passes",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: arp(),
            ret: PASS,
            event: None,
        },
    ];
    let (mut t, mut rb) = open();
    let mut failures = Vec::new();
    for c in cases {
        t.dp()
            .apply(&state(c.policy.clone(), &ipcache))
            .expect("apply");
        let _ = events(&mut rb);
        let ret = test_run(&mut t, c.prog, &c.pkt);
        let evs = events(&mut rb);
        let got_event = evs.first().map(|e| {
            (
                e.verdict,
                Reason::from_u8(e.reason).expect("reason"),
                e.rule,
            )
        });
        if ret != c.ret || got_event != c.event || evs.len() > 1 {
            failures.push(format!(
                "{}: ret {ret} (want {}), events {got_event:?} of {} (want {:?})",
                c.name,
                c.ret,
                evs.len(),
                c.event
            ));
        }
    }
    // Unmanaged: no endpoint at the interface.
    t.dp().apply(&DesiredState::default()).expect("apply");
    let ret = test_run(
        &mut t,
        programs::TO_POD,
        &common::tcp(peer, 4015, EP_IP, 80),
    );
    if ret != PASS || !events(&mut rb).is_empty() {
        failures.push(format!("unmanaged: ret {ret}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn conntrack() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let (mut t, mut rb) = open();
    let p = EndpointPolicy {
        ingress: vec![],
        egress: vec![allow_tcp(5, 301, 80)],
    };
    t.dp().apply(&state(p, &[(peer, 301)])).expect("apply");
    assert_eq!(
        test_run(
            &mut t,
            programs::FROM_POD,
            &common::tcp(EP_IP, 5000, peer, 80)
        ),
        PASS
    );
    assert_eq!(events(&mut rb).len(), 1, "one event for the new flow");
    for _ in 0..50 {
        assert_eq!(
            test_run(
                &mut t,
                programs::FROM_POD,
                &common::tcp(EP_IP, 5000, peer, 80)
            ),
            PASS
        );
        // The reply arrives through the other hook.
        assert_eq!(
            test_run(
                &mut t,
                programs::TO_POD,
                &common::tcp(peer, 80, EP_IP, 5000)
            ),
            PASS
        );
    }
    assert!(
        events(&mut rb).is_empty(),
        "no event per packet of an accepted flow"
    );
    let counters = t.dp().counters().expect("counters");
    let get = |r: Reason| counters.packets(VERDICT_ALLOWED, r);
    assert_eq!(get(Reason::Established), 50);
    assert_eq!(get(Reason::Reply), 50);
    // An inbound packet of a flow nobody opened is a new flow and default-denied.
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 80, EP_IP, 5001)
        ),
        PASS
    );
}

/// A closed TCP connection frees its entry: after both FINs, at the last ACK; at once on a RST.
fn conntrack_frees_closed_tcp_flows() {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let (mut t, mut rb) = open();
    // Egress to the peer allowed; ingress default-deny (only replies come in).
    let p = EndpointPolicy {
        ingress: vec![allow_tcp(6, 999, 1)],
        egress: vec![allow_tcp(5, 301, 80)],
    };
    t.dp().apply(&state(p, &[(peer, 301)])).expect("apply");
    let out = |f| common::tcp_with(EP_IP, 5000, peer, 80, f);
    let back = |f| common::tcp_with(peer, 80, EP_IP, 5000, f);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(SYN)), PASS);
    assert_eq!(test_run(&mut t, programs::TO_POD, &back(SYN | ACK)), PASS);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(ACK)), PASS);
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 1);
    // The peer closes first, the pod answers with its FIN, the peer's last ACK ends it.
    assert_eq!(test_run(&mut t, programs::TO_POD, &back(FIN | ACK)), PASS);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(ACK)), PASS);
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 1, "half-closed");
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(FIN | ACK)), PASS);
    assert_eq!(
        t.dp().conntrack_entries().expect("ct"),
        1,
        "both FINs, no last ACK yet"
    );
    assert_eq!(test_run(&mut t, programs::TO_POD, &back(ACK)), PASS);
    assert_eq!(
        t.dp().conntrack_entries().expect("ct"),
        0,
        "closed: entry freed"
    );
    // A late retransmission of the peer's FIN is a flow nobody opened: dropped, no entry.
    assert_eq!(test_run(&mut t, programs::TO_POD, &back(FIN | ACK)), DROP);
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 0);
    // A RST ends a flow at once, from either side.
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(SYN)), PASS);
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 1);
    assert_eq!(test_run(&mut t, programs::TO_POD, &back(RST | ACK)), PASS);
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 0);
    // Data after one FIN (a half-close) keeps the flow.
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(SYN)), PASS);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out(FIN | ACK)), PASS);
    for _ in 0..5 {
        assert_eq!(test_run(&mut t, programs::TO_POD, &back(ACK)), PASS);
    }
    assert_eq!(t.dp().conntrack_entries().expect("ct"), 1);
    let _ = events(&mut rb);
}

/// Traffic between two pods of the node is decided at both ends in the sender's run and handed
/// straight to the receiver (TC_ACT_REDIRECT); a drop at the receiver's ingress drops it there.
/// Traffic to a pod of another node takes the routed path (PASS).
fn same_node_delivery() {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const REDIRECT: i32 = 7;
    let dst_ip = Ipv4Addr::new(10, 0, 0, 11);
    let remote = Ipv4Addr::new(10, 0, 0, 20);
    let (mut t, mut rb) = open();
    let mut s = state(
        EndpointPolicy::default(),
        &[(EP_IP, EP_ID), (dst_ip, 302), (remote, 303)],
    );
    s.endpoints.insert(
        2,
        Endpoint {
            ip: dst_ip,
            identity: 302,
            policy: EndpointPolicy {
                ingress: vec![allow_tcp(9, EP_ID, 80)],
                egress: vec![],
            },
        },
    );
    t.dp().apply(&s).expect("apply");
    let _ = events(&mut rb);
    let syn = common::tcp_with(EP_IP, 5000, dst_ip, 80, SYN);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &syn), REDIRECT);
    let ends = |evs: &[FlowEvent]| -> Vec<(u8, u32, u8, u8, u32, u32, u32)> {
        evs.iter()
            .map(|e| {
                (
                    e.direction,
                    e.ifindex,
                    e.verdict,
                    e.reason,
                    e.rule,
                    e.src_identity,
                    e.dst_identity,
                )
            })
            .collect()
    };
    // The sender's egress (no policy) and the receiver's ingress, as events report them.
    let sender = (
        DIR_EGRESS,
        1,
        VERDICT_ALLOWED,
        Reason::NoPolicy as u8,
        0,
        EP_ID,
        302,
    );
    let receiver = |verdict: u8, reason: Reason, rule: u32| {
        (DIR_INGRESS, 2, verdict, reason as u8, rule, EP_ID, 302)
    };
    assert_eq!(
        ends(&events(&mut rb)),
        vec![sender, receiver(VERDICT_ALLOWED, Reason::PolicyAllow, 9)],
        "one new-flow event per end"
    );
    assert_eq!(
        t.dp().conntrack_entries().expect("ct"),
        2,
        "an entry per end"
    );
    let ack = common::tcp_with(EP_IP, 5000, dst_ip, 80, ACK);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &ack), REDIRECT);
    assert!(events(&mut rb).is_empty(), "tracked at both ends");

    // Port 81 is not admitted by the receiver: dropped in the sender's run.
    let denied = common::tcp_with(EP_IP, 5001, dst_ip, 81, SYN);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &denied), DROP);
    assert_eq!(
        ends(&events(&mut rb)),
        vec![sender, receiver(VERDICT_DROPPED, Reason::DefaultDeny, 0)]
    );

    // A pod of another node: the routed path.
    let out = common::tcp_with(EP_IP, 5002, remote, 80, SYN);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &out), PASS);
    let _ = events(&mut rb);
}

fn policy_change_re_evaluates() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let (mut t, mut rb) = open();
    let allow = EndpointPolicy {
        ingress: vec![rule(5, Action::Allow, Mode::Enforce, ids(&[301]), vec![])],
        egress: vec![],
    };
    let deny = EndpointPolicy {
        ingress: vec![rule(
            6,
            Action::Deny,
            Mode::Enforce,
            ids(&[301]),
            vec![tcp_ports(80, 80)],
        )],
        egress: vec![],
    };
    t.dp()
        .apply(&state(allow.clone(), &[(peer, 301)]))
        .expect("apply");
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 6000, EP_IP, 80)
        ),
        PASS
    );
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 6001, EP_IP, 80)
        ),
        PASS
    );
    let _ = events(&mut rb);
    let gen0 = t.dp().generation();
    let stats = t.dp().apply(&state(deny, &[(peer, 301)])).expect("apply");
    assert!(stats.generation_bumped && t.dp().generation() != gen0);
    // The established flow's next packet (either direction) is re-evaluated and dropped.
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 6000, EP_IP, 80)
        ),
        DROP
    );
    assert_eq!(
        test_run(
            &mut t,
            programs::FROM_POD,
            &common::tcp(EP_IP, 80, peer, 6001)
        ),
        DROP
    );
    let evs = events(&mut rb);
    assert_eq!(evs.len(), 2, "{evs:?}");
    assert!(evs.iter().all(|e| e.verdict == VERDICT_DROPPED
        && e.reason == Reason::PolicyDeny as u8
        && e.rule == 6));
    // Its conntrack entry is gone: the next packet is a new flow, dropped again.
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 6000, EP_IP, 80)
        ),
        DROP
    );
    // Applying the same state again changes nothing and re-evaluates nothing.
    let stats = t
        .dp()
        .apply(&state(allow.clone(), &[(peer, 301)]))
        .expect("apply");
    assert!(stats.generation_bumped);
    let stats = t.dp().apply(&state(allow, &[(peer, 301)])).expect("apply");
    assert_eq!(
        (stats.written, stats.deleted, stats.generation_bumped),
        (0, 0, false)
    );
}

fn counters() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let (mut t, _rb) = open();
    let deny = EndpointPolicy {
        ingress: vec![rule(6, Action::Deny, Mode::Enforce, Peers::Any, vec![])],
        egress: vec![],
    };
    t.dp().apply(&state(deny, &[(peer, 301)])).expect("apply");
    let pkt = common::udp(peer, 7000, EP_IP, 53);
    for _ in 0..10 {
        assert_eq!(test_run(&mut t, programs::TO_POD, &pkt), DROP);
    }
    let counters = t.dp().counters().expect("counters");
    let c = counters
        .samples
        .iter()
        .find(|c| c.verdict == VERDICT_DROPPED && c.reason == Reason::PolicyDeny)
        .expect("policy_deny counter");
    assert_eq!(c.packets, 10);
    assert_eq!(c.bytes, 10 * pkt.len() as u64);
    assert_eq!(counters.events_lost, 0);
}

// ---- property test ---------------------------------------------------------------------------

const POD_IDS: [u32; 4] = [301, 302, 303, 304];

fn random_policy(rng: &mut SmallRng, cidrs: &[Cidr]) -> EndpointPolicy {
    let mut next_id = 1u32;
    let mut rules = |rng: &mut SmallRng| {
        let n = rng.random_range(0..=4);
        (0..n)
            .map(|_| {
                next_id += rng.random_range(1..5);
                let peers = if rng.random_bool(0.25) {
                    Peers::Any
                } else {
                    let k = rng.random_range(0..=3);
                    Peers::Only(
                        (0..k)
                            .map(|_| {
                                if rng.random_bool(0.6) {
                                    let pool = [301, 302, 303, 304, IDENTITY_HOST, 999];
                                    Peer::Identity(*pool.choose(rng).expect("pool"))
                                } else {
                                    let cidr = *cidrs.choose(rng).expect("cidrs");
                                    let except = cidrs
                                        .iter()
                                        .filter(|c| {
                                            cidr.covers(c) && **c != cidr && rng.random_bool(0.5)
                                        })
                                        .copied()
                                        .collect();
                                    Peer::IpBlock { cidr, except }
                                }
                            })
                            .collect(),
                    )
                };
                let ports = if rng.random_bool(0.3) {
                    vec![]
                } else {
                    (0..rng.random_range(1..=3))
                        .map(|_| {
                            let protocol = if rng.random_bool(0.7) {
                                Protocol::Tcp
                            } else {
                                Protocol::Udp
                            };
                            let (first, last) = match rng.random_range(0..5) {
                                0 => (80, 80),
                                1 => (1, 1024),
                                2 => (1000, 2000),
                                3 => (53, 53),
                                _ => {
                                    let a = rng.random_range(1..=65535u16);
                                    let b = rng.random_range(a..=a.saturating_add(3000));
                                    (a, b)
                                }
                            };
                            PortRange {
                                protocol,
                                first,
                                last,
                            }
                        })
                        .collect()
                };
                Rule {
                    id: next_id,
                    action: if rng.random_bool(0.7) {
                        Action::Allow
                    } else {
                        Action::Deny
                    },
                    mode: if rng.random_bool(0.75) {
                        Mode::Enforce
                    } else {
                        Mode::Audit
                    },
                    peers,
                    ports,
                }
            })
            .collect::<Vec<_>>()
    };
    let ingress = rules(rng);
    let egress = rules(rng);
    EndpointPolicy { ingress, egress }
}

fn property_kernel_matches_model() {
    const CASES: usize = 100_000;
    const PACKETS_PER_POLICY: usize = 25;
    let seed: u64 = std::env::var("CF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00c0_ffee);
    let mut rng = SmallRng::seed_from_u64(seed);
    let cidrs: Vec<Cidr> = [
        "0.0.0.0/0",
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.0/24",
        "192.168.0.0/16",
        "192.168.1.0/24",
        "172.16.0.0/12",
        "8.8.8.8/32",
    ]
    .iter()
    .map(|s| s.parse().expect("cidr"))
    .collect();
    let external: Vec<Ipv4Addr> = [
        "10.1.2.3",
        "10.1.9.9",
        "10.9.9.9",
        "192.168.1.5",
        "192.168.200.1",
        "172.16.5.5",
        "8.8.8.8",
        "8.8.4.4",
        "1.1.1.1",
    ]
    .iter()
    .map(|s| s.parse().expect("ip"))
    .collect();
    let pods: Vec<Ipv4Addr> = (1..=4).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    let node = Ipv4Addr::new(10, 0, 255, 1);
    let interesting = [
        1u16, 22, 53, 79, 80, 81, 443, 999, 1000, 1024, 1025, 1500, 2000, 2001, 8080, 65535,
    ];

    let (mut t, mut rb) = open();
    let mut checked = 0usize;
    let mut mismatches = Vec::new();
    let mut sport: u16 = 1024;
    while checked < CASES {
        let policy = random_policy(&mut rng, &cidrs);
        // Pod identities are shuffled per policy.
        let mut ipcache: Vec<(Ipv4Addr, u32)> = pods
            .iter()
            .map(|p| (*p, *POD_IDS.choose(&mut rng).expect("id")))
            .collect();
        ipcache.push((node, IDENTITY_HOST));
        ipcache.push((EP_IP, EP_ID));
        t.dp()
            .apply(&state(policy.clone(), &ipcache))
            .expect("apply");
        let _ = events(&mut rb);
        for _ in 0..PACKETS_PER_POLICY {
            let dir = if rng.random_bool(0.5) {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            let (addr, cluster_identity) = match rng.random_range(0..10) {
                0..=4 => {
                    let i = rng.random_range(0..ipcache.len() - 1);
                    (ipcache[i].0, Some(ipcache[i].1))
                }
                _ => (*external.choose(&mut rng).expect("ext"), None),
            };
            let peer = PeerAddr {
                addr,
                cluster_identity,
            };
            let protocol: u8 = *[6u8, 6, 17, 17, 1].choose(&mut rng).expect("proto");
            let port = if rng.random_bool(0.5) {
                *interesting.choose(&mut rng).expect("port")
            } else {
                rng.random_range(1..=65535)
            };
            sport = if sport >= 65000 { 1024 } else { sport + 1 };
            let (src, dst) = if dir == Direction::Egress {
                (EP_IP, addr)
            } else {
                (addr, EP_IP)
            };
            let pkt = match protocol {
                6 => common::tcp(src, sport, dst, port),
                17 => common::udp(src, sport, dst, port),
                _ => common::icmp(src, dst),
            };
            let port_seen = if protocol == 1 { 0 } else { port };
            let prog = if dir == Direction::Egress {
                programs::FROM_POD
            } else {
                programs::TO_POD
            };
            let ret = test_run(&mut t, prog, &pkt);
            let evs = events(&mut rb);
            let want = policy::decide(&policy, dir, &peer, protocol, port_seen);
            let want_ret = if want.allowed { PASS } else { DROP };
            let want_event = if !want.allowed {
                Some((VERDICT_DROPPED, want.reason, want.rule))
            } else if let Some((r, rule)) = want.audit {
                Some((VERDICT_AUDIT, r, rule))
            } else if protocol != 1 {
                Some((VERDICT_ALLOWED, want.reason, want.rule))
            } else {
                None
            };
            let got_event = evs.first().map(|e| {
                (
                    e.verdict,
                    Reason::from_u8(e.reason).expect("reason"),
                    e.rule,
                )
            });
            let identity_ok = evs.first().is_none_or(|e| {
                let (ep_side, peer_side) = if dir == Direction::Egress {
                    (e.src_identity, e.dst_identity)
                } else {
                    (e.dst_identity, e.src_identity)
                };
                ep_side == EP_ID && cluster_identity.is_none_or(|id| id == peer_side)
            });
            if ret != want_ret || got_event != want_event || evs.len() > 1 || !identity_ok {
                mismatches.push(format!(
                    "seed {seed} case {checked}: {dir:?} peer {addr} ({cluster_identity:?}) proto {protocol} port {port_seen}: kernel ret {ret} event {got_event:?} (n={}), model {want:?}\npolicy {policy:?}",
                    evs.len()
                ));
            }
            checked += 1;
            if mismatches.len() >= 5 {
                break;
            }
        }
        if mismatches.len() >= 5 {
            break;
        }
        if checked % 30_000 < PACKETS_PER_POLICY {
            t.dp().flush_conntrack().expect("flush");
        }
    }
    assert!(
        mismatches.is_empty(),
        "kernel and model disagree:\n{}",
        mismatches.join("\n\n")
    );
    eprintln!("property: {checked} cases, kernel == model (seed {seed})");
}

// ---- capacity and restarts -------------------------------------------------------------------

fn capacity_refused_whole() {
    let capacity = Capacity {
        policy: 64,
        ..Capacity::default()
    };
    let mut t = TestDatapath::with(capacity, TcMode::Auto);
    let small = EndpointPolicy {
        ingress: vec![allow_tcp(1, 301, 80)],
        egress: vec![],
    };
    t.dp().apply(&state(small, &[])).expect("small config fits");
    let before = t.dp().read_installed().expect("read");
    // 40 identities × (1-65535 → 16 blocks) = 640 policy entries.
    let big = EndpointPolicy {
        ingress: vec![rule(
            2,
            Action::Allow,
            Mode::Enforce,
            ids(&(400..440).collect::<Vec<_>>()),
            vec![tcp_ports(1, 65535)],
        )],
        egress: vec![],
    };
    let ipcache: Vec<(Ipv4Addr, u32)> = (0..50u8)
        .map(|i| (Ipv4Addr::new(10, 9, 0, i), 500 + u32::from(i)))
        .collect();
    let err = t
        .dp()
        .apply(&state(big, &ipcache))
        .expect_err("must not fit");
    match &err {
        DatapathError::Capacity {
            map,
            needed,
            capacity,
        } => {
            assert_eq!(*map, "CF_POLICY");
            assert_eq!(*capacity, 64);
            assert!(*needed > 64);
        }
        other => panic!("wrong error {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("CF_POLICY") && msg.contains("over"), "{msg}");
    assert_eq!(
        t.dp().read_installed().expect("read"),
        before,
        "nothing of the refused config was written"
    );
}

fn pinned_capacity_mismatch() {
    let mut t = TestDatapath::new();
    t.close();
    let err =
        cortexflow_agent::datapath::Datapath::open(cortexflow_agent::datapath::DatapathOptions {
            pin_dir: t.pin_dir.clone(),
            capacity: Capacity {
                conntrack: 1024,
                ..Capacity::default()
            },
            tc_mode: TcMode::Auto,
        })
        .err()
        .expect("must refuse");
    assert!(
        matches!(err, DatapathError::PinnedMismatch { map: "CF_CT", .. }),
        "{err}"
    );
}

/// A pinned map left by an agent whose value layout differs (here: an ipcache of 4-byte values,
/// the layout before same-node delivery) is refused by name instead of being reused.
fn pinned_layout_mismatch() {
    let mut t = TestDatapath::new();
    t.close();
    let pin = t.pin_dir.join("maps/CF_IPCACHE");
    std::fs::remove_file(&pin).expect("unpin the ipcache");
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "65536",
            "name",
            "CF_IPCACHE",
        ])
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err =
        cortexflow_agent::datapath::Datapath::open(cortexflow_agent::datapath::DatapathOptions {
            pin_dir: t.pin_dir.clone(),
            capacity: Capacity::default(),
            tc_mode: TcMode::Auto,
        })
        .err()
        .expect("must refuse");
    assert!(
        matches!(
            err,
            DatapathError::PinnedMismatch {
                map: "CF_IPCACHE",
                what: "value size",
                have: 4,
                want: 8,
                ..
            }
        ),
        "{err}"
    );
}

fn restart_reopens_pins() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let mut t = TestDatapath::new();
    let p = EndpointPolicy {
        ingress: vec![rule(
            5,
            Action::Allow,
            Mode::Enforce,
            ids(&[301]),
            vec![tcp_ports(80, 90)],
        )],
        egress: vec![rule(6, Action::Deny, Mode::Audit, Peers::Any, vec![])],
    };
    let mut s = state(p, &[(peer, 301)]);
    s.services.insert(
        Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 9),
            port: 80,
            protocol: Protocol::Tcp,
        },
        vec![Backend {
            ip: peer,
            port: 8080,
            weight: 1,
        }],
    );
    t.dp().apply(&s).expect("apply");
    let before = t.dp().read_installed().expect("read");
    let generation = t.dp().generation();
    t.close();
    t.reopen();
    assert_eq!(
        t.dp().installed(),
        &before,
        "a restarted datapath reads the previous state back"
    );
    assert_eq!(t.dp().generation(), generation);
    let stats = t.dp().apply(&s).expect("apply");
    assert_eq!(
        (stats.written, stats.deleted, stats.generation_bumped),
        (0, 0, false),
        "same state: nothing to write"
    );
}

// ---- real traffic between network namespaces -----------------------------------------------

/// A topology of `n` pods with a datapath attached in its node namespace.
fn topology_with_datapath(n: usize, net: u8, mode: TcMode) -> (Topology, TestDatapath) {
    let topo = Topology::new(n, net);
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(common::unique("cftest-"));
    let ifs: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
    let node_path = topo.node.path();
    // Attach from inside the node namespace (interface names resolve there).
    let t = std::thread::spawn(move || {
        cortexflow_agent::netns::enter(&node_path).expect("enter node");
        let mut t = TestDatapath::at(pin_dir, Capacity::default(), mode);
        for i in &ifs {
            t.dp().attach_interface(i).expect("attach");
        }
        t
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    (topo, t)
}

/// Desired state: pods with identities 301.. and the given policies.
fn pod_state(topo: &Topology, policies: &[EndpointPolicy]) -> DesiredState {
    let mut s = DesiredState::default();
    for (i, p) in topo.pods.iter().enumerate() {
        s.endpoints.insert(
            p.ifindex,
            Endpoint {
                ip: p.ip,
                identity: 301 + i as u32,
                policy: policies.get(i).cloned().unwrap_or_default(),
            },
        );
        s.ipcache.insert(p.ip, 301 + i as u32);
    }
    s.ipcache.insert(topo.node_ip, IDENTITY_HOST);
    s
}

fn netns_tcp_udp() {
    netns_allow_deny(TcMode::Auto, 201);
}

fn netns_clsact() {
    netns_allow_deny(TcMode::Clsact, 202);
}

fn netns_allow_deny(mode: TcMode, net: u8) {
    let (topo, mut t) = topology_with_datapath(3, net, mode);
    let mut rb = t.dp().take_events().expect("events");
    t.dp().set_events_allowed(true).expect("config");
    // Pod 1 (identity 302) admits TCP 8080 and UDP 5353 from pod 0 (identity 301) only.
    let b_policy = EndpointPolicy {
        ingress: vec![rule(
            77,
            Action::Allow,
            Mode::Enforce,
            ids(&[301]),
            vec![
                tcp_ports(8080, 8080),
                PortRange {
                    protocol: Protocol::Udp,
                    first: 5353,
                    last: 5353,
                },
            ],
        )],
        egress: vec![],
    };
    t.dp()
        .apply(&pod_state(&topo, &[EndpointPolicy::default(), b_policy]))
        .expect("apply");
    let (a, b, c) = (&topo.pods[0], &topo.pods[1], &topo.pods[2]);
    let _tcp = Server::start(&b.ns, 8080, "b8080");
    let _udp = Server::start(&b.ns, 5353, "b5353");
    let _other = Server::start(&b.ns, 9090, "b9090");
    let first = tcp_try(&a.ns, b.ip, 8080);
    if first.is_err() {
        eprintln!("COUNTERS {:?}", t.dp().counters());
        eprintln!("EVENTS {:?}", events(&mut rb));
        eprintln!("INSTALLED {:?}", t.dp().installed().endpoints);
    }
    assert_eq!(first, Ok("b8080".to_string()), "allowed TCP");
    assert_eq!(
        udp_try(&a.ns, b.ip, 5353).map(|r| r.0),
        Some("b5353".into()),
        "allowed UDP"
    );
    let denied = tcp_try(&c.ns, b.ip, 8080);
    assert!(
        matches!(
            denied,
            Err(std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock)
        ),
        "denied TCP from c: {denied:?}"
    );
    assert!(tcp_try(&a.ns, b.ip, 9090).is_err(), "port not allowed");
    assert_eq!(udp_try(&c.ns, b.ip, 5353), None, "denied UDP");
    // Pod a has no policy: it can be reached by everyone.
    let _a_srv = Server::start(&a.ns, 8080, "a8080");
    assert_eq!(tcp_try(&c.ns, a.ip, 8080), Ok("a8080".to_string()));
    // The denied SYN produced a drop event with the right tuple, identities and reason.
    let evs = events(&mut rb);
    let drop = evs
        .iter()
        .find(|e| {
            e.verdict == VERDICT_DROPPED
                && e.saddr == u32::from_ne_bytes(c.ip.octets())
                && e.protocol == 6
                && u16::from_be(e.dport) == 8080
        })
        .unwrap_or_else(|| panic!("no drop event for c -> b:8080 in {evs:?}"));
    assert_eq!(drop.reason, Reason::DefaultDeny as u8);
    assert_eq!(
        (drop.src_identity, drop.dst_identity, drop.direction),
        (303, 302, DIR_INGRESS)
    );
    assert!(
        evs.iter()
            .any(|e| e.verdict == VERDICT_ALLOWED && e.rule == 77 && e.protocol == 17),
        "allowed UDP flow event"
    );
    assert!(
        evs.iter()
            .all(|e| e.direction == DIR_INGRESS || e.direction == DIR_EGRESS)
    );
    drop_in_node(&topo, t);
}

/// Drops a datapath (and its pins) from inside the node namespace.
fn drop_in_node(topo: &Topology, t: TestDatapath) {
    let path = topo.node.path();
    std::thread::spawn(move || {
        cortexflow_agent::netns::enter(&path).expect("enter");
        drop(t);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn netns_two_datapaths() {
    let (topo1, mut t1) = topology_with_datapath(2, 203, TcMode::Auto);
    let (topo2, mut t2) = topology_with_datapath(2, 204, TcMode::Auto);
    let deny_all_in = EndpointPolicy {
        ingress: vec![rule(1, Action::Deny, Mode::Enforce, Peers::Any, vec![])],
        egress: vec![],
    };
    // Node 1 isolates its second pod; node 2 lets everything through.
    t1.dp()
        .apply(&pod_state(
            &topo1,
            &[EndpointPolicy::default(), deny_all_in],
        ))
        .expect("apply 1");
    t2.dp().apply(&pod_state(&topo2, &[])).expect("apply 2");
    let _s1 = Server::start(&topo1.pods[1].ns, 8080, "n1");
    let _s2 = Server::start(&topo2.pods[1].ns, 8080, "n2");
    assert!(
        tcp_try(&topo1.pods[0].ns, topo1.pods[1].ip, 8080).is_err(),
        "node 1 enforces its policy"
    );
    assert_eq!(
        tcp_try(&topo2.pods[0].ns, topo2.pods[1].ip, 8080),
        Ok("n2".into()),
        "node 2 is not affected"
    );
    assert_ne!(t1.pin_dir, t2.pin_dir);
    drop_in_node(&topo1, t1);
    drop_in_node(&topo2, t2);
}

fn netns_restart() {
    let (topo, mut t) = topology_with_datapath(2, 205, TcMode::Auto);
    let deny_all_in = EndpointPolicy {
        ingress: vec![rule(1, Action::Deny, Mode::Enforce, Peers::Any, vec![])],
        egress: vec![],
    };
    t.dp()
        .apply(&pod_state(&topo, &[EndpointPolicy::default(), deny_all_in]))
        .expect("apply");
    let _s = Server::start(&topo.pods[1].ns, 8080, "b");
    let _s0 = Server::start(&topo.pods[0].ns, 8080, "a");
    assert!(tcp_try(&topo.pods[0].ns, topo.pods[1].ip, 8080).is_err());
    // The agent exits: programs stay attached through the pinned links and keep enforcing.
    t.close();
    assert!(
        tcp_try(&topo.pods[0].ns, topo.pods[1].ip, 8080).is_err(),
        "enforcement continues without the agent"
    );
    assert_eq!(
        tcp_try(&topo.pods[1].ns, topo.pods[0].ip, 8080),
        Ok("a".into())
    );
    // A new agent swaps its programs into the same links.
    let path = topo.node.path();
    let ifs: Vec<String> = topo.pods.iter().map(|p| p.host_if.clone()).collect();
    let t = std::thread::spawn(move || {
        cortexflow_agent::netns::enter(&path).expect("enter");
        t.reopen();
        let before = t.dp().attached_interfaces();
        for i in &ifs {
            t.dp().attach_interface(i).expect("re-attach");
        }
        assert_eq!(
            t.dp().attached_interfaces(),
            before,
            "no new links, the pinned ones were updated"
        );
        t
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
    assert!(
        tcp_try(&topo.pods[0].ns, topo.pods[1].ip, 8080).is_err(),
        "still enforced after restart"
    );
    assert_eq!(
        tcp_try(&topo.pods[1].ns, topo.pods[0].ip, 8080),
        Ok("a".into())
    );
    drop_in_node(&topo, t);
}

// ---- Service load balancing --------------------------------------------------------------------

/// Runs this test binary as a client inside `ns` and `cgroup`: it waits for a line on stdin
/// (sent once it is in the cgroup), then connects `count` times and prints one line per result.
fn client(
    ns: &common::Netns,
    cgroup: &Cgroup,
    mode: &str,
    target: SocketAddrV4,
    count: usize,
) -> Vec<String> {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .env("CF_HELPER", mode)
        .env("CF_TARGET", target.to_string())
        .env("CF_COUNT", count.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn client");
    cgroup.add(child.id());
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let out = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = child.wait().expect("wait");
    assert!(status.success(), "client failed");
    out
}

/// The client side of [`client`].
fn helper(mode: &str) -> ExitCode {
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let target: SocketAddrV4 = std::env::var("CF_TARGET")
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("CF_TARGET");
    let count: usize = std::env::var("CF_COUNT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let mut out = std::io::stdout().lock();
    for _ in 0..count {
        let result = match mode {
            "tcp" => {
                let start = Instant::now();
                match TcpStream::connect_timeout(&target.into(), Duration::from_secs(2)) {
                    Ok(s) => {
                        let mut buf = String::new();
                        let _ = BufReader::new(s).read_line(&mut buf);
                        format!("ok {}", buf.trim())
                    }
                    Err(e) => format!("err {:?} {}us", e.kind(), start.elapsed().as_micros()),
                }
            }
            _ => {
                let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
                s.set_read_timeout(Some(Duration::from_secs(1)))
                    .expect("timeout");
                match s.send_to(b"ping", target) {
                    Ok(_) => {
                        let mut buf = [0u8; 64];
                        match s.recv_from(&mut buf) {
                            Ok((n, from)) => {
                                format!("ok {} {}", String::from_utf8_lossy(&buf[..n]), from)
                            }
                            Err(e) => format!("err {:?}", e.kind()),
                        }
                    }
                    Err(e) => format!("err {:?}", e.kind()),
                }
            }
        };
        let _ = writeln!(out, "{result}");
    }
    ExitCode::SUCCESS
}

fn service_topology(
    net: u8,
    backends: &[(usize, u32)],
    vip: Ipv4Addr,
) -> (Topology, TestDatapath, Cgroup) {
    let (topo, mut t) = topology_with_datapath(4, net, TcMode::Auto);
    let cgroup = Cgroup::create();
    t.dp().attach_cgroup(&cgroup.path).expect("attach cgroup");
    let mut s = pod_state(&topo, &[]);
    s.services.insert(
        Frontend {
            vip,
            port: 80,
            protocol: Protocol::Tcp,
        },
        backends
            .iter()
            .map(|(i, w)| Backend {
                ip: topo.pods[*i].ip,
                port: 8080,
                weight: *w,
            })
            .collect(),
    );
    s.services.insert(
        Frontend {
            vip,
            port: 53,
            protocol: Protocol::Udp,
        },
        backends
            .iter()
            .map(|(i, w)| Backend {
                ip: topo.pods[*i].ip,
                port: 5353,
                weight: *w,
            })
            .collect(),
    );
    t.dp().apply(&s).expect("apply");
    (topo, t, cgroup)
}

fn service_weights() {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let (topo, mut t, cgroup) = service_topology(206, &[(1, 1), (2, 2), (3, 3)], vip);
    let _servers: Vec<Server> = [(1, "b1"), (2, "b2"), (3, "b3")]
        .iter()
        .map(|(i, tag)| Server::start(&topo.pods[*i].ns, 8080, tag))
        .collect();
    const N: usize = 6000;
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "tcp",
        SocketAddrV4::new(vip, 80),
        N,
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        *counts.entry(l.clone()).or_default() += 1;
    }
    assert_eq!(lines.len(), N);
    let failures: usize = counts
        .iter()
        .filter(|(k, _)| !k.starts_with("ok"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failures, 0, "failed connects: {counts:?}");
    // Each backend's share within 5 standard deviations of its weight's share.
    for (tag, w) in [("ok b1", 1.0), ("ok b2", 2.0), ("ok b3", 3.0)] {
        let p: f64 = w / 6.0;
        let want = N as f64 * p;
        let sd = (N as f64 * p * (1.0 - p)).sqrt();
        let got = *counts.get(tag).unwrap_or(&0) as f64;
        assert!(
            (got - want).abs() <= 5.0 * sd,
            "{tag}: {got} connects, want {want:.0} ± {:.0}: {counts:?}",
            5.0 * sd
        );
    }
    // Closed connections free their conntrack entries (two per connection: the client's
    // egress and the backend's ingress): the table does not fill up with dead flows.
    std::thread::sleep(Duration::from_millis(200));
    let ct = t.dp().conntrack_entries().expect("conntrack");
    eprintln!("service weights 1:2:3 over {N} connects: {counts:?}; {ct} conntrack entries left");
    assert!(
        ct < N / 20,
        "{ct} conntrack entries left after {N} closed connections"
    );
    drop(cgroup);
    drop_in_node(&topo, t);
}

fn service_no_backend() {
    let vip = Ipv4Addr::new(10, 96, 0, 11);
    let (topo, t, cgroup) = service_topology(207, &[], vip);
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "tcp",
        SocketAddrV4::new(vip, 80),
        5,
    );
    for l in &lines {
        assert!(
            l.starts_with("err ConnectionRefused"),
            "want ECONNREFUSED, got {l}"
        );
        let us: u64 = l
            .split_whitespace()
            .last()
            .and_then(|s| s.trim_end_matches("us").parse().ok())
            .unwrap_or(u64::MAX);
        assert!(us < 100_000, "refused only after {us} µs: {l}");
    }
    drop(cgroup);
    drop_in_node(&topo, t);
}

fn service_udp() {
    let vip = Ipv4Addr::new(10, 96, 0, 12);
    let (topo, t, cgroup) = service_topology(208, &[(2, 1)], vip);
    let _srv = Server::start(&topo.pods[2].ns, 5353, "dns");
    let lines = client(
        &topo.pods[0].ns,
        &cgroup,
        "udp",
        SocketAddrV4::new(vip, 53),
        3,
    );
    for l in &lines {
        assert_eq!(
            l,
            &format!("ok dns {vip}:53"),
            "reply must come from the Service address"
        );
    }
    drop(cgroup);
    drop_in_node(&topo, t);
    let _ = sh(&["true"]);
    let _ = DIR_EGRESS;
}
