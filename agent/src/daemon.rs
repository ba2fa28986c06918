//! The agent process: flags, and the tasks that join the operator to the datapath.
//!
//! * **subscription** — one `AgentConfig.Subscribe` stream at a time; every message is validated
//!   (`TryFrom`) and merged ([`Received`]), then programmed by the datapath thread. Retryable
//!   errors reconnect with exponential backoff; fatal ones end the process (see [`classify`]).
//! * **reports** — `AgentConfig.ReportStatus`: after every apply or refusal, and every
//!   `--report-interval`.
//! * **flows** — the ring buffer → metrics and `Flows.Observe` (on `--grpc-addr`).
//! * **usage** — map usage and kernel counters → metrics, every few seconds.
//! * **admin** — `/metrics`, `/healthz`, `/readyz` (ready once the first config is in the kernel).
//!
//! Shutdown (SIGTERM) stops the tasks and leaves every pin: the kernel goes on enforcing the last
//! programmed state until the next agent takes over.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use cortexflow_domain::{self as domain, AgentStatus};
use cortexflow_proto::agent::v1::{self, agent_config_client::AgentConfigClient};
use cortexflow_runtime::{LogFormat, Metrics, Readiness};
use opentelemetry::KeyValue;
use tokio::sync::{broadcast, mpsc, watch};
use tonic::{Code, transport::Channel};

use crate::{
    datapath::{Capacity, DatapathOptions, TcMode},
    flows::{self, FlowsService},
    metrics::AgentMetrics,
    state::Received,
    worker::{Applied, Notice, Refused, Worker, WorkerOptions},
};

/// Flags of the agent; every flag also reads an environment variable.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about = "CortexFlow node agent: programs the eBPF datapath from the operator's config"
)]
pub struct Args {
    /// Name of the node this agent serves (its Kubernetes Node). Required.
    #[arg(long, env = "CORTEXFLOW_NODE_NAME", default_value = "")]
    pub node_name: String,
    /// The operator's gRPC endpoint (e.g. `http://cortexflow-operator.cortexflow:8090`).
    /// Required.
    #[arg(long, env = "CORTEXFLOW_OPERATOR", default_value = "")]
    pub operator: String,
    /// Remove every pin under `--pin-dir` (detaching the programs and freeing the maps: the
    /// node stops enforcing) and exit. For removing CortexFlow from a node.
    #[arg(long)]
    pub uninstall: bool,
    /// Address of this agent's gRPC server (`Flows.Observe`).
    #[arg(long, env = "CORTEXFLOW_GRPC_ADDR", default_value = "0.0.0.0:8091")]
    pub grpc_addr: SocketAddr,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "CORTEXFLOW_ADMIN_ADDR", default_value = "0.0.0.0:9091")]
    pub admin_addr: SocketAddr,
    /// bpffs directory for the maps and links.
    #[arg(long, env = "CORTEXFLOW_PIN_DIR", default_value = cortexflow_common::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// cgroup v2 directory whose sockets get Service load balancing (the node's pods' root;
    /// empty: no socket load balancing).
    #[arg(long, env = "CORTEXFLOW_CGROUP_ROOT", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Network namespace of the node (a path such as `/run/netns/node-1`); by default the
    /// agent's own. Only interface lookups and TC attachment happen there.
    #[arg(long, env = "CORTEXFLOW_NETNS")]
    pub netns: Option<PathBuf>,
    /// TC attachment: auto (tcx on 6.6+, else clsact), tcx or clsact.
    #[arg(long, env = "CORTEXFLOW_TC_MODE", default_value = "auto")]
    pub tc_mode: TcModeArg,
    /// Report allowed new flows too (drops and audit verdicts always are).
    #[arg(long, env = "CORTEXFLOW_FLOW_EVENTS_ALLOWED", default_value_t = true, action = clap::ArgAction::Set)]
    pub flow_events_allowed: bool,
    /// Map capacities (entries); pinned maps of another size are refused at start.
    #[arg(long, env = "CORTEXFLOW_MAP_ENDPOINTS", default_value_t = Capacity::default().endpoints)]
    pub map_endpoints: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_IPCACHE", default_value_t = Capacity::default().ipcache)]
    pub map_ipcache: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_CIDRS", default_value_t = Capacity::default().cidrs)]
    pub map_cidrs: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_POLICY", default_value_t = Capacity::default().policy)]
    pub map_policy: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_POLICY_EXACT", default_value_t = Capacity::default().policy_exact)]
    pub map_policy_exact: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_CONNTRACK", default_value_t = Capacity::default().conntrack)]
    pub map_conntrack: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_SERVICES", default_value_t = Capacity::default().services)]
    pub map_services: u32,
    #[arg(long, env = "CORTEXFLOW_MAP_BACKENDS", default_value_t = Capacity::default().backends)]
    pub map_backends: u32,
    /// Largest config message accepted from the operator, in bytes.
    #[arg(long, env = "CORTEXFLOW_MAX_CONFIG_BYTES", default_value_t = 64 << 20)]
    pub max_config_bytes: usize,
    /// Seconds between status reports when nothing changes.
    #[arg(long, env = "CORTEXFLOW_REPORT_INTERVAL_SECS", default_value_t = 30)]
    pub report_interval_secs: u64,
    /// Longest wait between reconnection attempts, in milliseconds.
    #[arg(long, env = "CORTEXFLOW_MAX_BACKOFF_MS", default_value_t = 10_000)]
    pub max_backoff_ms: u64,
    /// Log filter (overridden by RUST_LOG).
    #[arg(long, env = "CORTEXFLOW_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "CORTEXFLOW_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// `--tc-mode`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TcModeArg {
    Auto,
    Tcx,
    Clsact,
}

