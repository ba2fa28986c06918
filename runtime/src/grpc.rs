//! A gRPC server as a supervised task: serves until the drain starts, then finishes the calls
//! in flight (the streams end on the same drain) while it holds the drain up.
use tonic::transport::server::Router;

use crate::drain::Watcher;

/// Serves `router` on `listener` until the drain; the future is the task to register.
pub async fn serve_grpc(
    router: Router,
    listener: tokio::net::TcpListener,
    drain: Watcher,
) -> anyhow::Result<()> {
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            drain.clone().into_signaled(),
        )
        .await?;
    drop(drain);
    Ok(())
}
