//! `MeshPolicy`: L3/L4 authorization between identities. Exact semantics: docs/policy.md.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most rules a MeshPolicy may have in one direction: what the rule-id layout of the datapath
/// can number (`cortexflow_domain::rule_id`).
const MAX_RULES: usize = cortexflow_domain::rule_id::MAX_RULES_PER_DIRECTION;

/// MeshPolicy authorizes L3/L4 traffic between workload identities. It protects the pods of its
/// namespace chosen by `selector`: an `Allow` policy with rules in a direction makes those pods
/// default-deny in that direction, so that only connections matching a rule of an `Allow`
/// policy pass; a connection matching a rule of a `Deny` policy is dropped whatever allows it.
/// Verdicts are taken per connection and enforced in the kernel on both sides.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mesh.cortexflow.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    plural = "meshpolicies",
    shortname = "mp",
    category = "cortexflow",
    namespaced,
    status = "MeshPolicyStatus",
    label("app.kubernetes.io/part-of", "cortexflow"),
    derive = "PartialEq",
    derive = "Default",
    doc = "MeshPolicy authorizes L3/L4 traffic between CortexFlow workload identities. See docs/policy.md for the exact semantics.",
    printcolumn(
        name = "Action",
        type_ = "string",
        json_path = ".spec.action",
        description = "Allow or Deny"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mode",
        description = "Enforce or Audit"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the policy is valid and compiled"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status",
        description = "Whether every node that needs the policy has applied it"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].message",
        description = "On how many nodes the policy is programmed",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicySpec {
    /// Pods of this namespace the policy protects (applies to). An empty selector selects every
    /// pod of the namespace.
    #[serde(default)]
    #[schemars(schema_with = "crate::label_selector_schema")]
    pub selector: LabelSelector,

    /// What a matching connection gets: `Allow` (default) or `Deny`. A connection that matches
    /// any rule of a Deny policy selecting the pod is dropped, whatever an Allow policy says.
    #[serde(default)]
    pub action: PolicyAction,

    /// `Enforce` (default) drops what the policy denies. `Audit` computes the same verdicts and
    /// reports them as audit flow events, but never drops a packet.
    #[serde(default)]
    pub mode: PolicyMode,

    /// Rules for connections arriving at the selected pods. Enforced on the destination's node.
    /// Omitted or empty: the policy says nothing about ingress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub ingress: Vec<IngressRule>,

    /// Rules for connections the selected pods open. Enforced on the source's node. Omitted or
    /// empty: the policy says nothing about egress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_RULES))]
    pub egress: Vec<EgressRule>,
}

/// Whether matching traffic is allowed or denied.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    // Matching connections pass; selected pods become default-deny in the rule directions.
    #[default]
    Allow,
    // Matching connections are dropped, whatever allows them.
    Deny,
}

/// Whether verdicts are enforced or only reported.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PolicyMode {
    // Verdicts drop packets.
    #[default]
    Enforce,
    // Verdicts are reported (audit flow events) and nothing is dropped.
    Audit,
}

/// A rule for connections arriving at the selected pods.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Peers the connection may come from. Each entry names exactly one kind of peer. Omitted
    /// or empty: any peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub from: Vec<Peer>,

    /// Destination ports (on the selected pods) the rule covers. Omitted or empty: every port
    /// and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<PortSpec>,
}

/// A rule for connections the selected pods open.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    /// Peers the connection may go to. Each entry names exactly one kind of peer. Omitted or
    /// empty: any peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub to: Vec<Peer>,

    /// Destination ports (on the peer) the rule covers. For a Service, these are the ports of
    /// the backend pods, after load balancing. Omitted or empty: every port and protocol.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<PortSpec>,
}

/// One peer of a rule. Exactly one of `identity`, `serviceAccount`, `namespaceSelector` and
/// `ipBlock` must be set.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "[has(self.identity), has(self.serviceAccount), has(self.namespaceSelector), has(self.ipBlock)].filter(x, x).size() == 1"
).message("exactly one of identity, serviceAccount, namespaceSelector or ipBlock must be set in a peer"))]
pub struct Peer {
    /// A ServiceIdentity: `<name>` for one in the policy's namespace, or `<namespace>/<name>`.
    /// Matches the pods that carry that identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::REF_PATTERN), length(max = 317))]
    pub identity: Option<String>,

    /// The implicit identity of a service account: `<name>` for one in the policy's namespace,
    /// or `<namespace>/<name>`. Matches pods running as that service account that no
    /// ServiceIdentity claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::REF_PATTERN), length(max = 317))]
    pub service_account: Option<String>,

    /// Every identity of the pods in the namespaces whose labels match. An empty selector
    /// matches every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::label_selector_schema")]
    pub namespace_selector: Option<LabelSelector>,

    /// Addresses outside the cluster's pods (the `world` identity), by IPv4 CIDR. Pod addresses
    /// inside the block are not matched by it: pods are matched by identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A block of IPv4 addresses.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("isCIDR(self.cidr) && cidr(self.cidr).ip().family() == 4")
        .message("cidr must be an IPv4 CIDR such as 10.0.0.0/8 (the v1alpha1 datapath is IPv4-only)")
        .field_path(".cidr"),
    validation = Rule::new("!isCIDR(self.cidr) || cidr(self.cidr) == cidr(self.cidr).masked()")
        .message("cidr must not have host bits set (write 10.0.0.0/8, not 10.0.0.1/8)")
        .field_path(".cidr"),
    validation = Rule::new(
        "!has(self.except) || !isCIDR(self.cidr) || self.except.all(e, isCIDR(e) && cidr(e).ip().family() == 4 && cidr(self.cidr).containsCIDR(e) && cidr(e).prefixLength() > cidr(self.cidr).prefixLength())"
    )
        .message("every except entry must be an IPv4 CIDR strictly inside cidr")
        .field_path(".except"),
)]
pub struct IpBlock {
    /// The block, as an IPv4 CIDR with no host bits set (for example `203.0.113.0/24`;
    /// `0.0.0.0/0` for every address).
    #[schemars(length(min = 9, max = 18))]
    pub cidr: String,

    /// CIDRs inside `cidr` that the peer does not cover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(max = 18)))]
    pub except: Vec<String>,
}

/// A destination port or port range of one protocol.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.endPort) || self.endPort >= self.port")
    .message("endPort must be greater than or equal to port")
    .field_path(".endPort"))]
pub struct PortSpec {
    /// The destination port, 1-65535; with `endPort`, the first port of the range.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// The last port of an inclusive range starting at `port`. Must be at least `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,

    /// The L4 protocol: `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// L4 protocol of a port.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// Observed state of a MeshPolicy, written by the operator.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` (False with a reason for semantic errors), `ResolvedRefs` (False naming each
    /// reference that points at nothing) and `Programmed` ("programmed on N/M nodes", from the
    /// agents' reports; never True for a generation that is not in force).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The generation the mesh enforces and its spec: the last generation the operator
    /// accepted. While a newer generation is invalid, this one stays in force (also across
    /// operator restarts, which is why it is recorded here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<InForce>,
}

/// The generation of a MeshPolicy in force, with its spec.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InForce {
    /// Its `metadata.generation`.
    pub generation: i64,
    /// The spec of that generation.
    pub spec: MeshPolicySpec,
}
