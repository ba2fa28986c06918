//! Wire ↔ domain: `TryFrom<v1::…>` validates every message into the types of
//! `cortexflow-domain`, refusing the whole message when any part is invalid (unknown enum
//! values, zero ids, bad CIDRs or port ranges, dangling references, duplicates), so that the
//! agent either gets a whole, consistent config or an error naming what is wrong — never half
//! of one. `From<&domain::…> for v1::…` is the operator's direction and cannot fail. This
//! module is the only place that converts between the two.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use cortexflow_domain::{
    Action, AgentStatus, Backend, Cidr, Direction, Endpoint, EndpointPolicy, Endpoints,
    IdentityInfo, Invalid, Ipcache, Mode, NodeConfig, NodeInfo, Peer, Peers, PolicyGeneration,
    PortRange, Protocol, Rule, RuleRef, Service, identity, invalid,
};

use crate::agent::v1;

impl From<v1::PolicyGeneration> for PolicyGeneration {
    fn from(p: v1::PolicyGeneration) -> Self {
        PolicyGeneration {
            namespace: p.namespace,
            name: p.name,
            generation: p.generation,
        }
    }
}

impl From<&PolicyGeneration> for v1::PolicyGeneration {
    fn from(p: &PolicyGeneration) -> Self {
        v1::PolicyGeneration {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            generation: p.generation,
        }
    }
}

// ---- wire → domain (validating) ----------------------------------------------------------------

fn port(p: u32, what: &str) -> Result<u16, Invalid> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => invalid(format!("{what} {p} is not a port (1-65535)")),
    }
}

