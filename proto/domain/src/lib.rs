//! What the control plane says to a node, as validated Rust types: a node's config (its
//! endpoints with their compiled policies, the cluster's address → identity table, Services,
//! identity names) and an agent's status report.
//!
//! The operator's core computes these and the agent programs them; neither needs the gRPC stack
//! for that. `cortexflow-proto` is the only place that converts them to and from the wire
//! (`cortexflow.agent.v1`), validating every message with `TryFrom`.
#![forbid(unsafe_code)]
pub mod verdict;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// `Err(Invalid(msg))`.
pub fn invalid<T>(msg: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(msg.into()))
}

// ---- numbering -------------------------------------------------------------------------------

/// Identity numbers (docs/policy.md, "Identities"): a few reserved, the cluster's allocated by
/// the operator's leader, and node-local CIDR identities at the top. Defined in
/// `cortexflow-common`, where the kernel programs read them too.
pub mod identity {
    pub use cortexflow_common::{
        IDENTITY_ANY as ANY, IDENTITY_CIDR_BASE as CIDR_BASE,
        IDENTITY_FIRST_ALLOCATED as FIRST_ALLOCATED, IDENTITY_HOST as HOST,
        IDENTITY_LAST_ALLOCATED as LAST_ALLOCATED, IDENTITY_RESERVED_MAX as RESERVED_MAX,
        IDENTITY_UNKNOWN as UNKNOWN, IDENTITY_WORLD as WORLD,
    };

    /// Whether `id` may be a cluster pod's identity: an allocated one, or [`UNKNOWN`].
    pub const fn is_pod_identity(id: u32) -> bool {
        id == UNKNOWN || (id >= FIRST_ALLOCATED && id <= LAST_ALLOCATED)
    }
}

/// Rule ids: `policy number << 6 | direction << 5 | index`. The id is what the kernel stores
/// with an accepted flow and reports in flow events; the node config maps it back to the policy,
/// direction and index ([`RuleRef`]). The layout bounds the rules of a direction and the policy
/// numbers; the CRD schema, the engine and the allocator all take their limits from here.
pub mod rule_id {
    use super::Direction;

    /// Bits of the rule's index within its direction.
    pub const INDEX_BITS: u32 = 5;
    /// Most rules one MeshPolicy may have in one direction (32).
    pub const MAX_RULES_PER_DIRECTION: usize = 1 << INDEX_BITS;
    /// Bits of the policy number (the rest of the 32-bit id after the index and direction).
    pub const POLICY_NUMBER_BITS: u32 = 32 - INDEX_BITS - 1;
    /// Largest policy number.
    pub const MAX_POLICY_NUMBER: u32 = (1 << POLICY_NUMBER_BITS) - 1;

    /// The id of rule `index` of `direction` of the policy numbered `policy`; `None` when the
    /// number or the index does not fit the layout.
    pub const fn encode(policy: u32, direction: Direction, index: usize) -> Option<u32> {
        if policy == 0 || policy > MAX_POLICY_NUMBER || index >= MAX_RULES_PER_DIRECTION {
            return None;
        }
        let dir = match direction {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        };
        Some((policy << (INDEX_BITS + 1)) | (dir << INDEX_BITS) | index as u32)
    }

    /// The inverse of [`encode`]: `(policy number, direction, index)`.
    pub const fn decode(id: u32) -> (u32, Direction, usize) {
        let dir = if (id >> INDEX_BITS) & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        (
            id >> (INDEX_BITS + 1),
            dir,
            (id & ((1 << INDEX_BITS) - 1)) as usize,
        )
    }
}

// ---- policy ----------------------------------------------------------------------------------

/// Allow or Deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Allow,
    Deny,
}

/// Enforce or Audit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Enforce,
    Audit,
}

/// Traffic direction, seen from the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    /// `"ingress"` or `"egress"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

