//! The CortexFlow control-plane API, package `cortexflow.agent.v1`.
//!
//! * [`v1`] — the wire types and the tonic client and server, generated from
//!   `proto/cortexflow/agent/v1/agent.proto` and checked in (building needs no `protoc`;
//!   `cargo xtask protogen` regenerates them and a test fails when they drift from the `.proto`).
//! * [`domain`] — what the messages mean, as validated Rust types. The agent turns every message
//!   into these with `TryFrom` and refuses the whole message when any part is invalid; the
//!   operator builds these and converts them into messages.
#![forbid(unsafe_code)]

pub mod domain;

/// Generated code of `cortexflow.agent.v1` (do not edit; `cargo xtask protogen`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod v1 {
    include!("gen/cortexflow.agent.v1.rs");
}
