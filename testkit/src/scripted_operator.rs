//! A scripted operator: a real tonic `AgentConfig` server whose config stream a test or a
//! benchmark drives — it sets the snapshot every new stream starts with, pushes messages (valid
//! or not) to the open streams, and reads every status report. It stands in for the operator
//! below the top of the test ladder (the agent's own tests and benchmark); the e2e suite runs
//! the real operator.
//!
//! It speaks the real operator's TLS: a CA of its own (one per test process, so that an
//! operator restarted on the same address is trusted by the agents that knew the last one)
//! signs the operator's certificate and, through `Certificates.Sign`, whatever node certificate
//! an agent asks for — it checks no token. [`ScriptedOperator::control`] is what an agent needs
//! to reach it: the address, a trust bundle file and a token file.
use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use cortexflow_domain as domain;
use cortexflow_proto::{
    agent::v1::{
        self,
        agent_config_server::{AgentConfig, AgentConfigServer},
    },
    identity::v1 as idv1,
};
use cortexflow_trust::{Authority, Credentials, TrustStore};
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status, Streaming};

/// What the fake operator serves and what it was told.
struct OpState {
    /// The full config every new stream starts with (none: streams wait).
    snapshot: Mutex<Option<v1::NodeConfig>>,
    /// Messages for the open streams.
    push: broadcast::Sender<v1::NodeConfig>,
    /// Every status report, in order.
    reports: watch::Sender<Vec<v1::AgentStatus>>,
    subscriptions: AtomicUsize,
    version: AtomicU64,
}

#[derive(Clone)]
struct Svc {
    state: Arc<OpState>,
    stop: watch::Receiver<bool>,
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<v1::NodeConfig, Status>> + Send>>;

#[tonic::async_trait]
impl AgentConfig for Svc {
    type SubscribeStream = ConfigStream;

    async fn subscribe(
        &self,
        _req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<ConfigStream>, Status> {
        let (first, mut rx) = {
            let snap = self.state.snapshot.lock().expect("lock");
            (snap.clone(), self.state.push.subscribe())
        };
        self.state.subscriptions.fetch_add(1, Ordering::SeqCst);
        let mut stop = self.stop.clone();
        Ok(Response::new(Box::pin(async_stream::stream! {
            if let Some(f) = first {
                yield Ok(f);
            }
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Ok(m) => yield Ok(m),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        })))
    }

    async fn report_status(
        &self,
        req: Request<Streaming<v1::AgentStatus>>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let mut s = req.into_inner();
        let mut stop = self.stop.clone();
        loop {
            tokio::select! {
                m = s.message() => match m? {
                    Some(st) => self.state.reports.send_modify(|v| v.push(st)),
                    None => break,
                },
                _ = stop.changed() => break,
            }
        }
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}

/// The test process's CA.
fn authority() -> &'static Authority {
    static CA: std::sync::OnceLock<Authority> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        Authority::generate(TRUST_DOMAIN, std::time::SystemTime::now()).expect("a test CA")
    })
}

/// The trust domain of the scripted operator's CA (the agent's default).
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Signs any CSR for the one id it asks for.
struct Signer;

type BundleStream = Pin<Box<dyn Stream<Item = Result<idv1::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl idv1::certificates_server::Certificates for Signer {
    type WatchBundleStream = BundleStream;

    /// The one bundle, then nothing (the stream stays open).
    async fn watch_bundle(
        &self,
        _req: Request<idv1::WatchBundleRequest>,
    ) -> Result<Response<BundleStream>, Status> {
        let b = authority().bundle();
        let first = idv1::TrustBundle {
            roots: b.ders().iter().map(|c| c.to_vec()).collect(),
            digest: b.digest(),
        };
        Ok(Response::new(Box::pin(async_stream::stream! {
            yield Ok(first);
            futures::future::pending::<()>().await;
        })))
    }

    /// A scripted token is the SPIFFE id it proves (`spiffe://…`); anything else is refused.
    async fn identity(
        &self,
        req: Request<idv1::IdentityRequest>,
    ) -> Result<Response<idv1::IdentityResponse>, Status> {
        let token = req.into_inner().token;
        if !token.starts_with(&format!("spiffe://{TRUST_DOMAIN}/")) {
            return Err(Status::unauthenticated(
                "a scripted token is the SPIFFE id it proves",
            ));
        }
        Ok(Response::new(idv1::IdentityResponse { spiffe_id: token }))
    }

    async fn sign(
        &self,
        req: Request<idv1::SignRequest>,
    ) -> Result<Response<idv1::SignResponse>, Status> {
        let req = req.into_inner();
        let ca = authority();
        let id = match cortexflow_trust::csr::requested_uris(&req.csr).as_slice() {
            [id] => id.clone(),
            _ => return Err(Status::invalid_argument("the CSR must ask for one URI")),
        };
        let leaf = ca
            .sign(
                &req.csr,
                &id,
                cortexflow_trust::ca::DEFAULT_LEAF_LIFETIME,
                std::time::SystemTime::now(),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(idv1::SignResponse {
            chain: leaf.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: ca.bundle().ders().iter().map(|c| c.to_vec()).collect(),
            spiffe_id: leaf.spiffe_id,
            not_after: cortexflow_trust::unix_secs(leaf.not_after),
        }))
    }
}

