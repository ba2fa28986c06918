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
//! * [`state`] — the merged config stream, and the desired datapath state it implies.
//! * [`ifaces`] — finding a pod's host-side interface from the node's routes.
//! * [`worker`] — the datapath thread (in the node's namespace): apply, attach, retry.
//! * [`flows`] — ring buffer → metrics and `Flows.Observe`; [`flows_auth`] — who may read them.
//! * [`metrics`] — the agent's Prometheus metrics.
//! * [`identity`] — the node certificate from the operator's CA, and the control channel's mTLS.
//! * [`control`] — the config stream, status reports and the periodic work, as supervised tasks.
//! * [`daemon`] — flags, and the supervised tasks of the `cortexflow-agent` process.
//!
//! This crate is kernel-facing: `sys` holds the only `unsafe` (three `bpf(2)` commands).

pub mod cni;
pub mod compile;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod flows;
pub mod flows_auth;
pub mod identity;
pub mod ifaces;
pub mod kernel;
pub mod loader;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod state;
pub(crate) mod sys;
pub mod worker;

pub use daemon::{Args, run};
