//! A mesh member's identity, kept current: the agent's node certificate and the mTLS proxy's
//! workload certificate are obtained, renewed and re-anchored the same way (docs/security.md).
//!
//! * Bootstrap: a trust bundle the member is given (the agent's mounted ConfigMap, the proxy's
//!   injected bundle), a projected token file (audience `cortexflow-ca`), a fresh P-256 key and
//!   its CSR → `Certificates.Sign` over TLS that verifies the operator's SPIFFE id. The key never
//!   leaves the process.
//! * Which id: fixed (a node's agent), or asked with `Certificates.Identity` before each Sign (a
//!   workload's id follows the ServiceIdentity that claims its pod, which the pod cannot see).
//! * Renewal at about half of the certificate's life (±10 % jitter), with the token read anew
//!   (the kubelet rotates it); a failed renewal keeps the certificate that is still valid and
//!   retries with backoff. Every answer carries the current trust bundle, which replaces the one
//!   in use — new connections verify with it, nothing restarts.
//! * [`bundle_loop`] follows `Certificates.WatchBundle` and renews at once when the bundle no
//!   longer holds the root of the certificate in use.
use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use cortexflow_proto::identity::v1::{
    IdentityRequest, WatchBundleRequest, certificates_client::CertificatesClient,
};
use cortexflow_runtime::{
    backoff::{Backoff, Retry, classify},
    drain,
};
use tokio::sync::{Notify, watch};

use crate::{Bundle, Credentials, TrustStore, client::ObtainError, tls};

/// Which SPIFFE id a member asks for.
#[derive(Clone, Debug)]
pub enum Id {
    /// Always this one (an agent: its node's id).
    Fixed(String),
    /// Whatever its token proves now, asked before each Sign (a workload).
    Asked,
}

/// A member's credentials and the TLS configurations that use them.
pub struct Member {
    id: Id,
    /// The id of the certificate in use (or asked for, before the first one).
    spiffe_id: RwLock<String>,
    pub trust: Arc<TrustStore>,
    pub creds: Arc<Credentials>,
    /// mTLS to the operator: our certificate, the operator's id verified.
    pub operator_tls: Arc<rustls::ClientConfig>,
    /// TLS to the operator without a client certificate (Sign authenticates by token).
    sign_tls: Arc<rustls::ClientConfig>,
    token_file: PathBuf,
    operator: String,
    /// True once a certificate is installed.
    ready: watch::Sender<bool>,
    /// Renew now (the bundle dropped the root of the certificate in use).
    renew_now: Notify,
}

/// What one attempt of [`renew_loop`] did, for the member's metrics.
#[derive(Debug)]
pub enum Renewal {
    Obtained { valid_for: Duration, roots: usize },
    Failed { error: String, keeps_valid: bool },
}

impl Member {
    pub fn new(
        id: Id,
        trust_domain: &str,
        operator: &str,
        bundle: Bundle,
        token_file: PathBuf,
    ) -> anyhow::Result<Self> {
        let trust = TrustStore::new(trust_domain, bundle);
        let creds = Credentials::new();
        let operator_id = cortexflow_domain::spiffe::operator(trust_domain);
        Ok(Self {
            spiffe_id: RwLock::new(match &id {
                Id::Fixed(s) => s.clone(),
                Id::Asked => String::new(),
            }),
            id,
            operator_tls: tls::client_config(Some(creds.clone()), trust.clone(), &operator_id)?,
            sign_tls: tls::client_config(None, trust.clone(), &operator_id)?,
            trust,
            creds,
            token_file,
            operator: operator.to_string(),
            ready: watch::channel(false).0,
            renew_now: Notify::new(),
        })
    }

