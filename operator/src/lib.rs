//! The CortexFlow operator (control plane).
//!
//! * [`index`] — watches of MeshPolicy, ServiceIdentity, Pod, Namespace, Service, EndpointSlice,
//!   Node (and the id table) turned into engine changes.
//! * [`store`] — the shared state: the kube-free engine of `cortexflow-operator-core`, agent
//!   reports, observed statuses.
//! * [`grpc`] — the `cortexflow.agent.v1.AgentConfig` server (over any [`grpc::Configs`] and
//!   [`grpc::Reports`]: it knows neither the store nor the lease).
//! * [`lease`] — leader election; [`allocator`], [`status`] and [`readiness`] act only on the
//!   leader.
//! * [`ca`] — the mesh CA: its Secret, `cortexflow.identity.v1.Certificates`, the operator's
//!   own serving certificate and the published trust bundle.
//! * [`metrics`] — the operator's Prometheus metrics.
//!
//! [`run`] wires them, every task supervised (`cortexflow_runtime::Supervisor`): a task that
//! dies ends the process. `main.rs` only parses flags.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod ca;
pub mod grpc;
pub mod index;
pub mod injector;
pub mod lease;
pub mod listwatch;
pub mod metrics;
pub mod readiness;
pub mod status;
pub mod store;
pub mod webhook;

pub use cortexflow_crds as crds;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use cortexflow_domain::AgentStatus;
use cortexflow_operator_core::EngineConfig;
use cortexflow_runtime::{Exit, LogFormat, Metrics, Readiness, Supervisor, drain};
use kube::runtime::events::Reporter;
use tokio::sync::{mpsc, watch};

