//! What the operator has told this agent: the merge of the messages of the current config
//! stream (a full snapshot, then sections that changed), and what the datapath should hold
//! because of it.
//!
//! The agent keeps the *received* state separate from what the kernel holds: a config the maps
//! cannot take is refused whole (the kernel keeps the last good state) but later messages still
//! merge onto the received state, since the operator sends changes relative to what it sent.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use cortexflow_common::IDENTITY_HOST;
use cortexflow_domain::{
    Endpoint as DomainEndpoint, Endpoints, IdentityInfo, Invalid, NodeConfig, NodeInfo,
    PolicyGeneration, Service,
};

use crate::compile::{Backend, DesiredState, Endpoint, Frontend};

/// The merged config of one stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Version of the last merged message (0: nothing yet).
    pub version: u64,
    /// Its cluster revision (0: unknown; see `cortexflow_domain::NodeConfig::revision`).
    pub revision: u64,
    pub node: NodeInfo,
    pub endpoints: Endpoints,
    pub ipcache: BTreeMap<Ipv4Addr, u32>,
    pub services: Vec<Service>,
    pub identities: BTreeMap<u32, IdentityInfo>,
}

impl Received {
    /// Whether a full snapshot was merged.
    pub fn started(&self) -> bool {
        self.version != 0
    }

    /// Merges the next message of the stream. A stream starts with a full snapshot; after it,
    /// versions must increase. On error nothing changes.
    pub fn merge(&mut self, m: NodeConfig) -> Result<(), Invalid> {
        if !m.full && !self.started() {
            return Err(Invalid(format!(
                "version {}: the stream did not start with a full snapshot",
                m.version
            )));
        }
        if !m.full && m.version <= self.version {
            return Err(Invalid(format!(
                "version {} does not follow version {}",
                m.version, self.version
            )));
        }
        if m.version == 0 {
            return Err(Invalid("version 0".into()));
        }
        if !m.full && m.revision != 0 && m.revision < self.revision {
            return Err(Invalid(format!(
                "version {}: revision {} is older than the stream's {}",
                m.version, m.revision, self.revision
            )));
        }
        if m.full {
            *self = Received::default();
        }
        self.version = m.version;
        // An update without a revision (0: unknown) is no news about it.
        if m.full || m.revision != 0 {
            self.revision = m.revision;
        }
        if let Some(n) = m.node {
            self.node = n;
        }
        if let Some(e) = m.endpoints {
            self.endpoints = e;
        }
        if let Some(c) = m.ipcache {
            if c.full {
                self.ipcache.clear();
            }
            for ip in c.removals {
                self.ipcache.remove(&ip);
            }
            self.ipcache.extend(c.upserts);
        }
        if let Some(s) = m.services {
            self.services = s;
        }
        if let Some(i) = m.identities {
            self.identities = i.into_iter().map(|i| (i.id, i)).collect();
        }
        Ok(())
    }

    /// The policies of the config (echoed in status reports once applied).
    pub fn policies(&self) -> BTreeSet<PolicyGeneration> {
        self.endpoints.policies.clone()
    }

    /// The local endpoint with this address.
    pub fn endpoint_by_ip(&self, ip: Ipv4Addr) -> Option<&DomainEndpoint> {
        self.endpoints.endpoints.iter().find(|e| e.ip == ip)
    }

    /// What the datapath should hold, given where each endpoint's interface is (`ifindex`
    /// returns `None` for a pod whose interface is not there yet: it is left out and listed).
    pub fn desired(
        &self,
        ifindex: impl Fn(&DomainEndpoint) -> Option<u32>,
    ) -> (DesiredState, Vec<DomainEndpoint>) {
        let mut d = DesiredState::default();
        let mut pending = Vec::new();
        for e in &self.endpoints.endpoints {
            let Some(policy) = self.endpoints.policy_sets.get(&e.policy_set) else {
                // Validation guarantees the set exists; an endpoint without one is skipped.
                pending.push(e.clone());
                continue;
            };
            match ifindex(e) {
                Some(i) => {
                    d.endpoints.insert(
                        i,
                        Endpoint {
                            ip: e.ip,
                            identity: e.identity,
                            policy: (**policy).clone(),
                        },
                    );
                }
                None => pending.push(e.clone()),
            }
        }
        d.ipcache = self.ipcache.clone();
        for a in &self.node.addresses {
            d.ipcache.insert(*a, IDENTITY_HOST);
        }
        for s in &self.services {
            d.services.insert(
                Frontend {
                    vip: s.vip,
                    port: s.port,
                    protocol: s.protocol,
                },
                s.backends
                    .iter()
                    .map(|b| Backend {
                        ip: b.ip,
                        port: b.port,
                        weight: b.weight,
                    })
                    .collect(),
            );
        }
        (d, pending)
    }

