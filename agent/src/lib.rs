//! The CortexFlow node agent.
//!
//! One agent runs per node (a DaemonSet; in the lab, one per simulated node). It subscribes to
//! the operator for its node's config over gRPC, programs the eBPF maps, attaches the kernel
//! programs to local pods, reports what it applied, and exports flows and metrics.
//!
//! This crate is kernel-facing: the loader talks to the kernel through aya.

pub mod loader;
