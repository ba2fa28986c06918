//! Node configs: a node's endpoints (its live pods with an address and an identity), each
//! pointing at a policy set, the rule → policy map and the policies with their generation.
use super::*;

impl Engine {
    /// Rebuilds a node's config; returns whether it changed.
    pub(super) fn rebuild_node(&mut self, node: &str) -> bool {
        let info = match self.snap.nodes.get(node) {
            Some(n) => NodeInfo {
                name: n.name.to_string(),
                addresses: n.addresses.clone(),
                pod_cidr: n.pod_cidr,
            },
            None => NodeInfo {
                name: node.to_string(),
                ..Default::default()
            },
        };
        let mut sets: BTreeMap<Arc<EndpointPolicy>, u32> = BTreeMap::new();
        let mut eps = Vec::new();
        let mut policies = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for pod in self.pods_by_node.get(node).into_iter().flatten() {
            let (Some(p), Some(policy), Some(identity)) = (
                self.snap.pods.get(pod),
                self.pod_endpoint.get(pod),
                self.pod_identity(pod),
            ) else {
                continue;
            };
            let Some(ip) = p.ip else { continue };
            // Two live pods with one address (a recycled IP): the first by namespace/name owns
            // it, as in the ipcache; a node config never lists an address twice.
            if !addresses.insert(ip) {
                continue;
            }
            for (k, c) in self.compiled_policies_of(pod) {
                policies.insert(PolicyGeneration {
                    namespace: k.namespace.to_string(),
                    name: k.name.to_string(),
                    generation: c.generation,
                });
            }
            sets.entry(policy.clone()).or_insert(0);
            eps.push((pod.clone(), ip, identity, policy.clone()));
        }
        for (i, id) in sets.values_mut().enumerate() {
            *id = i as u32 + 1;
        }
        let mut rules = BTreeMap::new();
        for policy in sets.keys() {
            for r in policy.ingress.iter().chain(&policy.egress) {
                if let Some(rr) = self.rule_refs.get(&r.id) {
                    rules.insert(r.id, rr.clone());
                }
            }
        }
        let endpoints = Endpoints {
            endpoints: eps
                .iter()
                .map(|(k, ip, identity, policy)| Endpoint {
                    namespace: k.namespace.to_string(),
                    name: k.name.to_string(),
                    ip: *ip,
                    identity: *identity,
                    policy_set: sets[policy],
                })
                .collect(),
            policy_sets: sets.into_iter().map(|(p, id)| (id, p)).collect(),
            rules,
            policies,
        };
        let exists = self.snap.nodes.contains_key(node) || !endpoints.endpoints.is_empty();
        let version = self.version;
        match self.nodes.get_mut(node) {
            _ if !exists => self.nodes.remove(node).is_some(),
            Some(st) => {
                let mut changed = false;
                if *st.info != info {
                    st.info = Arc::new(info);
                    st.info_version = version;
                    changed = true;
                }
                if *st.endpoints != endpoints {
                    st.endpoints = Arc::new(endpoints);
                    st.endpoints_version = version;
                    changed = true;
                }
                changed
            }
            None => {
                self.nodes.insert(
                    node.into(),
                    NodeState {
                        info: Arc::new(info),
                        info_version: version,
                        endpoints: Arc::new(endpoints),
                        endpoints_version: version,
                    },
                );
                true
            }
        }
    }
}
