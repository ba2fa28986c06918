//! A scripted operator: a real tonic `AgentConfig` server whose config stream a test or a
//! benchmark drives — it sets the snapshot every new stream starts with, pushes messages (valid
//! or not) to the open streams, and reads every status report. It stands in for the operator
//! below the top of the test ladder (the agent's own tests and benchmark); the e2e suite runs
//! the real operator.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use cortexflow_domain as domain;
use cortexflow_proto::agent::v1::{
    self,
    agent_config_server::{AgentConfig, AgentConfigServer},
};
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

/// The server; stop it with [`ScriptedOperator::stop`].
pub struct ScriptedOperator {
    pub addr: SocketAddr,
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
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentConfigServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move {
                        let _ = down.changed().await;
                    },
                )
                .await;
        });
        Self {
            addr,
            state,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
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
