//! The CortexFlow control-plane API, package `cortexflow.agent.v1`.
//!
//! `AgentConfig.Subscribe(node) → stream NodeConfig` (full snapshot first, then newer versions)
//! and `AgentConfig.ReportStatus(stream AgentStatus)`. The `.proto` files live in `proto/` and
//! the generated Rust code is checked in, so building needs no `protoc`. Defined in the operator
//! issue.
#![forbid(unsafe_code)]
