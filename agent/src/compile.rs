//! Turns the desired state of a node (endpoints with their policies, the cluster's address
//! identities, Services) into the exact contents of the kernel maps.
//!
//! * Each distinct [`EndpointPolicy`] becomes a **policy set**: LPM entries keyed by
//!   (set, peer identity, direction, protocol, port prefix). A port range becomes the aligned
//!   prefix blocks that cover it; rules without ports become one entry per protocol key (TCP, UDP,
//!   other) with a 0-bit port prefix. Since the trie returns only the longest match, every entry
//!   carries the flags (and lowest rule ids) of the shorter entries that contain it.
//! * `ipBlock` peers become **CIDR identities**: each prefix used by any rule gets a node-local
//!   identity; an address that is not a cluster address resolves (LPM) to the identity of the
//!   most specific such prefix containing it, and a rule matches that identity iff the prefix lies
//!   inside the rule's `cidr` and outside all its `except`s — exact, because prefixes containing
//!   one address are nested.
//! * A Service becomes a **backend table** of slots filled in proportion to backend weights.
//!
//! Ids of policy sets, CIDR identities and backend tables are allocated by [`Allocator`]; a
//! changed set or table gets a new id so that the kernel switches to it in one write.
//!
//! The expansion is bounded by [`Limits`] (the maps' capacities): compiling stops at the first
//! entry a map could not hold, so a config far too large for the kernel (a rule with every
//! identity of the cluster and dozens of port ranges) costs at most as much memory as the maps
//! themselves and is refused with the map it overflows.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, btree_map},
    net::Ipv4Addr,
};

use cortexflow_common::{
    BackendValue, CidrValue, DIR_EGRESS, DIR_INGRESS, EP_EGRESS_AUDIT_DEFAULT_DENY,
    EP_EGRESS_DEFAULT_DENY, EP_EGRESS_ENFORCED, EP_EGRESS_POLICED, EP_INGRESS_AUDIT_DEFAULT_DENY,
    EP_INGRESS_DEFAULT_DENY, EP_INGRESS_ENFORCED, EP_INGRESS_POLICED, EndpointInfo, IDENTITY_ANY,
    IDENTITY_CIDR_BASE, IpcacheValue, POLICY_ALLOW, POLICY_AUDIT_ALLOW, POLICY_AUDIT_DENY,
    POLICY_DENY, POLICY_KEY_FIXED_BITS, PROTO_OTHER, PROTO_TCP, PROTO_UDP, PolicyKey, PolicyValue,
    ServiceKey, ServiceValue,
};

use crate::policy::{Action, Cidr, Direction, EndpointPolicy, Mode, Peer, Peers, Protocol, Rule};

/// A local endpoint (pod) as the datapath needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub policy: EndpointPolicy,
}

/// A Service frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

/// A Service backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

/// Everything one node's datapath should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// By the ifindex of the pod's host-side veth.
    pub endpoints: BTreeMap<u32, Endpoint>,
    /// Identity of every cluster address (pods of every node, and this node's own addresses
    /// with identity host).
    pub ipcache: BTreeMap<Ipv4Addr, u32>,
    pub services: BTreeMap<Frontend, Vec<Backend>>,
}

/// The contents of the maps the agent writes (conntrack, counters and events are the kernel's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// Keyed by the address in network order, as the kernel reads it from packets.
    pub ipcache: BTreeMap<u32, IpcacheValue>,
    pub cidrs: BTreeMap<(u32, [u8; 4]), CidrValue>,
    /// Keyed by (prefix length, key bytes).
    pub policy: BTreeMap<(u32, PolicyKeyBytes), PolicyValue>,
    pub services: BTreeMap<ServiceKeyBytes, ServiceValue>,
    pub backends: BTreeMap<(u32, u32), BackendValue>,
}

