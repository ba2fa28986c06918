//! `ServiceIdentity`: a named workload identity. Identity model: docs/policy.md.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// ServiceIdentity names a workload identity: the pods of its namespace that match `selector`
/// (and, if set, run as one of `serviceAccounts`) carry it. Policies refer to it by name; the
/// kernel enforces by the numeric id the operator allocates. When several ServiceIdentities
/// select a pod the oldest wins and the others report `Conflict`.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "mesh.cortexflow.io",
    version = "v1alpha1",
    kind = "ServiceIdentity",
    plural = "serviceidentities",
    shortname = "sid",
    category = "cortexflow",
    namespaced,
    status = "ServiceIdentityStatus",
    label("app.kubernetes.io/part-of", "cortexflow"),
    derive = "PartialEq",
    derive = "Default",
    doc = "ServiceIdentity names a CortexFlow workload identity carried by the selected pods of its namespace. See docs/policy.md.",
    printcolumn(
        name = "ID",
        type_ = "integer",
        json_path = ".status.id",
        description = "Numeric identity enforced in the kernel"
    ),
    printcolumn(
        name = "Endpoints",
        type_ = "integer",
        json_path = ".status.endpoints",
        description = "Pods carrying the identity"
    ),
    printcolumn(
        name = "mTLS",
        type_ = "string",
        json_path = ".spec.mtls",
        description = "Disabled, Permissive or Strict"
    ),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status",
        description = "Whether the identity is allocated",
        priority = 1
    ),
    printcolumn(
        name = "SPIFFE",
        type_ = "string",
        json_path = ".status.spiffeId",
        priority = 1,
        description = "SPIFFE id of the identity"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIdentitySpec {
    /// Pods of this namespace that carry the identity. An empty selector selects every pod of
    /// the namespace.
    #[schemars(schema_with = "crate::label_selector_schema")]
    pub selector: LabelSelector,

    /// If set, a pod must also run as one of these service accounts (of this namespace) to
    /// carry the identity: labels alone can be set by anyone who can create a pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 32),
        inner(regex(pattern = crate::NAME_PATTERN), length(max = 253)),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub service_accounts: Vec<String>,

    /// Mutual TLS for traffic to these pods: `Disabled` (default), `Permissive` (the proxy
    /// accepts mTLS and plaintext) or `Strict` (plaintext to the pods' app ports is dropped in
    /// the kernel and traffic must come through the proxy; wave 2).
    #[serde(default)]
    pub mtls: MtlsMode,
}

/// Mutual TLS mode of an identity.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    // No proxy; L3/L4 policy in the kernel only.
    #[default]
    Disabled,
    // The proxy accepts both mTLS and plaintext.
    Permissive,
    // Plaintext is dropped in the kernel; traffic must come through the proxy.
    Strict,
}

/// Observed state of a ServiceIdentity, written by the operator.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceIdentityStatus {
    /// The numeric identity the kernel enforces (256 and up; 0-255 are reserved). Stable for the
    /// life of the object, unique in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 256, max = 4294967295u32), extend("format" = "int64"))]
    pub id: Option<u32>,

    /// The SPIFFE id of the identity: `spiffe://<trustDomain>/ns/<namespace>/sid/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,

    /// How many pods carry the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<i32>,

    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Accepted` (the identity is allocated), `Conflict` (True when some selected pods are
    /// claimed by an older ServiceIdentity; the message names it) and `MTLS` (whether
    /// `spec.mtls` is honoured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::conditions_schema")]
    pub conditions: Vec<Condition>,
}
