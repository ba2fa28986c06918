//! `cortexflow-proxy`: the mTLS proxy, injected as a native sidecar into the pods that ask for
//! mTLS (docs/mtls.md). Traffic of pods without it never passes through a proxy: L3/L4 policy
//! and Service load balancing stay in the kernel.
//!
//! Built so far:
//! * its workload certificate — `spiffe://<td>/ns/<ns>/sid/<name>` or `…/sa/<sa>`, whichever
//!   its pod's token proves — obtained from the operator's CA with the pod's own projected token
//!   (`Certificates.Identity`, then `Sign`), renewed at about half its life, re-anchored when the
//!   trust bundle changes ([`cortexflow_trust::member`], the agent's code);
//! * [`messages`] — the message port (TCP 5054): JSON lines from the pod's app delivered over
//!   mTLS to the named Service's proxy, which answers;
//! * [`dns`] — the DNS port (5053, UDP and TCP): queries forwarded to the cluster DNS;
//! * the admin port: `/metrics`, `/healthz`, `/readyz` (ready once the certificate is there).
//!
//! Not built yet: the eBPF redirection of the app's connections, the mTLS port 15443 that
//! carries them, identity-based ingress policy, HTTP awareness.
#![forbid(unsafe_code)]

pub mod dns;
pub mod messages;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use cortexflow_runtime::{Exit, LogFormat, Metrics, Readiness, Supervisor, drain};
use cortexflow_trust::{
    Bundle,
    member::{self, Member, Renewal},
};
use opentelemetry::KeyValue;

/// The proxy's flags (the injector sets `--ca-addr`, `--trust-domain` and `--token-file`; the
/// trust bundle comes in `CORTEXFLOW_TRUST_BUNDLE`).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "cortexflow-proxy", version, about)]
pub struct Args {
    /// The operator's CA (`Certificates`), `host:port`.
    #[arg(long, env = "CORTEXFLOW_CA_ADDR")]
    pub ca_addr: String,
    #[arg(long, env = "CORTEXFLOW_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The projected ServiceAccount token (audience `cortexflow-ca`), read anew at each renewal.
    #[arg(long, env = "CORTEXFLOW_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The trust bundle to start from, PEM (the injector puts the CA's bundle here).
    #[arg(long, env = "CORTEXFLOW_TRUST_BUNDLE", hide_env_values = true)]
    pub trust_bundle: String,
    /// The pod's namespace (downward API): the namespace of a message's service when it names
    /// none is `cortexflow`, as in the original proxy; this one is only logged.
    #[arg(long, env = "POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// The pod's address (downward API): messages from it or loopback are the app's own.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,
    /// The cluster's DNS domain (a service `name.ns` is `name.ns.svc.<domain>`).
    #[arg(
        long,
        env = "CORTEXFLOW_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// The message port.
    #[arg(long, env = "CORTEXFLOW_MESSAGE_ADDR", default_value = "0.0.0.0:5054")]
    pub message_addr: SocketAddr,
    /// The DNS port.
    #[arg(long, env = "CORTEXFLOW_DNS_ADDR", default_value = "0.0.0.0:5053")]
    pub dns_addr: SocketAddr,
    /// Where DNS queries go: `ip[:port]`; default the first `nameserver` of /etc/resolv.conf
    /// (the cluster DNS a pod is given).
    #[arg(long, env = "CORTEXFLOW_DNS_UPSTREAM")]
    pub dns_upstream: Option<String>,
    /// The admin port: /metrics, /healthz, /readyz.
    #[arg(long, env = "CORTEXFLOW_ADMIN_ADDR", default_value = "0.0.0.0:15090")]
    pub admin_addr: SocketAddr,
    /// Longest wait between attempts to obtain the certificate, in milliseconds.
    #[arg(long, env = "CORTEXFLOW_MAX_BACKOFF_MS", default_value_t = 5_000)]
    pub max_backoff_ms: u64,
    /// Log filter (overridden by RUST_LOG).
    #[arg(long, env = "CORTEXFLOW_LOG", default_value = "info")]
    pub log: String,
    /// Log format: plain or json.
    #[arg(long, env = "CORTEXFLOW_LOG_FORMAT", default_value = "plain")]
    pub log_format: LogFormat,
}

