//! Refuse whole, truly: a config is in the kernel entirely or not at all, whichever map it
//! overflows and whatever happens half-way through writing it.
use std::path::Path;

use aya::maps::HashMap;
use cortexflow_common::{EndpointInfo, maps};

use super::*;

fn pinned_endpoints(pin_dir: &Path) -> HashMap<MapData, u32, EndpointInfo> {
    let data = MapData::from_pin(pin_dir.join("maps").join(maps::ENDPOINTS)).expect("pin");
    aya::maps::Map::HashMap(data).try_into().expect("hash map")
}

/// Ifindexes of the entries another writer puts into the endpoints map.
const FOREIGN: std::ops::Range<u32> = 9001..9007;

fn endpoint(ifindex: u32, identity: u32, policy: &EndpointPolicy) -> (u32, Endpoint) {
    (
        ifindex,
        Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, ifindex as u8 + 9),
            identity,
            policy: policy.clone(),
        },
    )
}

fn frontend(port: u16) -> Frontend {
    Frontend {
        vip: Ipv4Addr::new(10, 96, 0, 1),
        port,
        protocol: Protocol::Tcp,
    }
}

fn backends(hosts: &[u8]) -> Vec<Backend> {
    hosts
        .iter()
        .map(|h| Backend {
            ip: Ipv4Addr::new(10, 1, 0, *h),
            port: 8080,
            weight: 1,
        })
        .collect()
}

/// A write the kernel refuses half-way through (another writer filled the endpoints map, so
/// the capacity check passes but the third endpoint cannot be inserted) leaves the maps
/// exactly as they were before the config — not with the new policy entries, identities and
/// the first endpoints already switched — and the next apply once there is room succeeds.
pub(crate) fn a_write_that_fails_half_way_is_rolled_back() {
    let capacity = Capacity {
        endpoints: 8,
        ..Capacity::default()
    };
    let mut t = TestDatapath::with(capacity, TcMode::Auto);
    let peer = Ipv4Addr::new(10, 0, 0, 20);
    let old = EndpointPolicy {
        ingress: vec![allow_tcp(1, 301, 80)],
        egress: vec![],
    };
    let new = EndpointPolicy {
        ingress: vec![allow_tcp(2, 302, 90)],
        egress: vec![],
    };
    let before_state = DesiredState {
        endpoints: BTreeMap::from([endpoint(1, EP_ID, &old), endpoint(2, 310, &old)]),
        ipcache: BTreeMap::from([(peer, 301), (EP_IP, EP_ID)]),
        services: BTreeMap::from([(frontend(80), backends(&[1, 2]))]),
    };
    t.dp().apply(&before_state).expect("fits");
    let before = t.dp().read_installed().expect("read");
    let generation = t.dp().generation();

    let mut foreign = pinned_endpoints(&t.pin_dir);
    for i in FOREIGN {
        foreign
            .insert(i, EndpointInfo::default(), 0)
            .expect("fill the map from outside");
    }
    let after_state = DesiredState {
        endpoints: BTreeMap::from([
            endpoint(1, EP_ID, &new),
            endpoint(2, 310, &new),
            endpoint(3, 311, &new),
            endpoint(4, 312, &new),
        ]),
        ipcache: BTreeMap::from([
            (peer, 302),
            (EP_IP, EP_ID),
            (Ipv4Addr::new(10, 0, 0, 21), 303),
        ]),
        services: BTreeMap::from([
            (frontend(80), backends(&[3])),
            (frontend(81), backends(&[4])),
        ]),
    };
    let err = t
        .dp()
        .apply(&after_state)
        .expect_err("the kernel refuses the 9th endpoint");
    let msg = err.to_string();
    assert!(
        matches!(err, DatapathError::RolledBack { .. }),
        "rolled back: {msg}"
    );
    assert!(
        msg.contains(maps::ENDPOINTS) && msg.contains("written back"),
        "{msg}"
    );
    let mut now = t.dp().read_installed().expect("read");
    for i in FOREIGN {
        assert!(
            now.endpoints.remove(&i).is_some(),
            "foreign entries untouched"
        );
    }
    assert_eq!(
        now, before,
        "every map holds what it held before the config"
    );
    assert!(
        t.dp().generation() != generation,
        "flows accepted while the maps were half-written are decided again"
    );
    // What the old config allows still passes, what only the new one allows does not.
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 5001, EP_IP, 80)
        ),
        PASS
    );
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 5002, EP_IP, 90)
        ),
        DROP
    );

    // Room again: the same config applies in full.
    for i in FOREIGN {
        foreign.remove(&i).expect("remove");
    }
    t.dp().apply(&after_state).expect("fits now");
    let now = t.dp().read_installed().expect("read");
    assert_eq!(now.endpoints.len(), 4);
    assert_eq!(now.services.len(), 2);
    assert_eq!(
        test_run(
            &mut t,
            programs::TO_POD,
            &common::tcp(peer, 5003, EP_IP, 90)
        ),
        PASS
    );
}

