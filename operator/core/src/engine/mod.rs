//! The engine: cluster objects in, identities, statuses and every node's config out —
//! incrementally.
//!
//! Each batch of [`Change`]s marks what it touches dirty (namespaces whose identities must be
//! resolved again, policies to recompile, pods whose endpoint policy may change, nodes whose
//! config must be rebuilt, pods whose address identity may change) and only that is recomputed.
//! [`Engine::from_snapshot`] marks everything dirty; a property test checks that any sequence of
//! incremental batches ends in exactly the state a from-scratch engine computes from the final
//! objects.
//!
//! The stages, one module each: [`input`] (changes → snapshot, dirty marks), [`identity`]
//! (identities and ServiceIdentity statuses), [`policy`] (compilation, endpoint policies),
//! [`node`] (node configs), [`ipcache`] (address → identity), [`service`] (Services), and
//! [`status`] (the status types). [`Engine::apply`] runs them in that order over what is dirty.
mod identity;
mod input;
mod ipcache;
mod node;
mod policy;
mod service;
mod status;

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

pub use identity::IdentityPods;
pub use status::{Cond, CondReason, InForce, PolicyStatus, SidStatus};

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
    /// The persisted id table changed. Taken only if it follows from the table in use
    /// (`Allocations::check_successor`); else refused, and the problem recorded.
    Allocations(Allocations),
    /// The persisted id table is missing or does not parse: the numbers in use are kept, and
    /// the problem recorded (the leader writes the table again). `watermark` is what the
    /// counters had reached by another record (the leader's Lease) — the table existed, so it is
    /// **lost**: counters never go below the watermark, and the operator waits for the table to
    /// be restored before it serves or allocates (docs/architecture.md).
    TableUnreadable {
        why: String,
        watermark: Option<(u32, u32)>,
    },
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
    /// The compilation of the generation in force (`None` when none is, or while waiting for
    /// its number).
    compiled: Option<Compiled>,
    /// The generation `compiled` is of: the object's, or while that is invalid the last
    /// accepted one (`status.inForce`). Its selector decides which pods it selects.
    spec: Option<MeshPolicy>,
    deps: Deps,
    status: PolicyStatus,
    /// Engine version at which what the policy enforces last changed.
    changed_at: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NsState {
    /// The identity key of every live pod of the namespace.
    pod_keys: BTreeMap<ObjKey, AllocKey>,
    /// The identity number every live pod is enforced with: its key's, or while that has none
    /// yet the one it had before, or `identity::UNKNOWN` (see `resolve_namespace`).
    pod_ids: BTreeMap<ObjKey, u32>,
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
    /// Why the id table in the cluster is not the one in use (missing, unreadable, or refused
    /// as no successor of it); `None` while they agree.
    table_problem: Option<String>,
    /// See [`Engine::table_lost`].
    table_lost: bool,
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
    pub fn new(cfg: EngineConfig) -> Self {
        Self {
            cfg,
            snap: Snapshot::default(),
            alloc: Allocations::default(),
            table_problem: None,
            table_lost: false,
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

    /// Why the id table in the cluster is not the one in use, if it is not (see
    /// [`Change::TableUnreadable`]).
    pub fn table_problem(&self) -> Option<&str> {
        self.table_problem.as_deref()
    }

    /// Whether the id table is lost: missing or unreadable while another record says it
    /// existed, and this engine holds no numbers from it.
    pub fn table_lost(&self) -> bool {
        self.table_lost
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

    /// Applies a batch of changes and recomputes what they affect.
    pub fn apply(&mut self, changes: Vec<Change>) -> Update {
        let mut d = Dirty::default();
        for c in changes {
            self.absorb(c, &mut d);
        }
        self.version += 1;
        self.recompute(d)
    }

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
                if old.pod_keys.get(p) != new.pod_keys.get(p)
                    || old.pod_ids.get(p) != new.pod_ids.get(p)
                {
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

    /// A node's config, if the node exists or has endpoints.
    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.get(name)
    }

    /// Whether a Node object of that name exists.
    pub fn has_node(&self, name: &str) -> bool {
        self.snap.nodes.contains_key(name)
    }

    /// Every node with a config.
    pub fn nodes(&self) -> impl Iterator<Item = (&Arc<str>, &NodeState)> {
        self.nodes.iter()
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