/// Flags of the operator; every flag also reads an environment variable.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    version,
    about = "CortexFlow operator: identities, policy compilation, per-node config streams, status"
)]
pub struct Args {
    /// Address the gRPC server (agents) listens on.
    #[arg(long, env = "CORTEXFLOW_GRPC_ADDR", default_value = "0.0.0.0:8090")]
    pub grpc_addr: SocketAddr,
    /// Address other replicas reach this replica's gRPC server at (published in the leader
    /// Lease, for report forwarding); defaults to the listen address, or `$POD_IP` with its
    /// port when it listens on every address (never `0.0.0.0`).
    #[arg(long, env = "CORTEXFLOW_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Start a new id table when the one in the cluster is missing or unreadable although
    /// CortexFlow objects carry statuses (every identity is numbered afresh). Without it such a
    /// replica serves nothing until the table is restored.
    #[arg(long, env = "CORTEXFLOW_ID_TABLE_RECREATE", default_value_t = false)]
    pub id_table_recreate: bool,
    /// Address of the admin server (/metrics, /healthz, /readyz).
    #[arg(long, env = "CORTEXFLOW_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    /// Namespace of the operator's own objects (the Lease, the id table).
    #[arg(long, env = "CORTEXFLOW_NAMESPACE", default_value = "cortexflow")]
    pub namespace: String,
    /// This replica's identity in leader election (its pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Name of the leader Lease.
    #[arg(
        long,
        env = "CORTEXFLOW_LEASE_NAME",
        default_value = "cortexflow-operator"
    )]
    pub lease_name: String,
    /// Lease duration: how long a dead leader keeps the lease.
    #[arg(long, env = "CORTEXFLOW_LEASE_DURATION_SECS", default_value_t = 15)]
    pub lease_duration_secs: u64,
    /// Name of the ConfigMap holding the identity table.
    #[arg(
        long,
        env = "CORTEXFLOW_IDENTITIES_CONFIGMAP",
        default_value = "cortexflow-identities"
    )]
    pub identities_configmap: String,
    /// SPIFFE trust domain.
    #[arg(long, env = "CORTEXFLOW_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The Secret (in `--namespace`) with the CA's material: the user's (keys `ca.crt`,
    /// `issuer.crt`, `issuer.key`, optionally `ca.key`), or generated there on first start.
    #[arg(long, env = "CORTEXFLOW_CA_SECRET", default_value = "cortexflow-ca")]
    pub ca_secret: String,
    /// The ConfigMap (in `--namespace`) the trust bundle is published in (key `ca.crt`).
    #[arg(
        long,
        env = "CORTEXFLOW_CA_BUNDLE_CONFIGMAP",
        default_value = "cortexflow-ca-bundle"
    )]
    pub ca_bundle_configmap: String,
    /// The agents' ServiceAccount (in `--namespace`): only its tokens obtain node certificates.
    #[arg(
        long,
        env = "CORTEXFLOW_AGENT_SERVICE_ACCOUNT",
        default_value = "cortexflow-agent"
    )]
    pub agent_service_account: String,
    /// Lifetime of the certificates the CA issues, in seconds (at least 60, at most 7 days).
    #[arg(long, env = "CORTEXFLOW_CERT_LIFETIME_SECS", default_value_t = 86_400)]
    pub cert_lifetime_secs: u64,
    /// How often the CA Secret is read for a rotation (seconds).
    #[arg(long, env = "CORTEXFLOW_CA_POLL_SECS", default_value_t = 10)]
    pub ca_poll_secs: u64,
    /// Address the admission webhook (HTTPS) listens on.
    #[arg(long, env = "CORTEXFLOW_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// The host names the apiserver calls the webhook by (comma-separated; the chart passes
    /// `<release>-operator-webhook.<namespace>.svc`): its serving certificate's DNS names. Without
    /// any, no webhook is served.
    #[arg(long, env = "CORTEXFLOW_WEBHOOK_DNS_NAMES", value_delimiter = ',')]
    pub webhook_dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose webhooks' `caBundle` the leader keeps equal to
    /// the trust bundle.
    #[arg(
        long,
        env = "CORTEXFLOW_WEBHOOK_CONFIGURATION",
        default_value = "cortexflow-injector"
    )]
    pub webhook_configuration: String,
    /// Whether the webhook injects the mTLS proxy into the pods that ask for it (docs/mtls.md).
    /// Off by default: this version has no proxy to run, and a pod that asks for it is admitted
    /// without it, with a warning.
    #[arg(long, env = "CORTEXFLOW_INJECT_PROXY", default_value_t = false, action = clap::ArgAction::Set)]
    pub inject_proxy: bool,
    /// The image of the injected proxy.
    #[arg(
        long,
        env = "CORTEXFLOW_PROXY_IMAGE",
        default_value = concat!("ghcr.io/cortexflow/cortexflow-proxy:", env!("CARGO_PKG_VERSION"))
    )]
    pub proxy_image: String,
    /// Where injected proxies ask the CA for their certificate (`host:port` of this Deployment's
    /// gRPC Service; the chart passes `<release>-operator.<namespace>.svc:<grpcPort>`).
    #[arg(
        long,
        env = "CORTEXFLOW_PROXY_CA_ADDR",
        default_value = "cortexflow-operator.cortexflow.svc:8090"
    )]
    pub proxy_ca_addr: String,
    /// Whether the webhook adds the readiness gate `mesh.cortexflow.io/programmed` to every pod
    /// that is an endpoint.
    #[arg(long, env = "CORTEXFLOW_READINESS_GATE_INJECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub readiness_gate_injection: bool,
    /// Namespaces whose pods the webhook admits unchanged (comma-separated), besides
    /// `--namespace` itself; the chart's MutatingWebhookConfiguration does not even send them.
    #[arg(
        long,
        env = "CORTEXFLOW_WEBHOOK_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system,kube-public,kube-node-lease"
    )]
    pub webhook_exclude_namespaces: Vec<String>,
    /// Log filter (overridden by RUST_LOG).
    #[arg(long, env = "CORTEXFLOW_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "CORTEXFLOW_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// Timeouts of every Kubernetes request but watches and lists.
pub const REQUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a replica drains on SIGTERM: streams end, the Lease is released, servers finish.
const GRACE: Duration = Duration::from_secs(10);

