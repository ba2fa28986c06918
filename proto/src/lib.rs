//! The CortexFlow gRPC APIs, generated from `proto/cortexflow/**.proto` and checked in
//! (building needs no `protoc`; `cargo xtask protogen` regenerates them and a test fails when
//! they drift from the `.proto` files):
//!
//! * [`agent::v1`] — `cortexflow.agent.v1`: the operator streams each node's config
//!   (`AgentConfig.Subscribe`) and takes the agents' reports (`AgentConfig.ReportStatus`).
//! * [`flows::v1`] — `cortexflow.flows.v1`: every agent's `Flows.Observe`.
//! * [`identity::v1`] — `cortexflow.identity.v1`: the mesh CA's `Certificates.Sign`.
//!
//! [`convert`] turns `cortexflow.agent.v1` messages into the validated types of
//! `cortexflow-domain` and back; it is the only place that does.
#![forbid(unsafe_code)]

pub mod convert;

/// `cortexflow.agent.v1`.
pub mod agent {
    /// Generated code of `cortexflow.agent.v1` (do not edit; `cargo xtask protogen`).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    pub mod v1 {
        include!("gen/cortexflow.agent.v1.rs");
    }
}

/// `cortexflow.flows.v1`.
pub mod flows {
    /// Generated code of `cortexflow.flows.v1` (do not edit; `cargo xtask protogen`).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    pub mod v1 {
        include!("gen/cortexflow.flows.v1.rs");
    }
}

/// `cortexflow.identity.v1`.
pub mod identity {
    /// Generated code of `cortexflow.identity.v1` (do not edit; `cargo xtask protogen`).
    #[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
    pub mod v1 {
        include!("gen/cortexflow.identity.v1.rs");
    }
}
