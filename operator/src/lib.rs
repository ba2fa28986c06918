//! The CortexFlow operator (control plane).
//!
//! A kube-runtime controller that watches MeshPolicy, ServiceIdentity, Pod, Namespace, Service,
//! EndpointSlice and Node; allocates numeric identities; compiles policies into per-node configs;
//! streams them to the node agents over gRPC (`cortexflow.agent.v1.AgentConfig`); and writes
//! status conditions on the CRs. Only the holder of the leader Lease writes status; every replica
//! serves gRPC. Built in the operator issue; today the crate only links the CRD types.
#![forbid(unsafe_code)]

pub use cortexflow_crds as crds;
