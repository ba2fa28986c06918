//! Numeric ids: identities (ServiceIdentities and implicit service-account identities) and
//! policy numbers (the high bits of rule ids).
//!
//! Ids come from counters that only ever increase, so an id is never given to anything else,
//! in use or not. The operator persists the table (a ConfigMap, see docs/architecture.md) so
//! that ids survive restarts and upgrades; only the leader allocates, every replica reads.
use std::collections::{BTreeMap, BTreeSet};

use crate::model::ObjKey;

use cortexflow_domain::{identity, rule_id};

/// What an id is allocated to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllocKey {
    /// A ServiceIdentity.
    Sid(ObjKey),
    /// The implicit identity of `(namespace, service account)`.
    Sa(ObjKey),
    /// A MeshPolicy's number.
    Policy(ObjKey),
}

impl AllocKey {
    /// A ConfigMap data key: `sid_<ns>_<name>`, `sa_<ns>_<name>`, `mp_<ns>_<name>` (Kubernetes
    /// names never contain `_`, so the encoding is unambiguous).
    pub fn encode(&self) -> String {
        let (p, k) = match self {
            AllocKey::Sid(k) => ("sid", k),
            AllocKey::Sa(k) => ("sa", k),
            AllocKey::Policy(k) => ("mp", k),
        };
        format!("{p}_{}_{}", k.namespace, k.name)
    }

    /// The inverse of [`AllocKey::encode`].
    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, '_');
        let (p, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
        if ns.is_empty() || name.is_empty() || name.contains('_') {
            return None;
        }
        let k = ObjKey::new(ns, name);
        match p {
            "sid" => Some(AllocKey::Sid(k)),
            "sa" => Some(AllocKey::Sa(k)),
            "mp" => Some(AllocKey::Policy(k)),
            _ => None,
        }
    }

    fn is_policy(&self) -> bool {
        matches!(self, AllocKey::Policy(_))
    }
}

/// The allocation table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocations {
    pub ids: BTreeMap<AllocKey, u32>,
    /// Next identity to hand out.
    pub next_identity: u32,
    /// Next policy number to hand out.
    pub next_policy: u32,
}

impl Default for Allocations {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            next_identity: identity::FIRST_ALLOCATED,
            next_policy: 1,
        }
    }
}

const NEXT_IDENTITY: &str = "next-identity";
const NEXT_POLICY: &str = "next-policy";

impl Allocations {
    pub fn get(&self, key: &AllocKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// The table with an id for every key in `needed` (existing ids kept, new ones from the
    /// counters, in key order) and none for the others; `None` when nothing changes.
    /// Fails when a counter would run past its range.
    pub fn allocate(&self, needed: &BTreeSet<AllocKey>) -> Result<Option<Allocations>, String> {
        let mut next = self.clone();
        next.ids.retain(|k, _| needed.contains(k));
        for k in needed {
            if next.ids.contains_key(k) {
                continue;
            }
            let id = if k.is_policy() {
                if next.next_policy > rule_id::MAX_POLICY_NUMBER {
                    return Err("policy numbers exhausted".into());
                }
                next.next_policy += 1;
                next.next_policy - 1
            } else {
                if next.next_identity > identity::LAST_ALLOCATED {
                    return Err("identities exhausted".into());
                }
                next.next_identity += 1;
                next.next_identity - 1
            };
            next.ids.insert(k.clone(), id);
        }
        Ok((next != *self).then_some(next))
    }

    /// The table as ConfigMap data.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m: BTreeMap<String, String> = self
            .ids
            .iter()
            .map(|(k, v)| (k.encode(), v.to_string()))
            .collect();
        m.insert(NEXT_IDENTITY.into(), self.next_identity.to_string());
        m.insert(NEXT_POLICY.into(), self.next_policy.to_string());
        m
    }

    /// The table from ConfigMap data. Entries that do not parse are reported and skipped; the
    /// counters never go below any id in the table (so nothing is handed out twice).
    pub fn from_map(m: &BTreeMap<String, String>) -> (Self, Vec<String>) {
        let mut a = Allocations::default();
        let mut bad = Vec::new();
        for (k, v) in m {
            match k.as_str() {
                NEXT_IDENTITY => match v.parse() {
                    Ok(n) => a.next_identity = a.next_identity.max(n),
                    Err(_) => bad.push(k.clone()),
                },
                NEXT_POLICY => match v.parse() {
                    Ok(n) => a.next_policy = a.next_policy.max(n),
                    Err(_) => bad.push(k.clone()),
                },
                _ => match (AllocKey::decode(k), v.parse::<u32>()) {
                    (Some(key), Ok(id)) => {
                        a.ids.insert(key, id);
                    }
                    _ => bad.push(k.clone()),
                },
            }
        }
        for (k, id) in &a.ids {
            if k.is_policy() {
                a.next_policy = a.next_policy.max(id + 1);
            } else {
                a.next_identity = a.next_identity.max(id + 1);
            }
        }
        (a, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(ns: &str, n: &str) -> AllocKey {
        AllocKey::Sa(ObjKey::new(ns, n))
    }

    #[test]
    fn ids_are_stable_unique_and_never_reused() {
        let a = Allocations::default();
        let needed: BTreeSet<_> = [
            sa("a", "x"),
            sa("a", "y"),
            AllocKey::Policy(ObjKey::new("a", "p")),
        ]
        .into();
        let a = a.allocate(&needed).unwrap().unwrap();
        assert_eq!(a.get(&sa("a", "x")), Some(256));
        assert_eq!(a.get(&sa("a", "y")), Some(257));
        assert_eq!(a.get(&AllocKey::Policy(ObjKey::new("a", "p"))), Some(1));
        assert_eq!(a.allocate(&needed).unwrap(), None, "nothing to do twice");
        // x goes away; z arrives: z gets a fresh id, not x's.
        let needed: BTreeSet<_> = [sa("a", "y"), sa("a", "z")].into();
        let b = a.allocate(&needed).unwrap().unwrap();
        assert_eq!(b.get(&sa("a", "y")), Some(257));
        assert_eq!(b.get(&sa("a", "z")), Some(258));
        assert_eq!(b.get(&sa("a", "x")), None);
    }

    #[test]
    fn table_round_trips_through_configmap_data() {
        let needed: BTreeSet<_> = [
            AllocKey::Sid(ObjKey::new("shop", "front-end")),
            sa("shop", "default"),
        ]
        .into();
        let a = Allocations::default().allocate(&needed).unwrap().unwrap();
        let (b, bad) = Allocations::from_map(&a.to_map());
        assert!(bad.is_empty());
        assert_eq!(a, b);
        let mut m = a.to_map();
        m.insert("garbage".into(), "x".into());
        m.insert(NEXT_IDENTITY.into(), "3".into());
        let (c, bad) = Allocations::from_map(&m);
        assert_eq!(bad, vec!["garbage".to_string()]);
        assert!(
            c.next_identity > *a.ids.values().max().unwrap(),
            "counter never below a used id"
        );
    }
}
