//! 100 000 random (policy, packet) cases through the kernel and the reference model.
use super::*;

/// What a pod's address may resolve to: an allocated identity, or unknown (a pod whose number
/// is not known yet; rules never name it).
const PEER_IDS: [u32; 5] = [301, 302, 303, 304, cortexflow_common::IDENTITY_UNKNOWN];

pub(crate) fn random_policy(rng: &mut SmallRng, cidrs: &[Cidr]) -> EndpointPolicy {
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

pub(crate) fn property_kernel_matches_model() {
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
            .map(|p| (*p, *PEER_IDS.choose(&mut rng).expect("id")))
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