impl MapContents {
    /// The entries of `self` whose keys `a` or `b` has: what a write from `a` to `b` may have
    /// changed, leaving alone anything another writer put into the maps.
    pub fn restricted_to(mut self, a: &MapContents, b: &MapContents) -> MapContents {
        fn keep<K: Ord, V>(m: &mut BTreeMap<K, V>, a: &BTreeMap<K, V>, b: &BTreeMap<K, V>) {
            m.retain(|k, _| a.contains_key(k) || b.contains_key(k));
        }
        keep(&mut self.endpoints, &a.endpoints, &b.endpoints);
        keep(&mut self.ipcache, &a.ipcache, &b.ipcache);
        keep(&mut self.cidrs, &a.cidrs, &b.cidrs);
        keep(&mut self.policy, &a.policy, &b.policy);
        keep(&mut self.services, &a.services, &b.services);
        keep(&mut self.backends, &a.backends, &b.backends);
        self
    }
}

/// A [`PolicyKey`] as an ordered tuple (the shared type does not derive `Ord`).
pub type PolicyKeyBytes = ([u8; 4], [u8; 4], u8, u8, [u8; 2]);
/// A [`ServiceKey`] as an ordered tuple: (vip, port, protocol), network order.
pub type ServiceKeyBytes = (u32, u16, u8);

/// Converts between the ordered tuples and the kernel structs.
pub fn policy_key(k: &PolicyKeyBytes) -> PolicyKey {
    PolicyKey {
        policy_set: k.0,
        identity: k.1,
        direction: k.2,
        protocol: k.3,
        port: k.4,
    }
}
pub fn policy_key_bytes(k: &PolicyKey) -> PolicyKeyBytes {
    (k.policy_set, k.identity, k.direction, k.protocol, k.port)
}
pub fn service_key(k: &ServiceKeyBytes) -> ServiceKey {
    ServiceKey {
        vip: k.0,
        port: k.1,
        protocol: k.2,
        _pad: 0,
    }
}

/// An IPv4 address as the kernel compares it: the packet's bytes read as a native `u32`.
pub fn net_u32(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
/// A port in network order, as `bpf_sock_addr.user_port` and packet headers hold it.
pub fn net_port(port: u16) -> u16 {
    port.to_be()
}

/// Most slots one Service's backend table may have; weights finer than 1/1024 are rounded.
pub const MAX_SLOTS: u32 = 1024;

/// Most entries [`compile`] may produce for each map whose contents it expands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub cidrs: usize,
    pub policy: usize,
    pub policy_exact: usize,
    pub backends: usize,
}

impl Limits {
    /// No bound (tests and tools that compile what is already known to fit).
    pub const NONE: Limits = Limits {
        cidrs: usize::MAX,
        policy: usize::MAX,
        policy_exact: usize::MAX,
        backends: usize::MAX,
    };
}

/// A config that expands to more entries than a map can hold; compiling stopped there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "map {map}: the config needs more than {limit} entries (compiling stopped there); nothing was applied"
)]
pub struct Overflow {
    pub map: &'static str,
    pub limit: usize,
}

/// What is left of the [`Limits`] of the policy maps while sets are compiled.
#[derive(Clone, Copy, Debug)]
struct Room {
    policy: usize,
    policy_exact: usize,
    limits: Limits,
}

impl Room {
    fn new(limits: Limits) -> Self {
        Self {
            policy: limits.policy,
            policy_exact: limits.policy_exact,
            limits,
        }
    }

    /// Takes room for one more entry whose port prefix has `bits`, or says which map is full.
    fn take(&mut self, bits: u32) -> Result<(), Overflow> {
        let (left, map, limit) = if bits == 16 {
            (
                &mut self.policy_exact,
                cortexflow_common::maps::POLICY_EXACT,
                self.limits.policy_exact,
            )
        } else {
            (
                &mut self.policy,
                cortexflow_common::maps::POLICY,
                self.limits.policy,
            )
        };
        *left = left.checked_sub(1).ok_or(Overflow { map, limit })?;
        Ok(())
    }
}

/// Stable ids for policy sets, CIDR identities and backend tables across successive compiles.
#[derive(Clone, Debug, Default)]
pub struct Allocator {
    sets: HashMap<EndpointPolicy, u32>,
    next_set: u32,
    cidrs: BTreeMap<Cidr, u32>,
    next_cidr: u32,
    tables: HashMap<(Frontend, Vec<Backend>), u32>,
    next_table: u32,
    /// After a restart: the policy sets found in the kernel, by their entries (set id left
    /// out), so that a set with the same entries keeps its id and nothing is rewritten.
    installed_sets: HashMap<Vec<SetEntry>, u32>,
    /// After a restart: the backend tables found in the kernel, by their slots.
    installed_tables: HashMap<Vec<BackendValue>, u32>,
}

