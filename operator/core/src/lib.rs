//! The kube-free core of the CortexFlow operator.
//!
//! From plain cluster objects ([`model`]) and the persisted id table ([`alloc`]) the
//! [`engine`] computes, incrementally: every pod's identity, the ServiceIdentity and MeshPolicy
//! statuses, every node's config (its endpoints with their compiled policies), the cluster's
//! address → identity table and the Services with their backends — and, per config stream,
//! what to send next ([`stream`]). No API server, no gRPC: the operator crate feeds it from
//! watches and serves its output.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod engine;
pub mod intern;
pub mod model;
pub mod selector;
pub mod stream;

pub use alloc::{AllocKey, Allocations};
pub use engine::{
    Change, Cond, CondReason, Engine, EngineConfig, IdentityPods, InForce, NodeState, Outcome,
    PolicyStatus, SidStatus, Snapshot, Update,
};
pub use model::{Kind, ObjKey, Object};
pub use stream::Cursor;
