//! The agent process: flags, and the tasks that join the operator to the datapath, each one
//! registered with the supervisor (`cortexflow_runtime::Supervisor`): if any ends or panics,
//! the process exits non-zero and Kubernetes restarts it — the pins keep enforcing meanwhile.
//!
//! * **datapath** — the datapath thread (`worker`), in the node's network namespace.
//! * **subscription** — one `AgentConfig.Subscribe` stream at a time; every message is validated
//!   (`TryFrom`) and merged ([`Received`]), then programmed by the datapath thread. Retryable
//!   errors reconnect with exponential backoff; fatal ones end the process (see
//!   [`control::classify`]).
//! * **identity** — the node certificate: obtained from the operator's CA with the projected
//!   token, renewed at half-life (`identity`); the control channel waits for it.
//! * **reports** — `AgentConfig.ReportStatus`: after every apply or refusal, and every
//!   `--report-interval`.
//! * **notices** — what the datapath thread did on its own (interfaces found on retry).
//! * **flows** — the ring buffer → metrics and `Flows.Observe`: **grpc** on `--grpc-addr`
//!   (TLS, callers authorized through the Kubernetes API, `flows_auth`) and **flows socket**
//!   (`--flows-socket`, root on the node).
//! * **usage** — map usage and kernel counters → metrics, every few seconds.
//! * **admin** — `/metrics`, `/healthz`, `/readyz` (ready once the first config is in the kernel).
//!
//! Shutdown (SIGTERM) drains the tasks and leaves every pin: the kernel goes on enforcing the
//! last programmed state until the next agent takes over.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use cortexflow_domain::AgentStatus;
use cortexflow_runtime::{Exit, LogFormat, Metrics, Readiness, Supervisor, drain};
use tokio::sync::watch;

use crate::{
    control,
    datapath::{Capacity, DatapathOptions, TcMode},
    flows::{self, FlowsService},
    metrics::AgentMetrics,
    state::Received,
    worker::{Worker, WorkerOptions},
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
    /// The operator's gRPC endpoint, always over mTLS (e.g. `cortexflow-operator.cortexflow:8090`;
    /// an `https://` or `http://` prefix is accepted and ignored).
    /// Required.
    #[arg(long, env = "CORTEXFLOW_OPERATOR", default_value = "")]
    pub operator: String,
    /// The projected ServiceAccount token (audience `cortexflow-ca`) the node certificate is
    /// obtained with; read again at every renewal.
    #[arg(
        long,
        env = "CORTEXFLOW_TOKEN_FILE",
        default_value = "/var/run/secrets/cortexflow/token"
    )]
    pub token_file: PathBuf,
    /// The trust bundle (PEM) the operator's certificate is verified with until the operator
    /// sends a newer one (the `cortexflow-ca-bundle` ConfigMap, mounted).
    #[arg(
        long,
        env = "CORTEXFLOW_TRUST_BUNDLE",
        default_value = "/etc/cortexflow/ca/ca.crt"
    )]
    pub trust_bundle: PathBuf,
    /// SPIFFE trust domain of the mesh.
    #[arg(long, env = "CORTEXFLOW_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// `Flows.Observe` for root on the node, without further checks (a Unix socket, mode 0600).
    #[arg(
        long,
        env = "CORTEXFLOW_FLOWS_SOCKET",
        default_value = "/run/cortexflow/flows.sock"
    )]
    pub flows_socket: PathBuf,
    /// Kubeconfig of the agent's ServiceAccount, for authorizing `Flows.Observe` callers on
    /// `--grpc-addr` (TokenReview, SubjectAccessReview). Default: the in-cluster account;
    /// without either, network callers are refused.
    #[arg(long, env = "CORTEXFLOW_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
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
    /// Unix socket of the CNI hook (`cortexflow-cni`, chained after the pod network's plugin,
    /// asks the agent to guard a new pod's interface before its container starts); none when
    /// unset.
    #[arg(long, env = "CORTEXFLOW_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,
    /// Largest config message accepted from the operator, in bytes.
    #[arg(long, env = "CORTEXFLOW_MAX_CONFIG_BYTES", default_value_t = 64 << 20)]
    pub max_config_bytes: usize,
    /// Seconds between status reports when nothing changes.
    #[arg(long, env = "CORTEXFLOW_REPORT_INTERVAL_SECS", default_value_t = 30)]
    pub report_interval_secs: u64,
    /// Longest wait between reconnection attempts, in milliseconds (jittered; short, so that
    /// a restarted operator has its agents back within about this long).
    #[arg(long, env = "CORTEXFLOW_MAX_BACKOFF_MS", default_value_t = 2_000)]
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

