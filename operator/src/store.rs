//! The state every part of a replica shares: the engine (behind a read-write lock: one writer,
//! the engine task; many readers, the config streams and the status writer), a notification of
//! every new version, the revision up to which the replica has applied every source (the sync
//! gate), what agents reported, and the statuses the CRs carry now.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use cortexflow_domain::{AgentStatus, NodeConfig, PolicyGeneration};
use cortexflow_operator_core::{Change, Cursor, Engine, EngineConfig, Kind, ObjKey};
use cortexflow_runtime::drain::Watcher;
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
    /// The address each has in the kernel (empty from agents that predate it).
    pub programmed_at: BTreeMap<String, std::net::Ipv4Addr>,
    /// The digest of the trust bundle the agent verifies with.
    pub trust_bundle: String,
    pub at: Instant,
}

/// Where an input of the engine comes from: the watch of a kind, or the id table's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Kind(Kind),
    IdTable,
}

impl Source {
    /// Every source: the replica is synced once each has been listed and applied.
    pub const ALL: [Source; 8] = [
        Source::Kind(Kind::Namespace),
        Source::Kind(Kind::Node),
        Source::Kind(Kind::Pod),
        Source::Kind(Kind::ServiceIdentity),
        Source::Kind(Kind::MeshPolicy),
        Source::Kind(Kind::Service),
        Source::Kind(Kind::EndpointSlice),
        Source::IdTable,
    ];
}

/// One input of the engine task: what `source` saw at `revision` (a change, or `None` when the
/// watch only moved on: a bookmark, or an object that did not deserialize).
#[derive(Clone, Debug)]
pub struct Input {
    pub source: Source,
    pub revision: u64,
    pub change: Option<Change>,
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
    connected: Arc<AtomicU64>,
    metrics: OperatorMetrics,
    /// The revision up to which each source's events are applied to the engine.
    revisions: Mutex<BTreeMap<Source, u64>>,
    /// Flips once every source has been listed and applied.
    synced: watch::Sender<bool>,
    /// Whether a missing or unreadable id table may be started afresh although CortexFlow
    /// objects carry statuses (which an operator wrote with numbers from a table).
    recreate_table: bool,
    /// Whether the sync is held for a lost table (logged once).
    held_for_table: std::sync::atomic::AtomicBool,
    /// The counters of the last table this replica wrote (the watch may not have brought it
    /// back yet).
    written_counters: Mutex<(u32, u32)>,
}

impl Store {
    pub fn new(cfg: EngineConfig, metrics: OperatorMetrics) -> Arc<Self> {
        Self::with_table_policy(cfg, metrics, false)
    }

