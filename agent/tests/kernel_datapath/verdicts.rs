//! `BPF_PROG_TEST_RUN` of every verdict path on crafted packets.
use super::*;

pub(crate) fn loads_and_passes_the_verifier() {
    let mut t = TestDatapath::new();
    for name in [programs::FROM_POD, programs::TO_POD] {
        t.dp().classifier(name).expect("classifier loaded");
    }
    assert!(t.pin_dir.join("maps/CF_POLICY").exists(), "maps are pinned");
}

pub(crate) struct Case {
    name: &'static str,
    policy: EndpointPolicy,
    prog: &'static str,
    pkt: Vec<u8>,
    ret: i32,
    /// (verdict, reason, rule) of the one event expected, if any.
    event: Option<(u8, Reason, u32)>,
}

pub(crate) fn verdict_paths() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let node = Ipv4Addr::new(10, 0, 255, 1);
    let ext = Ipv4Addr::new(192, 168, 7, 7);
    // A pod whose identity number is not known yet.
    let unknown = Ipv4Addr::new(10, 0, 0, 21);
    let ipcache = [
        (peer, 301),
        (node, IDENTITY_HOST),
        (EP_IP, EP_ID),
        (unknown, cortexflow_common::IDENTITY_UNKNOWN),
    ];
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
            name: "unknown identity: a rule naming identities does not admit it",
            policy: allow_301_80.clone(),
            prog: programs::TO_POD,
            pkt: tcp(unknown, 4012, EP_IP, 80),
            ret: DROP,
            event: Some((VERDICT_DROPPED, Reason::DefaultDeny, 0)),
        },
        Case {
            name: "unknown identity: a rule admitting any peer does, a Deny naming others does not drop it",
            policy: deny_any.clone(),
            prog: programs::TO_POD,
            pkt: tcp(unknown, 4013, EP_IP, 80),
            ret: PASS,
            event: Some((VERDICT_ALLOWED, Reason::PolicyAllow, 20)),
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

/// A pod whose identity number is not known yet is an endpoint like any other: its own policies
/// apply (here: default-deny but for identity 301 on port 80), and its flows name it unknown.
pub(crate) fn an_endpoint_of_unknown_identity_is_enforced() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let mut s = state(
        EndpointPolicy {
            ingress: vec![allow_tcp(11, 301, 80)],
            egress: vec![],
        },
        &[(peer, 301)],
    );
    if let Some(ep) = s.endpoints.get_mut(&1) {
        ep.identity = cortexflow_common::IDENTITY_UNKNOWN;
    }
    s.ipcache.insert(EP_IP, cortexflow_common::IDENTITY_UNKNOWN);
    let (mut t, mut rb) = open();
    t.dp().apply(&s).expect("apply");
    let _ = events(&mut rb);
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 4100, EP_IP, 80)
        ),
        PASS
    );
    let ev = events(&mut rb);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (
            ev[0].verdict,
            ev[0].rule,
            ev[0].src_identity,
            ev[0].dst_identity
        ),
        (VERDICT_ALLOWED, 11, 301, 0)
    );
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 4101, EP_IP, 81)
        ),
        DROP,
        "default-deny holds for a pod whose number is not known"
    );
    let ev = events(&mut rb);
    assert_eq!(
        ev.first().map(|e| (e.verdict, Reason::from_u8(e.reason))),
        Some((VERDICT_DROPPED, Some(Reason::DefaultDeny)))
    );
}

/// An ICMP error (type, code) from `router` to `dst` quoting `inner` (an IPv4 packet without
/// its Ethernet header; the first 28 bytes are quoted, as routers do).
fn icmp_error(router: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, inner: &[u8]) -> Vec<u8> {
    let quoted = &inner[..inner.len().min(28)];
    let mut p = common::eth_ip_header(router, dst, 1, 8 + quoted.len());
    p.extend_from_slice(&[kind, code, 0, 0, 0, 0, 0x05, 0xdc]);
    p.extend_from_slice(quoted);
    p
}

