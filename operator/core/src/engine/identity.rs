//! Identities: every pod's identity key (the oldest ServiceIdentity of its namespace that
//! selects it, else its service account's implicit identity) and the number it is enforced
//! with, the ServiceIdentity statuses, and the list of identity names.
//!
//! **A pod is never left unenforced for want of a number.** Until its key has a number (a new
//! ServiceIdentity, a new service account, no leader, a full table) a pod keeps the number it
//! had — that of another ServiceIdentity selecting it, oldest first, else its service account's —
//! and a pod that had none is enforced as `identity::UNKNOWN` (0): its own policies apply to it
//! (default-deny where they say so), and as a peer it matches only rules that admit any peer.
//! This is computed from the current objects and table alone, so it is the same whatever order
//! changes arrived in.
use cortexflow_domain::{identity, spiffe};

use super::*;

impl Engine {
    /// The ServiceIdentities of `ns`, oldest first (creation time, then name).
    fn sids_oldest_first(&self, ns: &str) -> Vec<&ServiceIdentity> {
        let mut sids: Vec<&ServiceIdentity> = self.sids_of(ns).collect();
        sids.sort_by(|a, b| (a.created, &a.key.name).cmp(&(b.created, &b.key.name)));
        sids
    }

    /// The ServiceIdentity that claims `pod` (the oldest of its namespace that selects it), by
    /// the rule every pod's identity follows; `None`: its service account's implicit identity.
    /// The pod need not be known to the engine (the injector asks before it exists).
    pub fn claiming_identity(&self, pod: &Pod) -> Option<&ServiceIdentity> {
        self.sids_oldest_first(&pod.key.namespace)
            .into_iter()
            .find(|s| s.selects(pod))
    }

    pub(super) fn resolve_namespace(&self, ns: &str) -> NsState {
        let sids = self.sids_oldest_first(ns);
        let mut st = NsState::default();
        for pod in self.pods_of(ns) {
            if !pod.live() {
                continue;
            }
            let sa = AllocKey::Sa(ObjKey::new(ns, pod.service_account.clone()));
            let mut candidates: Vec<AllocKey> = sids
                .iter()
                .filter(|s| s.selects(pod))
                .map(|s| AllocKey::Sid(s.key.clone()))
                .collect();
            candidates.push(sa);
            // The first candidate is the pod's key; the first one with a number is what it is
            // enforced with until its key has one.
            let id = candidates
                .iter()
                .find_map(|k| self.alloc.get(k))
                .unwrap_or(identity::UNKNOWN);
            if id != identity::UNKNOWN {
                st.identities.insert(id);
            }
            st.pod_ids.insert(pod.key.clone(), id);
            st.pod_keys.insert(pod.key.clone(), candidates.remove(0));
        }
        st
    }

