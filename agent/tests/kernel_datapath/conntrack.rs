//! Connection tracking (later packets, replies, closes), same-node delivery, policy changes
//! re-evaluating established flows, counters.
use super::*;

pub(crate) fn conntrack() {
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
pub(crate) fn conntrack_frees_closed_tcp_flows() {
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
pub(crate) fn same_node_delivery() {
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

pub(crate) fn policy_change_re_evaluates() {
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

pub(crate) fn counters() {
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