/// One entry of a policy set without the set id: (prefix length, identity, direction,
/// protocol, port) and value.
type SetEntry = ((u32, [u8; 4], u8, u8, [u8; 2]), PolicyValue);

fn set_entries(
    entries: &BTreeMap<(u32, PolicyKeyBytes), PolicyValue>,
) -> BTreeMap<u32, Vec<SetEntry>> {
    let mut out: BTreeMap<u32, Vec<SetEntry>> = BTreeMap::new();
    for ((len, k), v) in entries {
        out.entry(u32::from_be_bytes(k.0))
            .or_default()
            .push(((*len, k.1, k.2, k.3, k.4), *v));
    }
    out
}

impl Allocator {
    /// An allocator whose ids do not collide with the ids already present in `installed`
    /// (after a restart), reusing the CIDR identities found there.
    pub fn resume(installed: &MapContents) -> Self {
        let mut a = Self::default();
        let max_set = installed
            .endpoints
            .values()
            .map(|e| e.policy_set)
            .chain(
                installed
                    .policy
                    .keys()
                    .map(|(_, k)| u32::from_be_bytes(k.0)),
            )
            .max()
            .unwrap_or(0);
        a.next_set = max_set;
        for ((len, addr), v) in &installed.cidrs {
            if let Ok(c) = Cidr::new(Ipv4Addr::from(*addr), *len as u8) {
                a.cidrs.insert(c, v.identity);
                a.next_cidr = a.next_cidr.max(v.identity - IDENTITY_CIDR_BASE);
            }
        }
        a.next_table = installed
            .services
            .values()
            .map(|s| s.table)
            .chain(installed.backends.keys().map(|k| k.0))
            .max()
            .unwrap_or(0);
        let sets = set_entries(&installed.policy);
        // A set without entries (endpoints no policy selects) is known by its endpoints only;
        // the lowest such id is reused for the empty set.
        let empty = installed
            .endpoints
            .values()
            .map(|e| e.policy_set)
            .filter(|s| !sets.contains_key(s))
            .min();
        for (set, entries) in sets {
            a.installed_sets.insert(entries, set);
        }
        if let Some(set) = empty {
            a.installed_sets.insert(Vec::new(), set);
        }
        let mut tables: BTreeMap<u32, Vec<BackendValue>> = BTreeMap::new();
        for ((table, _slot), v) in &installed.backends {
            tables.entry(*table).or_default().push(*v);
        }
        for (table, slots) in tables {
            a.installed_tables.insert(slots, table);
        }
        a
    }

    fn set_id(
        &mut self,
        p: &EndpointPolicy,
        universe: &[(Cidr, u32)],
        limits: Limits,
    ) -> Result<u32, Overflow> {
        if let Some(id) = self.sets.get(p) {
            return Ok(*id);
        }
        let id = if self.installed_sets.is_empty() {
            None
        } else {
            let mut entries = BTreeMap::new();
            compile_set(0, p, universe, &mut Room::new(limits), &mut entries)?;
            let entries = set_entries(&entries).remove(&0).unwrap_or_default();
            self.installed_sets.get(&entries).copied()
        };
        let id = id.unwrap_or_else(|| {
            self.next_set += 1;
            self.next_set
        });
        self.sets.insert(p.clone(), id);
        Ok(id)
    }

    fn cidr_id(&mut self, c: Cidr) -> u32 {
        if let Some(id) = self.cidrs.get(&c) {
            return *id;
        }
        self.next_cidr += 1;
        let id = IDENTITY_CIDR_BASE + self.next_cidr;
        self.cidrs.insert(c, id);
        id
    }

    fn table_id(&mut self, f: Frontend, backends: &[Backend], slots: &[BackendValue]) -> u32 {
        let key = (f, backends.to_vec());
        if let Some(id) = self.tables.get(&key) {
            return *id;
        }
        let id = self
            .installed_tables
            .get(slots)
            .copied()
            .unwrap_or_else(|| {
                self.next_table += 1;
                self.next_table
            });
        self.tables.insert(key, id);
        id
    }