/// Runs the operator until SIGTERM/Ctrl-C, or until one of its tasks dies.
pub async fn run(args: Args) -> anyhow::Result<Exit> {
    cortexflow_runtime::init_logging(&args.log, args.log_format);
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("cortexflow-operator-{}", std::process::id()));
    // Two clients: watches and lists (long-lived reads; `listwatch` bounds them with its own
    // deadlines), and every other request — Lease, id table, status, readiness gates, events —
    // with a connect, read and write timeout, so that no request can hang a task.
    let config = kube::Config::infer()
        .await
        .context("find the Kubernetes API (in-cluster or a kubeconfig)")?;
    let watch_client =
        kube::Client::try_from(config.clone()).context("a client of the Kubernetes API")?;
    let mut request_config = config;
    request_config.connect_timeout = Some(REQUEST_CONNECT_TIMEOUT);
    request_config.read_timeout = Some(REQUEST_TIMEOUT);
    request_config.write_timeout = Some(REQUEST_TIMEOUT);
    // The read timeout counts from the request, not from when a pooled connection went idle.
    request_config.reset_reader_on_write = true;
    let client =
        kube::Client::try_from(request_config).context("a client of the Kubernetes API")?;
    let telemetry = Metrics::new("operator")?;
    let metrics = metrics::OperatorMetrics::new(&telemetry);
    let ca_metrics = ca::CaMetrics::new(&telemetry);
    let ca_config = ca::CaConfig {
        namespace: args.namespace.clone(),
        secret: args.ca_secret.clone(),
        bundle_configmap: args.ca_bundle_configmap.clone(),
        trust_domain: args.trust_domain.clone(),
        agent_service_account: args.agent_service_account.clone(),
        leaf_lifetime: Duration::from_secs(args.cert_lifetime_secs.max(60))
            .min(cortexflow_trust::ca::MAX_LEAF_LIFETIME),
    };
    let authority = ca::load_or_create(&client, &ca_config).await?;
    let ca_state = ca::CaState::new(ca_config.clone(), authority, ca_metrics.clone());
    ca_metrics
        .bundle_roots
        .record(ca_state.bundle().ders().len() as u64, &[]);
    let trust = ca_state.trust();
    let creds = cortexflow_trust::Credentials::new();
    let readiness = Readiness::default();
    let synced_guard = readiness.register("initial sync");
    let (trigger, drain) = drain::channel();
    let mut sup = Supervisor::new();

    let store = store::Store::with_table_policy(
        EngineConfig {
            trust_domain: args.trust_domain.clone(),
            ..EngineConfig::default()
        },
        metrics.clone(),
        args.id_table_recreate,
    );
    let gate = Arc::new(readiness::Gate::default());

    // Watches → engine.
    let (changes_tx, changes_rx) = mpsc::channel(8192);
    index::spawn_watches(
        &mut sup,
        watch_client.clone(),
        index::WatchSinks {
            changes: changes_tx.clone(),
            metrics: metrics.clone(),
            store: store.clone(),
            gate: gate.clone(),
            drain: drain.clone(),
        },
    );
    sup.spawn(
        "watch/id-table",
        index::allocation_watch(
            watch_client.clone(),
            &args.namespace,
            &args.identities_configmap,
            &args.lease_name,
            changes_tx,
            drain.clone(),
        ),
    );
    sup.spawn(
        "engine",
        store::run_engine(store.clone(), changes_rx, drain.clone()),
    );

    // Ready once every kind and the id table are listed and applied (the store's sync gate:
    // no config stream sends anything before, and the allocator waits for it too).
    let table_synced = store.synced();
    {
        let mut synced = store.synced();
        sup.spawn_startup("initial sync", async move {
            synced.wait_for(|s| *s).await?;
            synced_guard.done();
            Ok(())
        });
    }

    // Leadership.
    let (lead_tx, leadership) = watch::channel(lease::Leadership::default());
    let renew_now = Arc::new(tokio::sync::Notify::new());
    let advertise = advertise_address(&args)?;
    sup.spawn(
        "lease",
        lease::run(
            client.clone(),
            lease::LeaseConfig {
                namespace: args.namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                address: advertise.clone(),
                duration: Duration::from_secs(args.lease_duration_secs.max(3)),
                renew_now: renew_now.clone(),
                counters: {
                    let store = store.clone();
                    Arc::new(move || store.known_counters())
                },
            },
            lead_tx,
            drain.clone(),
        ),
    );
    {
        let (mut leadership, gauge, drain) =
            (leadership.clone(), metrics.leader.clone(), drain.clone());
        sup.spawn("leader metric", async move {
            loop {
                let leads = leadership.borrow_and_update().is_leader;
                gauge.record(u64::from(leads), &[]);
                tokio::select! {
                    r = leadership.changed() => if r.is_err() { return Ok(()) },
                    () = drain.signaled() => return Ok(()),
                }
            }
        });
    }
    sup.spawn(
        "allocator",
        allocator::run(
            allocator::Table {
                client: client.clone(),
                namespace: args.namespace.clone(),
                name: args.identities_configmap.clone(),
                written: renew_now,
            },
            store.clone(),
            metrics.clone(),
            leadership.clone(),
            table_synced,
            drain.clone(),
        ),
    );
    sup.spawn(
        "status",
        status::run(
            client.clone(),
            store.clone(),
            metrics.clone(),
            Reporter {
                controller: "cortexflow-operator".into(),
                instance: Some(identity.clone()),
            },
            leadership.clone(),
            drain.clone(),
        ),
    );
    sup.spawn(
        "readiness gate",
        readiness::run(
            client.clone(),
            gate,
            store.clone(),
            leadership.clone(),
            drain.clone(),
        ),
    );

    // The CA: this replica's serving certificate, the published bundle.
    sup.spawn(
        "ca/serving certificate",
        ca::serve_own(ca_state.clone(), creds.clone(), drain.clone())?,
    );
    sup.spawn(
        "ca/trust bundle",
        ca::publish_bundle(client.clone(), ca_state.clone(), drain.clone()),
    );
    sup.spawn(
        "ca/rotation",
        ca::rotate(
            client.clone(),
            ca_state.clone(),
            store.clone(),
            Duration::from_secs(args.ca_poll_secs.max(1)),
            drain.clone(),
        ),
    );

    // The admission webhook: its serving certificate and the caBundle that trusts it.
    if !args.webhook_dns_names.is_empty() {
        webhook::spawn(
            &mut sup,
            webhook::WebhookDeps {
                client: client.clone(),
                ca: ca_state.clone(),
                store: store.clone(),
            },
            webhook::WebhookConfig {
                addr: args.webhook_addr,
                dns_names: args.webhook_dns_names.clone(),
                configuration: args.webhook_configuration.clone(),
                injector: injector::InjectorConfig {
                    inject_proxy: args.inject_proxy,
                    proxy_image: args.proxy_image.clone(),
                    ca_addr: args.proxy_ca_addr.clone(),
                    trust_domain: args.trust_domain.clone(),
                    trust_bundle: String::new(),
                    readiness_gate: args.readiness_gate_injection,
                    excluded_namespaces: args
                        .webhook_exclude_namespaces
                        .iter()
                        .cloned()
                        .chain([args.namespace.clone()])
                        .filter(|n| !n.is_empty())
                        .collect(),
                },
            },
            telemetry.meter(),
            leadership.clone(),
            drain.clone(),
        )
        .await?;
    }

    // gRPC, over mTLS.
    let peer_tls = cortexflow_trust::tls::client_config(
        Some(creds.clone()),
        trust.clone(),
        &cortexflow_domain::spiffe::operator(&args.trust_domain),
    )?;
    let (fwd_tx, fwd_rx) = mpsc::channel(1024);
    {
        let leadership = leadership.clone();
        sup.spawn(
            "report forwarding",
            grpc::forward_reports(
                fwd_rx,
                {
                    let ours = advertise.clone();
                    move || {
                        let l = leadership.borrow();
                        // Never to ourselves (a leader that just lost its lease still names us).
                        (!l.is_leader)
                            .then(|| l.leader_address.clone())
                            .flatten()
                            .filter(|a| *a != ours)
                    }
                },
                peer_tls,
            ),
        );
    }
    let reports = Arc::new(ReplicaReports {
        store: store.clone(),
        leadership,
        forward: fwd_tx,
    });
    let service = grpc::AgentConfigService::new(
        store.clone(),
        reports,
        metrics.clone(),
        trust.clone(),
        drain.clone(),
    );
    let certificates =
        ca::CertificateService::new(client.clone(), ca_state, store.clone(), drain.clone());
    let server_tls = cortexflow_trust::tls::server_config(creds, trust)?;
    let grpc_listener = tokio::net::TcpListener::bind(args.grpc_addr)
        .await
        .with_context(|| format!("bind gRPC {}", args.grpc_addr))?;
    tracing::info!(addr = %grpc_listener.local_addr()?, %identity, "serving gRPC");
    {
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(service.into_server())
            .add_service(certificates.into_server());
        let drain = drain.clone();
        sup.spawn("grpc", async move {
            cortexflow_trust::tls::serve(
                router,
                grpc_listener,
                server_tls,
                drain.clone().into_signaled(),
            )
            .await?;
            // Held until the calls in flight finished.
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
    drop(drain);

    let exit = sup.run(trigger, GRACE).await;
    telemetry.shutdown();
    Ok(exit)
}

/// Where other replicas reach this one: `--advertise-addr`, else the listen address, else (when
/// that is every address) `$POD_IP` with the listen port.
fn advertise_address(args: &Args) -> anyhow::Result<String> {
    if let Some(a) = &args.advertise_addr {
        return Ok(a.clone());
    }
    if !args.grpc_addr.ip().is_unspecified() {
        return Ok(args.grpc_addr.to_string());
    }
    let ip: std::net::IpAddr = std::env::var("POD_IP")
        .context("--grpc-addr listens on every address: set --advertise-addr or POD_IP")?
        .parse()
        .context("POD_IP")?;
    Ok(SocketAddr::new(ip, args.grpc_addr.port()).to_string())
}

/// Agent reports as this replica takes them: recorded, and forwarded to the leader when this
/// replica does not lead (only the leader writes status).
pub struct ReplicaReports {
    pub store: Arc<store::Store>,
    pub leadership: watch::Receiver<lease::Leadership>,
    /// To [`grpc::forward_reports`].
    pub forward: mpsc::Sender<AgentStatus>,
}

impl grpc::Reports for ReplicaReports {
    fn report(&self, status: AgentStatus) {
        if self.leadership.borrow().is_leader {
            self.store.report(status);
        } else {
            // Keep our own copy too (for logs and a fast start when we become leader).
            self.store.report(status.clone());
            let _ = self.forward.try_send(status);
        }
    }
}
