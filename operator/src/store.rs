//! The state every part of a replica shares: the engine (behind a read-write lock: one writer,
//! the engine task; many readers, the config streams and the status writer), a notification of
//! every new version, what agents reported, and the statuses the CRs carry now.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use cortexflow_domain::{self as domain, AgentStatus, NodeConfig, NodeInfo, PolicyGeneration};
use cortexflow_operator_core::{Change, Engine, EngineConfig, Kind, ObjKey};
use opentelemetry::KeyValue;
use tokio::sync::{mpsc, watch};

use crate::metrics::OperatorMetrics;

/// What one agent last reported.
#[derive(Clone, Debug)]
pub struct Report {
    pub applied_version: u64,
    pub failed: Option<(u64, String)>,
    pub policies: BTreeSet<PolicyGeneration>,
    /// Endpoints (`namespace/name`) whose policy is in the node's kernel.
    pub programmed: BTreeSet<String>,
    pub at: Instant,
}

/// The shared state of a replica.
pub struct Store {
    engine: RwLock<Engine>,
    /// Added to engine versions on the wire: the start time in ms, shifted left by 20 bits, so
    /// versions also increase across restarts.
    version_base: u64,
    version: watch::Sender<u64>,
    /// When each recent engine version was produced.
    version_times: Mutex<VecDeque<(u64, Instant)>>,
    reports: Mutex<BTreeMap<String, Report>>,
    reported: watch::Sender<u64>,
    /// The `status` the API server holds for each MeshPolicy and ServiceIdentity.
    observed_status: Mutex<BTreeMap<(Kind, ObjKey), serde_json::Value>>,
    connected: AtomicU64,
    metrics: OperatorMetrics,
}

/// What a config stream already sent, section by section (engine versions).
#[derive(Clone, Debug, Default)]
pub struct Sent {
    started: bool,
    info: u64,
    endpoints: u64,
    ipcache: u64,
    services: u64,
    identities: u64,
}

