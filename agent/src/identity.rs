//! The agent's identity (docs/security.md): its node certificate
//! `spiffe://<td>/cortexflow/node/<node>` from the operator's CA, and the mTLS configuration of
//! the control channel built on it.
//!
//! * Bootstrap: the trust bundle from `--trust-bundle` (the `cortexflow-ca-bundle` ConfigMap,
//!   mounted), the projected token from `--token-file` (audience `cortexflow-ca`, bound to the
//!   agent's pod), a fresh P-256 key and its CSR → `Certificates.Sign` over TLS that verifies the
//!   operator's SPIFFE id. The key never leaves the process.
//! * Renewal at about half of the certificate's life (±10 % jitter), with a token read anew
//!   (the kubelet rotates it); a failed renewal keeps the certificate that is still valid and
//!   retries with backoff. Every answer carries the current trust bundle, which replaces the one
//!   in use — new connections verify with it, nothing restarts.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use cortexflow_domain::spiffe;
use cortexflow_trust::{Bundle, Credentials, TrustStore, client::ObtainError, tls};
use tokio::sync::watch;

use crate::control::{Backoff, Retry, classify};

/// The agent's credentials and the TLS configurations that use them.
pub struct Identity {
    pub(crate) spiffe_id: String,
    pub(crate) trust: Arc<TrustStore>,
    pub(crate) creds: Arc<Credentials>,
    /// mTLS to the operator: our certificate, the operator's id verified.
    pub(crate) operator_tls: Arc<rustls::ClientConfig>,
    /// TLS to the operator without a client certificate (Sign authenticates by token).
    sign_tls: Arc<rustls::ClientConfig>,
    token_file: PathBuf,
    operator: String,
    /// True once a certificate is installed.
    pub(crate) ready: watch::Sender<bool>,
    /// Renew now (the bundle dropped the root of the certificate in use).
    pub(crate) renew_now: tokio::sync::Notify,
}

impl Identity {
    pub(crate) fn new(
        node: &str,
        trust_domain: &str,
        operator: &str,
        bundle_file: &std::path::Path,
        token_file: PathBuf,
    ) -> anyhow::Result<Self> {
        let pem = std::fs::read(bundle_file)
            .with_context(|| format!("read the trust bundle {}", bundle_file.display()))?;
        let bundle = Bundle::from_pem(&pem)
            .with_context(|| format!("the trust bundle {}", bundle_file.display()))?;
        let trust = TrustStore::new(trust_domain, bundle);
        let creds = Credentials::new();
        let operator_id = spiffe::operator(trust_domain);
        Ok(Self {
            spiffe_id: spiffe::node_agent(trust_domain, node),
            operator_tls: tls::client_config(Some(creds.clone()), trust.clone(), &operator_id)?,
            sign_tls: tls::client_config(None, trust.clone(), &operator_id)?,
            trust,
            creds,
            token_file,
            operator: operator.to_string(),
            ready: watch::channel(false).0,
            renew_now: tokio::sync::Notify::new(),
        })
    }

    /// A channel to the operator over `config`.
    pub(crate) async fn channel(
        &self,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        tonic::transport::Endpoint::from_shared(tls::endpoint_uri(&self.operator))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_with_connector(tls::connector(config.clone()))
            .await
    }

    /// One `Sign`: a new key, its certificate, the bundle. Returns the new notAfter.
    async fn obtain(&self) -> Result<SystemTime, (Retry, String)> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| {
                (
                    Retry::Retryable,
                    format!("read the token {}: {e}", self.token_file.display()),
                )
            })?
            .trim()
            .to_string();
        let channel = self.channel(&self.sign_tls).await.map_err(|e| {
            (
                Retry::Retryable,
                format!("connect to {}: {e}", self.operator),
            )
        })?;
        let got = cortexflow_trust::client::obtain(
            channel,
            &token,
            &self.spiffe_id,
            self.trust.trust_domain(),
            &self.creds,
        )
        .await
        .map_err(|e| match &e {
            ObtainError::Refused(s) => (classify(s), e.to_string()),
            ObtainError::Bad(_) => (Retry::Retryable, e.to_string()),
        })?;
        let (bundle, not_after) = (got.bundle, got.not_after);
        if self.trust.set(bundle) {
            tracing::info!("trust bundle updated");
        }
        self.ready.send_replace(true);
        Ok(not_after)
    }

    /// Waits until a certificate is installed (false: shutting down).
    pub(crate) async fn wait_ready(&self, shutdown: &cortexflow_runtime::drain::Signal) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::select! {
            r = rx.wait_for(|r| *r) => r.is_ok(),
            () = shutdown.signaled() => false,
        }
    }
}