/// The maps of a churned state, counted per map as the test sees them (independently of the
/// datapath's own bookkeeping).
fn counts(m: &cortexflow_agent::compile::MapContents) -> BTreeMap<&'static str, usize> {
    let exact = m
        .policy
        .keys()
        .filter(|k| k.0 == cortexflow_common::POLICY_KEY_BITS)
        .count();
    BTreeMap::from([
        (maps::ENDPOINTS, m.endpoints.len()),
        (maps::IPCACHE, m.ipcache.len()),
        (maps::CIDRS, m.cidrs.len()),
        (maps::POLICY, m.policy.len() - exact),
        (maps::POLICY_EXACT, exact),
        (maps::SERVICES, m.services.len()),
        (maps::BACKENDS, m.backends.len()),
    ])
}

/// The map kind a churn step pushes towards its capacity (the others stay small), or none.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hot {
    Endpoints,
    Ipcache,
    Cidrs,
    Policy,
    PolicyExact,
    Services,
    Backends,
    Calm,
}

const HOT: [Hot; 8] = [
    Hot::Endpoints,
    Hot::Ipcache,
    Hot::Cidrs,
    Hot::Policy,
    Hot::PolicyExact,
    Hot::Services,
    Hot::Backends,
    Hot::Calm,
];

fn some_ids(rng: &mut SmallRng, n: std::ops::RangeInclusive<usize>) -> Peers {
    let n = rng.random_range(n);
    ids(&(0..n)
        .map(|_| rng.random_range(400..440))
        .collect::<Vec<_>>())
}

/// One policy, shared by every endpoint of the step.
fn random_policy(rng: &mut SmallRng, hot: Hot) -> EndpointPolicy {
    let allow = |id, peers, ports| rule(id, Action::Allow, Mode::Enforce, peers, ports);
    let range = |rng: &mut SmallRng| {
        let first = rng.random_range(1..2000u16);
        tcp_ports(first, first + rng.random_range(5..60))
    };
    let single = |rng: &mut SmallRng| {
        let p = rng.random_range(1..2000u16);
        tcp_ports(p, p)
    };
    let ingress = match hot {
        Hot::Cidrs => vec![allow(
            1,
            Peers::Only(
                (0..rng.random_range(3..=9))
                    .map(|_| Peer::IpBlock {
                        cidr: Cidr::new(
                            Ipv4Addr::new(192, 168, rng.random_range(0..32), 0),
                            rng.random_range(22..=24),
                        )
                        .expect("cidr"),
                        except: vec![],
                    })
                    .collect(),
            ),
            vec![tcp_ports(80, 81)],
        )],
        Hot::Policy => (1..=2)
            .map(|id| {
                let peers = some_ids(rng, 3..=6);
                let ports = vec![range(rng)];
                allow(id, peers, ports)
            })
            .collect(),
        Hot::PolicyExact => {
            let peers = some_ids(rng, 2..=5);
            let ports = (0..rng.random_range(2..=4)).map(|_| single(rng)).collect();
            vec![allow(1, peers, ports)]
        }
        _ => {
            let peers = some_ids(rng, 1..=1);
            vec![allow(1, peers, vec![single(rng)])]
        }
    };
    EndpointPolicy {
        ingress,
        egress: vec![],
    }
}

fn random_state(rng: &mut SmallRng, hot: Hot) -> DesiredState {
    let mut s = DesiredState::default();
    let policy = random_policy(rng, hot);
    let (lo, hi) = if hot == Hot::Endpoints {
        (4, 8)
    } else {
        (1, 2)
    };
    let mut slots: Vec<u32> = (1..=12).collect();
    slots.shuffle(rng);
    for ifindex in slots.into_iter().take(rng.random_range(lo..=hi)) {
        s.endpoints
            .insert(ifindex, endpoint(ifindex, 300 + ifindex, &policy).1);
    }
    let (lo, hi) = if hot == Hot::Ipcache {
        (10, 20)
    } else {
        (2, 6)
    };
    for _ in 0..rng.random_range(lo..=hi) {
        s.ipcache.insert(
            Ipv4Addr::new(10, 9, 0, rng.random_range(0..40)),
            rng.random_range(400..440),
        );
    }
    let (services, per) = match hot {
        Hot::Services => (rng.random_range(4..=8), 1..=1),
        Hot::Backends => (2, 5..=11),
        _ => (rng.random_range(1..=2), 1..=2),
    };
    let mut ports: Vec<u16> = (80..92).collect();
    ports.shuffle(rng);
    for port in ports.into_iter().take(services) {
        let hosts: Vec<u8> = (0..rng.random_range(per.clone()))
            .map(|_| rng.random_range(1..50))
            .collect();
        s.services.insert(frontend(port), backends(&hosts));
    }
    s
}

