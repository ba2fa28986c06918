//! The `cortexflow.agent.v1.AgentConfig` server: the only place the operator converts between
//! the wire and its domain types. It knows neither the store nor the lease: it serves any
//! [`Configs`] and hands reports to any [`Reports`] (the replica wires the store, and a
//! [`Reports`] that forwards to the leader when this replica does not lead).
//!
//! `Subscribe` gives each node its own stream: the full config first, then only what changed.
//! A stream task waits until the agent can take a message, then builds it from the *latest*
//! state — so bursts coalesce and a slow agent skips intermediate versions instead of queueing
//! them. Streams end cleanly when the replica drains.
//!
//! `ReportStatus` feeds the `Programmed` conditions.
//!
//! Both run over mTLS only (docs/security.md): node N's config is served, and its status
//! taken, only from the holder of N's agent certificate (`spiffe://<td>/cortexflow/node/N`);
//! other replicas (the operator's certificate) may forward any node's reports to the leader.
//! No certificate: `UNAUTHENTICATED`; another node's or a workload's: `PERMISSION_DENIED`.
use std::{pin::Pin, sync::Arc};

use cortexflow_domain::spiffe;
use cortexflow_trust::TrustStore;

use cortexflow_domain::{AgentStatus, NodeConfig};
use cortexflow_operator_core::Cursor;
use cortexflow_proto::agent::v1::{self, agent_config_server::AgentConfig};
use cortexflow_runtime::drain::Watcher;
use futures::Stream;
use opentelemetry::KeyValue;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::metrics::OperatorMetrics;

/// Largest message the server sends (a full snapshot of a large cluster).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Where the node configs come from.
pub trait Configs: Send + Sync + 'static {
    /// A receiver that sees every new config version.
    fn versions(&self) -> watch::Receiver<u64>;
    /// The next message of `node`'s stream, `None` when nothing changed since `cursor`.
    fn next_config(&self, node: &str, cursor: &mut Cursor) -> Option<NodeConfig>;
    /// The replica's revision (`None` before the sync). `versions` also fires when it rises.
    fn revision(&self) -> Option<u64>;
    /// Counts an open stream until the returned guard is dropped.
    fn stream_opened(&self) -> Box<dyn Send>;
}

/// Where agent reports go.
pub trait Reports: Send + Sync + 'static {
    fn report(&self, status: AgentStatus);
}

pub struct AgentConfigService<C, R> {
    configs: Arc<C>,
    reports: Arc<R>,
    metrics: OperatorMetrics,
    trust: Arc<TrustStore>,
    drain: Watcher,
}

/// Who called, from its verified client certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The agent of this node.
    Node(String),
    /// An operator replica.
    Operator,
}

/// The caller of `req`: its certificate verified against `trust` and its SPIFFE id that of a
/// node agent or of the operator.
pub fn peer<T>(req: &Request<T>, trust: &TrustStore) -> Result<Peer, Status> {
    let id = cortexflow_trust::tls::peer_id(req, trust)
        .map_err(|e| Status::unauthenticated(e.to_string()))?
        .ok_or_else(|| {
            Status::unauthenticated(
                "a client certificate is required: the node agent's, from Certificates.Sign",
            )
        })?;
    let td = trust.trust_domain();
    if id == spiffe::operator(td) {
        return Ok(Peer::Operator);
    }
    match spiffe::node_of(td, &id) {
        Some(n) => Ok(Peer::Node(n.to_string())),
        None => Err(Status::permission_denied(format!(
            "{id} is not a node agent: only node agents subscribe and report"
        ))),
    }
}

impl<C: Configs, R: Reports> AgentConfigService<C, R> {
    pub fn new(
        configs: Arc<C>,
        reports: Arc<R>,
        metrics: OperatorMetrics,
        trust: Arc<TrustStore>,
        drain: Watcher,
    ) -> Self {
        Self {
            configs,
            reports,
            metrics,
            trust,
            drain,
        }
    }