/// How long the drain may take.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the proxy until SIGTERM or a dead task.
pub async fn run(args: Args) -> anyhow::Result<Exit> {
    cortexflow_runtime::init_logging(&args.log, args.log_format);
    let bundle = Bundle::from_pem(args.trust_bundle.as_bytes())
        .context("CORTEXFLOW_TRUST_BUNDLE (the injector sets it to the CA's bundle)")?;
    let id = Arc::new(Member::new(
        member::Id::Asked,
        &args.trust_domain,
        &args.ca_addr,
        bundle,
        args.token_file.clone(),
    )?);
    let upstream = dns::upstream(args.dns_upstream.as_deref())?;
    let telemetry = Metrics::new("proxy")?;
    let meter = telemetry.meter();
    let readiness = Readiness::default();
    let ready = readiness.register("workload certificate");
    let (trigger, drain) = drain::channel();
    let mut sup = Supervisor::new();

    let renewals = meter
        .u64_counter("proxy_certificate_renewals")
        .with_description("Attempts to obtain the workload certificate, by result: ok, failed")
        .build();
    for r in ["ok", "failed"] {
        renewals.add(0, &[KeyValue::new("result", r)]);
    }
    let expiry = meter
        .f64_gauge("proxy_certificate_expiry_seconds")
        .with_description(
            "Seconds the workload certificate in use is still valid for, when obtained",
        )
        .build();
    sup.spawn(
        "identity",
        member::renew_loop(
            id.clone(),
            drain.signal(),
            Duration::from_millis(args.max_backoff_ms),
            move |r| match r {
                Renewal::Obtained { valid_for, .. } => {
                    renewals.add(1, &[KeyValue::new("result", "ok")]);
                    expiry.record(valid_for.as_secs_f64(), &[]);
                }
                Renewal::Failed { .. } => renewals.add(1, &[KeyValue::new("result", "failed")]),
            },
        ),
    );
    sup.spawn(
        "trust bundle",
        member::bundle_loop(id.clone(), drain.signal(), |_| {}),
    );
    {
        let (id, signal) = (id.clone(), drain.signal());
        sup.spawn_startup("certificate", async move {
            if id.wait_ready(&signal).await {
                tracing::info!(spiffe_id = %id.spiffe_id(), "ready: the workload certificate is installed");
                ready.done();
            }
            Ok(())
        });
    }

    let dns_socket = tokio::net::UdpSocket::bind(args.dns_addr)
        .await
        .with_context(|| format!("bind DNS {}", args.dns_addr))?;
    tracing::info!(addr = %dns_socket.local_addr()?, %upstream, "serving DNS");
    let dns_listener = tokio::net::TcpListener::bind(args.dns_addr)
        .await
        .with_context(|| format!("bind DNS over TCP {}", args.dns_addr))?;
    let dns_metrics = dns::DnsMetrics::new(meter);
    sup.spawn(
        "dns",
        dns::serve(dns_socket, upstream, dns_metrics.clone(), drain.signal()),
    );
    sup.spawn(
        "dns/tcp",
        dns::serve_tcp(dns_listener, upstream, dns_metrics, drain.signal()),
    );

    let message_listener = tokio::net::TcpListener::bind(args.message_addr)
        .await
        .with_context(|| format!("bind messages {}", args.message_addr))?;
    tracing::info!(addr = %message_listener.local_addr()?, "serving messages");
    let messages = messages::Messages::new(
        id.clone(),
        messages::Config {
            pod_ip: args.pod_ip,
            cluster_domain: args.cluster_domain.clone(),
        },
        meter,
    )?;
    sup.spawn(
        "messages",
        messages::serve(message_listener, Arc::new(messages), drain.signal()),
    );

    cortexflow_runtime::spawn_admin(
        &mut sup,
        args.admin_addr,
        telemetry.clone(),
        readiness,
        drain.clone(),
    )
    .await?;
    drop(drain);
    tracing::info!(namespace = %args.pod_namespace, ca = %args.ca_addr, "started");
    let exit = sup.run(trigger, GRACE).await;
    telemetry.shutdown();
    Ok(exit)
}

/// Accepts connections on `listener` until the drain, handing each to `on` (a failed accept
/// is logged and retried after 50 ms).
pub(crate) async fn accept_until_drained(
    listener: tokio::net::TcpListener,
    shutdown: drain::Signal,
    what: &'static str,
    mut on: impl FnMut(tokio::net::TcpStream, SocketAddr),
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    on(tcp, peer);
                }
                Err(e) => {
                    tracing::warn!(error = %e, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.signaled() => return Ok(()),
        }
    }
}
