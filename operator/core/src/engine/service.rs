//! Services: ClusterIP Services with their ready EndpointSlice backends, and the identity list
//! a node config carries.
use super::*;

impl Engine {
    pub(super) fn compute_services(&self) -> Vec<DService> {
        let mut out = Vec::new();
        for svc in self.snap.services.values() {
            let Some(vip) = svc.cluster_ip else { continue };
            let slices: Vec<&EndpointSlice> = Self::range(&self.snap.slices, &svc.key.namespace)
                .filter(|s| *s.service == *svc.key.name)
                .collect();
            for sp in &svc.ports {
                let mut backends = BTreeSet::new();
                for s in &slices {
                    for port in s
                        .ports
                        .iter()
                        .filter(|p| p.name == sp.name && p.protocol == sp.protocol)
                    {
                        for ep in s.endpoints.iter().filter(|e| e.ready) {
                            for ip in &ep.addresses {
                                backends.insert(Backend {
                                    ip: *ip,
                                    port: port.port,
                                    weight: 1,
                                });
                            }
                        }
                    }
                }
                out.push(DService {
                    namespace: svc.key.namespace.to_string(),
                    name: svc.key.name.to_string(),
                    vip,
                    port: sp.port,
                    protocol: sp.protocol,
                    backends: backends.into_iter().collect(),
                });
            }
        }
        out
    }

    /// Every Service and the version it last changed at.
    pub fn services(&self) -> (Arc<Vec<DService>>, u64) {
        (self.services.clone(), self.services_version)
    }

    /// Every identity's name and the version the list last changed at.
    pub fn identities(&self) -> (Arc<Vec<IdentityInfo>>, u64) {
        (self.identities.clone(), self.identities_version)
    }
}