    /// `"<namespace>/<name>"` of an identity, or its reserved name.
    pub fn identity_name(&self, id: u32) -> String {
        match id {
            0 => "unknown".into(),
            1 => "host".into(),
            2 => "world".into(),
            _ => match self.identities.get(&id) {
                Some(i) => format!("{}/{}", i.namespace, i.name),
                None if id >= cortexflow_common::IDENTITY_CIDR_BASE => "world".into(),
                None => format!("identity-{id}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use cortexflow_domain::{EndpointPolicy, Ipcache, Protocol};

    use super::*;

    fn full(version: u64) -> NodeConfig {
        NodeConfig {
            version,
            revision: 1000,
            full: true,
            node: Some(NodeInfo {
                name: "n1".into(),
                addresses: vec![Ipv4Addr::new(172, 18, 0, 2)],
                pod_cidr: None,
            }),
            endpoints: Some(Endpoints {
                policy_sets: [(1, Arc::new(EndpointPolicy::default()))].into(),
                endpoints: vec![DomainEndpoint {
                    namespace: "shop".into(),
                    name: "web-1".into(),
                    ip: Ipv4Addr::new(10, 0, 0, 2),
                    identity: 300,
                    policy_set: 1,
                }],
                ..Default::default()
            }),
            ipcache: Some(Ipcache {
                full: true,
                upserts: vec![(Ipv4Addr::new(10, 0, 0, 2), 300)],
                removals: vec![],
            }),
            services: Some(vec![Service {
                namespace: "shop".into(),
                name: "web".into(),
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
                backends: vec![],
            }]),
            identities: Some(vec![]),
        }
    }

    #[test]
    fn a_stream_starts_with_a_snapshot_and_versions_increase() {
        let mut r = Received::default();
        let mut delta = NodeConfig {
            version: 5,
            ..Default::default()
        };
        assert!(r.merge(delta.clone()).is_err(), "a delta first is refused");
        r.merge(full(4)).unwrap();
        delta.version = 4;
        let before = r.clone();
        assert!(r.merge(delta.clone()).is_err(), "an old version is refused");
        assert_eq!(r, before, "a refused message changes nothing");
        delta.version = 6;
        r.merge(delta).unwrap();
        assert_eq!(r.version, 6);
        // A new stream's snapshot replaces everything, whatever its version.
        r.merge(full(2)).unwrap();
        assert_eq!(r.version, 2);
    }

    #[test]
    fn a_stream_revision_never_goes_back() {
        let mut r = Received::default();
        r.merge(full(4)).unwrap();
        assert_eq!(r.revision, 1000);
        let older = NodeConfig {
            version: 5,
            revision: 999,
            ..Default::default()
        };
        let before = r.clone();
        assert!(
            r.merge(older).is_err(),
            "a revision older than the stream's"
        );
        assert_eq!(r, before);
        r.merge(NodeConfig {
            version: 6,
            revision: 1000,
            ..Default::default()
        })
        .unwrap();
        r.merge(NodeConfig {
            version: 7,
            revision: 1200,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.revision, 1200);
    }

    #[test]
    fn ipcache_deltas_merge_and_sections_replace() {
        let mut r = Received::default();
        r.merge(full(1)).unwrap();
        r.merge(NodeConfig {
            version: 2,
            ipcache: Some(Ipcache {
                full: false,
                upserts: vec![(Ipv4Addr::new(10, 0, 1, 5), 301)],
                removals: vec![Ipv4Addr::new(10, 0, 0, 2)],
            }),
            services: Some(vec![]),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            r.ipcache,
            [(Ipv4Addr::new(10, 0, 1, 5), 301)].into_iter().collect()
        );
        assert!(r.services.is_empty());
        assert_eq!(r.endpoints.endpoints.len(), 1, "absent sections stay");
    }

    #[test]
    fn desired_state_lists_pods_without_interfaces_and_adds_the_node() {
        let mut r = Received::default();
        r.merge(full(1)).unwrap();
        let (d, pending) = r.desired(|_| None);
        assert!(d.endpoints.is_empty());
        assert_eq!(pending.len(), 1);
        assert_eq!(
            d.ipcache.get(&Ipv4Addr::new(172, 18, 0, 2)),
            Some(&IDENTITY_HOST)
        );
        let (d, pending) = r.desired(|_| Some(7));
        assert!(pending.is_empty());
        assert_eq!(d.endpoints[&7].identity, 300);
        assert_eq!(d.services.len(), 1);
    }
}