/// What the agent reports, kept current by the subscription.
#[derive(Clone, Debug, Default)]
pub(crate) struct Reported {
    pub(crate) status: AgentStatus,
}

/// What the tasks share.
pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) worker: Worker,
    pub(crate) metrics: AgentMetrics,
    /// The config last merged (the flow pump names identities and pods from it).
    pub(crate) config: watch::Sender<Arc<Received>>,
    pub(crate) report: watch::Sender<Reported>,
    /// The cluster revision of the config in the kernel (0: unknown), from the pins at start.
    pub(crate) programmed_revision: std::sync::atomic::AtomicU64,
    pub(crate) ready: std::sync::Mutex<Option<cortexflow_runtime::ReadyGuard>>,
    /// Sees the drain start (without holding it up: every loop is a supervised task).
    pub(crate) shutdown: drain::Signal,
    /// The node certificate and the control channel's mTLS.
    pub(crate) identity: Arc<crate::identity::Identity>,
}

/// How long the agent drains on SIGTERM (streams end, servers finish).
const GRACE: Duration = Duration::from_secs(5);

/// Runs the agent until SIGTERM/Ctrl-C, a fatal error from the operator, or a dead task.
pub async fn run(args: Args) -> anyhow::Result<Exit> {
    cortexflow_runtime::init_logging(&args.log, args.log_format);
    if args.uninstall {
        crate::datapath::Datapath::uninstall(&args.pin_dir)?;
        tracing::info!(pin_dir = %args.pin_dir.display(), "removed every pin; the node no longer enforces");
        return Ok(Exit::Clean);
    }
    anyhow::ensure!(
        !args.node_name.is_empty(),
        "--node-name (CORTEXFLOW_NODE_NAME) is required"
    );
    anyhow::ensure!(
        !args.operator.is_empty(),
        "--operator (CORTEXFLOW_OPERATOR) is required"
    );
    let identity = Arc::new(crate::identity::new(
        &args.node_name,
        &args.trust_domain,
        &args.operator,
        &args.trust_bundle,
        args.token_file.clone(),
    )?);
    let telemetry = Metrics::new("agent")?;
    let metrics = AgentMetrics::new(&telemetry);
    let readiness = Readiness::default();
    let ready = readiness.register("first config in the kernel");
    let (trigger, drain) = drain::channel();
    let mut sup = Supervisor::new();

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
        programmed_revision = started.state.revision,
        "datapath open (pinned state, if any, stays enforced until the first config)"
    );
    {
        let tcx = started.tcx;
        let features = tokio::task::spawn_blocking(move || crate::kernel::probe(tcx))
            .await
            .context("kernel feature probes")?;
        let release = crate::kernel::release();
        for f in features.iter().filter(|f| !f.available) {
            tracing::warn!(
                feature = f.name,
                required = f.required,
                purpose = f.purpose,
                "the kernel does not offer this eBPF feature"
            );
        }
        tracing::info!(
            kernel = %release,
            available = features.iter().filter(|f| f.available).count(),
            probed = features.len(),
            "kernel features probed"
        );
        metrics.record_kernel(&release, &features);
    }

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
        programmed_revision: std::sync::atomic::AtomicU64::new(started.state.revision),
        ready: std::sync::Mutex::new(Some(ready)),
        shutdown: drain.signal(),
        identity: identity.clone(),
    });

    // The datapath thread: a thread, not a task, so its end is watched here (the test hook
    // makes the thread itself panic).
    if let Some(injected) = sup.injected_failure("datapath") {
        let ctx = ctx.clone();
        sup.spawn_startup("datapath failure hook", async move {
            tokio::select! {
                () = injected => ctx.worker.inject_panic(),
                () = ctx.shutdown.signaled() => {}
            }
            Ok(())
        });
    }
    {
        let ended = started.ended;
        let drain = drain.clone();
        sup.spawn("datapath", async move {
            tokio::select! {
                why = ended => anyhow::bail!("the datapath thread {}", why.unwrap_or("is gone")),
                () = drain.signaled() => Ok(()),
            }
        });
    }

    // Flows.
    let hub = flows::FlowHub::new();
    {
        let pump = flows::pump(
            started.events,
            config_rx,
            args.node_name.clone(),
            metrics.clone(),
            hub.clone(),
            drain.clone(),
        );
        sup.spawn("flows", async move { Ok(pump.await?) });
    }
    // Flows.Observe: over TLS with the node certificate on --grpc-addr, each caller authorized
    // through the Kubernetes API; and on the local socket for root on the node.
    let access = match kube_client(&args).await {
        Ok(c) => crate::flows_auth::FlowsAccess::Kubernetes(c),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API: Flows.Observe on the network port refuses every caller (the local socket serves)");
            crate::flows_auth::FlowsAccess::Unavailable(format!("{e:#}"))
        }
    };
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("bind gRPC {}", args.grpc_addr))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, socket = %args.flows_socket.display(), "serving Flows.Observe");
    {
        let router = tonic::transport::Server::builder()
            .add_service(FlowsService::new(hub.clone(), drain.clone(), access).into_server());
        let tls =
            cortexflow_trust::tls::server_config(identity.creds.clone(), identity.trust.clone())?;
        let drain = drain.clone();
        sup.spawn("grpc", async move {
            cortexflow_trust::tls::serve(router, grpc_listener, tls, drain.clone().into_signaled())
                .await?;
            drop(drain);
            Ok(())
        });
    }
    {
        let listener = bind_private_socket(&args.flows_socket)?;
        let router = tonic::transport::Server::builder().add_service(
            FlowsService::new(hub, drain.clone(), crate::flows_auth::FlowsAccess::Local)
                .into_server(),
        );
        let drain = drain.clone();
        let path = args.flows_socket.clone();
        sup.spawn("flows socket", async move {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    drain.clone().into_signaled(),
                )
                .await?;
            let _ = std::fs::remove_file(&path);
            drop(drain);
            Ok(())
        });
    }

    cortexflow_runtime::spawn_admin(
        &mut sup,
        args.admin_addr,
        telemetry.clone(),
        readiness,
        drain.clone(),
    )
    .await?;

    if let Some(path) = &args.cni_socket {
        let listener = crate::cni::bind(path)?;
        tracing::info!(socket = %path.display(), "serving the CNI hook");
        sup.spawn(
            "cni",
            crate::cni::serve(listener, path.clone(), ctx.clone()),
        );
    }
    sup.spawn("usage", control::usage_loop(ctx.clone()));
    sup.spawn(
        "notices",
        control::notices_loop(ctx.clone(), started.notices),
    );
    sup.spawn(
        "identity",
        crate::identity::renew_loop(
            identity,
            drain.signal(),
            Duration::from_millis(args.max_backoff_ms),
            metrics.clone(),
        ),
    );
    sup.spawn("trust bundle", crate::identity::bundle_loop(ctx.clone()));
    sup.spawn("reports", control::report_loop(ctx.clone()));
    sup.spawn("subscription", control::subscribe_loop(ctx.clone()));
    drop(drain);

    let exit = sup.run(trigger, GRACE).await;
    if matches!(exit, Exit::Clean | Exit::Forced) {
        tracing::info!("stopped; the datapath keeps enforcing the last programmed state");
    }
    telemetry.shutdown();
    // Dropping the context ends the datapath thread; pins stay.
    drop(ctx);
    Ok(exit)
}

/// The Kubernetes client of the agent's ServiceAccount: `--kubeconfig`, else in-cluster.
async fn kube_client(args: &Args) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::incluster().context("not in a cluster and no --kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// A Unix socket only its owner (root) may connect to; a stale one is replaced.
fn bind_private_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener =
        tokio::net::UnixListener::bind(path).with_context(|| format!("bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
