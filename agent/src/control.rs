//! The agent's side of the control channel, and its periodic work: the config stream
//! (subscribe, validate, merge, program), status reports, the datapath thread's notices, map
//! usage. Every loop here is a supervised task of the daemon and ends on the drain.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use cortexflow_domain as domain;
use cortexflow_proto::agent::v1::{self, agent_config_client::AgentConfigClient};
use opentelemetry::KeyValue;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::Instrument as _;

pub use cortexflow_runtime::backoff::{Backoff, Retry, classify};

use crate::{
    daemon::Ctx,
    state::Received,
    worker::{Applied, Notice, Refused},
};

/// The mTLS channel to the operator (once the node certificate is there).
async fn connect(ctx: &Ctx) -> Result<Channel, tonic::transport::Error> {
    ctx.identity.channel(&ctx.identity.operator_tls).await
}

/// Holds the config stream up until shutdown; returns an error only when it is fatal.
pub(crate) async fn subscribe_loop(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(ctx.args.max_backoff_ms.max(100)),
    );
    let shutdown = ctx.shutdown.clone();
    let mut lost_at: Option<Instant> = None;
    if !ctx.identity.wait_ready(&shutdown).await {
        return Ok(());
    }
    loop {
        let span = tracing::info_span!("config stream", operator = %ctx.args.operator);
        match session(&ctx, &mut backoff, &mut lost_at)
            .instrument(span)
            .await
        {
            Ok(()) => tracing::info!("the operator ended the config stream; reconnecting"),
            Err(SessionError::Fatal(e)) => {
                ctx.metrics.operator_connected.record(0, &[]);
                tracing::error!(error = %e, "fatal error from the operator; exiting (the datapath keeps the last state)");
                return Err(anyhow::anyhow!(e));
            }
            Err(SessionError::Retry(e)) => {
                tracing::warn!(error = %e, "config stream failed; retrying (the datapath keeps the last state)")
            }
        }
        ctx.metrics.operator_connected.record(0, &[]);
        lost_at.get_or_insert_with(Instant::now);
        let wait = backoff.next_wait();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = shutdown.signaled() => return Ok(()),
        }
    }
}

enum SessionError {
    Retry(String),
    Fatal(String),
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        let msg = format!("{}: {}", s.code(), s.message());
        match classify(&s) {
            Retry::Fatal => SessionError::Fatal(msg),
            Retry::Retryable => SessionError::Retry(msg),
        }
    }
}

/// One config stream: a full snapshot, then changes, until it ends or fails.
async fn session(
    ctx: &Ctx,
    backoff: &mut Backoff,
    lost_at: &mut Option<Instant>,
) -> Result<(), SessionError> {
    let channel = connect(ctx)
        .await
        .map_err(|e| SessionError::Retry(format!("connect to {}: {e}", ctx.args.operator)))?;
    let mut client =
        AgentConfigClient::new(channel).max_decoding_message_size(ctx.args.max_config_bytes);
    let shutdown = ctx.shutdown.clone();
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            node: ctx.args.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_revision: ctx.programmed_revision.load(Ordering::Relaxed),
        })
        .await?
        .into_inner();
    let connected_at = Instant::now();
    ctx.metrics.operator_connected.record(1, &[]);
    tracing::info!(operator = %ctx.args.operator, "config stream open");
    let mut received = Received::default();
    let mut synced = false;
    let mut held = false;
    loop {
        let first = tokio::select! {
            m = stream.message() => m?,
            () = shutdown.signaled() => return Ok(()),
        };
        let Some(first) = first else {
            return Ok(());
        };
        // Merge everything already waiting, then program once.
        let mut batch = vec![first];
        while let Some(Ok(Some(m))) = futures::FutureExt::now_or_never(stream.message()) {
            batch.push(m);
        }
        for m in batch {
            let version = m.version;
            let merged = domain::NodeConfig::try_from(m).and_then(|c| received.merge(c));
            if let Err(e) = merged {
                ctx.metrics
                    .configs
                    .add(1, &[KeyValue::new("result", "invalid")]);
                tracing::error!(version, error = %e, "invalid config refused; keeping the last good state");
                refused(
                    ctx,
                    Refused {
                        version,
                        error: format!("invalid config: {e}"),
                        capacity: false,
                    },
                );
                // The stream's later changes would build on what was refused: start over with a
                // new snapshot.
                return Err(SessionError::Retry(format!(
                    "invalid config version {version}"
                )));
            }
        }
        // A stream whose state is older than what the kernel holds (a replica that lags behind
        // the one this node last heard from) is merged but not programmed: the kernel keeps the
        // richer state until the stream catches up.
        let kernel = ctx.programmed_revision.load(Ordering::Relaxed);
        if received.revision != 0 && kernel != 0 && received.revision < kernel {
            if !held {
                held = true;
                ctx.metrics
                    .configs
                    .add(1, &[KeyValue::new("result", "stale")]);
                tracing::warn!(
                    stream_revision = received.revision,
                    kernel_revision = kernel,
                    "the operator's state is older than the kernel's; keeping the kernel's until it catches up"
                );
            }
            continue;
        }
        if held {
            held = false;
            tracing::info!(
                revision = received.revision,
                "the operator caught up with the kernel's state"
            );
        }
        let snapshot = Arc::new(received.clone());
        ctx.config.send_replace(snapshot.clone());
        match ctx.worker.apply(snapshot.clone()).await {
            Ok(a) => {
                applied(ctx, &snapshot, a);
                backoff.reset();
                if !synced {
                    synced = true;
                    let resync = connected_at.elapsed();
                    ctx.metrics
                        .resync_duration
                        .record(resync.as_secs_f64(), &[]);
                    match lost_at.take() {
                        Some(t) => tracing::info!(
                            resync_ms = resync.as_secs_f64() * 1e3,
                            without_operator_ms = t.elapsed().as_millis() as u64,
                            "resynced with the operator"
                        ),
                        None => tracing::info!(
                            sync_ms = resync.as_secs_f64() * 1e3,
                            "synced with the operator"
                        ),
                    }
                }
                if let Ok(mut r) = ctx.ready.lock()
                    && let Some(g) = r.take()
                {
                    g.done();
                    tracing::info!(
                        version = snapshot.version,
                        "first config in the kernel; ready"
                    );
                }
            }
            Err(r) => refused(ctx, r),
        }
    }
}

