//! Flow events: read from the datapath's ring buffer, counted in the metrics, named (pods,
//! identities, rules) and streamed to `Flows.Observe` clients.
use std::{net::Ipv4Addr, pin::Pin, sync::Arc};

use aya::maps::{MapData, RingBuf};
use cortexflow_common::{DIR_EGRESS, FlowEvent, Reason, verdict_name};
use cortexflow_proto::flows::v1;
use cortexflow_runtime::drain::Watcher;
use futures::Stream;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status};

use crate::{metrics::AgentMetrics, state::Received};

/// Shared view of the config, for naming things in flows.
pub type ConfigView = watch::Receiver<Arc<Received>>;

/// Nanoseconds to add to the kernel's monotonic clock (`bpf_ktime_get_ns`) to get Unix time.
pub fn boot_offset_ns() -> i128 {
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC);
    let real = nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME);
    match (mono, real) {
        (Ok(m), Ok(r)) => {
            let ns = |t: nix::sys::time::TimeSpec| {
                i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
            };
            ns(r) - ns(m)
        }
        _ => 0,
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "TCP".into(),
        17 => "UDP".into(),
        1 => "ICMP".into(),
        n => n.to_string(),
    }
}

/// A flow event with names.
pub fn describe(ev: &FlowEvent, r: &Received, node: &str, offset_ns: i128) -> v1::Flow {
    let peer = |ip: u32, port: u16, identity: u32| {
        let ip = Ipv4Addr::from(ip.to_ne_bytes());
        let ep = r.endpoint_by_ip(ip);
        v1::FlowPeer {
            ip: u32::from(ip),
            port: u32::from(u16::from_be(port)),
            identity,
            identity_name: r.identity_name(identity),
            namespace: ep.map(|e| e.namespace.clone()).unwrap_or_default(),
            pod: ep.map(|e| e.name.clone()).unwrap_or_default(),
        }
    };
    let rule = (ev.rule != 0)
        .then(|| r.endpoints.rules.get(&ev.rule))
        .flatten()
        .map(|rr| v1::FlowRule {
            id: ev.rule,
            namespace: rr.namespace.clone(),
            policy: rr.policy.clone(),
            direction: rr.direction.as_str().into(),
            index: rr.index,
        });
    v1::Flow {
        time_unix_nanos: u64::try_from(i128::from(ev.timestamp_ns) + offset_ns).unwrap_or(0),
        node: node.to_string(),
        direction: direction_name(ev.direction).into(),
        verdict: verdict_name(ev.verdict).into(),
        reason: Reason::from_u8(ev.reason)
            .map_or("unknown", Reason::name)
            .into(),
        protocol: protocol_name(ev.protocol),
        source: Some(peer(ev.saddr, ev.sport, ev.src_identity)),
        destination: Some(peer(ev.daddr, ev.dport, ev.dst_identity)),
        rule,
        lost: 0,
    }
}

fn direction_name(d: u8) -> &'static str {
    if d == DIR_EGRESS { "egress" } else { "ingress" }
}

