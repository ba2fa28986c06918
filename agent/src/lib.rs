//! The CortexFlow node agent.
//!
//! One agent runs per node (a DaemonSet; in the lab, one per simulated node). It subscribes to
//! the operator for its node's config over gRPC, programs the eBPF maps, attaches the kernel
//! programs to local pods, reports what it applied, and exports flows and metrics.
//!
//! * [`policy`] — the per-endpoint policy the datapath enforces, and the reference model of the
//!   kernel's decision.
//! * [`compile`] — desired state → exact map contents (policy sets, CIDR identities, backend
//!   tables).
//! * [`datapath`] — load, pin, attach, apply; restart without detaching.
//! * [`loader`] — the embedded kernel object.
//! * [`netns`] — entering a node's network namespace; mounting bpffs.
//!
//! This crate is kernel-facing: `sys` holds the only `unsafe` (two `bpf(2)` commands).

pub mod compile;
pub mod datapath;
pub mod loader;
pub mod netns;
pub mod policy;
mod sys;
