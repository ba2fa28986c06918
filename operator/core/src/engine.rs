//! The engine: cluster objects in, identities, statuses and every node's config out —
//! incrementally.
//!
//! Each batch of [`Change`]s marks what it touches dirty (namespaces whose identities must be
//! resolved again, policies to recompile, pods whose endpoint policy may change, nodes whose
//! config must be rebuilt, pods whose address identity may change) and only that is recomputed.
//! [`Engine::from_snapshot`] marks everything dirty; a property test checks that any sequence of
//! incremental batches ends in exactly the state a from-scratch engine computes from the final
//! objects.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    sync::Arc,
};

use cortexflow_domain::{
    Backend, Direction, Endpoint, EndpointPolicy, Endpoints, IdentityInfo, Ipcache, NodeInfo, Peer,
    Peers, PolicyGeneration, Rule, RuleRef, Service as DService, rule_id,
};

use crate::{
    alloc::{AllocKey, Allocations},
    intern::Interner,
    model::*,
    selector::{Labels, Selector},
};

/// Settings of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// SPIFFE trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// How many ipcache changes are kept for deltas; a subscriber further behind gets the whole
    /// table.
    pub ipcache_log: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            ipcache_log: 200_000,
        }
    }
}

/// One input change.
#[derive(Clone, Debug)]
pub enum Change {
    /// An object was created or changed.
    Apply(Object),
    /// An object is gone.
    Delete(Kind, ObjKey),
    /// All objects of a kind, as a watch re-list gives them: replaces what the engine had.
    Reset(Kind, Vec<Object>),
    /// The persisted id table changed.
    Allocations(Allocations),
}

/// The state of a status condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: CondReason,
    pub message: String,
}

impl Cond {
    fn new(status: bool, reason: CondReason, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// Why a condition the engine computes has its status. The operator writes each as the reason
/// string of `cortexflow_crds::conditions::reasons` (one `match`, so none is forgotten).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CondReason {
    /// MeshPolicy `Accepted=True`.
    Accepted,
    /// MeshPolicy `Accepted=False` and `ResolvedRefs=False`: it cannot be compiled.
    Invalid,
    /// `ResolvedRefs=True`.
    ResolvedRefs,
    /// `ResolvedRefs=False`: references that point at nothing.
    IdentityNotFound,
    /// Waiting for a number from the id table.
    Pending,
    /// ServiceIdentity `Accepted=True`.
    Allocated,
    /// ServiceIdentity `Accepted=False`.
    InvalidSelector,
    /// `Conflict=True`.
    ClaimedByOlderIdentity,
    /// `Conflict=False`.
    NoConflict,
}

impl CondReason {
    /// Every reason.
    pub const ALL: [CondReason; 9] = [
        CondReason::Accepted,
        CondReason::Invalid,
        CondReason::ResolvedRefs,
        CondReason::IdentityNotFound,
        CondReason::Pending,
        CondReason::Allocated,
        CondReason::InvalidSelector,
        CondReason::ClaimedByOlderIdentity,
        CondReason::NoConflict,
    ];
}

/// What a ServiceIdentity's status should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidStatus {
    pub generation: i64,
    /// `None` while the leader has not allocated it yet.
    pub id: Option<u32>,
    pub spiffe_id: String,
    /// Pods carrying the identity.
    pub endpoints: u32,
    pub accepted: Cond,
    pub conflict: Cond,
}

/// What a MeshPolicy's status should say (`Programmed` is the operator's, from agent reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyStatus {
    pub generation: i64,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    /// Waiting for its policy number: no status is written yet.
    pub pending: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Compiled {
    number: u32,
    /// The generation compiled (nodes report it back once applied).
    generation: i64,
    selected: BTreeSet<ObjKey>,
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
    refs: Vec<(u32, RuleRef)>,
}

#[derive(Clone, Debug, Default)]
struct Deps {
    sids: BTreeSet<ObjKey>,
    sas: BTreeSet<ObjKey>,
    namespace_selector: bool,
}

#[derive(Clone, Debug)]
struct PolicyState {
    /// The compilation (`None` while invalid or waiting for its number).
    compiled: Option<Compiled>,
    deps: Deps,
    status: PolicyStatus,
    /// Engine version at which what the policy enforces last changed.
    changed_at: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NsState {
    /// The identity key of every live pod of the namespace.
    pod_keys: BTreeMap<ObjKey, AllocKey>,
    /// The allocated identities present in the namespace.
    identities: BTreeSet<u32>,
}

/// A node's config, as the engine holds it.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub info: Arc<NodeInfo>,
    pub info_version: u64,
    pub endpoints: Arc<Endpoints>,
    pub endpoints_version: u64,
}

/// What a batch changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Update {
    pub version: u64,
    pub nodes: BTreeSet<Arc<str>>,
    pub ipcache: bool,
    pub services: bool,
    pub identities: bool,
    pub sids: BTreeSet<ObjKey>,
    pub policies: BTreeSet<ObjKey>,
}

#[derive(Default)]
struct Dirty {
    namespaces: BTreeSet<Arc<str>>,
    policies: BTreeSet<ObjKey>,
    pods: BTreeSet<ObjKey>,
    nodes: BTreeSet<Arc<str>>,
    addresses: BTreeSet<ObjKey>,
    services: bool,
    sids: BTreeSet<ObjKey>,
}