fn protocol(p: i32) -> Result<Protocol, Invalid> {
    match v1::Protocol::try_from(p) {
        Ok(v1::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(v1::Protocol::Udp) => Ok(Protocol::Udp),
        _ => invalid(format!("protocol {p} is neither TCP nor UDP")),
    }
}

impl TryFrom<v1::Rule> for Rule {
    type Error = Invalid;
    fn try_from(r: v1::Rule) -> Result<Self, Invalid> {
        let id = r.id;
        if id == 0 {
            return invalid("rule id 0");
        }
        let action = match v1::Action::try_from(r.action) {
            Ok(v1::Action::Allow) => Action::Allow,
            Ok(v1::Action::Deny) => Action::Deny,
            _ => {
                return invalid(format!(
                    "rule {id}: action {} is neither Allow nor Deny",
                    r.action
                ));
            }
        };
        let mode = match v1::Mode::try_from(r.mode) {
            Ok(v1::Mode::Enforce) => Mode::Enforce,
            Ok(v1::Mode::Audit) => Mode::Audit,
            _ => {
                return invalid(format!(
                    "rule {id}: mode {} is neither Enforce nor Audit",
                    r.mode
                ));
            }
        };
        let peers = if r.any_peer {
            if !r.peers.is_empty() {
                return invalid(format!("rule {id}: any_peer with {} peers", r.peers.len()));
            }
            Peers::Any
        } else {
            let mut peers = Vec::with_capacity(r.peers.len());
            for p in r.peers {
                peers.push(match p.kind {
                    Some(v1::peer::Kind::Identity(0)) => {
                        return invalid(format!("rule {id}: peer identity 0"));
                    }
                    Some(v1::peer::Kind::Identity(i)) => Peer::Identity(i),
                    Some(v1::peer::Kind::IpBlock(b)) => {
                        let cidr: Cidr = b
                            .cidr
                            .parse()
                            .map_err(|e: Invalid| Invalid(format!("rule {id}: {}", e.0)))?;
                        let mut except = Vec::with_capacity(b.except.len());
                        for e in b.except {
                            let e: Cidr = e
                                .parse()
                                .map_err(|e: Invalid| Invalid(format!("rule {id}: {}", e.0)))?;
                            if !cidr.covers(&e) {
                                return invalid(format!("rule {id}: except {e} is outside {cidr}"));
                            }
                            except.push(e);
                        }
                        Peer::IpBlock { cidr, except }
                    }
                    None => return invalid(format!("rule {id}: peer of no kind")),
                });
            }
            Peers::Only(peers)
        };
        let mut ports = Vec::with_capacity(r.ports.len());
        for p in r.ports {
            let first = port(p.first, &format!("rule {id}: first port"))?;
            let last = port(p.last, &format!("rule {id}: last port"))?;
            if last < first {
                return invalid(format!("rule {id}: port range {first}-{last} is backwards"));
            }
            ports.push(PortRange {
                protocol: protocol(p.protocol)
                    .map_err(|e| Invalid(format!("rule {id}: {}", e.0)))?,
                first,
                last,
            });
        }
        Ok(Rule {
            id,
            action,
            mode,
            peers,
            ports,
        })
    }
}

impl TryFrom<v1::Endpoints> for Endpoints {
    type Error = Invalid;
    fn try_from(e: v1::Endpoints) -> Result<Self, Invalid> {
        let mut policy_sets = BTreeMap::new();
        let mut rule_ids = BTreeSet::new();
        for set in e.policy_sets {
            let mut policy = EndpointPolicy::default();
            for (dir, rules) in [
                (Direction::Ingress, set.ingress),
                (Direction::Egress, set.egress),
            ] {
                for r in rules {
                    let r = Rule::try_from(r)
                        .map_err(|e| Invalid(format!("policy set {}: {}", set.id, e.0)))?;
                    rule_ids.insert(r.id);
                    match dir {
                        Direction::Ingress => policy.ingress.push(r),
                        Direction::Egress => policy.egress.push(r),
                    }
                }
            }
            if set.id == 0 || policy_sets.insert(set.id, Arc::new(policy)).is_some() {
                return invalid(format!("policy set id {} is 0 or repeated", set.id));
            }
        }
        let mut endpoints = Vec::with_capacity(e.endpoints.len());
        let mut ips = BTreeSet::new();
        for ep in e.endpoints {
            let ip = Ipv4Addr::from(ep.ip);
            let who = format!("endpoint {}/{}", ep.namespace, ep.name);
            if ip.is_unspecified() || !ips.insert(ip) {
                return invalid(format!("{who}: address {ip} is unspecified or used twice"));
            }
            if !identity::is_pod_identity(ep.identity) {
                return invalid(format!(
                    "{who}: identity {} is neither allocated nor unknown (0)",
                    ep.identity
                ));
            }
            if !policy_sets.contains_key(&ep.policy_set) {
                return invalid(format!("{who}: unknown policy set {}", ep.policy_set));
            }
            endpoints.push(Endpoint {
                namespace: ep.namespace,
                name: ep.name,
                ip,
                identity: ep.identity,
                policy_set: ep.policy_set,
            });
        }
        let mut rules = BTreeMap::new();
        for r in e.rules {
            let direction = match r.direction.as_str() {
                "ingress" => Direction::Ingress,
                "egress" => Direction::Egress,
                other => return invalid(format!("rule ref {}: direction {other:?}", r.id)),
            };
            rules.insert(
                r.id,
                RuleRef {
                    namespace: r.namespace,
                    policy: r.policy,
                    direction,
                    index: r.index,
                },
            );
        }
        Ok(Endpoints {
            policy_sets,
            endpoints,
            rules,
            policies: e.policies.into_iter().map(PolicyGeneration::from).collect(),
        })
    }
}

impl TryFrom<v1::NodeConfig> for NodeConfig {
    type Error = Invalid;
    fn try_from(m: v1::NodeConfig) -> Result<Self, Invalid> {
        let node = m
            .node
            .map(|n| -> Result<NodeInfo, Invalid> {
                Ok(NodeInfo {
                    name: n.name,
                    addresses: n.addresses.into_iter().map(Ipv4Addr::from).collect(),
                    pod_cidr: if n.pod_cidr.is_empty() {
                        None
                    } else {
                        Some(n.pod_cidr.parse()?)
                    },
                })
            })
            .transpose()?;
        let endpoints = m.endpoints.map(Endpoints::try_from).transpose()?;
        let ipcache = m
            .ipcache
            .map(|c| -> Result<Ipcache, Invalid> {
                if c.full && !c.removals.is_empty() {
                    return invalid("a full ipcache with removals");
                }
                let mut upserts = Vec::with_capacity(c.upserts.len());
                for e in c.upserts {
                    let pod_or_host =
                        identity::is_pod_identity(e.identity) || e.identity == identity::HOST;
                    if !pod_or_host || e.ip == 0 {
                        return invalid(format!(
                            "ipcache entry {} → {}",
                            Ipv4Addr::from(e.ip),
                            e.identity
                        ));
                    }
                    upserts.push((Ipv4Addr::from(e.ip), e.identity));
                }
                Ok(Ipcache {
                    full: c.full,
                    upserts,
                    removals: c.removals.into_iter().map(Ipv4Addr::from).collect(),
                })
            })
            .transpose()?;
        let services = m
            .services
            .map(|s| -> Result<Vec<Service>, Invalid> {
                let mut out = Vec::with_capacity(s.services.len());
                for svc in s.services {
                    let who = format!("service {}/{}", svc.namespace, svc.name);
                    let mut backends = Vec::with_capacity(svc.backends.len());
                    for b in svc.backends {
                        backends.push(Backend {
                            ip: Ipv4Addr::from(b.ip),
                            port: port(b.port, &format!("{who}: backend port"))?,
                            weight: b.weight,
                        });
                    }
                    out.push(Service {
                        vip: Ipv4Addr::from(svc.vip),
                        port: port(svc.port, &format!("{who}: port"))?,
                        protocol: protocol(svc.protocol)
                            .map_err(|e| Invalid(format!("{who}: {}", e.0)))?,
                        namespace: svc.namespace,
                        name: svc.name,
                        backends,
                    });
                }
                Ok(out)
            })
            .transpose()?;
        let identities = m.identities.map(|i| {
            i.identities
                .into_iter()
                .map(|i| IdentityInfo {
                    id: i.id,
                    namespace: i.namespace,
                    name: i.name,
                    kind: i.kind,
                })
                .collect()
        });
        if m.full
            && (endpoints.is_none()
                || ipcache.as_ref().is_none_or(|c| !c.full)
                || services.is_none())
        {
            return invalid(
                "a full snapshot without all of endpoints, a full ipcache and services",
            );
        }
        Ok(NodeConfig {
            version: m.version,
            revision: m.revision,
            full: m.full,
            node,
            endpoints,
            ipcache,
            services,
            identities,
        })
    }
}

impl TryFrom<v1::AgentStatus> for AgentStatus {
    type Error = Invalid;
    fn try_from(s: v1::AgentStatus) -> Result<Self, Invalid> {
        if s.node.is_empty() {
            return invalid("status without a node");
        }
        Ok(AgentStatus {
            node: s.node,
            applied_version: s.applied_version,
            failed: (s.failed_version != 0 || !s.error.is_empty())
                .then_some((s.failed_version, s.error)),
            policies: s.policies.into_iter().map(PolicyGeneration::from).collect(),
            programmed: s.programmed.into_iter().collect(),
            programmed_at: s
                .programmed_endpoints
                .into_iter()
                .map(|e| (format!("{}/{}", e.namespace, e.name), Ipv4Addr::from(e.ip)))
                .collect(),
            trust_bundle: s.trust_bundle,
        })
    }
}

// ---- domain → wire -----------------------------------------------------------------------------

impl From<&Rule> for v1::Rule {
    fn from(r: &Rule) -> Self {
        let (any_peer, peers) = match &r.peers {
            Peers::Any => (true, Vec::new()),
            Peers::Only(list) => (
                false,
                list.iter()
                    .map(|p| v1::Peer {
                        kind: Some(match p {
                            Peer::Identity(i) => v1::peer::Kind::Identity(*i),
                            Peer::IpBlock { cidr, except } => {
                                v1::peer::Kind::IpBlock(v1::IpBlock {
                                    cidr: cidr.to_string(),
                                    except: except.iter().map(ToString::to_string).collect(),
                                })
                            }
                        }),
                    })
                    .collect(),
            ),
        };
        v1::Rule {
            id: r.id,
            action: match r.action {
                Action::Allow => v1::Action::Allow,
                Action::Deny => v1::Action::Deny,
            } as i32,
            mode: match r.mode {
                Mode::Enforce => v1::Mode::Enforce,
                Mode::Audit => v1::Mode::Audit,
            } as i32,
            any_peer,
            peers,
            ports: r
                .ports
                .iter()
                .map(|p| v1::PortRange {
                    protocol: wire_protocol(p.protocol),
                    first: u32::from(p.first),
                    last: u32::from(p.last),
                })
                .collect(),
        }
    }
}

fn wire_protocol(p: Protocol) -> i32 {
    match p {
        Protocol::Tcp => v1::Protocol::Tcp as i32,
        Protocol::Udp => v1::Protocol::Udp as i32,
    }
}

impl From<&Endpoints> for v1::Endpoints {
    fn from(e: &Endpoints) -> Self {
        v1::Endpoints {
            policy_sets: e
                .policy_sets
                .iter()
                .map(|(id, p)| v1::PolicySet {
                    id: *id,
                    ingress: p.ingress.iter().map(v1::Rule::from).collect(),
                    egress: p.egress.iter().map(v1::Rule::from).collect(),
                })
                .collect(),
            endpoints: e
                .endpoints
                .iter()
                .map(|ep| v1::Endpoint {
                    namespace: ep.namespace.clone(),
                    name: ep.name.clone(),
                    ip: u32::from(ep.ip),
                    identity: ep.identity,
                    policy_set: ep.policy_set,
                })
                .collect(),
            rules: e
                .rules
                .iter()
                .map(|(id, r)| v1::RuleRef {
                    id: *id,
                    namespace: r.namespace.clone(),
                    policy: r.policy.clone(),
                    direction: r.direction.as_str().to_string(),
                    index: r.index,
                })
                .collect(),
            policies: e.policies.iter().map(v1::PolicyGeneration::from).collect(),
        }
    }
}

impl From<&NodeInfo> for v1::NodeInfo {
    fn from(n: &NodeInfo) -> Self {
        v1::NodeInfo {
            name: n.name.clone(),
            addresses: n.addresses.iter().map(|a| u32::from(*a)).collect(),
            pod_cidr: n.pod_cidr.map(|c| c.to_string()).unwrap_or_default(),
        }
    }
}

impl From<&Ipcache> for v1::Ipcache {
    fn from(c: &Ipcache) -> Self {
        v1::Ipcache {
            full: c.full,
            upserts: c
                .upserts
                .iter()
                .map(|(ip, id)| v1::IpIdentity {
                    ip: u32::from(*ip),
                    identity: *id,
                })
                .collect(),
            removals: c.removals.iter().map(|ip| u32::from(*ip)).collect(),
        }
    }
}

impl From<&Service> for v1::Service {
    fn from(s: &Service) -> Self {
        v1::Service {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip: u32::from(s.vip),
            port: u32::from(s.port),
            protocol: wire_protocol(s.protocol),
            backends: s
                .backends
                .iter()
                .map(|b| v1::Backend {
                    ip: u32::from(b.ip),
                    port: u32::from(b.port),
                    weight: b.weight,
                })
                .collect(),
        }
    }
}

impl From<&IdentityInfo> for v1::IdentityInfo {
    fn from(i: &IdentityInfo) -> Self {
        v1::IdentityInfo {
            id: i.id,
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            kind: i.kind.clone(),
        }
    }
}

impl From<&NodeConfig> for v1::NodeConfig {
    fn from(c: &NodeConfig) -> Self {
        v1::NodeConfig {
            version: c.version,
            revision: c.revision,
            full: c.full,
            node: c.node.as_ref().map(v1::NodeInfo::from),
            endpoints: c.endpoints.as_ref().map(v1::Endpoints::from),
            ipcache: c.ipcache.as_ref().map(v1::Ipcache::from),
            services: c.services.as_ref().map(|s| v1::Services {
                services: s.iter().map(v1::Service::from).collect(),
            }),
            identities: c.identities.as_ref().map(|i| v1::Identities {
                identities: i.iter().map(v1::IdentityInfo::from).collect(),
            }),
        }
    }
}

impl From<&AgentStatus> for v1::AgentStatus {
    fn from(s: &AgentStatus) -> Self {
        let (failed_version, error) = s.failed.clone().unwrap_or_default();
        v1::AgentStatus {
            node: s.node.clone(),
            applied_version: s.applied_version,
            failed_version,
            error,
            policies: s.policies.iter().map(v1::PolicyGeneration::from).collect(),
            programmed: s.programmed.iter().cloned().collect(),
            programmed_endpoints: s
                .programmed_at
                .iter()
                .filter_map(|(key, ip)| {
                    let (namespace, name) = key.split_once('/')?;
                    Some(v1::ProgrammedEndpoint {
                        namespace: namespace.into(),
                        name: name.into(),
                        ip: u32::from(*ip),
                    })
                })
                .collect(),
            trust_bundle: s.trust_bundle.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> NodeConfig {
        let rule = Rule {
            id: 65,
            action: Action::Allow,
            mode: Mode::Enforce,
            peers: Peers::Only(vec![
                Peer::Identity(300),
                Peer::IpBlock {
                    cidr: "10.0.0.0/8".parse().unwrap(),
                    except: vec!["10.1.0.0/16".parse().unwrap()],
                },
            ]),
            ports: vec![PortRange {
                protocol: Protocol::Udp,
                first: 53,
                last: 53,
            }],
        };
        NodeConfig {
            version: 7,
            revision: 123,
            full: true,
            node: Some(NodeInfo {
                name: "n1".into(),
                addresses: vec![Ipv4Addr::new(172, 16, 0, 1)],
                pod_cidr: Some("10.244.1.0/24".parse().unwrap()),
            }),
            endpoints: Some(Endpoints {
                policy_sets: BTreeMap::from([(
                    1,
                    Arc::new(EndpointPolicy {
                        ingress: vec![rule],
                        egress: vec![],
                    }),
                )]),
                endpoints: vec![Endpoint {
                    namespace: "shop".into(),
                    name: "db-0".into(),
                    ip: Ipv4Addr::new(10, 244, 1, 5),
                    identity: 301,
                    policy_set: 1,
                }],
                rules: BTreeMap::from([(
                    65,
                    RuleRef {
                        namespace: "shop".into(),
                        policy: "db".into(),
                        direction: Direction::Ingress,
                        index: 0,
                    },
                )]),
                policies: BTreeSet::from([PolicyGeneration {
                    namespace: "shop".into(),
                    name: "db".into(),
                    generation: 3,
                }]),
            }),
            ipcache: Some(Ipcache {
                full: true,
                upserts: vec![(Ipv4Addr::new(10, 244, 1, 5), 301)],
                removals: vec![],
            }),
            services: Some(vec![Service {
                namespace: "shop".into(),
                name: "db".into(),
                vip: Ipv4Addr::new(10, 96, 0, 9),
                port: 5432,
                protocol: Protocol::Tcp,
                backends: vec![Backend {
                    ip: Ipv4Addr::new(10, 244, 1, 5),
                    port: 5432,
                    weight: 1,
                }],
            }]),
            identities: Some(vec![IdentityInfo {
                id: 301,
                namespace: "shop".into(),
                name: "db".into(),
                kind: "sid".into(),
            }]),
        }
    }

    #[test]
    fn round_trip_through_the_wire() {
        let c = sample();
        let wire = v1::NodeConfig::from(&c);
        let bytes = prost::Message::encode_to_vec(&wire);
        let back: v1::NodeConfig = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(NodeConfig::try_from(back).unwrap(), c);
    }

    #[test]
    fn a_status_round_trips_with_the_addresses_of_its_endpoints() {
        let s = AgentStatus {
            node: "n1".into(),
            applied_version: 9,
            failed: Some((10, "map CF_POLICY: full".into())),
            policies: BTreeSet::from([PolicyGeneration {
                namespace: "shop".into(),
                name: "db".into(),
                generation: 2,
            }]),
            programmed: BTreeSet::from(["shop/db-0".to_string()]),
            programmed_at: BTreeMap::from([("shop/db-0".to_string(), Ipv4Addr::new(10, 0, 0, 7))]),
            trust_bundle: "5e1f".into(),
        };
        let bytes = prost::Message::encode_to_vec(&v1::AgentStatus::from(&s));
        let back: v1::AgentStatus = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(AgentStatus::try_from(back).unwrap(), s);
    }

    /// Every way a message can be wrong is refused with a message that says what.
    #[test]
    fn invalid_messages_are_refused() {
        type Mutation = (&'static str, fn(&mut v1::NodeConfig));
        let cases: Vec<Mutation> = vec![
            ("rule id 0", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].id = 0
            }),
            ("action", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].action = 9
            }),
            ("mode", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].mode = 0
            }),
            ("any_peer", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].any_peer = true
            }),
            ("prefix length 33", |m| {
                if let Some(v1::peer::Kind::IpBlock(b)) =
                    &mut m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].peers[1].kind
                {
                    b.cidr = "10.0.0.0/33".into();
                }
            }),
            ("outside", |m| {
                if let Some(v1::peer::Kind::IpBlock(b)) =
                    &mut m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].peers[1].kind
                {
                    b.except = vec!["192.168.0.0/16".into()];
                }
            }),
            ("peer of no kind", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].peers[0].kind = None
            }),
            ("peer identity 0", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].peers[0].kind =
                    Some(v1::peer::Kind::Identity(0))
            }),
            ("backwards", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].ports[0].first = 60
            }),
            ("not a port", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].ports[0].last = 70000
            }),
            ("neither TCP nor UDP", |m| {
                m.endpoints.as_mut().unwrap().policy_sets[0].ingress[0].ports[0].protocol = 0
            }),
            ("unknown policy set", |m| {
                m.endpoints.as_mut().unwrap().endpoints[0].policy_set = 9
            }),
            ("neither allocated nor unknown", |m| {
                m.endpoints.as_mut().unwrap().endpoints[0].identity = 2
            }),
            ("neither allocated nor unknown", |m| {
                m.endpoints.as_mut().unwrap().endpoints[0].identity = 0xFF00_0001
            }),
            ("used twice", |m| {
                let e = m.endpoints.as_mut().unwrap();
                let dup = e.endpoints[0].clone();
                e.endpoints.push(dup);
            }),
            ("repeated", |m| {
                let e = m.endpoints.as_mut().unwrap();
                let dup = e.policy_sets[0].clone();
                e.policy_sets.push(dup);
            }),
            ("full snapshot", |m| m.services = None),
            ("full ipcache with removals", |m| {
                m.ipcache.as_mut().unwrap().removals.push(1)
            }),
            ("ipcache entry", |m| {
                m.ipcache.as_mut().unwrap().upserts[0].identity = 2
            }),
            ("ipcache entry", |m| {
                m.ipcache.as_mut().unwrap().upserts[0].identity = 0xFF00_0000
            }),
            ("backend port", |m| {
                m.services.as_mut().unwrap().services[0].backends[0].port = 0
            }),
            ("direction", |m| {
                m.endpoints.as_mut().unwrap().rules[0].direction = "sideways".into()
            }),
        ];
        for (want, mutate) in cases {
            let mut wire = v1::NodeConfig::from(&sample());
            mutate(&mut wire);
            match NodeConfig::try_from(wire) {
                Ok(_) => panic!("{want}: accepted"),
                Err(e) => assert!(e.0.contains(want), "{want}: error {e}"),
            }
        }
    }

    proptest! {
        /// Decoding arbitrary bytes and converting never panics: it yields a config or an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = <v1::NodeConfig as prost::Message>::decode(bytes.as_slice()) {
                let _ = NodeConfig::try_from(m);
            }
        }
    }
}