    pub(super) fn range<'a, V>(
        map: &'a BTreeMap<ObjKey, V>,
        ns: &str,
    ) -> impl Iterator<Item = &'a V> {
        let start = ObjKey::new(ns, "");
        map.range(start..)
            .take_while(move |(k, _)| &*k.namespace == ns)
            .map(|(_, v)| v)
    }

    pub(super) fn pods_of<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a Pod> {
        Self::range(&self.snap.pods, ns)
    }

    pub(super) fn sids_of<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a ServiceIdentity> {
        Self::range(&self.snap.sids, ns)
    }

    pub(super) fn sid_statuses(&self, ns: &str) -> Vec<(ObjKey, SidStatus)> {
        let mut sids: Vec<&ServiceIdentity> = self.sids_of(ns).collect();
        sids.sort_by(|a, b| (a.created, &a.key.name).cmp(&(b.created, &b.key.name)));
        let st = self.ns.get(ns);
        let mut out = Vec::new();
        for (i, s) in sids.iter().enumerate() {
            let id = self.alloc.get(&AllocKey::Sid(s.key.clone()));
            let endpoints = st
                .map(|st| {
                    st.pod_keys
                        .values()
                        .filter(|k| **k == AllocKey::Sid(s.key.clone()))
                        .count() as u32
                })
                .unwrap_or(0);
            let accepted = match (&s.selector, id) {
                (Err(e), _) => Cond::new(false, CondReason::InvalidSelector, e.clone()),
                (Ok(_), Some(id)) => {
                    Cond::new(true, CondReason::Allocated, format!("identity {id}"))
                }
                (Ok(_), None) => {
                    Cond::new(false, CondReason::Pending, "waiting for an identity number")
                }
            };
            // Pods this identity selects that an older one claims.
            let mut lost: BTreeMap<&ObjKey, Vec<&ObjKey>> = BTreeMap::new();
            for pod in self.pods_of(ns).filter(|p| p.live() && s.selects(p)) {
                if let Some(older) = sids[..i].iter().find(|o| o.selects(pod)) {
                    lost.entry(&older.key).or_default().push(&pod.key);
                }
            }
            let conflict = match lost.iter().next() {
                Some((older, pods)) => Cond::new(
                    true,
                    CondReason::ClaimedByOlderIdentity,
                    format!(
                        "{} pod(s) (first {}) carry the older ServiceIdentity {}",
                        lost.values().map(Vec::len).sum::<usize>(),
                        pods[0],
                        older
                    ),
                ),
                None => Cond::new(
                    false,
                    CondReason::NoConflict,
                    "no selected pod is claimed by an older ServiceIdentity",
                ),
            };
            out.push((
                s.key.clone(),
                SidStatus {
                    generation: s.generation,
                    id,
                    spiffe_id: spiffe::service_identity(
                        &self.cfg.trust_domain,
                        ns,
                        &s.key.name,
                    ),
                    endpoints,
                    accepted,
                    conflict,
                    mtls: match s.mtls {
                        Mtls::Disabled => Cond::new(
                            true,
                            CondReason::MtlsDisabled,
                            "mTLS is disabled: traffic to these pods is plaintext; L3/L4 policy applies",
                        ),
                        m => Cond::new(
                            false,
                            CondReason::ProxyNotAvailable,
                            format!(
                                "spec.mtls {} is not honoured yet: the mTLS proxy, when injected, serves its message and DNS ports but does not carry the app's connections, so traffic to these pods stays plaintext and none is dropped for lack of mTLS; L3/L4 policy applies",
                                m.as_str()
                            ),
                        ),
                    },
                },
            ));
        }
        out
    }

    /// The number a live pod is enforced with (`identity::UNKNOWN` while none is known);
    /// `None` for a pod that is not live.
    pub(super) fn pod_identity(&self, pod: &ObjKey) -> Option<u32> {
        self.ns.get(&pod.namespace)?.pod_ids.get(pod).copied()
    }

    /// The SPIFFE id a live pod's certificate carries: its key's (the ServiceIdentity that
    /// selects it, else its service account's) — whether or not the key has a number yet.
    pub fn pod_spiffe_id(&self, pod: &ObjKey) -> Option<String> {
        let td = &self.cfg.trust_domain;
        Some(match self.ns.get(&pod.namespace)?.pod_keys.get(pod)? {
            AllocKey::Sid(k) => spiffe::service_identity(td, &k.namespace, &k.name),
            AllocKey::Sa(k) => spiffe::service_account(td, &k.namespace, &k.name),
            AllocKey::Policy(_) => return None,
        })
    }

    /// Every identity a live pod carries or a ServiceIdentity defines: its number (once the
    /// id table has one), SPIFFE id and live pods — what `cfcli identities` prints.
    pub fn identities_with_pods(&self) -> Vec<IdentityPods> {
        let td = &self.cfg.trust_domain;
        let mut by_key: BTreeMap<AllocKey, Vec<String>> = BTreeMap::new();
        for k in self.snap.sids.keys() {
            by_key.entry(AllocKey::Sid(k.clone())).or_default();
        }
        for st in self.ns.values() {
            for (pod, k) in &st.pod_keys {
                by_key
                    .entry(k.clone())
                    .or_default()
                    .push(pod.name.to_string());
            }
        }
        by_key
            .into_iter()
            .filter_map(|(k, mut pods)| {
                let (kind, key, spiffe_id) = match &k {
                    AllocKey::Sid(key) => (
                        "sid",
                        key,
                        spiffe::service_identity(td, &key.namespace, &key.name),
                    ),
                    AllocKey::Sa(key) => (
                        "sa",
                        key,
                        spiffe::service_account(td, &key.namespace, &key.name),
                    ),
                    AllocKey::Policy(_) => return None,
                };
                pods.sort();
                Some(IdentityPods {
                    kind,
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                    id: self.alloc.get(&k),
                    spiffe_id,
                    pods,
                })
            })
            .collect()
    }

    pub(super) fn identity_list(&self) -> Vec<IdentityInfo> {
        let mut keys: BTreeSet<&AllocKey> = BTreeSet::new();
        for st in self.ns.values() {
            keys.extend(st.pod_keys.values());
        }
        let sid_keys: Vec<AllocKey> = self
            .snap
            .sids
            .keys()
            .map(|k| AllocKey::Sid(k.clone()))
            .collect();
        keys.extend(sid_keys.iter());
        let mut out: Vec<IdentityInfo> = keys
            .into_iter()
            .filter_map(|k| {
                let id = self.alloc.get(k)?;
                let (kind, key) = match k {
                    AllocKey::Sid(key) => ("sid", key),
                    AllocKey::Sa(key) => ("sa", key),
                    AllocKey::Policy(_) => return None,
                };
                Some(IdentityInfo {
                    id,
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                    kind: kind.into(),
                })
            })
            .collect();
        out.sort();
        out
    }
}

/// One identity with its live pods ([`Engine::identities_with_pods`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityPods {
    /// `sid` (a ServiceIdentity) or `sa` (a service account's implicit identity).
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// Its number, once the id table has one.
    pub id: Option<u32>,
    pub spiffe_id: String,
    /// Names of the live pods (of `namespace`) that carry it, sorted.
    pub pods: Vec<String>,
}
