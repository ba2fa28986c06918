//! What every CortexFlow daemon (operator, agent, and the proxy to come) shares at runtime.
//!
//! * [`supervisor`] — every long-running task is registered; if one ends or panics the process
//!   logs why, drains briefly and exits non-zero (Kubernetes restarts it): never a live process
//!   with a dead task.
//! * [`drain`] — one drain primitive: a graceful window with a deadline, then forced; a second
//!   signal exits at once.
//! * [`init_logging`] — `tracing` to stderr, plain or JSON, filter from `RUST_LOG` or a flag.
//! * [`Metrics`] — an OpenTelemetry meter whose instruments are exported in the Prometheus text
//!   format (opentelemetry-prometheus); metric names carry the `cortexflow_` prefix, counters end
//!   in `_total`, durations are histograms in seconds.
//! * [`Readiness`] — ready only once every registered start-up task said it is done.
//! * [`serve_grpc`] — a tonic server as a supervised task that stops on the drain.
//! * [`serve_admin`] — the admin HTTP server: `/metrics`, `/healthz`, `/readyz`, on its own port,
//!   away from the data path.
//! * [`shutdown_signal`] — resolves on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

mod admin;
pub mod backoff;
pub mod drain;
mod grpc;
mod logging;
mod metrics;
mod readiness;
mod signal;
pub mod supervisor;

pub use admin::{serve_admin, spawn_admin};
pub use grpc::serve_grpc;
pub use logging::{LogFormat, init_logging};
pub use metrics::Metrics;
pub use readiness::{Readiness, ReadyGuard};
pub use signal::shutdown_signal;
pub use supervisor::{Exit, Supervisor};
