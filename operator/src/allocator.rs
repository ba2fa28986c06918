//! The leader's id allocator: after every engine batch, gives every key that needs an id one
//! and persists the table in a ConfigMap (which every replica watches: that is how ids reach the
//! engines, the leader's own included).
//!
//! Why a ConfigMap: ids must survive operator restarts and upgrades and be the same on every
//! replica; one small object read at start-up and watched afterwards does both, and the counters
//! stored with the ids guarantee an id is never handed out twice.
use std::sync::Arc;

use cortexflow_operator_core::Allocations;
use cortexflow_runtime::drain::Watcher;
use k8s_openapi::{api::core::v1::ConfigMap, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use opentelemetry::KeyValue;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::{lease::Leadership, metrics::OperatorMetrics, store::Store};

pub const FIELD_MANAGER: &str = "cortexflow-operator";

/// Where the id table lives.
pub struct Table {
    pub client: Client,
    pub namespace: String,
    pub name: String,
}

/// Runs the allocator until `shutdown`. `table_synced` must flip once the table has been read
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
    } = table;
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let mut versions = store.versions();
    // What this leader wrote last: authoritative while it leads, ahead of the watch.
    let mut written: Option<Allocations> = None;
    loop {
        tokio::select! {
            _ = versions.changed() => {}
            _ = leadership.changed() => { written = None; }
            _ = table_synced.changed() => {}
            () = shutdown.signaled() => return Ok(()),
        }
        if !leadership.borrow().is_leader || !*table_synced.borrow() {
            continue;
        }
        let (current, needed) = store.read(|e| (e.allocations().clone(), e.needed_allocations()));
        let base = match &written {
            // The watch may lag behind our own write.
            Some(w)
                if w.next_identity >= current.next_identity
                    && w.next_policy >= current.next_policy =>
            {
                w.clone()
            }
            _ => current,
        };
        let next = match base.allocate(&needed) {
            Ok(Some(next)) => next,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot allocate ids");
                metrics
                    .reconcile_errors
                    .add(1, &[KeyValue::new("kind", "Allocations")]);
                continue;
            }
        };
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
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
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let span = tracing::info_span!("id table write", configmap = %name, ids = next.ids.len());
        match api
            .patch(&name, &params, &Patch::Apply(&cm))
            .instrument(span)
            .await
        {
            Ok(_) => {
                tracing::info!(ids = next.ids.len(), "wrote the id table");
                written = Some(next);
            }
            Err(e) => {
                tracing::warn!(error = %e, "writing the id table failed; retrying on the next change");
                metrics
                    .reconcile_errors
                    .add(1, &[KeyValue::new("kind", "Allocations")]);
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                versions.mark_changed();
            }
        }
    }
}
