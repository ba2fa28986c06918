//! Properties of the engine: incremental == from scratch, independent of the order objects
//! arrive in, deterministic.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use cortexflow_domain::{Action, Mode, PortRange, Protocol};
use cortexflow_operator_core::{
    Allocations, Change, Engine, EngineConfig, Kind, ObjKey, Object,
    model::{
        Created, EndpointSlice, MeshPolicy, Mtls, Namespace, Node, Pod, PolicyPeer, PolicyRule,
        Ref, Service, ServiceIdentity, ServicePort, SliceEndpoint, SlicePort,
    },
    selector::{Labels, Selector},
};
use proptest::prelude::*;

/// A small deterministic generator over one seed.
struct G(u64);

impl G {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const NS: [&str; 3] = ["ns0", "ns1", "ns2"];
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const APPS: [&str; 3] = ["web", "db", "api"];

fn labels(kv: &[(&str, &str)]) -> Labels {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One generation of a MeshPolicy (`in_force` left empty).
fn policy(g: &mut G, ns: &str, name: &str, generation: i64) -> MeshPolicy {
    let rules = |g: &mut G| -> Vec<PolicyRule> {
        (0..g.below(3))
            .map(|_| PolicyRule {
                peers: (0..g.below(3))
                    .map(|_| match g.below(5) {
                        0 => PolicyPeer::Identity(Ref {
                            namespace: g.chance(30).then(|| g.pick(&NS).to_string()),
                            name: format!("sid{}", g.below(4)),
                        }),
                        1 => PolicyPeer::ServiceAccount(Ref {
                            namespace: g.chance(30).then(|| g.pick(&NS).to_string()),
                            name: g.pick(&["default", "s1", "nobody"]).into(),
                        }),
                        2 => PolicyPeer::NamespaceSelector(Ok(Selector {
                            match_labels: labels(&[("team", g.pick(&["a", "b"]))]),
                            match_expressions: vec![],
                        })),
                        _ => PolicyPeer::IpBlock {
                            cidr: g
                                .pick(&["10.0.0.0/8", "192.168.0.0/16", "0.0.0.0/0", "bad"])
                                .into(),
                            except: if g.chance(30) {
                                vec!["10.1.0.0/16".into()]
                            } else {
                                vec![]
                            },
                        },
                    })
                    .collect(),
                ports: (0..g.below(2))
                    .map(|_| {
                        let first = g.below(2000) as u16 + 1;
                        PortRange {
                            protocol: if g.chance(50) {
                                Protocol::Tcp
                            } else {
                                Protocol::Udp
                            },
                            first,
                            last: first + g.below(10) as u16,
                        }
                    })
                    .collect(),
            })
            .collect()
    };
    let ingress = rules(g);
    let egress = rules(g);
    MeshPolicy {
        key: ObjKey::new(ns, name),
        generation,
        selector: selector(g),
        action: if g.chance(70) {
            Action::Allow
        } else {
            Action::Deny
        },
        mode: if g.chance(75) {
            Mode::Enforce
        } else {
            Mode::Audit
        },
        ingress,
        egress,
        invalid: None,
        spec_json: format!("{{\"g\":{generation}}}").into(),
        in_force: None,
    }
}

fn selector(g: &mut G) -> Result<Selector, String> {
    if g.chance(5) {
        return Err(
            "matchExpressions[0]: operator \"Foo\" is not one of In, NotIn, Exists, DoesNotExist"
                .into(),
        );
    }
    Ok(match g.below(4) {
        0 => Selector::default(),
        1 | 2 => Selector {
            match_labels: labels(&[("app", g.pick(&APPS))]),
            match_expressions: vec![],
        },
        _ => Selector::parse(
            Labels::new(),
            vec![("tier".into(), "In".into(), vec![g.pick(&["x", "y"]).into()])],
        )
        .unwrap(),
    })
}

fn object(kind: u8, seed: u64) -> Object {
    let g = &mut G(seed);
    let ns = g.pick(&NS).to_string();
    match kind % 7 {
        0 => Object::Namespace(Namespace {
            inject: None,
            name: ns,
            labels: labels(&[("team", g.pick(&["a", "b"]))]),
        }),
        1 | 2 => {
            let name = format!("p{}", g.below(8));
            let mut l = labels(&[("app", g.pick(&APPS))]);
            if g.chance(50) {
                l.insert("tier".into(), g.pick(&["x", "y"]).into());
            }
            Object::Pod(Pod {
                key: ObjKey::new(ns, name),
                labels: Arc::new(l),
                service_account: g.pick(&["default", "s1"]).into(),
                node: g.chance(85).then(|| g.pick(&NODES).into()),
                ip: g
                    .chance(85)
                    .then(|| Ipv4Addr::new(10, 0, g.below(3) as u8, g.below(12) as u8 + 1)),
                host_network: g.chance(5),
                terminated: g.chance(8),
                inject: None,
                has_proxy: false,
            })
        }
        3 => Object::ServiceIdentity(ServiceIdentity {
            key: ObjKey::new(ns, format!("sid{}", g.below(3))),
            created: Created(g.below(4) as i64),
            generation: g.below(3) as i64 + 1,
            selector: selector(g),
            service_accounts: if g.chance(30) {
                vec!["s1".into()]
            } else {
                vec![]
            },
            mtls: [Mtls::Disabled, Mtls::Permissive, Mtls::Strict][g.below(3) as usize],
        }),
        4 => {
            let name = format!("mp{}", g.below(4));
            let generation = g.below(5) as i64 + 1;
            let mut p = policy(g, &ns, &name, generation);
            // The last accepted generation as a status records it (maybe invalid itself: a
            // status the operator did not write).
            if generation > 1 && g.chance(40) {
                let older = g.below(generation as u64 - 1) as i64 + 1;
                p.in_force = Some(Box::new(policy(g, &ns, &name, older)));
            }
            Object::MeshPolicy(p)
        }
        5 => {
            if g.chance(50) {
                Object::Service(Service {
                    key: ObjKey::new(ns, format!("svc{}", g.below(2))),
                    cluster_ip: g
                        .chance(90)
                        .then(|| Ipv4Addr::new(10, 96, 0, g.below(5) as u8 + 1)),
                    ports: vec![ServicePort {
                        name: "http".into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                    }],
                })
            } else {
                Object::EndpointSlice(EndpointSlice {
                    key: ObjKey::new(ns, format!("svc{}-{}", g.below(2), g.below(2))),
                    service: format!("svc{}", g.below(2)),
                    ports: vec![SlicePort {
                        name: "http".into(),
                        port: 8080,
                        protocol: Protocol::Tcp,
                    }],
                    endpoints: (0..g.below(3))
                        .map(|_| SliceEndpoint {
                            addresses: vec![Ipv4Addr::new(10, 0, 0, g.below(12) as u8 + 1)],
                            ready: g.chance(80),
                        })
                        .collect(),
                })
            }
        }
        _ => Object::Node(Node {
            name: g.pick(&NODES).into(),
            addresses: vec![Ipv4Addr::new(172, 16, 0, g.below(3) as u8 + 1)],
            pod_cidr: None,
        }),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Apply(u8, u64),
    Delete(u8, u64),
    /// A relist of one kind: these objects, and no other of that kind (what a watch that
    /// restarted sees, objects deleted meanwhile gone).
    Reset(u8, Vec<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u8>(), any::<u64>()).prop_map(|(k, s)| Op::Apply(k, s)),
        2 => (any::<u8>(), any::<u64>()).prop_map(|(k, s)| Op::Delete(k, s)),
        1 => (any::<u8>(), prop::collection::vec(any::<u64>(), 0..6))
            .prop_map(|(k, s)| Op::Reset(k, s)),
    ]
}

fn change(op: &Op) -> Change {
    match op {
        Op::Apply(k, s) => Change::Apply(object(*k, *s)),
        Op::Delete(k, s) => {
            let o = object(*k, *s);
            Change::Delete(o.kind(), o.key())
        }
        Op::Reset(k, seeds) => {
            let kind = object(*k, 0).kind();
            // Objects of that kind only (a seed decides the content, the kind is fixed).
            let objs: BTreeMap<ObjKey, Object> = seeds
                .iter()
                .map(|s| object(*k, *s))
                .map(|o| (o.key(), o))
                .collect();
            Change::Reset(kind, objs.into_values().collect())
        }
    }
}

/// What the leader does after each batch: allocate ids for what needs them.
fn allocate(e: &mut Engine) {
    if let Some(a) = e.allocations().allocate(&e.needed_allocations()).table {
        e.apply(vec![Change::Allocations(a)]);
    }
}

fn run_incremental(ops: &[Op], batch: usize) -> Engine {
    run_allocating_every(ops, batch, 1)
}

/// Batches of `batch` changes; the leader allocates only after every `every`-th batch (a slow
/// or absent leader: pods and policies wait for numbers meanwhile).
fn run_allocating_every(ops: &[Op], batch: usize, every: usize) -> Engine {
    let mut e = Engine::new(EngineConfig::default());
    for (i, chunk) in ops.chunks(batch.max(1)).enumerate() {
        e.apply(chunk.iter().map(change).collect());
        if i % every.max(1) == 0 {
            allocate(&mut e);
        }
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_recompute(ops in prop::collection::vec(op(), 1..80), batch in 1usize..8) {
        let e = run_incremental(&ops, batch);
        let full = Engine::from_snapshot(EngineConfig::default(), e.snapshot().clone(), e.allocations().clone());
        prop_assert_eq!(e.outcome(), full.outcome());
    }

    #[test]
    fn order_of_arrival_does_not_matter(seeds in prop::collection::vec((any::<u8>(), any::<u64>()), 1..40), rotate in 0usize..40) {
        // The same final set of objects (last write per key wins), fed in two orders.
        let mut last: BTreeMap<(Kind, ObjKey), Object> = BTreeMap::new();
        for (k, s) in &seeds {
            let o = object(*k, *s);
            last.insert((o.kind(), o.key()), o);
        }
        let objs: Vec<Object> = last.into_values().collect();
        let mut rotated = objs.clone();
        rotated.rotate_left(rotate % objs.len().max(1));
        rotated.reverse();
        let feed = |objs: Vec<Object>| {
            let mut e = Engine::new(EngineConfig::default());
            for o in objs {
                e.apply(vec![Change::Apply(o)]);
            }
            // Ids are allocated in key order whatever the arrival order.
            let a = Allocations::default().allocate(&e.needed_allocations()).table.unwrap_or_default();
            e.apply(vec![Change::Allocations(a)]);
            e
        };
        prop_assert_eq!(feed(objs).outcome(), feed(rotated).outcome());
    }

    #[test]
    fn incremental_equals_full_recompute_with_numbers_missing(ops in prop::collection::vec(op(), 1..80), batch in 1usize..6, every in 2usize..5) {
        let e = run_allocating_every(&ops, batch, every);
        let full = Engine::from_snapshot(EngineConfig::default(), e.snapshot().clone(), e.allocations().clone());
        prop_assert_eq!(e.outcome(), full.outcome());
    }

    /// Whatever the id table holds (numbers missing, a leader that never allocated), every live
    /// pod with an address is an endpoint of its node and in the ipcache: enforced by its own
    /// policies, never left out.
    #[test]
    fn every_live_pod_is_enforced_whatever_the_table(ops in prop::collection::vec(op(), 1..80), batch in 1usize..6, every in 1usize..5, never in any::<bool>()) {
        let e = if never {
            let mut e = Engine::new(EngineConfig::default());
            for chunk in ops.chunks(batch) {
                e.apply(chunk.iter().map(change).collect());
            }
            e
        } else {
            run_allocating_every(&ops, batch, every)
        };
        let out = e.outcome();
        for (node, (_, eps)) in &out.nodes {
            let ips: BTreeSet<Ipv4Addr> = eps.endpoints.iter().map(|ep| ep.ip).collect();
            prop_assert_eq!(ips.len(), eps.endpoints.len(), "an address twice on {}", node);
        }
        // The owner of an address on a node: its first live pod by namespace/name.
        let mut owners: BTreeMap<(String, Ipv4Addr), &ObjKey> = BTreeMap::new();
        for p in e.snapshot().pods.values() {
            let (Some(node), Some(ip)) = (p.node.as_deref(), p.ip) else { continue };
            if !p.host_network && !p.terminated {
                owners.entry((node.to_string(), ip)).or_insert(&p.key);
            }
        }
        for p in e.snapshot().pods.values() {
            let (Some(node), Some(ip)) = (p.node.as_deref(), p.ip) else { continue };
            if p.host_network || p.terminated || owners[&(node.to_string(), ip)] != &p.key {
                continue;
            }
            let (_, eps) = out.nodes.get(node).expect("the pod's node has a config");
            let ep = eps
                .endpoints
                .iter()
                .find(|ep| *ep.namespace == *p.key.namespace && *ep.name == *p.key.name);
            prop_assert!(ep.is_some(), "{} is not an endpoint of {node}", p.key);
            prop_assert!(out.ipcache.contains_key(&ip), "{ip} of {} not in the ipcache", p.key);
            if never {
                prop_assert_eq!(ep.unwrap().identity, 0, "no number was ever allocated");
            }
        }
    }

    #[test]
    fn deterministic(ops in prop::collection::vec(op(), 1..50)) {
        prop_assert_eq!(run_incremental(&ops, 3).outcome(), run_incremental(&ops, 3).outcome());
    }
}

#[test]
fn policies_select_pods_and_compile_identities() {
    let mut e = Engine::new(EngineConfig::default());
    let pod = |name: &str, app: &str, node: &str, ip: u8| {
        Object::Pod(Pod {
            key: ObjKey::new("shop", name),
            labels: Arc::new(labels(&[("app", app)])),
            service_account: "default".into(),
            node: Some(node.into()),
            ip: Some(Ipv4Addr::new(10, 0, 0, ip)),
            host_network: false,
            terminated: false,
            inject: None,
            has_proxy: false,
        })
    };
    e.apply(vec![
        Change::Apply(pod("web-1", "web", "n1", 1)),
        Change::Apply(pod("db-1", "db", "n2", 2)),
        Change::Apply(Object::ServiceIdentity(ServiceIdentity {
            key: ObjKey::new("shop", "web"),
            created: Created(1),
            generation: 1,
            selector: Ok(Selector {
                match_labels: labels(&[("app", "web")]),
                match_expressions: vec![],
            }),
            service_accounts: vec![],
            mtls: Mtls::Disabled,
        })),
        Change::Apply(Object::MeshPolicy(MeshPolicy {
            key: ObjKey::new("shop", "db-in"),
            generation: 1,
            selector: Ok(Selector {
                match_labels: labels(&[("app", "db")]),
                match_expressions: vec![],
            }),
            action: Action::Allow,
            mode: Mode::Enforce,
            ingress: vec![PolicyRule {
                peers: vec![
                    PolicyPeer::Identity(Ref::parse("web").unwrap()),
                    PolicyPeer::Identity(Ref::parse("other/missing").unwrap()),
                ],
                ports: vec![PortRange {
                    protocol: Protocol::Tcp,
                    first: 5432,
                    last: 5432,
                }],
            }],
            egress: vec![],
            invalid: None,
            spec_json: "{}".into(),
            in_force: None,
        })),
    ]);
    allocate(&mut e);
    let web_id = e
        .sid_status(&ObjKey::new("shop", "web"))
        .and_then(|s| s.id)
        .expect("web identity");
    assert_eq!(
        e.sid_status(&ObjKey::new("shop", "web")).unwrap().endpoints,
        1
    );
    let n2 = e.node("n2").expect("node n2");
    assert_eq!(n2.endpoints.endpoints.len(), 1);
    let set = &n2.endpoints.policy_sets[&n2.endpoints.endpoints[0].policy_set];
    assert_eq!(set.ingress.len(), 1);
    assert_eq!(
        set.ingress[0].peers,
        cortexflow_domain::Peers::Only(vec![cortexflow_domain::Peer::Identity(web_id)])
    );
    let st = e.policy_status(&ObjKey::new("shop", "db-in")).unwrap();
    assert!(st.accepted.status);
    assert!(!st.resolved_refs.status);
    assert!(
        st.resolved_refs.message.contains("identity other/missing"),
        "{}",
        st.resolved_refs.message
    );
    let (nodes, _) = e.policy_nodes(&ObjKey::new("shop", "db-in")).unwrap();
    assert_eq!(nodes, BTreeSet::from(["n2".to_string()]));
    // The web pod's node has it as an endpoint without policy; the ipcache has both.
    assert_eq!(e.ipcache().0.len(), 2);
    // The identity listing (`cfcli identities`) agrees with what the nodes enforce.
    let ids = e.identities_with_pods();
    let web = ids
        .iter()
        .find(|i| i.name == "web")
        .expect("the web identity");
    assert_eq!(
        (web.kind, web.id, web.spiffe_id.as_str(), web.pods.clone()),
        (
            "sid",
            Some(web_id),
            "spiffe://cluster.local/ns/shop/sid/web",
            vec!["web-1".to_string()]
        )
    );
    let db = ids
        .iter()
        .find(|i| i.name == "default")
        .expect("db-1's implicit identity");
    assert_eq!((db.kind, db.pods.clone()), ("sa", vec!["db-1".to_string()]));
    assert_eq!(db.id, Some(n2.endpoints.endpoints[0].identity));
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[test]
fn an_invalid_generation_keeps_the_last_accepted_in_force() {
    let policy_at = |generation: i64, cidr: &str| MeshPolicy {
        key: ObjKey::new("shop", "p"),
        generation,
        selector: Ok(Selector::default()),
        action: Action::Deny,
        mode: Mode::Enforce,
        ingress: vec![PolicyRule {
            peers: vec![PolicyPeer::IpBlock {
                cidr: cidr.into(),
                except: vec![],
            }],
            ports: vec![],
        }],
        egress: vec![],
        invalid: None,
        spec_json: format!("{{\"cidr\":\"{cidr}\"}}").into(),
        in_force: None,
    };
    // Generation `g` of the object, with `status.inForce` recording `recorded` (if any).
    let object = |g: i64, cidr: &str, recorded: Option<MeshPolicy>| {
        let mut p = policy_at(g, cidr);
        p.in_force = recorded.map(Box::new);
        Change::Apply(Object::MeshPolicy(p))
    };
    let pod = Change::Apply(Object::Pod(Pod {
        key: ObjKey::new("shop", "a"),
        labels: Arc::default(),
        service_account: "default".into(),
        node: Some("n1".into()),
        ip: Some(Ipv4Addr::new(10, 0, 0, 9)),
        host_network: false,
        terminated: false,
        inject: None,
        has_proxy: false,
    }));
    // (rules in force on n1, the generation n1's config lists).
    let in_force = |e: &Engine| {
        let n = e.node("n1").unwrap();
        let rules = n
            .endpoints
            .policy_sets
            .values()
            .map(|p| p.ingress.len())
            .sum::<usize>();
        let generation = n.endpoints.policies.iter().map(|p| p.generation).next();
        (rules, generation)
    };
    let key = ObjKey::new("shop", "p");
    let mut e = Engine::new(EngineConfig::default());
    e.apply(vec![pod.clone(), object(1, "10.0.0.0/8", None)]);
    allocate(&mut e);
    assert_eq!(in_force(&e), (1, Some(1)));
    let st = e.policy_status(&key).unwrap();
    assert!(st.accepted.status);
    assert_eq!(st.in_force.as_ref().map(|f| f.generation), Some(1));
    assert_eq!(
        st.in_force.as_ref().map(|f| f.spec_json.to_string()),
        Some(r#"{"cidr":"10.0.0.0/8"}"#.to_string()),
        "status.inForce records the accepted spec"
    );

    // Generation 2 is invalid, and the status records generation 1: it stays in force.
    let gen1 = policy_at(1, "10.0.0.0/8");
    e.apply(vec![object(2, "10.0.0.0/99", Some(gen1.clone()))]);
    let st = e.policy_status(&key).unwrap();
    assert!(
        !st.accepted.status && st.accepted.reason == cortexflow_operator_core::CondReason::Invalid
    );
    assert!(
        st.accepted
            .message
            .contains("spec.ingress[0].from[0].ipBlock.cidr")
            && st
                .accepted
                .message
                .contains("generation 1 (the last accepted) stays in force"),
        "{}",
        st.accepted.message
    );
    assert_eq!(st.generation, 2);
    assert_eq!(st.in_force.as_ref().map(|f| f.generation), Some(1));
    assert_eq!(in_force(&e), (1, Some(1)), "generation 1 still enforced");

    // A restarted operator sees only the objects: the same.
    let mut fresh = Engine::new(EngineConfig::default());
    fresh.apply(vec![
        pod.clone(),
        object(2, "10.0.0.0/99", Some(gen1.clone())),
    ]);
    allocate(&mut fresh);
    assert_eq!(in_force(&fresh), (1, Some(1)));

    // Fixed: generation 3 is in force and recorded.
    e.apply(vec![object(3, "10.0.0.0/16", Some(gen1))]);
    assert_eq!(in_force(&e), (1, Some(3)));
    assert_eq!(
        e.policy_status(&key)
            .unwrap()
            .in_force
            .as_ref()
            .map(|f| f.generation),
        Some(3)
    );

    // Never accepted (nothing recorded, or a record that is itself invalid): nothing in force,
    // and the status says so.
    for recorded in [None, Some(policy_at(1, "bad"))] {
        let mut e = Engine::new(EngineConfig::default());
        e.apply(vec![pod.clone(), object(2, "10.0.0.0/99", recorded)]);
        allocate(&mut e);
        let st = e.policy_status(&key).unwrap();
        assert!(!st.accepted.status);
        assert!(
            st.accepted
                .message
                .contains("nothing of this policy is in force"),
            "{}",
            st.accepted.message
        );
        assert_eq!(st.in_force, None);
        assert_eq!(in_force(&e), (0, None));
    }
}
