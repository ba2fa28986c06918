//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, on its own port, away from the
//! data path.
use std::net::SocketAddr;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{Metrics, Readiness, drain::Watcher};

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

/// Binds the admin server on `addr` and registers it with `sup` as the task `admin`; returns
/// the address actually bound.
pub async fn spawn_admin(
    sup: &mut crate::Supervisor,
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    drain: Watcher,
) -> anyhow::Result<SocketAddr> {
    let (local, server) = serve_admin(addr, metrics, readiness, drain)
        .await
        .map_err(|e| anyhow::anyhow!("bind admin {addr}: {e}"))?;
    tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    sup.spawn("admin", server);
    Ok(local)
}

/// Binds `addr` and returns the address actually bound (useful with port 0) and the server, to
/// be run as a supervised task: it serves `/metrics`, `/healthz` and `/readyz` until the drain
/// starts, then finishes the requests in flight.
pub async fn serve_admin(
    addr: SocketAddr,
    metrics: Metrics,
    readiness: Readiness,
    drain: Watcher,
) -> anyhow::Result<(
    SocketAddr,
    impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
)> {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(AdminState { metrics, readiness });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let server = async move {
        let signaled = drain.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { signaled.signaled().await })
            .await?;
        drop(drain);
        Ok(())
    };
    Ok((local, server))
}
