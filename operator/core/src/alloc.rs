//! Numeric ids: identities (ServiceIdentities and implicit service-account identities) and
//! policy numbers (the high bits of rule ids).
//!
//! Ids come from counters that only ever increase, so an id is never given to anything else,
//! in use or not. The operator persists the table (a ConfigMap, see docs/architecture.md) so
//! that ids survive restarts and upgrades; only the leader allocates, every replica reads.
//!
//! A table read from the cluster is taken whole or not at all: one entry that does not parse,
//! a number out of its range or used twice, or a counter below a used number makes it invalid
//! ([`Allocations::from_map`]). A valid table replaces the one in use only if it follows from
//! it ([`Allocations::check_successor`]): counters never go back, a key never changes number,
//! and a new key's number comes from beyond the counters in use — so neither a deleted nor an
//! edited ConfigMap can renumber or reuse anything.
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

    pub fn is_policy(&self) -> bool {
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
    /// The resourceVersion of the ConfigMap it was read from (empty: not read from one), for
    /// compare-and-set writes.
    pub version: String,
}

impl Default for Allocations {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            next_identity: identity::FIRST_ALLOCATED,
            next_policy: 1,
            version: String::new(),
        }
    }
}

const NEXT_IDENTITY: &str = "next-identity";
const NEXT_POLICY: &str = "next-policy";

/// Most bytes of ConfigMap data the table may take: the apiserver refuses objects above 1 MiB,
/// and the object's metadata needs some room. At about 40 bytes an entry this is some 25 000
/// identities and policies together; past it, new keys wait (their pods stay enforced, see
/// docs/policy.md) and existing numbers are untouched.
pub const MAX_TABLE_BYTES: usize = 1_000_000;

/// What [`Allocations::allocate`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    /// The new table, `None` when nothing changes.
    pub table: Option<Allocations>,
    /// Keys that need a number but got none: the table is full or a range is exhausted.
    pub waiting: usize,
    /// Why they wait.
    pub reason: Option<String>,
}

impl Allocations {
    pub fn get(&self, key: &AllocKey) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// The table with an id for every key in `needed` (existing ids kept, new ones from the
    /// counters, in key order) and none for the others. Keys that would take the table past
    /// [`MAX_TABLE_BYTES`], or a counter past its range, are left waiting.
    pub fn allocate(&self, needed: &BTreeSet<AllocKey>) -> Allocated {
        let mut next = self.clone();
        next.ids.retain(|k, _| needed.contains(k));
        let mut size = next.encoded_size();
        let mut waiting = 0;
        let mut reason = None;
        for k in needed {
            if next.ids.contains_key(k) {
                continue;
            }
            let (counter, last) = if k.is_policy() {
                (&mut next.next_policy, rule_id::MAX_POLICY_NUMBER)
            } else {
                (&mut next.next_identity, identity::LAST_ALLOCATED)
            };
            let id = *counter;
            let entry = entry_size(k, id);
            if id > last {
                waiting += 1;
                reason.get_or_insert_with(|| {
                    format!(
                        "{} exhausted",
                        if k.is_policy() {
                            "policy numbers"
                        } else {
                            "identities"
                        }
                    )
                });
                continue;
            }
            if size + entry > MAX_TABLE_BYTES {
                waiting += 1;
                reason.get_or_insert_with(|| {
                    format!(
                        "the id table is full ({} entries, {size} of {MAX_TABLE_BYTES} bytes)",
                        next.ids.len()
                    )
                });
                continue;
            }
            *counter += 1;
            size += entry;
            next.ids.insert(k.clone(), id);
        }
        Allocated {
            table: (next != *self).then_some(next),
            waiting,
            reason,
        }
    }