fn applied(ctx: &Ctx, r: &Received, a: Applied) {
    ctx.programmed_revision.store(a.revision, Ordering::Relaxed);
    let m = &ctx.metrics;
    m.configs.add(1, &[KeyValue::new("result", "applied")]);
    m.apply_duration.record(a.duration.as_secs_f64(), &[]);
    m.config_version.record(a.version, &[]);
    m.endpoints.record(
        a.programmed.len() as u64,
        &[KeyValue::new("state", "programmed")],
    );
    m.endpoints
        .record(a.pending.len() as u64, &[KeyValue::new("state", "pending")]);
    m.endpoints
        .record(a.guarded.len() as u64, &[KeyValue::new("state", "guarded")]);
    if a.pending.is_empty() {
        tracing::info!(
            version = a.version,
            endpoints = a.programmed.len(),
            written = a.stats.written,
            deleted = a.stats.deleted,
            generation_bumped = a.stats.generation_bumped,
            ms = a.duration.as_secs_f64() * 1e3,
            "config programmed"
        );
    } else {
        tracing::info!(
            version = a.version,
            endpoints = a.programmed.len(),
            pending = ?a.pending,
            ms = a.duration.as_secs_f64() * 1e3,
            "config programmed; some pods' interfaces are not there yet (retried every second)"
        );
    }
    ctx.report.send_modify(|rep| {
        rep.status.applied_version = a.version;
        rep.status.failed = None;
        rep.status.policies = r.policies();
        rep.status.programmed = a.programmed.into_iter().collect();
        rep.status.programmed_at = a.programmed_at;
    });
}

fn refused(ctx: &Ctx, r: Refused) {
    if r.error.starts_with("invalid config") {
        // Counted by the caller.
    } else {
        ctx.metrics
            .configs
            .add(1, &[KeyValue::new("result", "refused")]);
        tracing::error!(version = r.version, error = %r.error, "config refused; the kernel keeps the last good state");
    }
    ctx.report.send_modify(|rep| {
        rep.status.failed = Some((r.version, r.error.clone()));
    });
}

/// What the datapath thread did on its own (interfaces found on retry).
pub(crate) async fn notices_loop(
    ctx: Arc<Ctx>,
    mut notices: mpsc::Receiver<Notice>,
) -> anyhow::Result<()> {
    loop {
        let n = tokio::select! {
            n = notices.recv() => match n {
                Some(n) => n,
                None => anyhow::bail!("the datapath thread stopped sending notices"),
            },
            () = ctx.shutdown.signaled() => return Ok(()),
        };
        match n {
            Notice::Reapplied(Ok(a)) => {
                let r = ctx.config.borrow().clone();
                applied(&ctx, &r, a);
            }
            Notice::Reapplied(Err(r)) => refused(&ctx, r),
        }
    }
}

/// Sends the status after every change and every report interval; reconnects with backoff.
pub(crate) async fn report_loop(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(ctx.args.max_backoff_ms.max(100)),
    );
    let shutdown = ctx.shutdown.clone();
    let interval = Duration::from_secs(ctx.args.report_interval_secs.max(1));
    if !ctx.identity.wait_ready(&shutdown).await {
        return Ok(());
    }
    loop {
        if let Ok(channel) = connect(&ctx).await {
            let mut client = AgentConfigClient::new(channel);
            let (tx, rx) = mpsc::channel::<v1::AgentStatus>(4);
            let span = tracing::info_span!("report stream", operator = %ctx.args.operator);
            let call = tokio::spawn(
                async move {
                    client
                        .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                }
                .instrument(span),
            );
            let mut changes = ctx.report.subscribe();
            let mut tick = tokio::time::interval(interval);
            loop {
                let status = changes.borrow_and_update().status.clone();
                // Nothing to say before the first apply or refusal.
                if (status.applied_version != 0 || status.failed.is_some())
                    && tx.send(v1::AgentStatus::from(&status)).await.is_err()
                {
                    break;
                }
                backoff.reset();
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return Ok(()) },
                    _ = tick.tick() => {}
                    () = shutdown.signaled() => return Ok(()),
                    _ = tx.closed() => break,
                }
            }
            drop(tx);
            if let Ok(Err(e)) = call.await {
                tracing::debug!(error = %e, "status stream ended");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_wait()) => {}
            () = shutdown.signaled() => return Ok(()),
        }
    }
}

/// Map usage and kernel counters into the metrics; conntrack is walked every 30 s.
pub(crate) async fn usage_loop(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let shutdown = ctx.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.signaled() => return Ok(()),
        }
        if let Some(u) = ctx.worker.usage(n.is_multiple_of(6)).await {
            ctx.metrics.record_usage(u);
        }
        n += 1;
    }
}
