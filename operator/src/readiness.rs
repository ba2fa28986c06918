//! The pod readiness gate `mesh.cortexflow.io/programmed`.
//!
//! A pod that lists this condition type in `spec.readinessGates` is not Ready — and receives no
//! Service traffic — until the mesh says its policy is enforced. The agent of the pod's node
//! reports the endpoints whose policy is in its kernel (`AgentStatus.programmed`); while this
//! replica leads, this task sets the pod's condition to True (`reason: Programmed`) from those
//! reports. The kubelet (or the lab's node simulator, which follows the same rule) then marks
//! the pod Ready. The condition is set once; it does not go back to False when the pod's policy
//! later changes (readiness gates are about a pod's first traffic).
//!
//! Only pods with the gate whose condition is not True yet are remembered, so a cluster of
//! ungated pods costs nothing but the watch events.
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use tokio::sync::watch;

use crate::{lease::Leadership, store::Store};

/// The condition type of the readiness gate.
pub const GATE: &str = "mesh.cortexflow.io/programmed";

/// Whether `p` waits for the gate: it lists it, runs on a node, and the condition is not True.
fn waiting(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let gated = spec
        .readiness_gates
        .iter()
        .flatten()
        .any(|g| g.condition_type == GATE);
    let done = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == GATE && c.status == "True"));
    (gated && !done && p.metadata.deletion_timestamp.is_none())
        .then(|| spec.node_name.clone())
        .flatten()
}

/// Runs until `shutdown`.
pub async fn run(
    client: Client,
    store: Arc<Store>,
    leadership: watch::Receiver<Leadership>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Pod> = Api::all(client.clone());
    let mut events = std::pin::pin!(watcher::watcher(api, watcher::Config::default()));
    let mut reported = store.reported();
    // `namespace/name` → node, of the pods waiting for the gate.
    let mut waiting_pods: BTreeMap<String, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                    let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
                    match waiting(&p) {
                        Some(node) => { waiting_pods.insert(key, node); }
                        None => { waiting_pods.remove(&key); }
                    }
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    waiting_pods.remove(&format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pod watch (readiness gate) error; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                None => return,
            },
            _ = reported.changed() => {}
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if waiting_pods.is_empty() || !leadership.borrow().is_leader {
            continue;
        }
        let reports = store.reports();
        let ready: Vec<(String, String)> = waiting_pods
            .iter()
            .filter(|(key, node)| {
                reports
                    .get(node.as_str())
                    .is_some_and(|r| r.programmed.contains(key.as_str()))
            })
            .map(|(k, n)| (k.clone(), n.clone()))
            .collect();
        for (key, node) in ready {
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let api: Api<Pod> = Api::namespaced(client.clone(), ns);
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let patch = serde_json::json!({"status": {"conditions": [{
                "type": GATE, "status": "True", "reason": "Programmed",
                "message": format!("policy enforced by the agent of node {node}"),
                "lastTransitionTime": now,
            }]}});
            match api
                .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => {
                    tracing::info!(pod = %key, %node, "readiness gate {GATE} set");
                    waiting_pods.remove(&key);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    waiting_pods.remove(&key);
                }
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "setting the readiness gate failed")
                }
            }
        }
    }
}
