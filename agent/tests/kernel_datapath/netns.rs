//! Real TCP and UDP between network namespaces (tcx and clsact), datapaths side by side,
//! links that survive the agent.
use super::*;

/// A topology of `n` pods with a datapath attached in its node namespace.
pub(crate) fn topology_with_datapath(n: usize, net: u8, mode: TcMode) -> (Topology, TestDatapath) {
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
pub(crate) fn pod_state(topo: &Topology, policies: &[EndpointPolicy]) -> DesiredState {
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

pub(crate) fn netns_tcp_udp() {
    netns_allow_deny(TcMode::Auto, 201);
}

pub(crate) fn netns_clsact() {
    netns_allow_deny(TcMode::Clsact, 202);
}

pub(crate) fn netns_allow_deny(mode: TcMode, net: u8) {
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
pub(crate) fn drop_in_node(topo: &Topology, t: TestDatapath) {
    let path = topo.node.path();
    std::thread::spawn(move || {
        cortexflow_agent::netns::enter(&path).expect("enter");
        drop(t);
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

pub(crate) fn netns_two_datapaths() {
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

pub(crate) fn netns_restart() {
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