/// Reads the ring buffer until `shutdown`: counts every event, names it and publishes it (to
/// the history and to the streams observing).
pub async fn pump(
    ring: RingBuf<MapData>,
    config: ConfigView,
    node: String,
    metrics: AgentMetrics,
    hub: Arc<FlowHub>,
    shutdown: Watcher,
) -> std::io::Result<()> {
    let offset = boot_offset_ns();
    let mut fd = crate::sys::async_ring_buffer(ring)?;
    // The kernel writes events without waking us (it does when the ring is a quarter full):
    // read every DRAIN_EVERY, a batch at a time.
    let mut tick = tokio::time::interval(DRAIN_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let drain = |rb: &mut RingBuf<MapData>| {
        let view = config.borrow().clone();
        while let Some(item) = rb.next() {
            let Some(ev) = cortexflow_common::FlowEvent::from_bytes(&item) else {
                continue;
            };
            metrics.flow(
                ev.verdict,
                direction_name(ev.direction),
                Reason::from_u8(ev.reason),
            );
            hub.publish(Arc::new(describe(&ev, &view, &node, offset)));
        }
    };
    loop {
        tokio::select! {
            g = fd.readable_mut() => {
                let mut guard = g?;
                drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = tick.tick() => drain(fd.get_mut()),
            () = shutdown.signaled() => return Ok(()),
        }
    }
}

/// How many flows an agent keeps for `ObserveRequest.last` (`cfcli flows --last`,
/// `cfcli explain`): the most recent of its node, about 1 MiB.
pub const FLOW_HISTORY: usize = 4096;

/// Where named flows go: the history of the last [`FLOW_HISTORY`], and every stream observing.
pub struct FlowHub {
    tx: broadcast::Sender<Arc<v1::Flow>>,
    history: std::sync::Mutex<std::collections::VecDeque<Arc<v1::Flow>>>,
}

impl FlowHub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            tx: broadcast::channel(4096).0,
            history: std::sync::Mutex::new(std::collections::VecDeque::with_capacity(FLOW_HISTORY)),
        })
    }

    pub fn publish(&self, f: Arc<v1::Flow>) {
        {
            let mut h = match self.history.lock() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            if h.len() == FLOW_HISTORY {
                h.pop_front();
            }
            h.push_back(f.clone());
        }
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(f);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<v1::Flow>> {
        self.tx.subscribe()
    }

    /// The `n` most recent flows of the history that pass `q`, oldest first.
    pub fn recent(&self, q: &v1::ObserveRequest, n: usize) -> Vec<Arc<v1::Flow>> {
        let h = match self.history.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let mut out: Vec<_> = h
            .iter()
            .rev()
            .filter(|f| matches(f, q))
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

/// How often the flow pump reads the ring buffer when the kernel did not wake it.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(20);

/// The `cortexflow.agent.v1.Flows` service.
#[derive(Clone)]
pub struct FlowsService {
    hub: Arc<FlowHub>,
    shutdown: Watcher,
    access: crate::flows_auth::FlowsAccess,
}

impl FlowsService {
    pub fn new(
        hub: Arc<FlowHub>,
        shutdown: Watcher,
        access: crate::flows_auth::FlowsAccess,
    ) -> Self {
        Self {
            hub,
            shutdown,
            access,
        }
    }

    pub fn into_server(self) -> v1::flows_server::FlowsServer<Self> {
        v1::flows_server::FlowsServer::new(self)
    }
}

/// Whether a flow passes an `Observe` filter.
pub fn matches(f: &v1::Flow, q: &v1::ObserveRequest) -> bool {
    if !q.direction.is_empty() && q.direction != f.direction {
        return false;
    }
    if !q.verdicts.is_empty() && !q.verdicts.contains(&f.verdict) {
        return false;
    }
    if q.namespace.is_empty() {
        return true;
    }
    // The local side: the source of an egress flow, the destination of an ingress one.
    let local = if f.direction == "egress" {
        f.source.as_ref()
    } else {
        f.destination.as_ref()
    };
    local.is_some_and(|p| p.namespace == q.namespace && (q.pod.is_empty() || p.pod == q.pod))
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<v1::Flow, Status>> + Send>>;

#[tonic::async_trait]
impl v1::flows_server::Flows for FlowsService {
    type ObserveStream = FlowStream;

    #[tracing::instrument(
        name = "Observe",
        skip_all,
        fields(namespace = %req.get_ref().namespace, pod = %req.get_ref().pod)
    )]
    async fn observe(
        &self,
        req: Request<v1::ObserveRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        self.access
            .authorize(req.metadata(), &req.get_ref().namespace)
            .await?;
        let q = req.into_inner();
        if !q.pod.is_empty() && q.namespace.is_empty() {
            return Err(Status::invalid_argument("a pod filter needs a namespace"));
        }
        for v in &q.verdicts {
            if !cortexflow_common::VERDICT_NAMES.contains(&v.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "verdict {v:?} is not one of {}",
                    cortexflow_common::VERDICT_NAMES.join(", ")
                )));
            }
        }
        if !["", "ingress", "egress"].contains(&q.direction.as_str()) {
            return Err(Status::invalid_argument(format!(
                "direction {:?} is neither ingress nor egress",
                q.direction
            )));
        }
        // Subscribed before the history is read: nothing falls between the two; a flow in both
        // is sent once (the history's flows are held, so their addresses stay theirs).
        let mut rx = self.hub.subscribe();
        let history = self.hub.recent(
            &q,
            usize::try_from(q.last)
                .unwrap_or(usize::MAX)
                .min(FLOW_HISTORY),
        );
        let shutdown = self.shutdown.clone();
        let stream = async_stream::stream! {
            let mut sent = 0u64;
            let mut lost = 0u64;
            let sent_before: std::collections::HashSet<usize> =
                history.iter().map(|f| Arc::as_ptr(f) as usize).collect();
            for f in &history {
                yield Ok((**f).clone());
                sent += 1;
                if q.limit != 0 && sent >= q.limit {
                    return;
                }
            }
            if q.history_only {
                return;
            }
            loop {
                let f = tokio::select! {
                    f = rx.recv() => f,
                    () = shutdown.signaled() => break,
                };
                match f {
                    Ok(f) => {
                        if !matches(&f, &q) || sent_before.contains(&(Arc::as_ptr(&f) as usize)) {
                            continue;
                        }
                        let mut f = (*f).clone();
                        f.lost = std::mem::take(&mut lost);
                        yield Ok(f);
                        sent += 1;
                        if q.limit != 0 && sent >= q.limit {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => lost += n,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(direction: &str, verdict: &str, src: (&str, &str), dst: (&str, &str)) -> v1::Flow {
        let p = |(ns, pod): (&str, &str)| v1::FlowPeer {
            namespace: ns.into(),
            pod: pod.into(),
            ..Default::default()
        };
        v1::Flow {
            direction: direction.into(),
            verdict: verdict.into(),
            source: Some(p(src)),
            destination: Some(p(dst)),
            ..Default::default()
        }
    }

    #[test]
    fn filters_match_the_local_side() {
        let egress = flow("egress", "dropped", ("shop", "web"), ("", ""));
        let ingress = flow("ingress", "allowed", ("", ""), ("shop", "db"));
        let q = |ns: &str, pod: &str| v1::ObserveRequest {
            namespace: ns.into(),
            pod: pod.into(),
            ..Default::default()
        };
        assert!(matches(&egress, &q("shop", "web")));
        assert!(!matches(&egress, &q("shop", "db")));
        assert!(matches(&ingress, &q("shop", "db")));
        assert!(matches(&ingress, &q("shop", "")));
        assert!(!matches(&ingress, &q("other", "")));
        let dropped = v1::ObserveRequest {
            verdicts: vec!["dropped".into()],
            ..Default::default()
        };
        assert!(matches(&egress, &dropped));
        assert!(!matches(&ingress, &dropped));
        let ing = v1::ObserveRequest {
            direction: "ingress".into(),
            ..Default::default()
        };
        assert!(!matches(&egress, &ing));
    }
}