    /// Forgets ids no longer used by `state` (call after `state` is in the kernel).
    pub fn retain_used(&mut self, state: &DesiredState) {
        let used_sets: BTreeSet<&EndpointPolicy> =
            state.endpoints.values().map(|e| &e.policy).collect();
        self.sets.retain(|p, _| used_sets.contains(p));
        let used_cidrs = prefixes(state);
        self.cidrs.retain(|c, _| used_cidrs.contains(c));
        self.tables
            .retain(|(f, b), _| state.services.get(f) == Some(b));
    }
}

/// Every prefix used by an `ipBlock` of any endpoint's policy.
fn prefixes(state: &DesiredState) -> BTreeSet<Cidr> {
    let mut out = BTreeSet::new();
    for ep in state.endpoints.values() {
        for r in ep.policy.ingress.iter().chain(&ep.policy.egress) {
            if let Peers::Only(peers) = &r.peers {
                for p in peers {
                    if let Peer::IpBlock { cidr, except } = p {
                        out.insert(*cidr);
                        out.extend(except.iter().copied());
                    }
                }
            }
        }
    }
    out
}

/// Compiles `state` into map contents. CIDR identities are allocated for the prefixes `state`
/// uses plus every prefix the allocator still knows (those may still be in the kernel while the
/// switch happens), so that each policy set has entries for every identity an address may
/// resolve to during the update.
///
/// Refused with the map it overflows when the contents would exceed `limits`.
pub fn compile(
    state: &DesiredState,
    alloc: &mut Allocator,
    limits: Limits,
) -> Result<MapContents, Overflow> {
    let mut out = MapContents::default();
    let used = prefixes(state);
    if used.len() > limits.cidrs {
        return Err(Overflow {
            map: cortexflow_common::maps::CIDRS,
            limit: limits.cidrs,
        });
    }
    for c in &used {
        alloc.cidr_id(*c);
    }
    let universe: Vec<(Cidr, u32)> = alloc.cidrs.iter().map(|(c, id)| (*c, *id)).collect();
    for (c, id) in &universe {
        out.cidrs.insert(
            (u32::from(c.len), c.addr.octets()),
            CidrValue { identity: *id },
        );
    }
    // Only prefixes the current state uses go into the CIDR map; the others stay in the kernel
    // until the caller removes them after switching.
    out.cidrs.retain(|(len, addr), _| {
        Cidr::new(Ipv4Addr::from(*addr), *len as u8).is_ok_and(|c| used.contains(&c))
    });

    let mut room = Room::new(limits);
    let mut compiled_sets: HashMap<u32, ()> = HashMap::new();
    for (ifindex, ep) in &state.endpoints {
        let set = alloc.set_id(&ep.policy, &universe, limits)?;
        out.endpoints.insert(
            *ifindex,
            EndpointInfo {
                ip: net_u32(ep.ip),
                identity: ep.identity,
                policy_set: set,
                flags: endpoint_flags(&ep.policy),
            },
        );
        if compiled_sets.insert(set, ()).is_none() {
            compile_set(set, &ep.policy, &universe, &mut room, &mut out.policy)?;
        }
    }
    let local: BTreeMap<Ipv4Addr, u32> = state
        .endpoints
        .iter()
        .map(|(ifindex, ep)| (ep.ip, *ifindex))
        .collect();
    for (ip, identity) in &state.ipcache {
        out.ipcache.insert(
            net_u32(*ip),
            IpcacheValue {
                identity: *identity,
                ifindex: local.get(ip).copied().unwrap_or(0),
            },
        );
    }
    for (f, backends) in &state.services {
        let slots: Vec<BackendValue> = slot_table(backends, MAX_SLOTS)
            .iter()
            .map(|b| BackendValue {
                ip: net_u32(b.ip),
                port: net_port(b.port),
                _pad: 0,
            })
            .collect();
        if out.backends.len() + slots.len() > limits.backends {
            return Err(Overflow {
                map: cortexflow_common::maps::BACKENDS,
                limit: limits.backends,
            });
        }
        let table = alloc.table_id(*f, backends, &slots);
        out.services.insert(
            (net_u32(f.vip), net_port(f.port), f.protocol.number()),
            ServiceValue {
                table,
                slots: slots.len() as u32,
            },
        );
        for (slot, b) in slots.into_iter().enumerate() {
            out.backends.insert((table, slot as u32), b);
        }
    }
    Ok(out)
}

