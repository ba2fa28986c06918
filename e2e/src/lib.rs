//! CortexFlow end-to-end suites (`tests/`), each a `harness = false` binary that starts its own
//! real control plane (`cortexflow_lab::harness`) and tears it down:
//!
//! * `crds` — the CRDs as the apiserver serves them: schema, CEL validation, printer columns,
//!   `kubectl explain`, status subresources.
//! * `operator` — the real operator process on the real apiserver: statuses and conditions,
//!   `Programmed` from agent reports, conflicts, events, metrics, ids across restarts, two
//!   replicas and a leader handover, a dead critical task.
//! * `lab` — the whole mesh (`cortexflow_lab::lab::Lab`): real agents, real kernel datapaths,
//!   real traffic between simulated nodes, Prometheus.
//!
//! This library is empty on purpose: what the suites share lives in `cortexflow-lab` and
//! `cortexflow-testkit`.
#![forbid(unsafe_code)]