/// ICMP errors about a tracked flow pass like its replies — "fragmentation needed" for path-MTU
/// discovery under default-deny, time exceeded, unreachable, parameter problem — from whichever
/// router sends them, in both directions; errors about no tracked flow, and ICMP that is not an
/// error, meet the policy (here: default-deny, dropped).
pub(crate) fn icmp_errors_of_tracked_flows_pass() {
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let router = Ipv4Addr::new(192, 168, 99, 1);
    let s = state(
        EndpointPolicy {
            ingress: vec![rule(
                11,
                Action::Allow,
                Mode::Enforce,
                ids(&[301]),
                vec![PortRange {
                    protocol: Protocol::Udp,
                    first: 53,
                    last: 53,
                }],
            )],
            egress: vec![allow_tcp(12, 301, 80)],
        },
        &[(peer, 301)],
    );
    let (mut t, mut rb) = open();
    t.dp().apply(&s).expect("apply");
    // The pod opens TCP to the peer (egress), the peer sends UDP to the pod (ingress).
    let syn = common::tcp(EP_IP, 40000, peer, 80);
    assert_eq!(test_run(&mut t, programs::FROM_POD, &syn), PASS);
    let dns = common::udp(peer, 5300, EP_IP, 53);
    assert_eq!(test_run(&mut t, programs::TO_POD, &dns), PASS);
    let _ = events(&mut rb);
    let before = t.dp().counters().expect("counters");

    let syn_ip = &syn[14..];
    let dns_ip = &dns[14..];
    let other_flow = common::tcp(EP_IP, 40001, peer, 80);
    let cases: Vec<(&str, &str, Vec<u8>, i32)> = vec![
        (
            "fragmentation needed for the pod's TCP flow",
            programs::TO_POD,
            icmp_error(router, EP_IP, 3, 4, syn_ip),
            PASS,
        ),
        (
            "time exceeded for the pod's TCP flow",
            programs::TO_POD,
            icmp_error(router, EP_IP, 11, 0, syn_ip),
            PASS,
        ),
        (
            "host unreachable for the pod's TCP flow",
            programs::TO_POD,
            icmp_error(router, EP_IP, 3, 1, syn_ip),
            PASS,
        ),
        (
            "parameter problem for the pod's TCP flow",
            programs::TO_POD,
            icmp_error(router, EP_IP, 12, 0, syn_ip),
            PASS,
        ),
        (
            "the pod's port unreachable about a UDP flow it received",
            programs::FROM_POD,
            icmp_error(EP_IP, peer, 3, 3, dns_ip),
            PASS,
        ),
        (
            "fragmentation needed for a flow that is not tracked",
            programs::TO_POD,
            icmp_error(router, EP_IP, 3, 4, &other_flow[14..]),
            DROP,
        ),
        (
            "an error quoting a packet of another pod",
            programs::TO_POD,
            icmp_error(
                router,
                EP_IP,
                3,
                4,
                &common::tcp(Ipv4Addr::new(10, 0, 0, 77), 40000, peer, 80)[14..],
            ),
            DROP,
        ),
        (
            "an error the pod sends about a flow it never received",
            programs::FROM_POD,
            icmp_error(EP_IP, peer, 3, 3, &common::udp(peer, 5301, EP_IP, 53)[14..]),
            DROP,
        ),
        (
            "echo request (not an error) under default-deny",
            programs::TO_POD,
            common::icmp(router, EP_IP),
            DROP,
        ),
    ];
    let mut failures = Vec::new();
    for (name, prog, pkt, want) in &cases {
        let got = test_run(&mut t, prog, pkt);
        if got != *want {
            failures.push(format!("{name}: {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let after = t.dp().counters().expect("counters");
    let related = after.packets(VERDICT_ALLOWED, Reason::Related)
        - before.packets(VERDICT_ALLOWED, Reason::Related);
    assert_eq!(related, 5, "the five related errors are counted as related");
    let ev = events(&mut rb);
    assert!(
        ev.iter()
            .all(|e| e.verdict == VERDICT_DROPPED && e.protocol == 1),
        "related errors make no event, the others are drops: {ev:?}"
    );
    assert_eq!(ev.len(), 4, "{ev:?}");
}