/// Obtains the certificate, then renews it at about half-life; fatal refusals end the agent.
pub async fn renew_loop(
    id: Arc<Identity>,
    shutdown: cortexflow_runtime::drain::Signal,
    max_backoff: Duration,
    metrics: crate::metrics::AgentMetrics,
) -> anyhow::Result<()> {
    use opentelemetry::KeyValue;
    let mut backoff = Backoff::new(
        Duration::from_millis(200),
        max_backoff.max(Duration::from_secs(1)),
    );
    let mut jitter = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
    loop {
        let wait = match id.obtain().await {
            Ok(not_after) => {
                backoff.reset();
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                metrics
                    .certificate_renewals
                    .add(1, &[KeyValue::new("result", "ok")]);
                metrics.certificate_expiry.record(left.as_secs_f64(), &[]);
                metrics
                    .trust_bundle_roots
                    .record(id.trust.bundle().ders().len() as u64, &[]);
                tracing::info!(
                    spiffe_id = %id.spiffe_id,
                    valid_for_secs = left.as_secs(),
                    "node certificate obtained"
                );
                // Half of the remaining life, ±10 %.
                let half = left / 2;
                let spread = jitter.next_wait().as_secs_f64(); // in [0.5, 1] s
                half.mul_f64(0.9 + 0.2 * (spread - 0.5) * 2.0)
                    .max(Duration::from_secs(1))
            }
            Err((Retry::Fatal, e)) => {
                anyhow::bail!("the node certificate was refused: {e}");
            }
            Err((Retry::Retryable, e)) => {
                metrics
                    .certificate_renewals
                    .add(1, &[KeyValue::new("result", "failed")]);
                let still = id
                    .creds
                    .current()
                    .is_some_and(|(_, _, na)| na > SystemTime::now());
                tracing::warn!(error = %e, keeps_valid_certificate = still, "obtaining the node certificate failed; retrying");
                backoff.next_wait()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = id.renew_now.notified() => tracing::info!("renewing the node certificate now: the trust bundle no longer holds its root"),
            () = shutdown.signaled() => return Ok(()),
        }
    }
}

/// Follows the operator's trust bundle (`Certificates.WatchBundle`, over mTLS): each one is
/// installed (new connections verify with it) and acknowledged in the status reports; when it
/// no longer verifies the node certificate in use, that is renewed at once.
pub(crate) async fn bundle_loop(ctx: Arc<crate::daemon::Ctx>) -> anyhow::Result<()> {
    use cortexflow_proto::identity::v1::{
        WatchBundleRequest, certificates_client::CertificatesClient,
    };
    let id = ctx.identity.clone();
    let shutdown = ctx.shutdown.clone();
    if !id.wait_ready(&shutdown).await {
        return Ok(());
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let r: Result<(), String> = async {
            let channel = id
                .channel(&id.operator_tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut stream = CertificatesClient::new(channel)
                .watch_bundle(WatchBundleRequest {})
                .await
                .map_err(|s| format!("WatchBundle: {}: {}", s.code(), s.message()))?
                .into_inner();
            loop {
                let m = tokio::select! {
                    m = stream.message() => m.map_err(|s| format!("WatchBundle: {s}"))?,
                    () = shutdown.signaled() => return Ok(()),
                };
                let Some(m) = m else { return Ok(()) };
                let bundle = Bundle::from_der(
                    m.roots
                        .into_iter()
                        .map(rustls_pki_types::CertificateDer::from)
                        .collect(),
                )
                .map_err(|e| format!("the bundle sent: {e}"))?;
                let digest = bundle.digest();
                let roots = bundle.ders().len();
                if id.trust.set(bundle) {
                    tracing::info!(roots, %digest, "trust bundle updated");
                }
                ctx.metrics.trust_bundle_roots.record(roots as u64, &[]);
                backoff.reset();
                ctx.report.send_if_modified(|r| {
                    std::mem::replace(&mut r.status.trust_bundle, digest.clone()) != digest
                });
                if let Some(chain) = id.creds.chain()
                    && id
                        .trust
                        .verify(&chain, cortexflow_trust::Usage::Client)
                        .is_err()
                {
                    id.renew_now.notify_one();
                }
            }
        }
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "the trust bundle stream failed; retrying (the bundle in use is kept)");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_wait()) => {}
            () = shutdown.signaled() => return Ok(()),
        }
    }
}