/// Small maps, every one of them near its capacity, and 400 random updates churning every
/// map kind: each update is in the kernel whole or refused whole with the map it overflows.
/// The kernel is the judge of "it fits": a capacity check that missed a map's update peak
/// shows up as a write the kernel refuses. A refusal is checked against independent bounds:
/// the new contents alone (compiled by a second, unconstrained datapath) plus what the maps
/// held must exceed the named map's capacity.
pub(crate) fn maps_near_capacity_under_churn_apply_whole_or_refuse_whole() {
    let capacity = Capacity {
        endpoints: 6,
        ipcache: 16,
        cidrs: 8,
        policy: 48,
        policy_exact: 16,
        services: 6,
        backends: 16,
        ..Capacity::default()
    };
    let caps = BTreeMap::from([
        (maps::ENDPOINTS, 6usize),
        (maps::IPCACHE, 16),
        (maps::CIDRS, 8),
        (maps::POLICY, 48),
        (maps::POLICY_EXACT, 16),
        (maps::SERVICES, 6),
        (maps::BACKENDS, 16),
    ]);
    let mut t = TestDatapath::with(capacity, TcMode::Auto);
    let mut oracle = TestDatapath::new();
    let mut rng = SmallRng::seed_from_u64(0x5eed_ca9a);
    let mut refused: BTreeMap<&str, usize> = BTreeMap::new();
    // Per map: the most entries an accepted update left in it.
    let mut fullest: BTreeMap<&str, usize> = BTreeMap::new();
    let mut applied = 0;
    for step in 0..400 {
        let s = random_state(&mut rng, HOT[step % HOT.len()]);
        let before = t.dp().read_installed().expect("read");
        match t.dp().apply(&s) {
            Ok(_) => {
                applied += 1;
                let now = t.dp().read_installed().expect("read");
                let ips: BTreeMap<u32, u32> = now
                    .endpoints
                    .iter()
                    .map(|(i, e)| (*i, e.identity))
                    .collect();
                let want: BTreeMap<u32, u32> =
                    s.endpoints.iter().map(|(i, e)| (*i, e.identity)).collect();
                assert_eq!(ips, want, "step {step}: every endpoint in place");
                let cache: BTreeMap<Ipv4Addr, u32> = now
                    .ipcache
                    .iter()
                    .map(|(a, v)| (Ipv4Addr::from(a.to_ne_bytes()), v.identity))
                    .collect();
                assert_eq!(cache, s.ipcache, "step {step}: the whole ipcache");
                let slots: usize = s.services.values().map(Vec::len).sum();
                assert_eq!(now.services.len(), s.services.len(), "step {step}");
                assert_eq!(now.backends.len(), slots, "step {step}: every slot");
                for (map, n) in counts(&now) {
                    let f = fullest.entry(map).or_default();
                    *f = (*f).max(n);
                }
            }
            Err(e) => {
                let Some(map) = e.full_map() else {
                    panic!("step {step}: a write failed, the capacity check let it through: {e}");
                };
                assert_eq!(
                    t.dp().read_installed().expect("read"),
                    before,
                    "step {step}: refused whole ({e})"
                );
                oracle
                    .dp()
                    .apply(&s)
                    .expect("the default capacity holds it");
                let alone = counts(&oracle.dp().read_installed().expect("read"))[map];
                assert!(
                    alone + counts(&before)[map] > caps[map],
                    "step {step}: {e}, but {alone} new + {} held fit in {}",
                    counts(&before)[map],
                    caps[map]
                );
                if let DatapathError::Capacity { needed, .. } = e {
                    assert!(
                        needed >= alone && needed <= alone + counts(&before)[map],
                        "step {step}: needed {needed} vs {alone} new, {} held",
                        counts(&before)[map]
                    );
                }
                *refused.entry(map).or_default() += 1;
            }
        }
    }
    eprintln!("400 updates: {applied} applied, refused by map {refused:?}, fullest {fullest:?}");
    for (map, cap) in &caps {
        assert!(
            refused.get(map).copied().unwrap_or(0) > 0,
            "no update overflowed {map}: the test does not reach its capacity ({refused:?})"
        );
        assert!(
            fullest.get(map).copied().unwrap_or(0) * 2 >= *cap,
            "{map} never more than half full after an accepted update ({fullest:?})"
        );
    }
    assert!(applied >= 40, "only {applied} of 400 updates applied");
}
