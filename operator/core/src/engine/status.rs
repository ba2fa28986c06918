//! What the engine says the status of each ServiceIdentity and MeshPolicy should be.

/// The state of a status condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub status: bool,
    pub reason: CondReason,
    pub message: String,
}

impl Cond {
    pub(super) fn new(status: bool, reason: CondReason, message: impl Into<String>) -> Self {
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
    /// ServiceIdentity `MTLS=True`: `spec.mtls` is `Disabled`.
    MtlsDisabled,
    /// ServiceIdentity `MTLS=False`: mTLS asked for, and no proxy to provide it yet.
    ProxyNotAvailable,
}

impl CondReason {
    /// Every reason.
    pub const ALL: [CondReason; 11] = [
        CondReason::Accepted,
        CondReason::Invalid,
        CondReason::ResolvedRefs,
        CondReason::IdentityNotFound,
        CondReason::Pending,
        CondReason::Allocated,
        CondReason::InvalidSelector,
        CondReason::ClaimedByOlderIdentity,
        CondReason::NoConflict,
        CondReason::MtlsDisabled,
        CondReason::ProxyNotAvailable,
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
    pub mtls: Cond,
}

/// What a MeshPolicy's status should say (`Programmed` is the operator's, from agent reports).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyStatus {
    pub generation: i64,
    pub accepted: Cond,
    pub resolved_refs: Cond,
    /// Waiting for its policy number: no status is written yet.
    pub pending: bool,
    /// The generation in force and its spec (`status.inForce`): this generation when it is
    /// accepted, else the last accepted one the status records, else nothing.
    pub in_force: Option<InForce>,
}

/// A generation of a MeshPolicy in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InForce {
    pub generation: i64,
    /// The spec as the API holds it (JSON).
    pub spec_json: std::sync::Arc<str>,
}
