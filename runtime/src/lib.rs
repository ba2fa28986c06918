//! Runtime plumbing shared by the CortexFlow daemons (operator, agent).
//!
//! * [`init_logging`] — `tracing` to stderr, plain or JSON, filter from `RUST_LOG` or a flag.
//! * [`Metrics`] — an OpenTelemetry meter whose instruments are exported in the Prometheus text
//!   format (opentelemetry-prometheus); metric names carry the `cortexflow_` prefix, counters end
//!   in `_total`, durations are histograms in seconds.
//! * [`Readiness`] — ready only once every registered start-up task said it is done.
//! * [`serve_admin`] — the admin HTTP server: `/metrics`, `/healthz`, `/readyz`, on its own port,
//!   away from the data path.
//! * [`shutdown_signal`] — resolves on SIGTERM or Ctrl-C.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;

/// Log format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?} is neither plain nor json")),
        }
    }
}

/// Installs the global `tracing` subscriber. `level` is an env-filter directive (e.g. `info`,
/// `cortexflow_operator=debug`), overridden by `RUST_LOG` when set.
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The metrics of one daemon.
#[derive(Clone)]
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
}

impl Metrics {
    /// A meter provider exporting to a fresh Prometheus registry; instruments get the
    /// `cortexflow_` prefix.
    pub fn new(component: &'static str) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .with_namespace("cortexflow")
            .without_target_info()
            .without_units()
            .scope_info_enabled(false)
            .build()?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter(component);
        Ok(Self {
            registry,
            provider,
            meter,
        })
    }

    /// The meter to create instruments from.
    pub fn meter(&self) -> &Meter {
        &self.meter
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        if let Err(e) = encoder.encode_utf8(&families, &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }

    /// Flushes and stops the provider.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// Readiness: ready once every registered task has finished starting.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<&'static str>>>);

impl Readiness {
    /// Registers a start-up task; the daemon is not ready until it is done.
    pub fn register(&self, task: &'static str) -> ReadyGuard {
        if let Ok(mut s) = self.0.lock() {
            s.insert(task);
        }
        ReadyGuard {
            readiness: self.clone(),
            task,
        }
    }

    /// Whether every registered task is done.
    pub fn is_ready(&self) -> bool {
        self.0.lock().map(|s| s.is_empty()).unwrap_or(false)
    }

    /// The tasks still starting.
    pub fn pending(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }
}

/// Marks its task done when [`ReadyGuard::done`] is called.
pub struct ReadyGuard {
    readiness: Readiness,
    task: &'static str,
}

impl ReadyGuard {
    /// The task is done starting.
    pub fn done(self) {
        if let Ok(mut s) = self.readiness.0.lock() {
            s.remove(self.task);
        }
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    readiness: Readiness,
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.readiness.is_ready() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: waiting for {}\n",
                s.readiness.pending().join(", ")
            ),
        )
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` resolves. Returns the
/// address actually bound (useful with port 0).
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok((local, task))
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_prefix_and_counter_suffix() {
        let m = Metrics::new("test").unwrap();
        let c = m.meter().u64_counter("widgets").build();
        c.add(3, &[opentelemetry::KeyValue::new("kind", "a")]);
        let h = m.meter().f64_histogram("wait_seconds").build();
        h.record(0.25, &[]);
        let text = m.render();
        assert!(
            text.contains("cortexflow_widgets_total{kind=\"a\"} 3"),
            "{text}"
        );
        assert!(text.contains("cortexflow_wait_seconds_bucket"), "{text}");
    }

    #[test]
    fn readiness_waits_for_every_task() {
        let r = Readiness::default();
        let a = r.register("a");
        let b = r.register("b");
        assert!(!r.is_ready());
        a.done();
        assert_eq!(r.pending(), vec!["b"]);
        b.done();
        assert!(r.is_ready());
    }
}
