//! The leader's id allocator: gives every key that needs an id one and persists the table in a
//! ConfigMap, which every replica watches — that is how ids reach the engines, the leader's own
//! included.
//!
//! **Never renumber, never reuse.** The table written is always built on the one the engine
//! applied (never on a guess), and written with compare-and-set on the resourceVersion it was
//! read at: a write based on a stale table fails (409) and is retried once the watch delivered
//! the newer one. Only a replica acting as leader (its Lease renewed recently enough that no
//! other can have taken over) writes. When the ConfigMap is deleted, or edited into something
//! that is not a successor of the table in use (garbage, numbers changed, counters going back),
//! the engine keeps its numbers and the leader writes them back. Keys that do not fit the table
//! (its size limit, `MAX_TABLE_BYTES`) wait without a number, counted and logged; their pods
//! stay enforced (docs/policy.md).
//!
//! Why a ConfigMap: ids must survive operator restarts and upgrades and be the same on every
//! replica; one small object read at start-up and watched afterwards does both, and the
//! counters stored with the ids guarantee an id is never handed out twice.
use std::{sync::Arc, time::Duration};

use cortexflow_operator_core::Allocations;
use cortexflow_runtime::drain::Watcher;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, Client, api::PostParams};
use opentelemetry::KeyValue;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::{lease::Leadership, metrics::OperatorMetrics, store::Store};

pub const FIELD_MANAGER: &str = "cortexflow-operator";

/// Deadline of one write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the id table lives.
pub struct Table {
    pub client: Client,
    pub namespace: String,
    pub name: String,
    /// Notified after every write (the lease task then records the counters in the Lease).
    pub written: Arc<tokio::sync::Notify>,
}

/// How a write went.
enum Written {
    Done,
    /// Someone wrote in between: wait for the watch, then build on the newer table.
    Conflict,
}

/// Runs the allocator until the drain. `table_synced` must flip once the replica is synced
/// (allocating before would hand out ids already taken).
pub async fn run(
    table: Table,
    store: Arc<Store>,
    metrics: OperatorMetrics,
    mut leadership: watch::Receiver<Leadership>,
    mut table_synced: watch::Receiver<bool>,
    shutdown: Watcher,
) -> anyhow::Result<()> {
    let Table {
        client,
        namespace,
        name,
        written,
    } = table;
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut versions = store.versions();
    let mut retry: Option<Duration> = None;
    let mut last_waiting = 0;
    loop {
        tokio::select! {
            _ = versions.changed() => {}
            _ = leadership.changed() => {}
            _ = table_synced.changed() => {}
            _ = tokio::time::sleep(retry.unwrap_or(Duration::from_secs(3600))), if retry.is_some() => {}
            () = shutdown.signaled() => return Ok(()),
        }
        retry = None;
        if !leadership.borrow().acting() || !*table_synced.borrow() {
            continue;
        }
        let (base, needed, problem) = store.read(|e| {
            (
                e.allocations().clone(),
                e.needed_allocations(),
                e.table_problem().map(str::to_string),
            )
        });
        let allocated = base.allocate(&needed);
        metrics
            .id_table_waiting
            .record(allocated.waiting as u64, &[]);
        if allocated.waiting > 0 && allocated.waiting != last_waiting {
            tracing::error!(
                waiting = allocated.waiting,
                reason = allocated.reason.as_deref().unwrap_or(""),
                "keys wait for a number (their pods stay enforced as they are)"
            );
        }
        last_waiting = allocated.waiting;
        let next = match (allocated.table, &problem) {
            (Some(next), _) => next,
            // Nothing new, but the table in the cluster is not ours: write ours back.
            (None, Some(_)) => base.clone(),
            (None, None) => continue,
        };
        if !leadership.borrow().acting() {
            continue;
        }
        let span = tracing::info_span!("id table write", configmap = %name, ids = next.ids.len(), repair = problem.is_some());
        let result = tokio::time::timeout(
            WRITE_TIMEOUT,
            write(&api, &name, &namespace, &base, &next, problem.as_deref()).instrument(span),
        )
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {WRITE_TIMEOUT:?}")));
        match result {
            Ok(Written::Done) => {
                tracing::info!(
                    ids = next.ids.len(),
                    bytes = next.encoded_size(),
                    repaired = problem.as_deref().unwrap_or(""),
                    "wrote the id table"
                );
                metrics
                    .id_table_bytes
                    .record(next.encoded_size() as u64, &[]);
                store.wrote_counters(next.next_identity, next.next_policy);
                written.notify_one();
            }
            Ok(Written::Conflict) => {
                tracing::debug!("the id table changed meanwhile; building on the newer one");
                retry = Some(Duration::from_millis(200));
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the id table failed; retrying");
                metrics
                    .reconcile_errors
                    .add(1, &[KeyValue::new("kind", "Allocations")]);
                retry = Some(Duration::from_millis(500));
            }
        }
    }
}

/// Writes `next` (built on `base`, read at `base.version`) with compare-and-set. When the
/// cluster's table is missing or unreadable (`problem`), reads what is there first and replaces
/// it only if it is not a readable successor of `base` (someone may have restored it).
async fn write(
    api: &Api<ConfigMap>,
    name: &str,
    namespace: &str,
    base: &Allocations,
    next: &Allocations,
    problem: Option<&str>,
) -> anyhow::Result<Written> {
    let object = |version: Option<String>| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            resource_version: version,
            labels: Some(
                [(
                    "app.kubernetes.io/part-of".to_string(),
                    "cortexflow".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some(next.to_map()),
        ..Default::default()
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    let version = if problem.is_some() {
        match api.get_opt(name).await? {
            None => {
                tracing::warn!(problem, "writing the id table back from the numbers in use");
                return match api.create(&pp, &object(None)).await {
                    Ok(_) => Ok(Written::Done),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(Written::Conflict),
                    Err(e) => Err(e.into()),
                };
            }
            Some(cm) => {
                let rv = cm.metadata.resource_version.clone().unwrap_or_default();
                let readable = Allocations::from_map(&cm.data.clone().unwrap_or_default(), &rv);
                if readable.is_ok_and(|t| t.check_successor(base).is_ok()) {
                    // A good table is there (restored): the watch brings it.
                    return Ok(Written::Conflict);
                }
                tracing::warn!(problem, "replacing the id table with the numbers in use");
                Some(rv)
            }
        }
    } else {
        (!base.version.is_empty()).then(|| base.version.clone())
    };
    let result = match &version {
        Some(_) => api.replace(name, &pp, &object(version.clone())).await,
        None => api.create(&pp, &object(None)).await,
    };
    match result {
        Ok(_) => Ok(Written::Done),
        // The resourceVersion moved on (someone wrote), or it was created meanwhile.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Written::Conflict),
        // Deleted meanwhile: the watch says so, and the next round writes it back.
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Written::Conflict),
        Err(e) => Err(e.into()),
    }
}