impl Store {
    pub fn new(cfg: EngineConfig, metrics: OperatorMetrics) -> Arc<Self> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            engine: RwLock::new(Engine::new(cfg)),
            version_base: ms << 20,
            version: watch::channel(0).0,
            version_times: Mutex::new(VecDeque::new()),
            reports: Mutex::new(BTreeMap::new()),
            reported: watch::channel(0).0,
            observed_status: Mutex::new(BTreeMap::new()),
            connected: AtomicU64::new(0),
            metrics,
        })
    }

    /// Reads the engine.
    pub fn read<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        match self.engine.read() {
            Ok(e) => f(&e),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Applies a batch to the engine and announces the new version.
    pub fn apply(&self, changes: Vec<Change>) -> cortexflow_operator_core::Update {
        let kinds: BTreeSet<&'static str> = changes.iter().map(change_kind).collect();
        let up = match self.engine.write() {
            Ok(mut e) => e.apply(changes),
            Err(poisoned) => poisoned.into_inner().apply(changes),
        };
        for k in kinds {
            self.metrics.reconciles.add(1, &[KeyValue::new("kind", k)]);
        }
        if let Ok(mut t) = self.version_times.lock() {
            t.push_back((up.version, Instant::now()));
            while t.len() > 4096 {
                t.pop_front();
            }
        }
        self.read(|e| {
            self.metrics
                .identities
                .record(e.allocations().ids.len() as u64, &[]);
        });
        self.metrics
            .config_version
            .record(self.version_base + up.version, &[]);
        self.version.send_replace(up.version);
        up
    }

    /// A receiver that sees every new engine version.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// When engine version `v` (or the nearest older one still remembered) was produced.
    pub fn version_time(&self, v: u64) -> Option<Instant> {
        let t = self.version_times.lock().ok()?;
        t.iter().rev().find(|(ver, _)| *ver <= v).map(|(_, at)| *at)
    }

    /// Records an agent's report.
    pub fn report(&self, s: AgentStatus) {
        if let Ok(mut r) = self.reports.lock() {
            r.insert(
                s.node.clone(),
                Report {
                    applied_version: s.applied_version,
                    failed: s.failed,
                    policies: s.policies,
                    programmed: s.programmed,
                    at: Instant::now(),
                },
            );
        }
        self.reported.send_modify(|n| *n += 1);
    }

    /// Every agent's last report.
    pub fn reports(&self) -> BTreeMap<String, Report> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A receiver that sees every new report.
    pub fn reported(&self) -> watch::Receiver<u64> {
        self.reported.subscribe()
    }

    /// Records the status the API server holds for a CR (from the watch).
    pub fn observe_status(&self, kind: Kind, key: ObjKey, status: Option<serde_json::Value>) {
        if let Ok(mut m) = self.observed_status.lock() {
            match status {
                Some(s) => m.insert((kind, key), s),
                None => m.remove(&(kind, key)),
            };
        }
    }

    /// The status the API server holds for a CR.
    pub fn observed_status(&self, kind: Kind, key: &ObjKey) -> Option<serde_json::Value> {
        self.observed_status
            .lock()
            .ok()?
            .get(&(kind, key.clone()))
            .cloned()
    }

    /// Counts an open config stream; the guard uncounts it.
    pub fn connect(self: &Arc<Self>) -> ConnectedGuard {
        let n = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.connected_agents.record(n, &[]);
        ConnectedGuard(self.clone())
    }

    /// The wire version of an engine version.
    pub fn wire_version(&self, v: u64) -> u64 {
        self.version_base + v
    }

    /// The engine version of a wire version of this replica (`None` for another replica's).
    pub fn engine_version(&self, wire: u64) -> Option<u64> {
        wire.checked_sub(self.version_base)
            .filter(|v| *v < (1 << 20) * 1024)
    }

    /// The next message for a node's stream: everything on the first call, then only the
    /// sections that changed since `sent`; `None` when nothing did.
    pub fn next_config(&self, node: &str, sent: &mut Sent) -> Option<NodeConfig> {
        self.read(|e| {
            let first = !sent.started;
            let mut msg = NodeConfig {
                version: self.wire_version(e.version()),
                full: first,
                ..Default::default()
            };
            let st = e.node(node);
            let (info, info_v) = match st {
                Some(s) => ((*s.info).clone(), s.info_version),
                None => (
                    NodeInfo {
                        name: node.to_string(),
                        ..Default::default()
                    },
                    0,
                ),
            };
            if first || info_v > sent.info {
                msg.node = Some(info);
                sent.info = info_v;
            }
            let (eps, eps_v) = match st {
                Some(s) => ((*s.endpoints).clone(), s.endpoints_version),
                None => (domain::Endpoints::default(), 0),
            };
            if first || eps_v > sent.endpoints {
                msg.endpoints = Some(eps);
                sent.endpoints = eps_v;
            }
            let (_, ipv) = e.ipcache();
            if first {
                msg.ipcache = Some(e.ipcache_full());
                sent.ipcache = ipv;
            } else if ipv > sent.ipcache {
                msg.ipcache = Some(
                    e.ipcache_since(sent.ipcache)
                        .unwrap_or_else(|| e.ipcache_full()),
                );
                sent.ipcache = ipv;
            }
            let (svcs, sv) = e.services();
            if first || sv > sent.services {
                msg.services = Some((*svcs).clone());
                sent.services = sv;
            }
            let (ids, iv) = e.identities();
            if first || iv > sent.identities {
                msg.identities = Some((*ids).clone());
                sent.identities = iv;
            }
            sent.started = true;
            let any = msg.node.is_some()
                || msg.endpoints.is_some()
                || msg.ipcache.is_some()
                || msg.services.is_some()
                || msg.identities.is_some();
            any.then_some(msg)
        })
    }
}

/// Uncounts a config stream on drop.
pub struct ConnectedGuard(Arc<Store>);

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        let n = self
            .0
            .connected
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.0.metrics.connected_agents.record(n, &[]);
    }
}

fn change_kind(c: &Change) -> &'static str {
    let k = match c {
        Change::Apply(o) => o.kind(),
        Change::Delete(k, _) | Change::Reset(k, _) => *k,
        Change::Allocations(_) => return "Allocations",
    };
    match k {
        Kind::Namespace => "Namespace",
        Kind::Pod => "Pod",
        Kind::ServiceIdentity => "ServiceIdentity",
        Kind::MeshPolicy => "MeshPolicy",
        Kind::Service => "Service",
        Kind::EndpointSlice => "EndpointSlice",
        Kind::Node => "Node",
    }
}

/// The engine task: takes changes off `rx`, coalesces bursts (everything queued goes into one
/// batch) and applies them.
pub async fn run_engine(store: Arc<Store>, mut rx: mpsc::Receiver<Change>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let span = tracing::debug_span!("apply", changes = batch.len());
        let _g = span.enter();
        let up = store.apply(batch);
        tracing::debug!(
            version = up.version,
            nodes = up.nodes.len(),
            ipcache = up.ipcache,
            services = up.services,
            "applied"
        );
    }
}