impl Args {
    fn capacity(&self) -> Capacity {
        Capacity {
            endpoints: self.map_endpoints,
            ipcache: self.map_ipcache,
            cidrs: self.map_cidrs,
            policy: self.map_policy,
            policy_exact: self.map_policy_exact,
            conntrack: self.map_conntrack,
            services: self.map_services,
            backends: self.map_backends,
            ..Capacity::default()
        }
    }
}

/// A gRPC error the agent cannot fix by retrying: its request is wrong, it is not allowed, or
/// the server does not speak this API. Everything else (the operator restarting, the network,
/// overload, a message too large for `--max-config-bytes`) is retried with backoff.
pub fn classify(s: &tonic::Status) -> Retry {
    match s.code() {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::Unimplemented
        | Code::FailedPrecondition => Retry::Fatal,
        _ => Retry::Retryable,
    }
}

/// Whether an error is worth retrying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    Retryable,
    Fatal,
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Self {
            base,
            max,
            attempt: 0,
            seed,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next wait: uniformly random in [cap/2, cap], cap = base·2^attempt up to max.
    pub fn next_wait(&mut self) -> Duration {
        let cap = self
            .base
            .saturating_mul(1 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift: no dependency for a little jitter.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = cap / 2;
        half + Duration::from_nanos(self.seed % (half.as_nanos() as u64 + 1))
    }
}

/// What the agent reports, kept current by the subscription.
#[derive(Clone, Debug, Default)]
struct Reported {
    status: AgentStatus,
}

struct Ctx {
    args: Args,
    worker: Worker,
    metrics: AgentMetrics,
    config: watch::Sender<Arc<Received>>,
    report: watch::Sender<Reported>,
    ready: std::sync::Mutex<Option<cortexflow_runtime::ReadyGuard>>,
    shutdown: watch::Receiver<bool>,
}

/// Runs the agent until SIGTERM/Ctrl-C (or a fatal error).
pub async fn run(args: Args) -> anyhow::Result<()> {
    cortexflow_runtime::init_logging(&args.log, args.log_format);
    if args.uninstall {
        crate::datapath::Datapath::uninstall(&args.pin_dir)?;
        tracing::info!(pin_dir = %args.pin_dir.display(), "removed every pin; the node no longer enforces");
        return Ok(());
    }
    anyhow::ensure!(
        !args.node_name.is_empty(),
        "--node-name (CORTEXFLOW_NODE_NAME) is required"
    );
    anyhow::ensure!(
        !args.operator.is_empty(),
        "--operator (CORTEXFLOW_OPERATOR) is required"
    );
    let telemetry = Metrics::new("agent")?;
    let metrics = AgentMetrics::new(&telemetry);
    let readiness = Readiness::default();
    let ready = readiness.register("first config in the kernel");
    let (shutdown_tx, shutdown) = watch::channel(false);

    let opts = WorkerOptions {
        datapath: DatapathOptions {
            pin_dir: args.pin_dir.clone(),
            capacity: args.capacity(),
            tc_mode: match args.tc_mode {
                TcModeArg::Auto => TcMode::Auto,
                TcModeArg::Tcx => TcMode::Tcx,
                TcModeArg::Clsact => TcMode::Clsact,
            },
        },
        netns: args.netns.clone(),
        cgroup_root: (!args.cgroup_root.as_os_str().is_empty()).then(|| args.cgroup_root.clone()),
        events_allowed: args.flow_events_allowed,
        retry_interval: Duration::from_secs(1),
    };
    let started = tokio::task::spawn_blocking(move || Worker::start(opts))
        .await
        .context("datapath thread")?
        .context("open the datapath")?;
    tracing::info!(
        node = %args.node_name,
        pin_dir = %args.pin_dir.display(),
        tcx = started.tcx,
        "datapath open (pinned state, if any, stays enforced until the first config)"
    );

    let (config_tx, config_rx) = watch::channel(Arc::new(Received::default()));
    let (report_tx, _) = watch::channel(Reported {
        status: AgentStatus {
            node: args.node_name.clone(),
            ..Default::default()
        },
    });
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        worker: started.worker,
        metrics: metrics.clone(),
        config: config_tx,
        report: report_tx,
        ready: std::sync::Mutex::new(Some(ready)),
        shutdown: shutdown.clone(),
    });

    // Flows.
    let (hub, _) = broadcast::channel(4096);
    let flow_task = tokio::spawn(flows::pump(
        started.events,
        config_rx,
        args.node_name.clone(),
        metrics.clone(),
        hub.clone(),
        shutdown.clone(),
    ));
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("bind gRPC {}", args.grpc_addr))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, "serving Flows.Observe");
    let mut grpc_shutdown = shutdown.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FlowsService::new(hub, shutdown.clone()).into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                async move {
                    let _ = grpc_shutdown.changed().await;
                },
            ),
    );

    // Admin.
    let mut admin_shutdown = shutdown.clone();
    let (admin_addr, admin_task) = cortexflow_runtime::serve_admin(
        args.admin_addr,
        telemetry.clone(),
        readiness,
        async move {
            let _ = admin_shutdown.changed().await;
        },
    )
    .await
    .with_context(|| format!("bind admin {}", args.admin_addr))?;
    tracing::info!(addr = %admin_addr, "serving /metrics, /healthz, /readyz");

    tokio::spawn(usage_loop(ctx.clone()));
    tokio::spawn(notices_loop(ctx.clone(), started.notices));
    tokio::spawn(report_loop(ctx.clone()));
    let mut subscription = tokio::spawn(subscribe_loop(ctx.clone()));

    let result = tokio::select! {
        _ = cortexflow_runtime::shutdown_signal() => {
            tracing::info!("shutting down; the datapath keeps enforcing the last programmed state");
            Ok(())
        }
        r = &mut subscription => match r {
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(()),
            Err(e) => Err(anyhow::anyhow!("subscription task: {e}")),
        },
    };
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = grpc_task.await;
        let _ = admin_task.await;
        let _ = flow_task.await;
    })
    .await;
    telemetry.shutdown();
    // Dropping the context ends the datapath thread; pins stay.
    drop(ctx);
    result
}