    /// Bytes of ConfigMap data the table takes (keys and values).
    pub fn encoded_size(&self) -> usize {
        self.ids
            .iter()
            .map(|(k, id)| entry_size(k, *id))
            .sum::<usize>()
            + NEXT_IDENTITY.len()
            + NEXT_POLICY.len()
            + 20
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

    /// The table from ConfigMap data (of resourceVersion `version`): whole, or an error naming
    /// what is wrong — an entry that does not parse, a number out of its range or used twice, a
    /// missing counter or one not above every number of its kind.
    pub fn from_map(m: &BTreeMap<String, String>, version: &str) -> Result<Self, String> {
        let counter = |k: &str| -> Result<u32, String> {
            m.get(k)
                .ok_or_else(|| format!("no {k}"))?
                .parse()
                .map_err(|e| format!("{k}: {e}"))
        };
        let mut a = Allocations {
            ids: BTreeMap::new(),
            next_identity: counter(NEXT_IDENTITY)?,
            next_policy: counter(NEXT_POLICY)?,
            version: version.to_string(),
        };
        let mut seen: BTreeSet<(bool, u32)> = BTreeSet::new();
        for (k, v) in m {
            if k == NEXT_IDENTITY || k == NEXT_POLICY {
                continue;
            }
            let key = AllocKey::decode(k).ok_or_else(|| format!("entry {k:?} is not a key"))?;
            let id: u32 = v.parse().map_err(|e| format!("entry {k}: {v:?}: {e}"))?;
            if !in_range(&key, id) {
                return Err(format!("entry {k}: {id} is out of range"));
            }
            if !seen.insert((key.is_policy(), id)) {
                return Err(format!("entry {k}: {id} is used twice"));
            }
            let next = if key.is_policy() {
                a.next_policy
            } else {
                a.next_identity
            };
            if id >= next {
                return Err(format!("entry {k}: {id} is not below its counter {next}"));
            }
            a.ids.insert(key, id);
        }
        if a.next_identity < identity::FIRST_ALLOCATED || a.next_policy < 1 {
            return Err("a counter is below the first number".into());
        }
        Ok(a)
    }

    /// Whether this table may replace `current`: counters do not go back, a key in both has one
    /// number, and a key new to `current` has a number from beyond `current`'s counters (one
    /// below them was given out before and is never given again).
    pub fn check_successor(&self, current: &Allocations) -> Result<(), String> {
        if self.next_identity < current.next_identity || self.next_policy < current.next_policy {
            return Err(format!(
                "its counters ({}, {}) are behind those in use ({}, {})",
                self.next_identity, self.next_policy, current.next_identity, current.next_policy
            ));
        }
        for (k, id) in &self.ids {
            match current.ids.get(k) {
                Some(have) if have != id => {
                    return Err(format!("{} would change from {have} to {id}", k.encode()));
                }
                Some(_) => {}
                None => {
                    let floor = if k.is_policy() {
                        current.next_policy
                    } else {
                        current.next_identity
                    };
                    if *id < floor {
                        return Err(format!(
                            "{} would get {id}, a number given out before",
                            k.encode()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn in_range(k: &AllocKey, id: u32) -> bool {
    if k.is_policy() {
        (1..=rule_id::MAX_POLICY_NUMBER).contains(&id)
    } else {
        (identity::FIRST_ALLOCATED..=identity::LAST_ALLOCATED).contains(&id)
    }
}

/// Bytes one entry takes in the ConfigMap's data.
fn entry_size(k: &AllocKey, id: u32) -> usize {
    // The key, the value's digits, and the JSON around them.
    k.encode().len() + id.checked_ilog10().unwrap_or(0) as usize + 1 + 6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(ns: &str, n: &str) -> AllocKey {
        AllocKey::Sa(ObjKey::new(ns, n))
    }

    fn table(needed: &[AllocKey]) -> Allocations {
        Allocations::default()
            .allocate(&needed.iter().cloned().collect())
            .table
            .expect("a table")
    }

    #[test]
    fn ids_are_stable_unique_and_never_reused() {
        let needed: BTreeSet<_> = [
            sa("a", "x"),
            sa("a", "y"),
            AllocKey::Policy(ObjKey::new("a", "p")),
        ]
        .into();
        let a = Allocations::default().allocate(&needed).table.unwrap();
        assert_eq!(a.get(&sa("a", "x")), Some(256));
        assert_eq!(a.get(&sa("a", "y")), Some(257));
        assert_eq!(a.get(&AllocKey::Policy(ObjKey::new("a", "p"))), Some(1));
        assert_eq!(
            a.allocate(&needed),
            Allocated::default(),
            "nothing to do twice"
        );
        // x goes away; z arrives: z gets a fresh id, not x's.
        let needed: BTreeSet<_> = [sa("a", "y"), sa("a", "z")].into();
        let b = a.allocate(&needed).table.unwrap();
        assert_eq!(b.get(&sa("a", "y")), Some(257));
        assert_eq!(b.get(&sa("a", "z")), Some(258));
        assert_eq!(b.get(&sa("a", "x")), None);
        assert_eq!(b.check_successor(&a), Ok(()));
    }

    #[test]
    fn table_round_trips_through_configmap_data() {
        let a = table(&[
            AllocKey::Sid(ObjKey::new("shop", "front-end")),
            sa("shop", "default"),
        ]);
        let b = Allocations::from_map(&a.to_map(), "").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn a_table_with_anything_wrong_is_refused_whole() {
        let a = table(&[sa("shop", "web"), sa("shop", "db")]);
        type Edit = Box<dyn Fn(&mut BTreeMap<String, String>)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "is not a key",
                Box::new(|m| {
                    m.insert("garbage".into(), "x".into());
                }),
            ),
            (
                "invalid digit",
                Box::new(|m| {
                    m.insert("sa_shop_web".into(), "x".into());
                }),
            ),
            (
                "out of range",
                Box::new(|m| {
                    m.insert("sa_shop_web".into(), u32::MAX.to_string());
                }),
            ),
            (
                "out of range",
                Box::new(|m| {
                    m.insert("sa_shop_web".into(), "2".into());
                }),
            ),
            (
                "number too large",
                Box::new(|m| {
                    m.insert("sa_shop_web".into(), "99999999999999".into());
                }),
            ),
            (
                "used twice",
                Box::new(|m| {
                    m.insert("sa_shop_other".into(), "256".into());
                }),
            ),
            (
                "not below its counter",
                Box::new(|m| {
                    m.insert(NEXT_IDENTITY.into(), "257".into());
                }),
            ),
            (
                "no next-policy",
                Box::new(|m| {
                    m.remove(NEXT_POLICY);
                }),
            ),
        ];
        for (want, edit) in cases {
            let mut m = a.to_map();
            edit(&mut m);
            let e = Allocations::from_map(&m, "7").unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn only_a_successor_replaces_the_table_in_use() {
        let cur = table(&[sa("shop", "web"), sa("shop", "db")]);
        // An empty table (a deleted and re-created ConfigMap) would forget every number.
        assert!(Allocations::default().check_successor(&cur).is_err());
        // A renumbered key.
        let mut renumbered = cur.clone();
        let (web, db) = (
            cur.get(&sa("shop", "web")).unwrap(),
            cur.get(&sa("shop", "db")).unwrap(),
        );
        renumbered.ids.insert(sa("shop", "web"), db);
        renumbered.ids.insert(sa("shop", "db"), web);
        assert!(
            renumbered
                .check_successor(&cur)
                .unwrap_err()
                .contains("would change")
        );
        // A new key with a number given out before (db's, released).
        let mut reused = cur.clone();
        reused.ids.remove(&sa("shop", "db"));
        reused.ids.insert(sa("shop", "new"), db);
        assert!(
            reused
                .check_successor(&cur)
                .unwrap_err()
                .contains("given out before")
        );
        // Counters going back.
        let mut back = cur.clone();
        back.next_identity -= 1;
        assert!(back.check_successor(&cur).unwrap_err().contains("behind"));
        // What the leader writes next is a successor.
        let needed: BTreeSet<_> = [sa("shop", "web"), sa("shop", "api")].into();
        let next = cur.allocate(&needed).table.unwrap();
        assert_eq!(next.check_successor(&cur), Ok(()));
    }

    #[test]
    fn a_full_table_leaves_new_keys_waiting_and_keeps_every_number() {
        // Fill the table close to its limit with implicit identities of long names.
        let name = |i: usize| format!("{i:0>200}");
        let mut keys: Vec<AllocKey> = (0..5000).map(|i| sa("ns", &name(i))).collect();
        let a = table(&keys);
        assert!(a.encoded_size() <= MAX_TABLE_BYTES);
        let full = a.ids.len();
        assert!(full < 5000, "{full} entries fit");
        keys.push(sa("ns", "late"));
        let more = a.allocate(&keys.iter().cloned().collect());
        assert!(more.waiting > 0);
        assert!(more.reason.unwrap().contains("the id table is full"));
        if let Some(t) = &more.table {
            assert!(t.encoded_size() <= MAX_TABLE_BYTES);
            assert_eq!(t.check_successor(&a), Ok(()));
        }
        for (k, id) in &a.ids {
            let now = more.table.as_ref().unwrap_or(&a).get(k);
            assert_eq!(now, Some(*id), "{} kept its number", k.encode());
        }
    }
}