/// All objects the engine knows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    pub pods: BTreeMap<ObjKey, Pod>,
    pub sids: BTreeMap<ObjKey, ServiceIdentity>,
    pub policies: BTreeMap<ObjKey, MeshPolicy>,
    pub services: BTreeMap<ObjKey, Service>,
    pub slices: BTreeMap<ObjKey, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}

/// The incremental engine.
pub struct Engine {
    cfg: EngineConfig,
    snap: Snapshot,
    alloc: Allocations,
    version: u64,
    ns: BTreeMap<Arc<str>, NsState>,
    policies: BTreeMap<ObjKey, PolicyState>,
    sid_status: BTreeMap<ObjKey, SidStatus>,
    /// Policies selecting each pod.
    pod_policies: BTreeMap<ObjKey, Arc<[ObjKey]>>,
    pod_endpoint: BTreeMap<ObjKey, Arc<EndpointPolicy>>,
    /// Every distinct endpoint policy in use, shared by the pods (and nodes) that have it.
    interned: BTreeSet<Arc<EndpointPolicy>>,
    pods_by_node: BTreeMap<Arc<str>, BTreeSet<ObjKey>>,
    nodes: BTreeMap<Arc<str>, NodeState>,
    rule_refs: BTreeMap<u32, RuleRef>,
    /// What each pod put in the ipcache.
    pod_address: BTreeMap<ObjKey, (Ipv4Addr, u32)>,
    /// The pods claiming each address, sorted (almost always one).
    address_owners: BTreeMap<Ipv4Addr, Vec<ObjKey>>,
    ipcache: BTreeMap<Ipv4Addr, u32>,
    ipcache_version: u64,
    ipcache_log: VecDeque<(u64, Ipv4Addr, Option<u32>)>,
    /// Deltas since a version below this one are no longer complete.
    ipcache_log_floor: u64,
    services: Arc<Vec<DService>>,
    services_version: u64,
    identities: Arc<Vec<IdentityInfo>>,
    identities_version: u64,
    /// Shared copies of pod fields and policy lists (see [`crate::intern`]).
    strs: Interner<str>,
    labels: Interner<Labels>,
    policy_lists: Interner<[ObjKey]>,
}