    /// [`Store::new`]; `recreate_table` lets a replica that finds the id table missing or
    /// unreadable start a new one even though CortexFlow objects carry statuses.
    pub fn with_table_policy(
        cfg: EngineConfig,
        metrics: OperatorMetrics,
        recreate_table: bool,
    ) -> Arc<Self> {
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
            connected: Arc::new(AtomicU64::new(0)),
            metrics,
            revisions: Mutex::new(BTreeMap::new()),
            synced: watch::channel(false).0,
            recreate_table,
            held_for_table: std::sync::atomic::AtomicBool::new(false),
            written_counters: Mutex::new((0, 0)),
        })
    }

    /// Reads the engine.
    ///
    /// A poisoned lock means the engine task panicked in the middle of a batch: the engine may
    /// be half-updated, so nobody reads it — the caller panics too, and the supervisor (which
    /// already saw the engine task die) ends the process.
    pub fn read<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        let e = self
            .engine
            .read()
            .expect("the engine lock is poisoned: the engine task panicked mid-batch");
        f(&e)
    }

    /// Applies a batch of inputs: their changes to the engine, then their revisions; announces
    /// the new version when the engine changed or the replica just became synced.
    pub fn apply(&self, inputs: Vec<Input>) -> Option<cortexflow_operator_core::Update> {
        let mut changes = Vec::new();
        let mut seen: Vec<(Source, u64, bool)> = Vec::new();
        for i in inputs {
            // A source counts from its first full list on (a kind's Reset, the id table).
            let listing = matches!(
                i.change,
                Some(Change::Reset(..) | Change::Allocations(_) | Change::TableUnreadable { .. })
            );
            seen.push((i.source, i.revision, listing));
            changes.extend(i.change);
        }
        let up = (!changes.is_empty()).then(|| self.apply_changes(changes));
        let revision_before = self.revision();
        let became_synced = {
            let mut r = lock(&self.revisions);
            for (source, rev, listing) in seen {
                if listing || r.contains_key(&source) {
                    let e = r.entry(source).or_insert(rev);
                    *e = (*e).max(rev);
                }
            }
            Source::ALL.iter().all(|s| r.contains_key(s)) && !*self.synced.borrow()
        } && self.table_allows_sync();
        if became_synced {
            self.synced.send_replace(true);
            tracing::info!(revision = ?self.revision(), "every source listed and applied: serving configs");
        }
        if up.is_some() || became_synced {
            self.prune_reports();
        }
        match &up {
            Some(up) => {
                self.version.send_replace(up.version);
            }
            None if became_synced => {
                self.version.send_modify(|_| {});
            }
            // Only the revision rose (bookmarks, an unchanged relist): streams an agent holds
            // for being older than its kernel may now be able to send (grpc.rs).
            None if self.revision() > revision_before => {
                self.version.send_modify(|_| {});
            }
            None => {}
        }
        up
    }

    fn apply_changes(&self, changes: Vec<Change>) -> cortexflow_operator_core::Update {
        let kinds: BTreeSet<&'static str> = changes.iter().map(change_kind).collect();
        let up = self
            .engine
            .write()
            .expect("the engine lock is poisoned: the engine task panicked mid-batch")
            .apply(changes);
        for k in kinds {
            self.metrics.reconciles.add(1, &[KeyValue::new("kind", k)]);
        }
        {
            let mut t = lock(&self.version_times);
            t.push_back((up.version, Instant::now()));
            while t.len() > 4096 {
                t.pop_front();
            }
        }
        self.read(|e| {
            self.metrics
                .identities
                .record(e.allocations().ids.len() as u64, &[]);
            self.metrics
                .id_table_ok
                .record(u64::from(e.table_problem().is_none()), &[]);
            self.metrics
                .id_table_bytes
                .record(e.allocations().encoded_size() as u64, &[]);
        });
        self.metrics
            .config_version
            .record(self.version_base + up.version, &[]);
        up
    }

    /// Whether the id table lets this replica become synced: it was read, or there is none yet
    /// and nothing says there was one. A **lost** table (missing or unreadable while the
    /// leader's Lease records counters it reached) holds the sync: starting a new table would
    /// renumber every identity. It is released when a readable table appears, or at once with
    /// `--id-table-recreate` (numbering afresh, beyond every number handed out before).
    fn table_allows_sync(&self) -> bool {
        let lost = self.read(|e| {
            e.table_lost()
                .then(|| e.table_problem().unwrap_or("").to_string())
        });
        let Some(problem) = lost else {
            return true;
        };
        if self.recreate_table {
            if !self.held_for_table.swap(true, Ordering::Relaxed) {
                tracing::warn!(%problem, "the id table is lost: numbering afresh (--id-table-recreate), beyond every number handed out before");
            }
            return true;
        }
        if !self.held_for_table.swap(true, Ordering::Relaxed) {
            tracing::error!(
                %problem,
                "the id table is lost: not serving configs and not allocating, so that no identity is renumbered; restore the ConfigMap, or start the operator with --id-table-recreate to number afresh"
            );
        }
        false
    }

    /// The revision up to which this replica has applied every event of every source: `None`
    /// until each has been listed (the sync gate: no config stream sends anything before).
    pub fn revision(&self) -> Option<u64> {
        let r = lock(&self.revisions);
        Source::ALL
            .iter()
            .map(|s| r.get(s).copied())
            .collect::<Option<Vec<u64>>>()
            .map(|v| v.into_iter().min().unwrap_or(0))
    }

    /// Records the counters of a table this replica wrote.
    pub fn wrote_counters(&self, identities: u32, policies: u32) {
        let mut c = lock(&self.written_counters);
        *c = (c.0.max(identities), c.1.max(policies));
    }

    /// How far the id table's counters have gone as far as this replica knows: those of the
    /// table in use (once synced and readable) and of the last table it wrote.
    pub fn known_counters(&self) -> Option<(u32, u32)> {
        self.revision()?;
        let engine = self.read(|e| {
            let a = e.allocations();
            e.table_problem()
                .is_none()
                .then_some((a.next_identity, a.next_policy))
        })?;
        let w = *lock(&self.written_counters);
        Some((engine.0.max(w.0), engine.1.max(w.1)))
    }

    /// A receiver that flips to `true` once the replica is synced.
    pub fn synced(&self) -> watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// A receiver that sees every new engine version.
    pub fn versions(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// When engine version `v` (or the nearest older one still remembered) was produced.
    pub fn version_time(&self, v: u64) -> Option<Instant> {
        let t = lock(&self.version_times);
        t.iter().rev().find(|(ver, _)| *ver <= v).map(|(_, at)| *at)
    }

    /// Forgets the reports of nodes that left (no Node object any more), once the Nodes are
    /// listed: a departed node's last report must not speak for pods of the same name later.
    fn prune_reports(&self) {
        if !*self.synced.borrow() {
            return;
        }
        let names: Vec<String> = lock(&self.reports).keys().cloned().collect();
        let gone: Vec<String> =
            self.read(|e| names.into_iter().filter(|n| !e.has_node(n)).collect());
        if !gone.is_empty() {
            tracing::info!(nodes = ?gone, "forgetting the reports of nodes that left");
            lock(&self.reports).retain(|n, _| !gone.contains(n));
        }
    }

    /// Records an agent's report (not from a node that does not exist, once the Nodes are
    /// listed).
    pub fn report(&self, s: AgentStatus) {
        if *self.synced.borrow() && !self.read(|e| e.has_node(&s.node)) {
            tracing::debug!(node = %s.node, "a report from a node that does not exist: not kept");
            return;
        }
        lock(&self.reports).insert(
            s.node.clone(),
            Report {
                applied_version: s.applied_version,
                failed: s.failed,
                policies: s.policies,
                programmed: s.programmed,
                programmed_at: s.programmed_at,
                trust_bundle: s.trust_bundle,
                at: Instant::now(),
            },
        );
        self.reported.send_modify(|n| *n += 1);
    }

    /// Every agent's last report.
    pub fn reports(&self) -> BTreeMap<String, Report> {
        lock(&self.reports).clone()
    }

    /// A receiver that sees every new report.
    pub fn reported(&self) -> watch::Receiver<u64> {
        self.reported.subscribe()
    }

    /// Records the status the API server holds for a CR (from the watch).
    pub fn observe_status(&self, kind: Kind, key: ObjKey, status: Option<serde_json::Value>) {
        let mut m = lock(&self.observed_status);
        match status {
            Some(s) => m.insert((kind, key), s),
            None => m.remove(&(kind, key)),
        };
    }

    /// The status the API server holds for a CR.
    pub fn observed_status(&self, kind: Kind, key: &ObjKey) -> Option<serde_json::Value> {
        lock(&self.observed_status)
            .get(&(kind, key.clone()))
            .cloned()
    }

    /// Counts an open config stream; the guard uncounts it.
    pub fn connect(&self) -> ConnectedGuard {
        let n = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.connected_agents.record(n, &[]);
        ConnectedGuard {
            connected: self.connected.clone(),
            metrics: self.metrics.clone(),
        }
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

    /// The next message for a node's stream (see [`cortexflow_operator_core::stream`]),
    /// stamped with the replica's revision; `None` before the replica is synced.
    pub fn next_config(&self, node: &str, cursor: &mut Cursor) -> Option<NodeConfig> {
        self.read(|e| {
            // Read under the engine lock: the revision never claims more than the engine holds
            // (revisions are raised only after their changes are applied).
            let revision = self.revision()?;
            let mut m = e.next_config(node, cursor, self.wire_version(e.version()))?;
            m.revision = revision;
            Some(m)
        })
    }
}

impl crate::grpc::Configs for Store {
    fn versions(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn next_config(&self, node: &str, cursor: &mut Cursor) -> Option<NodeConfig> {
        Store::next_config(self, node, cursor)
    }

    fn revision(&self) -> Option<u64> {
        Store::revision(self)
    }

    fn stream_opened(&self) -> Box<dyn Send> {
        Box::new(self.connect())
    }
}

/// Uncounts a config stream on drop.
pub struct ConnectedGuard {
    connected: Arc<AtomicU64>,
    metrics: OperatorMetrics,
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        let n = self
            .connected
            .fetch_sub(1, Ordering::Relaxed)
            .saturating_sub(1);
        self.metrics.connected_agents.record(n, &[]);
    }
}

fn change_kind(c: &Change) -> &'static str {
    match c {
        Change::Apply(o) => o.kind().as_str(),
        Change::Delete(k, _) | Change::Reset(k, _) => k.as_str(),
        Change::Allocations(_) | Change::TableUnreadable { .. } => "Allocations",
    }
}

