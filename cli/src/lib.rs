//! `cfcli`: the CortexFlow command line.
//!
//! * [`connect`] — the cluster as kubectl finds it (kubeconfig, context), the agents' flow
//!   endpoints (the agent DaemonSet's pods, or `--agent NODE=ADDR`), the bearer token and the
//!   trust bundle that `Flows.Observe` on an agent's network port needs (docs/security.md, "Who
//!   reads flows").
//! * [`filter`] — `--from/--to/--verdict/…` as a predicate over flows.
//! * [`flows`] — flows from every node at once, merged by time: the history each agent keeps,
//!   then (with `--follow`) the live streams.
//! * [`explain`] — which MeshPolicy and rule, or which default, decided a connection, from the
//!   rule id the kernel reported with the flow.
//! * [`live`] — the live objects and id table, and the operator's engine built on them.
//! * [`policy_diff`] — before applying, the (source, destination, port) pairs a MeshPolicy
//!   change would allow or deny, from the engine's compilation and the kernel's reference model.
//! * [`identities`] — numeric id ↔ name ↔ SPIFFE id ↔ pods, resolved by the operator's engine.
//! * [`install`] — `install`/`uninstall` through the `helm` binary and the embedded chart, with
//!   the rollout's progress.
//! * [`status`], [`check`] — what the mesh reports about itself (objects and the daemons'
//!   metrics): one screen, and health checks with hints.
#![forbid(unsafe_code)]

pub mod check;
pub mod connect;
pub mod explain;
pub mod filter;
pub mod flows;
pub mod identities;
pub mod install;
pub mod live;
pub mod policy_diff;
pub mod status;

/// Output formats of read commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One line per flow.
    Compact,
    /// One JSON object per line.
    Json,
}