/// How an agent reaches a control plane: its gRPC address, the trust bundle to verify it
/// with, and the token to obtain a certificate with.
#[derive(Clone, Debug)]
pub struct Control {
    pub url: String,
    pub bundle_file: PathBuf,
    pub token_file: PathBuf,
}

/// The server; stop it with [`ScriptedOperator::stop`].
pub struct ScriptedOperator {
    pub addr: SocketAddr,
    /// The bundle and token files (removed on drop).
    files: crate::process::TempDir,
    state: Arc<OpState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedOperator {
    /// Serves on `addr` (port 0: any), with versions counting from `first_version`.
    pub async fn start(addr: SocketAddr, first_version: u64) -> Self {
        let (reports, _) = watch::channel(Vec::new());
        let state = Arc::new(OpState {
            snapshot: Mutex::new(None),
            push: broadcast::channel(64).0,
            reports,
            subscriptions: AtomicUsize::new(0),
            version: AtomicU64::new(first_version),
        });
        let (stop, stop_rx) = watch::channel(false);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind fake operator");
        let addr = listener.local_addr().expect("addr");
        let svc = Svc {
            state: state.clone(),
            stop: stop_rx.clone(),
        };
        let mut down = stop_rx;
        let ca = authority();
        let trust = TrustStore::new(TRUST_DOMAIN, ca.bundle().clone());
        let creds = Credentials::new();
        let (key, own) = ca
            .issue_own(
                &cortexflow_domain::spiffe::operator(TRUST_DOMAIN),
                cortexflow_trust::ca::DEFAULT_LEAF_LIFETIME,
                std::time::SystemTime::now(),
            )
            .expect("the operator's certificate");
        creds
            .set_issued(&key, own)
            .expect("install the operator's certificate");
        let tls = cortexflow_trust::tls::server_config(creds, trust).expect("TLS config");
        let files = crate::process::TempDir::new("cftest-op-").expect("a temporary directory");
        std::fs::write(files.path().join("ca.crt"), ca.bundle().to_pem()).expect("bundle file");
        std::fs::write(files.path().join("token"), "scripted").expect("token file");
        let task = tokio::spawn(async move {
            let _ = cortexflow_trust::tls::serve(
                tonic::transport::Server::builder()
                    .add_service(AgentConfigServer::new(svc))
                    .add_service(idv1::certificates_server::CertificatesServer::new(Signer)),
                listener,
                tls,
                async move {
                    let _ = down.changed().await;
                },
            )
            .await;
        });
        Self {
            addr,
            files,
            state,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        self.addr.to_string()
    }

    /// What an agent needs to reach this operator.
    pub fn control(&self) -> Control {
        Control {
            url: self.url(),
            bundle_file: self.files.path().join("ca.crt"),
            token_file: self.files.path().join("token"),
        }
    }

    fn next_version(&self) -> u64 {
        self.state.version.fetch_add(1, Ordering::SeqCst)
    }

    /// Makes `cfg` the snapshot of new streams and sends it, as a full message, on open ones.
    /// Returns its version.
    pub fn set(&self, cfg: &domain::NodeConfig) -> u64 {
        let mut m = v1::NodeConfig::from(cfg);
        m.full = true;
        m.version = self.next_version();
        let mut snap = self.state.snapshot.lock().expect("lock");
        *snap = Some(m.clone());
        let _ = self.state.push.send(m.clone());
        m.version
    }

    /// Sends a message as it is on the open streams only (e.g. an invalid one).
    pub fn push_raw(&self, mut m: v1::NodeConfig) -> u64 {
        m.version = self.next_version();
        let _ = self.state.push.send(m.clone());
        m.version
    }

    pub fn subscriptions(&self) -> usize {
        self.state.subscriptions.load(Ordering::SeqCst)
    }

    /// Waits for a report that satisfies `f`.
    pub async fn report(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&v1::AgentStatus) -> bool,
    ) -> v1::AgentStatus {
        let mut rx = self.state.reports.subscribe();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(r) = rx.borrow_and_update().iter().rev().find(|r| f(r)) {
                    return r.clone();
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no report {what} within {timeout:?}; reports: {:?}",
                self.state.reports.borrow().last()
            )
        })
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