/// An IPv4 prefix (the address is always masked to the length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    /// A prefix; the address is masked to `len` bits. `len` above 32 is an error.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Self, Invalid> {
        if len > 32 {
            return invalid(format!("prefix length {len} > 32"));
        }
        Ok(Self {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Cidr {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| Invalid(format!("{s:?} is not a CIDR")))?;
        let addr: Ipv4Addr = a.parse().map_err(|e| Invalid(format!("{s:?}: {e}")))?;
        let len: u8 = l.parse().map_err(|e| Invalid(format!("{s:?}: {e}")))?;
        Cidr::new(addr, len)
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// Pods (or the host) carrying this numeric identity.
    Identity(u32),
    /// Addresses that are not cluster addresses, inside `cidr` and outside every `except`.
    IpBlock { cidr: Cidr, except: Vec<Cidr> },
}

/// The peers of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peers {
    /// Any peer (the rule lists none).
    Any,
    /// Exactly these (possibly none, e.g. when every reference is unresolved).
    Only(Vec<Peer>),
}

/// L4 protocol of a port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }
}

/// An inclusive destination port range of one protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

/// One rule of one policy, in one direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    /// Non-zero id reported with verdicts (see [`RuleRef`]).
    pub id: u32,
    pub action: Action,
    pub mode: Mode,
    pub peers: Peers,
    /// Empty: every port and protocol (including protocols other than TCP and UDP).
    pub ports: Vec<PortRange>,
}

/// Every rule of every policy that selects an endpoint. Endpoints with equal policies share one
/// policy set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointPolicy {
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl EndpointPolicy {
    /// The rules of one direction.
    pub fn rules(&self, dir: Direction) -> &[Rule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// An Enforce-mode Allow policy has rules in `dir`: default-deny.
    pub fn default_deny(&self, dir: Direction) -> bool {
        self.rules(dir)
            .iter()
            .any(|r| r.action == Action::Allow && r.mode == Mode::Enforce)
    }

    /// An Audit-mode Allow policy has rules in `dir`.
    pub fn audit_default_deny(&self, dir: Direction) -> bool {
        self.rules(dir)
            .iter()
            .any(|r| r.action == Action::Allow && r.mode == Mode::Audit)
    }

    /// Some Enforce-mode policy has rules in `dir`: the endpoint is under enforcement.
    pub fn enforced(&self, dir: Direction) -> bool {
        self.rules(dir).iter().any(|r| r.mode == Mode::Enforce)
    }

    /// Some policy has rules in `dir`.
    pub fn policed(&self, dir: Direction) -> bool {
        !self.rules(dir).is_empty()
    }
}

/// Where a rule id comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: u32,
}

// ---- node config -----------------------------------------------------------------------------

/// A pod of the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub identity: u32,
    pub policy_set: u32,
}

/// A MeshPolicy at one generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyGeneration {
    pub namespace: String,
    pub name: String,
    pub generation: i64,
}

/// The node's endpoints and their policies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub policy_sets: BTreeMap<u32, Arc<EndpointPolicy>>,
    pub endpoints: Vec<Endpoint>,
    pub rules: BTreeMap<u32, RuleRef>,
    /// The MeshPolicies applying to some endpoint of the node.
    pub policies: BTreeSet<PolicyGeneration>,
}

/// The node itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub pod_cidr: Option<Cidr>,
}

/// Identities of cluster addresses: a whole table or changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipcache {
    pub full: bool,
    pub upserts: Vec<(Ipv4Addr, u32)>,
    pub removals: Vec<Ipv4Addr>,
}

/// A Service frontend with its backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub backends: Vec<Backend>,
}

/// A Service backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub weight: u32,
}

/// What an identity is called.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `"sid"` (a ServiceIdentity) or `"sa"` (the implicit identity of a service account).
    pub kind: String,
}

/// One message of the config stream. An absent section is unchanged (unless `full`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub version: u64,
    /// The cluster revision up to which the sender has applied every change (0: unknown).
    pub revision: u64,
    pub full: bool,
    pub node: Option<NodeInfo>,
    pub endpoints: Option<Endpoints>,
    pub ipcache: Option<Ipcache>,
    pub services: Option<Vec<Service>>,
    pub identities: Option<Vec<IdentityInfo>>,
}

