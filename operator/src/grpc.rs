//! The `cortexflow.agent.v1.AgentConfig` server.
//!
//! `Subscribe` gives each node its own stream: the full config first, then only what changed.
//! A stream task waits until the agent can take a message, then builds it from the *latest*
//! state — so bursts coalesce and a slow agent skips intermediate versions instead of queueing
//! them. Streams end cleanly when the replica shuts down.
//!
//! `ReportStatus` feeds the `Programmed` conditions. Only the leader writes status, so a replica
//! that is not the leader forwards what it receives to the leader (see [`Forwarder`]).
use std::{pin::Pin, sync::Arc};

use cortexflow_domain::{AgentStatus, NodeConfig};
use cortexflow_proto::agent::v1::{self, agent_config_server::AgentConfig};
use futures::Stream;
use opentelemetry::KeyValue;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    lease::Leadership,
    metrics::OperatorMetrics,
    store::{Sent, Store},
};

/// Largest message the server sends (a full snapshot of a large cluster).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

pub struct AgentConfigService {
    store: Arc<Store>,
    metrics: OperatorMetrics,
    shutdown: watch::Receiver<bool>,
    leadership: watch::Receiver<Leadership>,
    forward: mpsc::Sender<AgentStatus>,
}

impl AgentConfigService {
    pub fn new(
        store: Arc<Store>,
        metrics: OperatorMetrics,
        shutdown: watch::Receiver<bool>,
        leadership: watch::Receiver<Leadership>,
        forward: mpsc::Sender<AgentStatus>,
    ) -> Self {
        Self {
            store,
            metrics,
            shutdown,
            leadership,
            forward,
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
impl AgentConfig for AgentConfigService {
    type SubscribeStream = ConfigStream;

    async fn subscribe(
        &self,
        req: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let req = req.into_inner();
        if req.node.is_empty() {
            return Err(Status::invalid_argument("SubscribeRequest.node is empty"));
        }
        let node = req.node;
        tracing::info!(%node, agent_version = %req.agent_version, "agent subscribed");
        let (tx, rx) = mpsc::channel::<Result<v1::NodeConfig, Status>>(1);
        let store = self.store.clone();
        let metrics = self.metrics.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let _connected = store.connect();
            let mut versions = store.versions();
            let mut sent = Sent::default();
            loop {
                // Wait until the agent can take a message, then build the freshest one.
                let permit = tokio::select! {
                    p = tx.reserve() => match p { Ok(p) => p, Err(_) => break },
                    _ = shutdown.changed() => break,
                };
                let msg: NodeConfig = loop {
                    if let Some(m) = store.next_config(&node, &mut sent) {
                        break m;
                    }
                    tokio::select! {
                        r = versions.changed() => if r.is_err() { return },
                        _ = shutdown.changed() => return,
                        _ = tx.closed() => return,
                    }
                };
                let kind = if msg.full { "full" } else { "update" };
                metrics.configs_sent.add(1, &[KeyValue::new("kind", kind)]);
                permit.send(Ok(v1::NodeConfig::from(&msg)));
            }
            tracing::info!(%node, "agent stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_status(
        &self,
        req: Request<Streaming<v1::AgentStatus>>,
    ) -> Result<Response<v1::ReportStatusResponse>, Status> {
        let mut stream = req.into_inner();
        let mut shutdown = self.shutdown.clone();
        loop {
            let msg = tokio::select! {
                m = stream.message() => m?,
                _ = shutdown.changed() => None,
            };
            let Some(msg) = msg else { break };
            let status = AgentStatus::try_from(msg).map_err(|e| Status::invalid_argument(e.0))?;
            if let Some((v, e)) = &status.failed {
                tracing::warn!(node = %status.node, version = v, error = %e, "agent refused a config");
            }
            if self.leadership.borrow().is_leader {
                self.store.report(status);
            } else {
                // Keep our own copy too (for logs and a fast start when we become leader).
                self.store.report(status.clone());
                let _ = self.forward.try_send(status);
            }
        }
        Ok(Response::new(v1::ReportStatusResponse {}))
    }
}

/// Forwards agent reports received by a replica that is not the leader to the leader's gRPC
/// address (published in the Lease). Reports are best effort: agents repeat theirs every 30 s.
pub struct Forwarder;

impl Forwarder {
    pub fn spawn(mut rx: mpsc::Receiver<AgentStatus>, leadership: watch::Receiver<Leadership>) {
        tokio::spawn(async move {
            let mut current: Option<(String, mpsc::Sender<v1::AgentStatus>)> = None;
            while let Some(s) = rx.recv().await {
                let l = leadership.borrow().clone();
                if l.is_leader {
                    continue;
                }
                let Some(addr) = l.leader_address.clone() else {
                    continue;
                };
                if current
                    .as_ref()
                    .is_none_or(|(a, tx)| *a != addr || tx.is_closed())
                {
                    current = connect(&addr).await.map(|tx| (addr.clone(), tx));
                }
                if let Some((_, tx)) = &current
                    && tx.send(v1::AgentStatus::from(&s)).await.is_err()
                {
                    current = None;
                }
            }
        });
    }
}

async fn connect(addr: &str) -> Option<mpsc::Sender<v1::AgentStatus>> {
    let uri = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = tonic::transport::Endpoint::from_shared(uri)
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut client = v1::agent_config_client::AgentConfigClient::new(channel);
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        if let Err(e) = client
            .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
        {
            tracing::debug!(error = %e, "forwarding reports to the leader ended");
        }
    });
    Some(tx)
}