/// The `EP_*` flags of a policy.
pub fn endpoint_flags(p: &EndpointPolicy) -> u32 {
    let mut f = 0;
    let bit = |cond: bool, b: u32| if cond { b } else { 0 };
    f |= bit(p.default_deny(Direction::Ingress), EP_INGRESS_DEFAULT_DENY);
    f |= bit(p.default_deny(Direction::Egress), EP_EGRESS_DEFAULT_DENY);
    f |= bit(
        p.audit_default_deny(Direction::Ingress),
        EP_INGRESS_AUDIT_DEFAULT_DENY,
    );
    f |= bit(
        p.audit_default_deny(Direction::Egress),
        EP_EGRESS_AUDIT_DEFAULT_DENY,
    );
    f |= bit(p.enforced(Direction::Ingress), EP_INGRESS_ENFORCED);
    f |= bit(p.enforced(Direction::Egress), EP_EGRESS_ENFORCED);
    f |= bit(p.policed(Direction::Ingress), EP_INGRESS_POLICED);
    f |= bit(p.policed(Direction::Egress), EP_EGRESS_POLICED);
    f
}

/// The aligned power-of-two blocks `(base, prefix bits of 16)` that exactly cover
/// `first..=last`.
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        let mut size: u32 = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros()));
        lo += size;
    }
    out
}

fn rule_flag(r: &Rule) -> (u32, usize) {
    match (r.action, r.mode) {
        (Action::Allow, Mode::Enforce) => (POLICY_ALLOW, cortexflow_common::RULE_ALLOW),
        (Action::Deny, Mode::Enforce) => (POLICY_DENY, cortexflow_common::RULE_DENY),
        (Action::Allow, Mode::Audit) => (POLICY_AUDIT_ALLOW, cortexflow_common::RULE_AUDIT_ALLOW),
        (Action::Deny, Mode::Audit) => (POLICY_AUDIT_DENY, cortexflow_common::RULE_AUDIT_DENY),
    }
}

fn merge(into: &mut PolicyValue, flags: u32, rules: &[u32; 4]) {
    into.flags |= flags;
    for (have, r) in into.rules.iter_mut().zip(rules) {
        if *r != 0 && (*have == 0 || r < have) {
            *have = *r;
        }
    }
}

/// The identities a rule's peers match, given the CIDR identities in use.
fn rule_identities(r: &Rule, universe: &[(Cidr, u32)]) -> BTreeSet<u32> {
    match &r.peers {
        Peers::Any => BTreeSet::from([IDENTITY_ANY]),
        Peers::Only(peers) => {
            let mut ids = BTreeSet::new();
            for p in peers {
                match p {
                    Peer::Identity(id) => {
                        ids.insert(*id);
                    }
                    Peer::IpBlock { cidr, except } => {
                        for (c, id) in universe {
                            if cidr.covers(c) && !except.iter().any(|e| e.covers(c)) {
                                ids.insert(*id);
                            }
                        }
                    }
                }
            }
            ids
        }
    }
}

/// `(protocol key, port base, port prefix bits)` blocks of a rule's ports, each once.
fn rule_port_blocks(r: &Rule) -> BTreeSet<(u8, u16, u32)> {
    if r.ports.is_empty() {
        return BTreeSet::from([(PROTO_TCP, 0, 0), (PROTO_UDP, 0, 0), (PROTO_OTHER, 0, 0)]);
    }
    let mut out = BTreeSet::new();
    for pr in &r.ports {
        for (base, bits) in port_blocks(pr.first, pr.last) {
            out.insert((pr.protocol.number(), base, bits));
        }
    }
    out
}