    /// The SPIFFE id of the certificate in use (empty before the first one of an asked id).
    pub fn spiffe_id(&self) -> String {
        self.spiffe_id.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// A channel to the operator over `config`.
    pub async fn channel(
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

    /// One `Sign` (after `Identity` for an asked id): a new key, its certificate, the bundle.
    /// Returns the new notAfter.
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
        let spiffe_id = match &self.id {
            Id::Fixed(s) => s.clone(),
            Id::Asked => {
                CertificatesClient::new(channel.clone())
                    .identity(IdentityRequest {
                        token: token.clone(),
                    })
                    .await
                    .map_err(|s| {
                        (
                            classify(&s),
                            format!("Certificates.Identity: {}: {}", s.code(), s.message()),
                        )
                    })?
                    .into_inner()
                    .spiffe_id
            }
        };
        let got = crate::client::obtain(
            channel,
            &token,
            &spiffe_id,
            self.trust.trust_domain(),
            &self.creds,
        )
        .await
        .map_err(|e| match &e {
            // The claiming ServiceIdentity changed between Identity and Sign: ask again.
            ObtainError::Refused(s)
                if matches!(self.id, Id::Asked) && s.code() == tonic::Code::PermissionDenied =>
            {
                (Retry::Retryable, e.to_string())
            }
            ObtainError::Refused(s) => (classify(s), e.to_string()),
            ObtainError::Bad(_) => (Retry::Retryable, e.to_string()),
        })?;
        if let Ok(mut s) = self.spiffe_id.write() {
            *s = spiffe_id;
        }
        if self.trust.set(got.bundle) {
            tracing::info!("trust bundle updated");
        }
        self.ready.send_replace(true);
        Ok(got.not_after)
    }

    /// Waits until a certificate is installed (false: shutting down).
    pub async fn wait_ready(&self, shutdown: &drain::Signal) -> bool {
        let mut rx = self.ready.subscribe();
        tokio::select! {
            r = rx.wait_for(|r| *r) => r.is_ok(),
            () = shutdown.signaled() => false,
        }
    }

    /// True once a certificate is installed.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }
}

/// Obtains the certificate, then renews it at about half-life; fatal refusals end the member.
/// `on` sees every attempt (the member's metrics).
pub async fn renew_loop(
    m: Arc<Member>,
    shutdown: drain::Signal,
    max_backoff: Duration,
    on: impl Fn(&Renewal),
) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(
        Duration::from_millis(200),
        max_backoff.max(Duration::from_secs(1)),
    );
    let mut jitter = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
    loop {
        let wait = match m.obtain().await {
            Ok(not_after) => {
                backoff.reset();
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                on(&Renewal::Obtained {
                    valid_for: left,
                    roots: m.trust.bundle().ders().len(),
                });
                tracing::info!(
                    spiffe_id = %m.spiffe_id(),
                    valid_for_secs = left.as_secs(),
                    "certificate obtained"
                );
                // Half of the remaining life, ±10 %.
                let half = left / 2;
                let spread = jitter.next_wait().as_secs_f64(); // in [0.5, 1] s
                half.mul_f64(0.9 + 0.2 * (spread - 0.5) * 2.0)
                    .max(Duration::from_secs(1))
            }
            Err((Retry::Fatal, e)) => {
                anyhow::bail!("the certificate was refused: {e}");
            }
            Err((Retry::Retryable, e)) => {
                let keeps_valid = m
                    .creds
                    .current()
                    .is_some_and(|(_, _, na)| na > SystemTime::now());
                tracing::warn!(error = %e, keeps_valid_certificate = keeps_valid, "obtaining the certificate failed; retrying");
                on(&Renewal::Failed {
                    error: e,
                    keeps_valid,
                });
                backoff.next_wait()
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = m.renew_now.notified() => tracing::info!("renewing the certificate now: the trust bundle no longer holds its root"),
            () = shutdown.signaled() => return Ok(()),
        }
    }
}

/// Follows the operator's trust bundle (`Certificates.WatchBundle`, over mTLS): each one is
/// installed (new connections verify with it) and shown to `on`; when it no longer verifies
/// the certificate in use, that is renewed at once.
pub async fn bundle_loop(
    m: Arc<Member>,
    shutdown: drain::Signal,
    on: impl Fn(&Bundle),
) -> anyhow::Result<()> {
    if !m.wait_ready(&shutdown).await {
        return Ok(());
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let r: Result<(), String> = async {
            let channel = m
                .channel(&m.operator_tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let mut stream = CertificatesClient::new(channel)
                .watch_bundle(WatchBundleRequest {})
                .await
                .map_err(|s| format!("WatchBundle: {}: {}", s.code(), s.message()))?
                .into_inner();
            loop {
                let msg = tokio::select! {
                    msg = stream.message() => msg.map_err(|s| format!("WatchBundle: {s}"))?,
                    () = shutdown.signaled() => return Ok(()),
                };
                let Some(msg) = msg else { return Ok(()) };
                let bundle = Bundle::from_der(
                    msg.roots
                        .into_iter()
                        .map(rustls_pki_types::CertificateDer::from)
                        .collect(),
                )
                .map_err(|e| format!("the bundle sent: {e}"))?;
                on(&bundle);
                let (digest, roots) = (bundle.digest(), bundle.ders().len());
                if m.trust.set(bundle) {
                    tracing::info!(roots, %digest, "trust bundle updated");
                }
                backoff.reset();
                if let Some(chain) = m.creds.chain()
                    && m.trust.verify(&chain, crate::Usage::Client).is_err()
                {
                    m.renew_now.notify_one();
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