impl Engine {
    /// An empty engine.
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            snap: Snapshot::default(),
            alloc: Allocations::default(),
            version: 0,
            ns: BTreeMap::new(),
            policies: BTreeMap::new(),
            sid_status: BTreeMap::new(),
            pod_policies: BTreeMap::new(),
            pod_endpoint: BTreeMap::new(),
            interned: BTreeSet::new(),
            pods_by_node: BTreeMap::new(),
            nodes: BTreeMap::new(),
            rule_refs: BTreeMap::new(),
            pod_address: BTreeMap::new(),
            address_owners: BTreeMap::new(),
            ipcache: BTreeMap::new(),
            ipcache_version: 0,
            ipcache_log: VecDeque::new(),
            ipcache_log_floor: 0,
            services: Arc::new(Vec::new()),
            services_version: 0,
            identities: Arc::new(Vec::new()),
            identities_version: 0,
            strs: Interner::default(),
            labels: Interner::default(),
            policy_lists: Interner::default(),
        }
    }

    /// An engine computed from scratch from a snapshot and an id table.
    pub fn from_snapshot(cfg: EngineConfig, snap: Snapshot, alloc: Allocations) -> Self {
        let mut e = Self::new(cfg);
        let mut changes = vec![Change::Allocations(alloc)];
        let objs = |v: Vec<Object>| v;
        changes.push(Change::Reset(
            Kind::Namespace,
            objs(
                snap.namespaces
                    .into_values()
                    .map(Object::Namespace)
                    .collect(),
            ),
        ));
        changes.push(Change::Reset(
            Kind::Node,
            snap.nodes.into_values().map(Object::Node).collect(),
        ));
        changes.push(Change::Reset(
            Kind::ServiceIdentity,
            snap.sids
                .into_values()
                .map(Object::ServiceIdentity)
                .collect(),
        ));
        changes.push(Change::Reset(
            Kind::Pod,
            snap.pods.into_values().map(Object::Pod).collect(),
        ));
        changes.push(Change::Reset(
            Kind::MeshPolicy,
            snap.policies
                .into_values()
                .map(Object::MeshPolicy)
                .collect(),
        ));
        changes.push(Change::Reset(
            Kind::Service,
            snap.services.into_values().map(Object::Service).collect(),
        ));
        changes.push(Change::Reset(
            Kind::EndpointSlice,
            snap.slices
                .into_values()
                .map(Object::EndpointSlice)
                .collect(),
        ));
        e.apply(changes);
        e
    }

    /// The current version (increases with every batch).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The objects.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The id table in use.
    pub fn allocations(&self) -> &Allocations {
        &self.alloc
    }

    /// Every key that needs an id: each ServiceIdentity, the implicit identity of each
    /// (namespace, service account) with live pods no ServiceIdentity claims, each MeshPolicy.
    pub fn needed_allocations(&self) -> BTreeSet<AllocKey> {
        let mut out: BTreeSet<AllocKey> = self
            .snap
            .sids
            .keys()
            .map(|k| AllocKey::Sid(k.clone()))
            .collect();
        for ns in self.ns.values() {
            out.extend(ns.pod_keys.values().cloned());
        }
        out.extend(
            self.snap
                .policies
                .keys()
                .map(|k| AllocKey::Policy(k.clone())),
        );
        out
    }

    // ---- input -------------------------------------------------------------------------------

    /// Applies a batch of changes and recomputes what they affect.
    pub fn apply(&mut self, changes: Vec<Change>) -> Update {
        let mut d = Dirty::default();
        for c in changes {
            self.absorb(c, &mut d);
        }
        self.version += 1;
        self.recompute(d)
    }

    fn absorb(&mut self, c: Change, d: &mut Dirty) {
        match c {
            Change::Apply(o) => self.upsert(o, d),
            Change::Delete(kind, key) => self.delete(kind, &key, d),
            Change::Reset(kind, objs) => {
                let keep: BTreeSet<ObjKey> = objs.iter().map(Object::key).collect();
                for key in self.keys_of(kind) {
                    if !keep.contains(&key) {
                        self.delete(kind, &key, d);
                    }
                }
                for o in objs {
                    self.upsert(o, d);
                }
            }
            Change::Allocations(a) => {
                let old = std::mem::replace(&mut self.alloc, a);
                let changed: BTreeSet<&AllocKey> = old
                    .ids
                    .iter()
                    .filter(|(k, v)| self.alloc.get(k) != Some(**v))
                    .map(|(k, _)| k)
                    .chain(
                        self.alloc
                            .ids
                            .iter()
                            .filter(|(k, v)| old.get(k) != Some(**v))
                            .map(|(k, _)| k),
                    )
                    .collect();
                for k in changed {
                    match k {
                        AllocKey::Sid(key) | AllocKey::Sa(key) => {
                            // The pods carrying the key change identity.
                            if let Some(st) = self.ns.get(&key.namespace) {
                                for (pod, pk) in &st.pod_keys {
                                    if pk == k {
                                        d.pods.insert(pod.clone());
                                        d.addresses.insert(pod.clone());
                                    }
                                }
                            }
                            d.namespaces.insert(key.namespace.clone());
                            if matches!(k, AllocKey::Sid(_)) {
                                d.sids.insert(key.clone());
                            }
                            for (p, st) in &self.policies {
                                if st.deps.sids.contains(key) || st.deps.sas.contains(key) {
                                    d.policies.insert(p.clone());
                                }
                            }
                        }
                        AllocKey::Policy(k) => {
                            d.policies.insert(k.clone());
                        }
                    }
                }
            }
        }
    }

    fn keys_of(&self, kind: Kind) -> Vec<ObjKey> {
        match kind {
            Kind::Namespace => self
                .snap
                .namespaces
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
                .collect(),
            Kind::Pod => self.snap.pods.keys().cloned().collect(),
            Kind::ServiceIdentity => self.snap.sids.keys().cloned().collect(),
            Kind::MeshPolicy => self.snap.policies.keys().cloned().collect(),
            Kind::Service => self.snap.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.snap.slices.keys().cloned().collect(),
            Kind::Node => self
                .snap
                .nodes
                .keys()
                .map(|n| ObjKey::new("", n.clone()))
                .collect(),
        }
    }

    fn policies_with_namespace_selectors(&self, d: &mut Dirty) {
        for (k, st) in &self.policies {
            if st.deps.namespace_selector {
                d.policies.insert(k.clone());
            }
        }
    }

    fn policies_referring_to_sid(&self, sid: &ObjKey, d: &mut Dirty) {
        for (k, st) in &self.policies {
            if st.deps.sids.contains(sid) {
                d.policies.insert(k.clone());
            }
        }
    }

    fn upsert(&mut self, o: Object, d: &mut Dirty) {
        match o {
            Object::Namespace(n) => {
                if self.snap.namespaces.get(&n.name) != Some(&n) {
                    self.snap.namespaces.insert(n.name.clone(), n);
                    self.policies_with_namespace_selectors(d);
                }
            }
            Object::Pod(mut p) => {
                self.share(&mut p);
                let key = p.key.clone();
                let old = self.snap.pods.insert(key.clone(), p.clone());
                if old.as_ref() == Some(&p) {
                    return;
                }
                if let Some(n) = old.as_ref().and_then(|o| o.node.clone()) {
                    if let Some(set) = self.pods_by_node.get_mut(&n) {
                        set.remove(&key);
                    }
                    d.nodes.insert(n);
                }
                if let Some(n) = &p.node {
                    self.pods_by_node
                        .entry(n.clone())
                        .or_default()
                        .insert(key.clone());
                    d.nodes.insert(n.clone());
                }
                d.namespaces.insert(key.namespace.clone());
                d.pods.insert(key.clone());
                d.addresses.insert(key);
            }
            Object::ServiceIdentity(s) => {
                let key = s.key.clone();
                if self.snap.sids.get(&key) == Some(&s) {
                    return;
                }
                self.snap.sids.insert(key.clone(), s);
                d.namespaces.insert(key.namespace.clone());
                d.sids.insert(key.clone());
                self.policies_referring_to_sid(&key, d);
            }
            Object::MeshPolicy(p) => {
                let key = p.key.clone();
                if self.snap.policies.get(&key) == Some(&p) {
                    return;
                }
                self.snap.policies.insert(key.clone(), p);
                d.policies.insert(key);
            }
            Object::Service(s) => {
                if self.snap.services.get(&s.key) != Some(&s) {
                    self.snap.services.insert(s.key.clone(), s);
                    d.services = true;
                }
            }
            Object::EndpointSlice(s) => {
                if self.snap.slices.get(&s.key) != Some(&s) {
                    self.snap.slices.insert(s.key.clone(), s);
                    d.services = true;
                }
            }
            Object::Node(n) => {
                if self.snap.nodes.get(&n.name) != Some(&n) {
                    d.nodes.insert(n.name.as_str().into());
                    self.snap.nodes.insert(n.name.clone(), n);
                }
            }
        }
    }

    /// Replaces a pod's strings and labels by the shared copies.
    fn share(&mut self, p: &mut Pod) {
        let take = std::mem::take::<Arc<str>>;
        p.key.namespace = self.strs.intern(take(&mut p.key.namespace));
        p.service_account = self.strs.intern(take(&mut p.service_account));
        p.node = p.node.take().map(|n| self.strs.intern(n));
        p.labels = self.labels.intern(std::mem::take(&mut p.labels));
    }

    fn delete(&mut self, kind: Kind, key: &ObjKey, d: &mut Dirty) {
        match kind {
            Kind::Namespace => {
                if self.snap.namespaces.remove(&*key.name).is_some() {
                    self.policies_with_namespace_selectors(d);
                }
            }
            Kind::Pod => {
                if let Some(old) = self.snap.pods.remove(key) {
                    if let Some(n) = old.node {
                        if let Some(set) = self.pods_by_node.get_mut(&n) {
                            set.remove(key);
                        }
                        d.nodes.insert(n);
                    }
                    d.namespaces.insert(key.namespace.clone());
                    d.pods.insert(key.clone());
                    d.addresses.insert(key.clone());
                }
            }
            Kind::ServiceIdentity => {
                if self.snap.sids.remove(key).is_some() {
                    d.namespaces.insert(key.namespace.clone());
                    d.sids.insert(key.clone());
                    self.policies_referring_to_sid(key, d);
                }
            }
            Kind::MeshPolicy => {
                if self.snap.policies.remove(key).is_some() {
                    d.policies.insert(key.clone());
                }
            }
            Kind::Service => {
                if self.snap.services.remove(key).is_some() {
                    d.services = true;
                }
            }
            Kind::EndpointSlice => {
                if self.snap.slices.remove(key).is_some() {
                    d.services = true;
                }
            }
            Kind::Node => {
                if self.snap.nodes.remove(&*key.name).is_some() {
                    d.nodes.insert(key.name.clone());
                }
            }
        }
    }

    // ---- recomputation ---------------------------------------------------------------------

    fn recompute(&mut self, mut d: Dirty) -> Update {
        let mut up = Update {
            version: self.version,
            ..Default::default()
        };
        // 1. Identities of the dirty namespaces.
        let mut identities_changed = false;
        let mut sid_ns: BTreeSet<Arc<str>> = d.sids.iter().map(|k| k.namespace.clone()).collect();
        for ns in std::mem::take(&mut d.namespaces) {
            sid_ns.insert(ns.clone());
            let new = self.resolve_namespace(&ns);
            let old = self.ns.get(&ns).cloned().unwrap_or_default();
            if new == old {
                continue;
            }
            identities_changed = true;
            for p in old.pod_keys.keys().chain(new.pod_keys.keys()) {
                if old.pod_keys.get(p) != new.pod_keys.get(p) {
                    d.addresses.insert(p.clone());
                    d.pods.insert(p.clone());
                }
            }
            if new.identities != old.identities {
                self.policies_with_namespace_selectors(&mut d);
            }
            if new.pod_keys.is_empty() {
                self.ns.remove(&ns);
            } else {
                self.ns.insert(ns, new);
            }
        }
        // ServiceIdentity statuses of every touched namespace ("oldest wins" ties the identities
        // of a namespace together, and their counts depend on its pods).
        for ns in &sid_ns {
            for (key, st) in self.sid_statuses(ns) {
                if self.sid_status.get(&key) != Some(&st) {
                    self.sid_status.insert(key.clone(), st);
                    up.sids.insert(key);
                }
            }
            let gone: Vec<ObjKey> = self
                .sid_status
                .keys()
                .filter(|k| &k.namespace == ns && !self.snap.sids.contains_key(k))
                .cloned()
                .collect();
            for k in gone {
                self.sid_status.remove(&k);
                up.sids.insert(k);
            }
        }
        // 2. Policies.
        for key in std::mem::take(&mut d.policies) {
            self.recompile(&key, &mut d, &mut up);
        }
        // 3. Which policies select the dirty pods, and their endpoint policies.
        for pod in std::mem::take(&mut d.pods) {
            self.reselect_pod(&pod);
            let new = self.endpoint_policy(&pod);
            let changed = match (&new, self.pod_endpoint.get(&pod)) {
                (Some(n), Some(o)) => n != o,
                (None, None) => false,
                _ => true,
            };
            if changed {
                match new {
                    Some(n) => self.pod_endpoint.insert(pod.clone(), n),
                    None => self.pod_endpoint.remove(&pod),
                };
            }
            if let Some(n) = self.snap.pods.get(&pod).and_then(|p| p.node.clone()) {
                d.nodes.insert(n);
            }
        }
        // Endpoint policies no pod uses any more.
        self.interned.retain(|p| Arc::strong_count(p) > 1);
        // 4. Nodes.
        for node in std::mem::take(&mut d.nodes) {
            if self.rebuild_node(&node) {
                up.nodes.insert(node);
            }
        }
        // 5. Addresses.
        for pod in std::mem::take(&mut d.addresses) {
            if self.readdress(&pod) {
                up.ipcache = true;
            }
        }
        if up.ipcache {
            self.ipcache_version = self.version;
        }
        // 6. Services.
        if d.services {
            let s = Arc::new(self.compute_services());
            if s != self.services {
                self.services = s;
                self.services_version = self.version;
                up.services = true;
            }
        }
        // 7. Identity names.
        if identities_changed || !up.sids.is_empty() {
            let list = Arc::new(self.identity_list());
            if list != self.identities {
                self.identities = list;
                self.identities_version = self.version;
                up.identities = true;
            }
        }
        up
    }

    fn resolve_namespace(&self, ns: &str) -> NsState {
        let mut sids: Vec<&ServiceIdentity> = self.sids_of(ns).collect();
        sids.sort_by(|a, b| (a.created, &a.key.name).cmp(&(b.created, &b.key.name)));
        let mut st = NsState::default();
        for pod in self.pods_of(ns) {
            if !pod.live() {
                continue;
            }
            let key = match sids.iter().find(|s| s.selects(pod)) {
                Some(s) => AllocKey::Sid(s.key.clone()),
                None => AllocKey::Sa(ObjKey::new(ns, pod.service_account.clone())),
            };
            if let Some(id) = self.alloc.get(&key) {
                st.identities.insert(id);
            }
            st.pod_keys.insert(pod.key.clone(), key);
        }
        st
    }

    fn range<'a, V>(map: &'a BTreeMap<ObjKey, V>, ns: &str) -> impl Iterator<Item = &'a V> {
        let start = ObjKey::new(ns, "");
        map.range(start..)
            .take_while(move |(k, _)| &*k.namespace == ns)
            .map(|(_, v)| v)
    }

    fn pods_of<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a Pod> {
        Self::range(&self.snap.pods, ns)
    }

    fn sids_of<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a ServiceIdentity> {
        Self::range(&self.snap.sids, ns)
    }

    fn sid_statuses(&self, ns: &str) -> Vec<(ObjKey, SidStatus)> {
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
                    spiffe_id: format!(
                        "spiffe://{}/ns/{}/sid/{}",
                        self.cfg.trust_domain, ns, s.key.name
                    ),
                    endpoints,
                    accepted,
                    conflict,
                },
            ));
        }
        out
    }

    fn recompile(&mut self, key: &ObjKey, d: &mut Dirty, up: &mut Update) {
        let old = self.policies.get(key).cloned();
        let old_compiled = old.as_ref().and_then(|o| o.compiled.clone());
        let Some(p) = self.snap.policies.get(key).cloned() else {
            // Deleted: everything it selected is dirty.
            if let Some(c) = old_compiled {
                d.pods.extend(c.selected.iter().cloned());
                for (id, _) in &c.refs {
                    self.rule_refs.remove(id);
                }
            }
            self.policies.remove(key);
            up.policies.insert(key.clone());
            return;
        };
        let number = self.alloc.get(&AllocKey::Policy(key.clone()));
        let (compiled, deps, accepted, resolved_refs) = match number {
            None => (
                old_compiled.clone(),
                old.as_ref().map(|o| o.deps.clone()).unwrap_or_default(),
                None,
                None,
            ),
            Some(number) => match self.compile(&p, number) {
                Ok((c, deps, missing)) => {
                    let resolved = if missing.is_empty() {
                        Cond::new(true, CondReason::ResolvedRefs, "every reference resolved")
                    } else {
                        Cond::new(
                            false,
                            CondReason::IdentityNotFound,
                            format!("not found: {}", missing.join(", ")),
                        )
                    };
                    (
                        Some(c),
                        deps,
                        Some(Cond::new(
                            true,
                            CondReason::Accepted,
                            "the policy is valid and compiled",
                        )),
                        Some(resolved),
                    )
                }
                Err(e) => (
                    None,
                    Deps::default(),
                    Some(Cond::new(
                        false,
                        CondReason::Invalid,
                        format!("{e}; the policy enforces nothing until it is fixed"),
                    )),
                    Some(Cond::new(
                        false,
                        CondReason::Invalid,
                        "the policy could not be compiled",
                    )),
                ),
            },
        };
        let status = PolicyStatus {
            generation: p.generation,
            pending: accepted.is_none(),
            accepted: accepted.unwrap_or_else(|| {
                Cond::new(false, CondReason::Pending, "waiting for a policy number")
            }),
            resolved_refs: resolved_refs.unwrap_or_else(|| {
                Cond::new(false, CondReason::Pending, "waiting for a policy number")
            }),
        };
        let enforcement_changed = compiled != old_compiled;
        if enforcement_changed {
            let before = old_compiled
                .as_ref()
                .map(|c| c.selected.clone())
                .unwrap_or_default();
            let after = compiled
                .as_ref()
                .map(|c| c.selected.clone())
                .unwrap_or_default();
            d.pods.extend(before.union(&after).cloned());
            if let Some(c) = &old_compiled {
                for (id, _) in &c.refs {
                    self.rule_refs.remove(id);
                }
            }
            if let Some(c) = &compiled {
                for (id, r) in &c.refs {
                    self.rule_refs.insert(*id, r.clone());
                }
            }
        }
        let changed_at = match &old {
            Some(o) if !enforcement_changed => o.changed_at,
            _ => self.version,
        };
        if old
            .as_ref()
            .is_none_or(|o| o.status != status || enforcement_changed)
        {
            up.policies.insert(key.clone());
        }
        self.policies.insert(
            key.clone(),
            PolicyState {
                compiled,
                deps,
                status,
                changed_at,
            },
        );
    }

    /// Compiles a policy: the pods it selects, its rules with every reference resolved, what it
    /// depends on, and the references that resolve to nothing.
    fn compile(
        &self,
        p: &MeshPolicy,
        number: u32,
    ) -> Result<(Compiled, Deps, Vec<String>), String> {
        if let Some(e) = &p.invalid {
            return Err(e.clone());
        }
        let selector = p
            .selector
            .as_ref()
            .map_err(|e| format!("spec.selector: {e}"))?;
        let ns = &p.key.namespace;
        let selected: BTreeSet<ObjKey> = self
            .pods_of(ns)
            .filter(|pod| pod.live() && selector.matches(&pod.labels))
            .map(|pod| pod.key.clone())
            .collect();
        let mut deps = Deps::default();
        let mut missing = BTreeSet::new();
        let mut compiled = Compiled {
            number,
            generation: p.generation,
            selected,
            ..Default::default()
        };
        for (dir, rules) in [
            (Direction::Ingress, &p.ingress),
            (Direction::Egress, &p.egress),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let field = format!("spec.{}[{i}]", dir.as_str());
                let peers = if r.peers.is_empty() {
                    Peers::Any
                } else {
                    let mut out = BTreeSet::new();
                    for (j, peer) in r.peers.iter().enumerate() {
                        let pfield = format!(
                            "{field}.{}[{j}]",
                            if dir == Direction::Ingress {
                                "from"
                            } else {
                                "to"
                            }
                        );
                        match peer {
                            PolicyPeer::Identity(r) => {
                                let key = r.resolve(ns);
                                deps.sids.insert(key.clone());
                                if !self.snap.sids.contains_key(&key) {
                                    missing.insert(format!("identity {key}"));
                                } else if let Some(id) = self.alloc.get(&AllocKey::Sid(key)) {
                                    out.insert(Peer::Identity(id));
                                }
                            }
                            PolicyPeer::ServiceAccount(r) => {
                                let key = r.resolve(ns);
                                deps.sas.insert(key.clone());
                                if let Some(id) = self.alloc.get(&AllocKey::Sa(key)) {
                                    out.insert(Peer::Identity(id));
                                }
                            }
                            PolicyPeer::NamespaceSelector(sel) => {
                                deps.namespace_selector = true;
                                let sel: &Selector = sel
                                    .as_ref()
                                    .map_err(|e| format!("{pfield}.namespaceSelector: {e}"))?;
                                for n in self
                                    .snap
                                    .namespaces
                                    .values()
                                    .filter(|n| sel.matches(&n.labels))
                                {
                                    if let Some(st) = self.ns.get(n.name.as_str()) {
                                        out.extend(
                                            st.identities.iter().map(|i| Peer::Identity(*i)),
                                        );
                                    }
                                }
                            }
                            PolicyPeer::IpBlock { cidr, except } => {
                                let c = cidr.parse().map_err(|e: cortexflow_domain::Invalid| {
                                    format!("{pfield}.ipBlock.cidr: {}", e.0)
                                })?;
                                let mut ex = Vec::new();
                                for (k, e) in except.iter().enumerate() {
                                    let e =
                                        e.parse().map_err(|e: cortexflow_domain::Invalid| {
                                            format!("{pfield}.ipBlock.except[{k}]: {}", e.0)
                                        })?;
                                    ex.push(e);
                                }
                                ex.sort();
                                ex.dedup();
                                out.insert(Peer::IpBlock {
                                    cidr: c,
                                    except: ex,
                                });
                            }
                        }
                    }
                    Peers::Only(out.into_iter().collect())
                };
                for pr in &r.ports {
                    if pr.first == 0 || pr.last < pr.first {
                        return Err(format!(
                            "{field}.ports: {}-{} is not a port range",
                            pr.first, pr.last
                        ));
                    }
                }
                let Some(id) = rule_id::encode(number, dir, i) else {
                    return Err(format!(
                        "more than {} rules in a direction",
                        rule_id::MAX_RULES_PER_DIRECTION
                    ));
                };
                let rule = Rule {
                    id,
                    action: p.action,
                    mode: p.mode,
                    peers,
                    ports: r.ports.clone(),
                };
                compiled.refs.push((
                    id,
                    RuleRef {
                        namespace: p.key.namespace.to_string(),
                        policy: p.key.name.to_string(),
                        direction: dir,
                        index: i as u32,
                    },
                ));
                match dir {
                    Direction::Ingress => compiled.ingress.push(rule),
                    Direction::Egress => compiled.egress.push(rule),
                }
            }
        }
        if p.ingress.len() > rule_id::MAX_RULES_PER_DIRECTION
            || p.egress.len() > rule_id::MAX_RULES_PER_DIRECTION
        {
            return Err(format!(
                "more than {} rules in a direction",
                rule_id::MAX_RULES_PER_DIRECTION
            ));
        }
        Ok((compiled, deps, missing.into_iter().collect()))
    }

    /// Updates which policies select `pod` (and their selected sets).
    fn reselect_pod(&mut self, pod: &ObjKey) {
        let live = self.snap.pods.get(pod).filter(|p| p.live()).cloned();
        let mut now = BTreeSet::new();
        let start = ObjKey::new(pod.namespace.clone(), "");
        let keys: Vec<ObjKey> = self
            .policies
            .range(start..)
            .take_while(|(k, _)| k.namespace == pod.namespace)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            let selects = match (&live, self.snap.policies.get(&k)) {
                (Some(p), Some(pol)) => pol.selector.as_ref().is_ok_and(|s| s.matches(&p.labels)),
                _ => false,
            };
            if let Some(c) = self
                .policies
                .get_mut(&k)
                .and_then(|st| st.compiled.as_mut())
            {
                if selects {
                    c.selected.insert(pod.clone());
                    now.insert(k.clone());
                } else {
                    c.selected.remove(pod);
                }
            }
        }
        if now.is_empty() {
            self.pod_policies.remove(pod);
        } else {
            let list = self.policy_lists.intern(now.into_iter().collect());
            self.pod_policies.insert(pod.clone(), list);
        }
    }

    /// The endpoint policy of a pod; pods with equal policies share one allocation.
    fn endpoint_policy(&mut self, pod: &ObjKey) -> Option<Arc<EndpointPolicy>> {
        self.snap.pods.get(pod).filter(|p| p.live())?;
        let mut ep = EndpointPolicy::default();
        for k in self
            .pod_policies
            .get(pod)
            .into_iter()
            .flat_map(|l| l.iter())
        {
            if let Some(c) = self.policies.get(k).and_then(|st| st.compiled.as_ref()) {
                ep.ingress.extend(c.ingress.iter().cloned());
                ep.egress.extend(c.egress.iter().cloned());
            }
        }
        if let Some(shared) = self.interned.get(&ep) {
            return Some(shared.clone());
        }
        let shared = Arc::new(ep);
        self.interned.insert(shared.clone());
        Some(shared)
    }

    fn pod_identity(&self, pod: &ObjKey) -> Option<u32> {
        let key = self.ns.get(&pod.namespace)?.pod_keys.get(pod)?;
        self.alloc.get(key)
    }

    /// Rebuilds a node's config; returns whether it changed.
    fn rebuild_node(&mut self, node: &str) -> bool {
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
        for pod in self.pods_by_node.get(node).into_iter().flatten() {
            let (Some(p), Some(policy), Some(identity)) = (
                self.snap.pods.get(pod),
                self.pod_endpoint.get(pod),
                self.pod_identity(pod),
            ) else {
                continue;
            };
            let Some(ip) = p.ip else { continue };
            for k in self
                .pod_policies
                .get(pod)
                .into_iter()
                .flat_map(|l| l.iter())
            {
                if let Some(c) = self.policies.get(k).and_then(|st| st.compiled.as_ref()) {
                    policies.insert(PolicyGeneration {
                        namespace: k.namespace.to_string(),
                        name: k.name.to_string(),
                        generation: c.generation,
                    });
                }
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

    /// Updates what a pod puts in the ipcache; returns whether the ipcache changed.
    fn readdress(&mut self, pod: &ObjKey) -> bool {
        let new = self
            .snap
            .pods
            .get(pod)
            .filter(|p| p.live())
            .and_then(|p| Some((p.ip?, self.pod_identity(pod)?)));
        let old = self.pod_address.get(pod).copied();
        if new == old {
            return false;
        }
        let mut touched = BTreeSet::new();
        if let Some((ip, _)) = old {
            if let Some(o) = self.address_owners.get_mut(&ip) {
                o.retain(|k| k != pod);
                if o.is_empty() {
                    self.address_owners.remove(&ip);
                }
            }
            self.pod_address.remove(pod);
            touched.insert(ip);
        }
        if let Some((ip, id)) = new {
            let owners = self.address_owners.entry(ip).or_default();
            if let Err(i) = owners.binary_search(pod) {
                owners.insert(i, pod.clone());
            }
            self.pod_address.insert(pod.clone(), (ip, id));
            touched.insert(ip);
        }
        let mut changed = false;
        for ip in touched {
            // Two pods with one address (a recycled IP): the first by name wins, deterministically.
            let want = self
                .address_owners
                .get(&ip)
                .and_then(|o| o.first())
                .and_then(|p| self.pod_address.get(p))
                .map(|(_, id)| *id);
            let have = self.ipcache.get(&ip).copied();
            if want != have {
                match want {
                    Some(id) => self.ipcache.insert(ip, id),
                    None => self.ipcache.remove(&ip),
                };
                self.ipcache_log.push_back((self.version, ip, want));
                changed = true;
            }
        }
        while self.ipcache_log.len() > self.cfg.ipcache_log {
            if let Some((v, _, _)) = self.ipcache_log.pop_front() {
                self.ipcache_log_floor = self.ipcache_log_floor.max(v);
            }
        }
        changed
    }

    fn compute_services(&self) -> Vec<DService> {
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

    fn identity_list(&self) -> Vec<IdentityInfo> {
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

    // ---- output ------------------------------------------------------------------------------

    /// A node's config, if the node exists or has endpoints.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.get(name)
    }

    /// Every node with a config.
    pub fn nodes(&self) -> impl Iterator<Item = (&Arc<str>, &NodeState)> {
        self.nodes.iter()
    }

    /// The whole ipcache and its version.
    pub fn ipcache(&self) -> (&BTreeMap<Ipv4Addr, u32>, u64) {
        (&self.ipcache, self.ipcache_version)
    }

    /// The ipcache changes after version `since`, or `None` when the log no longer reaches
    /// back that far (the subscriber needs the whole table).
    pub fn ipcache_since(&self, since: u64) -> Option<Ipcache> {
        if since >= self.ipcache_version {
            return Some(Ipcache::default());
        }
        if since < self.ipcache_log_floor {
            return None;
        }
        let mut latest: BTreeMap<Ipv4Addr, Option<u32>> = BTreeMap::new();
        for (v, ip, id) in &self.ipcache_log {
            if *v > since {
                latest.insert(*ip, *id);
            }
        }
        let mut delta = Ipcache::default();
        for (ip, id) in latest {
            match id {
                Some(id) => delta.upserts.push((ip, id)),
                None => delta.removals.push(ip),
            }
        }
        Some(delta)
    }

    /// The whole ipcache as a full section.
    pub fn ipcache_full(&self) -> Ipcache {
        Ipcache {
            full: true,
            upserts: self.ipcache.iter().map(|(ip, id)| (*ip, *id)).collect(),
            removals: Vec::new(),
        }
    }

    /// Every Service and the version it last changed at.
    pub fn services(&self) -> (Arc<Vec<DService>>, u64) {
        (self.services.clone(), self.services_version)
    }

    /// Every identity's name and the version the list last changed at.
    pub fn identities(&self) -> (Arc<Vec<IdentityInfo>>, u64) {
        (self.identities.clone(), self.identities_version)
    }

    /// What a ServiceIdentity's status should say.
    pub fn sid_status(&self, key: &ObjKey) -> Option<&SidStatus> {
        self.sid_status.get(key)
    }

    /// Every ServiceIdentity's status.
    pub fn sid_statuses_all(&self) -> impl Iterator<Item = (&ObjKey, &SidStatus)> {
        self.sid_status.iter()
    }

    /// What a MeshPolicy's status should say.
    pub fn policy_status(&self, key: &ObjKey) -> Option<&PolicyStatus> {
        self.policies.get(key).map(|p| &p.status)
    }

    /// Every MeshPolicy's status.
    pub fn policy_statuses(&self) -> impl Iterator<Item = (&ObjKey, &PolicyStatus)> {
        self.policies.iter().map(|(k, p)| (k, &p.status))
    }

    /// The nodes that must apply a policy (those hosting pods it selects) and the engine
    /// version its current form first appeared at: a node has it programmed once it applied a
    /// config of at least that version.
    pub fn policy_nodes(&self, key: &ObjKey) -> Option<(BTreeSet<String>, u64)> {
        let st = self.policies.get(key)?;
        let nodes = st
            .compiled
            .iter()
            .flat_map(|c| c.selected.iter())
            .filter_map(|p| self.snap.pods.get(p)?.node.as_deref().map(str::to_string))
            .collect();
        Some((nodes, st.changed_at))
    }

    /// Everything the engine outputs, without versions: what the property tests compare.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            nodes: self
                .nodes
                .iter()
                .map(|(n, st)| (n.to_string(), ((*st.info).clone(), (*st.endpoints).clone())))
                .collect(),
            ipcache: self.ipcache.clone(),
            services: (*self.services).clone(),
            identities: (*self.identities).clone(),
            sids: self.sid_status.clone(),
            policies: self
                .policies
                .iter()
                .map(|(k, st)| {
                    (
                        k.clone(),
                        (
                            st.status.clone(),
                            self.policy_nodes(k).map(|n| n.0).unwrap_or_default(),
                        ),
                    )
                })
                .collect(),
            needed: self.needed_allocations(),
        }
    }
}

/// Everything the engine outputs, comparable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub nodes: BTreeMap<String, (NodeInfo, Endpoints)>,
    pub ipcache: BTreeMap<Ipv4Addr, u32>,
    pub services: Vec<DService>,
    pub identities: Vec<IdentityInfo>,
    pub sids: BTreeMap<ObjKey, SidStatus>,
    pub policies: BTreeMap<ObjKey, (PolicyStatus, BTreeSet<String>)>,
    pub needed: BTreeSet<AllocKey>,
}