/// The entries of one policy set. Every distinct entry takes [`Room`] as soon as it appears,
/// so a set too large stops before it is materialised: memory stays bounded by the limits,
/// and work by them times the number of rules (blocks repeat across rules, never within one).
fn compile_set(
    set: u32,
    policy: &EndpointPolicy,
    universe: &[(Cidr, u32)],
    room: &mut Room,
    out: &mut BTreeMap<(u32, PolicyKeyBytes), PolicyValue>,
) -> Result<(), Overflow> {
    // (identity, dir, proto) → (port base, bits) → value, before inheritance.
    type Group = BTreeMap<(u16, u32), PolicyValue>;
    let mut raw: BTreeMap<(u32, u8, u8), Group> = BTreeMap::new();
    for (dir, rules) in [(DIR_INGRESS, &policy.ingress), (DIR_EGRESS, &policy.egress)] {
        for r in rules {
            let (flag, idx) = rule_flag(r);
            let mut ids = [0u32; 4];
            ids[idx] = r.id;
            let blocks = rule_port_blocks(r);
            for identity in rule_identities(r, universe) {
                for (proto, base, bits) in &blocks {
                    let group = raw.entry((identity, dir, *proto)).or_default();
                    let v = match group.entry((*base, *bits)) {
                        btree_map::Entry::Occupied(e) => e.into_mut(),
                        btree_map::Entry::Vacant(e) => {
                            room.take(*bits)?;
                            e.insert(PolicyValue::default())
                        }
                    };
                    merge(v, flag, &ids);
                }
            }
        }
    }
    for ((identity, dir, proto), group) in &raw {
        for ((base, bits), value) in group {
            let mut v = *value;
            // Inherit from every shorter block that contains this one.
            for shorter in 0..*bits {
                let mask: u16 = if shorter == 0 {
                    0
                } else {
                    u16::MAX << (16 - shorter)
                };
                if let Some(parent) = group.get(&(base & mask, shorter)) {
                    let parent = *parent;
                    merge(&mut v, parent.flags, &parent.rules);
                }
            }
            let key = PolicyKey::new(set, *identity, *dir, *proto, *base);
            out.insert((POLICY_KEY_FIXED_BITS + bits, policy_key_bytes(&key)), v);
        }
    }
    Ok(())
}