async fn connect(ctx: &Ctx) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(ctx.args.operator.clone())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
}

/// Holds the config stream up until shutdown; returns an error only when it is fatal.
async fn subscribe_loop(ctx: Arc<Ctx>) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(ctx.args.max_backoff_ms.max(100)),
    );
    let mut shutdown = ctx.shutdown.clone();
    let mut lost_at: Option<Instant> = None;
    loop {
        match session(&ctx, &mut backoff, &mut lost_at).await {
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
            _ = shutdown.changed() => return Ok(()),
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
    let mut shutdown = ctx.shutdown.clone();
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            node: ctx.args.node_name.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await?
        .into_inner();
    let connected_at = Instant::now();
    ctx.metrics.operator_connected.record(1, &[]);
    tracing::info!(operator = %ctx.args.operator, "config stream open");
    let mut received = Received::default();
    let mut synced = false;
    loop {
        let first = tokio::select! {
            m = stream.message() => m?,
            _ = shutdown.changed() => return Ok(()),
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
async fn notices_loop(ctx: Arc<Ctx>, mut notices: mpsc::Receiver<Notice>) {
    while let Some(n) = notices.recv().await {
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
async fn report_loop(ctx: Arc<Ctx>) {
    let mut backoff = Backoff::new(
        Duration::from_millis(100),
        Duration::from_millis(ctx.args.max_backoff_ms.max(100)),
    );
    let mut shutdown = ctx.shutdown.clone();
    let interval = Duration::from_secs(ctx.args.report_interval_secs.max(1));
    loop {
        if let Ok(channel) = connect(&ctx).await {
            let mut client = AgentConfigClient::new(channel);
            let (tx, rx) = mpsc::channel::<v1::AgentStatus>(4);
            let call = tokio::spawn(async move {
                client
                    .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
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
                    r = changes.changed() => if r.is_err() { return },
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => return,
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
            _ = shutdown.changed() => return,
        }
    }
}

/// Map usage and kernel counters into the metrics; conntrack is walked every 30 s.
async fn usage_loop(ctx: Arc<Ctx>) {
    let mut shutdown = ctx.shutdown.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if let Some(u) = ctx.worker.usage(n.is_multiple_of(6)).await {
            ctx.metrics.record_usage(u);
        }
        n += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..8).map(|_| b.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(50) && waits[0] <= Duration::from_millis(100));
        assert!(waits[7] >= Duration::from_secs(1) && waits[7] <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn only_errors_retrying_cannot_fix_are_fatal() {
        for c in [
            Code::InvalidArgument,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            assert_eq!(classify(&tonic::Status::new(c, "")), Retry::Fatal);
        }
        for c in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Cancelled,
        ] {
            assert_eq!(classify(&tonic::Status::new(c, "")), Retry::Retryable);
        }
    }
}