/// The engine task: takes inputs off `rx`, coalesces bursts (everything queued goes into one
/// batch, up to 4 096) and applies them, one `engine` span per pass. Ends on the drain; the
/// watches going away before that is a failure.
pub async fn run_engine(
    store: Arc<Store>,
    mut rx: mpsc::Receiver<Input>,
    drain: Watcher,
) -> anyhow::Result<()> {
    loop {
        let first = tokio::select! {
            c = rx.recv() => match c {
                Some(c) => c,
                None => anyhow::bail!("every watch is gone"),
            },
            () = drain.signaled() => return Ok(()),
        };
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => batch.push(c),
                Err(_) => break,
            }
        }
        let kinds: BTreeSet<&'static str> = batch
            .iter()
            .filter_map(|i| i.change.as_ref())
            .map(change_kind)
            .collect();
        let span = tracing::info_span!(
            "engine",
            inputs = batch.len(),
            kinds = ?kinds,
            version = tracing::field::Empty,
            revision = tracing::field::Empty
        );
        let up = span.in_scope(|| store.apply(batch));
        if let Some(r) = store.revision() {
            span.record("revision", r);
        }
        if let Some(up) = up {
            span.record("version", up.version);
            span.in_scope(|| {
                tracing::debug!(
                    nodes = up.nodes.len(),
                    ipcache = up.ipcache,
                    services = up.services,
                    policies = up.policies.len(),
                    "applied"
                )
            });
        }
    }
}

/// Locks a mutex of the store. A poisoned one means a task panicked while it held it: its
/// content may be half-written, so it is never used again (the caller panics too; a critical
/// task's panic ends the process).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock()
        .expect("a store lock is poisoned: a task panicked while holding it")
}