    /// The tonic service, with the message size limits.
    pub fn into_server(self) -> v1::agent_config_server::AgentConfigServer<Self> {
        v1::agent_config_server::AgentConfigServer::new(self)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .max_decoding_message_size(1 << 20)
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<v1::NodeConfig, Status>> + Send>>;

#[tonic::async_trait]
impl<C: Configs, R: Reports> AgentConfig for AgentConfigService<C, R> {
    type SubscribeStream = ConfigStream;

    #[tracing::instrument(name = "Subscribe", skip_all, fields(node = %req.get_ref().node))]
    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = peer(&req, &self.trust)?;
        let req = req.into_inner();
        if req.node.is_empty() {
            return Err(Status::invalid_argument("SubscribeRequest.node is empty"));
        }
        if caller != Peer::Node(req.node.clone()) {
            return Err(Status::permission_denied(format!(
                "{caller:?} may not subscribe to the config of node {}",
                req.node
            )));
        }
        let node = req.node;
        let kernel_revision = req.kernel_revision;
        tracing::info!(agent_version = %req.agent_version, "agent subscribed");
        let (tx, rx) = mpsc::channel::<Result<v1::NodeConfig, Status>>(1);
        let configs = self.configs.clone();
        let metrics = self.metrics.clone();
        let drain = self.drain.clone();
        let span = tracing::info_span!("config stream", node = %node);
        tokio::spawn(
            async move {
                let _open = configs.stream_opened();
                let mut versions = configs.versions();
                let mut cursor = Cursor::default();
                // What the agent's kernel holds, and the revision of what this stream sent: an
                // agent keeps its kernel's state over a stream that is older (this replica lags
                // behind the one it last heard from). When this replica catches up, the agent
                // gets a full snapshot at once — not only at the node's next change, which may
                // never come — so it is never left holding back new pods.
                let mut sent_revision = 0u64;
                loop {
                    // Wait until the agent can take a message, then build the freshest one.
                    let permit = tokio::select! {
                        p = tx.reserve() => match p { Ok(p) => p, Err(_) => break },
                        () = drain.signaled() => break,
                    };
                    let msg: NodeConfig = loop {
                        if let Some(m) = configs.next_config(&node, &mut cursor) {
                            break m;
                        }
                        if kernel_revision != 0
                            && sent_revision != 0
                            && sent_revision < kernel_revision
                            && configs.revision().is_some_and(|r| r >= kernel_revision)
                        {
                            cursor = Cursor::default();
                            continue;
                        }
                        tokio::select! {
                            r = versions.changed() => if r.is_err() { return },
                            () = drain.signaled() => return,
                            () = tx.closed() => return,
                        }
                    };
                    sent_revision = sent_revision.max(msg.revision);
                    let kind = if msg.full { "full" } else { "update" };
                    metrics.configs_sent.add(1, &[KeyValue::new("kind", kind)]);
                    tracing::debug!(version = msg.version, kind, "config sent");
                    permit.send(Ok(v1::NodeConfig::from(&msg)));
                }
                tracing::info!("agent stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(name = "ReportStatus", skip_all, fields(node = tracing::field::Empty))]
    async fn report_status(
        &self,
        req: Request<Streaming<v1::AgentStatus>>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let caller = peer(&req, &self.trust)?;
        let mut stream = req.into_inner();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                () = self.drain.signaled() => None,
            };
            let Some(msg) = msg else { break };
            let status = AgentStatus::try_from(msg).map_err(|e| Status::invalid_argument(e.0))?;
            tracing::Span::current().record("node", status.node.as_str());
            if let Peer::Node(n) = &caller
                && *n != status.node
            {
                return Err(Status::permission_denied(format!(
                    "the agent of node {n} may not report the status of node {}",
                    status.node
                )));
            }
            if let Some((v, e)) = &status.failed {
                tracing::warn!(version = v, error = %e, "agent refused a config");
            }
            self.reports.report(status);
        }
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}

/// Forwards the reports on `rx` to the gRPC address `leader()` gives (the leader's, published
/// in the Lease; `None` drops the report), over one `ReportStatus` stream that follows the
/// leader. Reports are best effort: agents repeat theirs every 30 s. Runs until every sender is
/// gone.
pub async fn forward_reports(
    mut rx: mpsc::Receiver<AgentStatus>,
    leader: impl Fn() -> Option<String> + Send,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let mut current: Option<(String, mpsc::Sender<v1::AgentStatus>)> = None;
    while let Some(s) = rx.recv().await {
        let Some(addr) = leader() else {
            continue;
        };
        if current
            .as_ref()
            .is_none_or(|(a, tx)| *a != addr || tx.is_closed())
        {
            current = connect(&addr, &tls).await.map(|tx| (addr.clone(), tx));
        }
        if let Some((_, tx)) = &current
            && tx.send(v1::AgentStatus::from(&s)).await.is_err()
        {
            current = None;
        }
    }
    Ok(())
}

async fn connect(
    addr: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Option<mpsc::Sender<v1::AgentStatus>> {
    let channel =
        tonic::transport::Endpoint::from_shared(cortexflow_trust::tls::endpoint_uri(addr))
            .ok()?
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_with_connector(cortexflow_trust::tls::connector(tls.clone()))
            .await
            .ok()?;
    let mut client = v1::agent_config_client::AgentConfigClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    let span = tracing::info_span!("report forwarding", leader = %addr);
    tokio::spawn(
        async move {
            if let Err(e) = client
                .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                tracing::debug!(error = %e, "forwarding reports to the leader ended");
            }
        }
        .instrument(span),
    );
    Some(tx)
}