/// What an agent reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentStatus {
    pub node: String,
    pub applied_version: u64,
    /// The refused version and why.
    pub failed: Option<(u64, String)>,
    /// The policies of the applied config.
    pub policies: BTreeSet<PolicyGeneration>,
    /// Endpoints (`namespace/name`) whose policy is in the kernel.
    pub programmed: BTreeSet<String>,
    /// The address each of `programmed` has in the kernel (empty from older agents).
    pub programmed_at: BTreeMap<String, Ipv4Addr>,
    /// The digest of the trust bundle the agent verifies with (empty from older agents).
    pub trust_bundle: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_ids_round_trip_and_refuse_what_does_not_fit() {
        for (p, d, i) in [
            (1, Direction::Ingress, 0),
            (7, Direction::Egress, 31),
            (rule_id::MAX_POLICY_NUMBER, Direction::Egress, 17),
        ] {
            let id = rule_id::encode(p, d, i).expect("fits");
            assert_ne!(id, 0);
            assert_eq!(rule_id::decode(id), (p, d, i));
        }
        assert_eq!(rule_id::encode(0, Direction::Ingress, 0), None);
        assert_eq!(
            rule_id::encode(rule_id::MAX_POLICY_NUMBER + 1, Direction::Ingress, 0),
            None
        );
        assert_eq!(
            rule_id::encode(1, Direction::Ingress, rule_id::MAX_RULES_PER_DIRECTION),
            None
        );
        assert_eq!(rule_id::MAX_RULES_PER_DIRECTION, 32);
    }
}

// ---- SPIFFE ids --------------------------------------------------------------------------------

/// SPIFFE ids of the mesh (SPEC §3, docs/security.md): workloads under `/ns/…`, the mesh's
/// own components under `/cortexflow/…` (no namespace can produce that path, so a workload can
/// never hold a component's id).
pub mod spiffe {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`: the implicit identity of a service account.
    pub fn service_account(trust_domain: &str, ns: &str, sa: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}")
    }

    /// `spiffe://<td>/ns/<ns>/sid/<name>`: a ServiceIdentity.
    pub fn service_identity(trust_domain: &str, ns: &str, name: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{ns}/sid/{name}")
    }

    /// `spiffe://<td>/cortexflow/node/<node>`: the agent of a node.
    pub fn node_agent(trust_domain: &str, node: &str) -> String {
        format!("spiffe://{trust_domain}/cortexflow/node/{node}")
    }

    /// `spiffe://<td>/cortexflow/operator`: every operator replica.
    pub fn operator(trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/cortexflow/operator")
    }

    /// The node a node agent's id names, `None` for any other id of `trust_domain`.
    pub fn node_of<'a>(trust_domain: &str, id: &'a str) -> Option<&'a str> {
        let rest = id
            .strip_prefix("spiffe://")?
            .strip_prefix(trust_domain)?
            .strip_prefix("/cortexflow/node/")?;
        (!rest.is_empty() && !rest.contains('/')).then_some(rest)
    }

    /// The trust domain of a well-formed SPIFFE id (`spiffe://<td>/<path>`, a non-empty path
    /// without empty, `.` or `..` segments, no query or fragment), `None` otherwise.
    pub fn trust_domain_of(id: &str) -> Option<&str> {
        let rest = id.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = path.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
        (td_ok && path_ok).then_some(td)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ids_and_their_parts() {
            let n = node_agent("cluster.local", "lab-node-1");
            assert_eq!(n, "spiffe://cluster.local/cortexflow/node/lab-node-1");
            assert_eq!(node_of("cluster.local", &n), Some("lab-node-1"));
            assert_eq!(node_of("other.domain", &n), None);
            assert_eq!(
                node_of("cluster.local", "spiffe://cluster.local/cortexflow/node/"),
                None
            );
            assert_eq!(
                node_of(
                    "cluster.local",
                    "spiffe://cluster.local/cortexflow/node/a/b"
                ),
                None
            );
            assert_eq!(
                node_of(
                    "cluster.local",
                    &service_account("cluster.local", "cortexflow", "node")
                ),
                None
            );
            assert_eq!(trust_domain_of(&operator("td.example")), Some("td.example"));
            for bad in [
                "spiffe://cluster.local",
                "spiffe://cluster.local/",
                "spiffe://Cluster/ns/a",
                "spiffe://cluster.local/ns//a",
                "spiffe://cluster.local/ns/../a",
                "spiffe://cluster.local/ns/a?x=1",
                "https://cluster.local/ns/a",
            ] {
                assert_eq!(trust_domain_of(bad), None, "{bad}");
            }
        }
    }
}