/// Fills up to `max` slots with backends in proportion to their weights (largest remainder).
/// Backends of weight 0 get none; no backend with weight → no slot.
pub fn slot_table(backends: &[Backend], max: u32) -> Vec<Backend> {
    let live: Vec<&Backend> = backends.iter().filter(|b| b.weight > 0).collect();
    let total: u64 = live.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return Vec::new();
    }
    let n = total.min(u64::from(max));
    let mut shares: Vec<(u64, u64, usize)> = live
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let exact = u64::from(b.weight) * n;
            (exact / total, exact % total, i)
        })
        .collect();
    let assigned: u64 = shares.iter().map(|s| s.0).sum();
    let mut by_remainder: Vec<usize> = (0..shares.len()).collect();
    by_remainder.sort_by(|a, b| shares[*b].1.cmp(&shares[*a].1).then(a.cmp(b)));
    for i in by_remainder.into_iter().take((n - assigned) as usize) {
        shares[i].0 += 1;
    }
    let mut out = Vec::with_capacity(n as usize);
    for (count, _, i) in shares {
        for _ in 0..count {
            out.push(*live[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PortRange;

    #[test]
    fn port_blocks_cover_exactly() {
        for (first, last) in [
            (0u16, 65535u16),
            (1, 1024),
            (80, 80),
            (1000, 2000),
            (65535, 65535),
            (0, 0),
            (3, 17),
        ] {
            let blocks = port_blocks(first, last);
            let mut covered = Vec::new();
            for (base, bits) in &blocks {
                let size = 1u32 << (16 - bits);
                assert_eq!(u32::from(*base) % size, 0, "unaligned block {base}/{bits}");
                covered.extend((u32::from(*base)..u32::from(*base) + size).map(|p| p as u16));
            }
            let want: Vec<u16> = (first..=last).collect();
            assert_eq!(covered, want, "{first}-{last}");
        }
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert!(port_blocks(1, 65535).len() <= 16);
    }

    #[test]
    fn slots_follow_weights() {
        let b = |w| Backend {
            ip: Ipv4Addr::new(10, 0, 0, w as u8),
            port: 80,
            weight: w,
        };
        let t = slot_table(&[b(1), b(2), b(3)], MAX_SLOTS);
        assert_eq!(t.len(), 6);
        assert_eq!(t.iter().filter(|x| x.weight == 3).count(), 3);
        let t = slot_table(&[b(1000), b(3000)], MAX_SLOTS);
        assert_eq!(t.len(), 1024);
        assert_eq!(t.iter().filter(|x| x.weight == 3000).count(), 768);
        assert!(slot_table(&[b(0)], MAX_SLOTS).is_empty());
        assert!(slot_table(&[], MAX_SLOTS).is_empty());
    }

    #[test]
    fn narrower_entries_inherit_wider_flags() {
        let policy = EndpointPolicy {
            ingress: vec![
                Rule {
                    id: 4,
                    action: Action::Deny,
                    mode: Mode::Enforce,
                    peers: Peers::Any,
                    ports: vec![],
                },
                Rule {
                    id: 2,
                    action: Action::Allow,
                    mode: Mode::Enforce,
                    peers: Peers::Any,
                    ports: vec![PortRange {
                        protocol: Protocol::Tcp,
                        first: 80,
                        last: 80,
                    }],
                },
            ],
            egress: vec![],
        };
        let mut out = BTreeMap::new();
        compile_set(1, &policy, &[], &mut Room::new(Limits::NONE), &mut out).unwrap();
        let k80 = PolicyKey::new(1, IDENTITY_ANY, DIR_INGRESS, PROTO_TCP, 80);
        let v = out[&(96, policy_key_bytes(&k80))];
        assert_eq!(v.flags, POLICY_ALLOW | POLICY_DENY);
        assert_eq!(v.rules[cortexflow_common::RULE_DENY], 4);
        // tcp, udp and other wildcard entries plus the port-80 entry.
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn ip_blocks_become_cidr_identities() {
        let block = Peer::IpBlock {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        };
        let policy = EndpointPolicy {
            ingress: vec![],
            egress: vec![Rule {
                id: 1,
                action: Action::Allow,
                mode: Mode::Enforce,
                peers: Peers::Only(vec![block]),
                ports: vec![],
            }],
        };
        let state = DesiredState {
            endpoints: BTreeMap::from([(
                7,
                Endpoint {
                    ip: Ipv4Addr::new(10, 244, 0, 5),
                    identity: 300,
                    policy,
                },
            )]),
            ..Default::default()
        };
        let mut alloc = Allocator::default();
        let m = compile(&state, &mut alloc, Limits::NONE).unwrap();
        assert_eq!(m.cidrs.len(), 2);
        let id8 = m.cidrs[&(8, [10, 0, 0, 0])].identity;
        let id16 = m.cidrs[&(16, [10, 1, 0, 0])].identity;
        let idents: BTreeSet<u32> = m
            .policy
            .keys()
            .map(|(_, k)| u32::from_be_bytes(k.1))
            .collect();
        assert!(idents.contains(&id8) && !idents.contains(&id16));
        // Recompiling the same state allocates nothing new.
        assert_eq!(compile(&state, &mut alloc, Limits::NONE).unwrap(), m);
    }

    #[test]
    fn a_resumed_allocator_keeps_every_set_id_including_the_empty_set() {
        let guarded = EndpointPolicy {
            ingress: vec![Rule {
                id: 1,
                action: Action::Allow,
                mode: Mode::Enforce,
                peers: Peers::Only(vec![Peer::Identity(1001)]),
                ports: vec![],
            }],
            egress: vec![],
        };
        let ep = |n: u8, policy: &EndpointPolicy| Endpoint {
            ip: Ipv4Addr::new(10, 244, 0, n),
            identity: 1000 + u32::from(n),
            policy: policy.clone(),
        };
        let open = EndpointPolicy::default();
        let state = DesiredState {
            // The empty set is allocated first, so that a fresh allocator would give it
            // another id than the installed one.
            endpoints: BTreeMap::from([(2, ep(2, &open)), (3, ep(3, &guarded)), (4, ep(4, &open))]),
            ..Default::default()
        };
        let installed = compile(&state, &mut Allocator::default(), Limits::NONE).unwrap();
        // Another process (a restarted agent) resumes from what the maps hold.
        let mut resumed = Allocator::resume(&installed);
        assert_eq!(
            compile(&state, &mut resumed, Limits::NONE).unwrap(),
            installed
        );
    }

    fn one_endpoint(policy: EndpointPolicy) -> DesiredState {
        DesiredState {
            endpoints: BTreeMap::from([(
                1,
                Endpoint {
                    ip: Ipv4Addr::new(10, 244, 0, 1),
                    identity: 300,
                    policy,
                },
            )]),
            ..Default::default()
        }
    }

    #[test]
    fn limits_count_distinct_entries_exactly() {
        // Two rules with the same peers and ports: 3 identities x 2 blocks (80-81 is one
        // 15-bit block, 443 an exact port), counted once whatever the number of rules.
        let r = |id| Rule {
            id,
            action: Action::Allow,
            mode: Mode::Enforce,
            peers: Peers::Only(vec![
                Peer::Identity(1001),
                Peer::Identity(1002),
                Peer::Identity(1003),
            ]),
            ports: vec![
                PortRange {
                    protocol: Protocol::Tcp,
                    first: 80,
                    last: 81,
                },
                PortRange {
                    protocol: Protocol::Tcp,
                    first: 443,
                    last: 443,
                },
                // Repeated within the rule: still the same entries.
                PortRange {
                    protocol: Protocol::Tcp,
                    first: 443,
                    last: 443,
                },
            ],
        };
        let state = one_endpoint(EndpointPolicy {
            ingress: vec![r(1), r(2)],
            egress: vec![],
        });
        let exact_fit = Limits {
            policy: 3,
            policy_exact: 3,
            ..Limits::NONE
        };
        let m = compile(&state, &mut Allocator::default(), exact_fit).expect("fits exactly");
        assert_eq!(m.policy.len(), 6);
        for (limits, map) in [
            (
                Limits {
                    policy: 2,
                    ..exact_fit
                },
                cortexflow_common::maps::POLICY,
            ),
            (
                Limits {
                    policy_exact: 2,
                    ..exact_fit
                },
                cortexflow_common::maps::POLICY_EXACT,
            ),
        ] {
            let err = compile(&state, &mut Allocator::default(), limits).expect_err("one over");
            assert_eq!(err.map, map);
            assert_eq!(err.limit, 2);
        }
    }

    #[test]
    fn backend_slots_and_prefixes_are_bounded_too() {
        let b = |n: u8, weight| Backend {
            ip: Ipv4Addr::new(10, 1, 0, n),
            port: 8080,
            weight,
        };
        let f = |port| Frontend {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            port,
            protocol: Protocol::Tcp,
        };
        let state = DesiredState {
            services: BTreeMap::from([(f(80), vec![b(1, 3), b(2, 1)]), (f(81), vec![b(3, 2)])]),
            ..Default::default()
        };
        let fit = Limits {
            backends: 6,
            ..Limits::NONE
        };
        assert_eq!(
            compile(&state, &mut Allocator::default(), fit)
                .expect("6 slots fit")
                .backends
                .len(),
            6
        );
        let err = compile(
            &state,
            &mut Allocator::default(),
            Limits { backends: 5, ..fit },
        )
        .expect_err("6 slots in 5");
        assert_eq!(err.map, cortexflow_common::maps::BACKENDS);

        let block = |n: u8| Peer::IpBlock {
            cidr: Cidr::new(Ipv4Addr::new(192, 168, n, 0), 24).unwrap(),
            except: vec![],
        };
        let state = one_endpoint(EndpointPolicy {
            ingress: vec![Rule {
                id: 1,
                action: Action::Allow,
                mode: Mode::Enforce,
                peers: Peers::Only((0..5).map(block).collect()),
                ports: vec![],
            }],
            egress: vec![],
        });
        let limits = |cidrs| Limits {
            cidrs,
            ..Limits::NONE
        };
        assert!(compile(&state, &mut Allocator::default(), limits(5)).is_ok());
        let err = compile(&state, &mut Allocator::default(), limits(4)).expect_err("5 in 4");
        assert_eq!(err.map, cortexflow_common::maps::CIDRS);
    }
}
