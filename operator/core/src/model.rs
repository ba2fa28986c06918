//! The cluster objects the core works from: plain, already-parsed structs (the operator's watch
//! layer converts Kubernetes objects into these; tests build them directly).
use std::{net::Ipv4Addr, sync::Arc};

use cortexflow_domain::{Action, Cidr, Mode, PortRange, Protocol};

use crate::selector::{Labels, Selector};

/// A namespaced object's `(namespace, name)`. The strings are shared: a key is cloned into
/// several indexes, and a clone costs two reference counts, not two allocations.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjKey {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
    /// Its `mesh.cortexflow.io/inject` annotation (the injector's; the engine ignores it).
    pub inject: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub key: ObjKey,
    /// Shared: pods of one workload have equal labels (the engine interns them).
    pub labels: Arc<Labels>,
    pub service_account: Arc<str>,
    pub node: Option<Arc<str>>,
    pub ip: Option<Ipv4Addr>,
    /// The pod shares its node's network: it is the host, not an endpoint.
    pub host_network: bool,
    /// Succeeded or Failed: it holds no address any more.
    pub terminated: bool,
    /// Its `mesh.cortexflow.io/inject` annotation (the injector's; the engine ignores it).
    pub inject: Option<String>,
    /// It has a container named `cortexflow-proxy` (the injected mTLS proxy).
    pub has_proxy: bool,
}

impl Pod {
    /// Whether the pod takes part in identities (it is running or about to).
    pub fn live(&self) -> bool {
        !self.terminated && !self.host_network
    }
}

/// The order of "older": creation time, then name (deterministic for equal timestamps).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Created(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceIdentity {
    pub key: ObjKey,
    pub created: Created,
    pub generation: i64,
    /// `Err` with the reason when the selector is invalid.
    pub selector: Result<Selector, String>,
    pub service_accounts: Vec<String>,
    pub mtls: Mtls,
}

/// A ServiceIdentity's `spec.mtls`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mtls {
    #[default]
    Disabled,
    Permissive,
    Strict,
}

impl Mtls {
    pub fn as_str(self) -> &'static str {
        match self {
            Mtls::Disabled => "Disabled",
            Mtls::Permissive => "Permissive",
            Mtls::Strict => "Strict",
        }
    }
}

impl ServiceIdentity {
    /// Whether the identity claims a pod (before the "oldest wins" rule).
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.key.namespace == self.key.namespace
            && self.selector.as_ref().is_ok_and(|s| s.matches(&pod.labels))
            && (self.service_accounts.is_empty()
                || self
                    .service_accounts
                    .iter()
                    .any(|s| **s == *pod.service_account))
    }
}

/// A reference `<name>` or `<namespace>/<name>` from a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref {
    pub namespace: Option<String>,
    pub name: String,
}

impl Ref {
    /// Parses `<name>` or `<namespace>/<name>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            None if !s.is_empty() => Ok(Ref {
                namespace: None,
                name: s.to_string(),
            }),
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Ref {
                    namespace: Some(ns.to_string()),
                    name: name.to_string(),
                })
            }
            _ => Err(format!("{s:?} is neither <name> nor <namespace>/<name>")),
        }
    }

    /// The referenced object, relative to the referring object's namespace.
    pub fn resolve(&self, namespace: &str) -> ObjKey {
        ObjKey::new(
            self.namespace.as_deref().unwrap_or(namespace),
            self.name.as_str(),
        )
    }
}

/// One peer of a policy rule, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyPeer {
    Identity(Ref),
    ServiceAccount(Ref),
    NamespaceSelector(Result<Selector, String>),
    IpBlock { cidr: String, except: Vec<String> },
}

/// One rule of a policy, as written: no peers = any peer; no ports = every port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyRule {
    pub peers: Vec<PolicyPeer>,
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshPolicy {
    pub key: ObjKey,
    pub generation: i64,
    pub selector: Result<Selector, String>,
    pub action: Action,
    pub mode: Mode,
    pub ingress: Vec<PolicyRule>,
    pub egress: Vec<PolicyRule>,
    /// Set when the object could not be read (a field of the wrong shape): the policy is
    /// refused with this reason.
    pub invalid: Option<String>,
    /// The spec as the API holds it (JSON), opaque to the core: recorded in `status.inForce`
    /// when this generation is accepted.
    pub spec_json: Arc<str>,
    /// `status.inForce`: the last accepted generation as the object's status records it (its
    /// own `in_force` is `None`) — what stays in force while this generation is invalid.
    pub in_force: Option<Box<MeshPolicy>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub key: ObjKey,
    /// `None` for headless Services.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<Ipv4Addr>,
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub key: ObjKey,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub addresses: Vec<Ipv4Addr>,
    pub pod_cidr: Option<Cidr>,
}

/// Any object the core consumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Pod),
    ServiceIdentity(ServiceIdentity),
    MeshPolicy(MeshPolicy),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

/// The kinds of [`Object`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Namespace,
    Pod,
    ServiceIdentity,
    MeshPolicy,
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    /// Every kind, in the order the operator starts its watches.
    pub const ALL: [Kind; 7] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::ServiceIdentity,
        Kind::MeshPolicy,
        Kind::Service,
        Kind::EndpointSlice,
    ];

    /// The Kubernetes kind name (a metric label value, a task name).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::ServiceIdentity => "ServiceIdentity",
            Kind::MeshPolicy => "MeshPolicy",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::ServiceIdentity(_) => Kind::ServiceIdentity,
            Object::MeshPolicy(_) => Kind::MeshPolicy,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    /// The object's key; cluster-scoped kinds have an empty namespace.
    pub fn key(&self) -> ObjKey {
        match self {
            Object::Namespace(n) => ObjKey::new("", n.name.as_str()),
            Object::Pod(p) => p.key.clone(),
            Object::ServiceIdentity(s) => s.key.clone(),
            Object::MeshPolicy(p) => p.key.clone(),
            Object::Service(s) => s.key.clone(),
            Object::EndpointSlice(s) => s.key.clone(),
            Object::Node(n) => ObjKey::new("", n.name.as_str()),
        }
    }
}
