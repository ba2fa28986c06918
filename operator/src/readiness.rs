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
//! The [`Gate`] is fed by the operator's one Pod watch (the engine's, `index.rs`): only pods with
//! the gate whose condition is not True yet are remembered, so a cluster of ungated pods costs
//! nothing but the watch events it already receives.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use cortexflow_crds::conditions::{READINESS_GATE, reasons};
use cortexflow_runtime::drain::Watcher;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
};
use tokio::sync::{Notify, watch};
use tracing::Instrument as _;

use crate::{lease::Leadership, store::Store};

/// A pod waiting for the gate: its node and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    pub node: String,
    pub ip: Option<std::net::Ipv4Addr>,
}

/// The pods waiting for the gate, by `namespace/name`.
#[derive(Default)]
pub struct Gate {
    waiting: Mutex<BTreeMap<String, Waiting>>,
    changed: Notify,
}

/// Whether `report` (of the pod's node) says the pod `key` at address `ip` is enforced: it
/// lists the pod, at that address — a report about an earlier pod of the same name (a
/// StatefulSet pod re-created on the node, with a new address) does not count. Reports of
/// agents that predate addresses are taken by name.
pub fn programmed_here(
    report: &crate::store::Report,
    key: &str,
    ip: Option<std::net::Ipv4Addr>,
) -> bool {
    report.programmed.contains(key)
        && (report.programmed_at.is_empty()
            || ip.is_some_and(|ip| report.programmed_at.get(key) == Some(&ip)))
}

impl Gate {
    /// Takes in a pod the watch saw (`deleted`: its last state).
    pub fn observe(&self, p: &Pod, deleted: bool) {
        let key = format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any());
        let node = if deleted { None } else { waiting(p) };
        let mut w = self.lock();
        let changed = match node {
            Some(node) => {
                let entry = Waiting {
                    node,
                    ip: p
                        .status
                        .as_ref()
                        .and_then(|s| s.pod_ip.as_deref())
                        .and_then(|ip| ip.parse().ok()),
                };
                w.insert(key, entry.clone()).as_ref() != Some(&entry)
            }
            None => w.remove(&key).is_some(),
        };
        drop(w);
        if changed {
            self.changed.notify_one();
        }
    }

    /// The waiting pods.
    pub fn waiting(&self) -> BTreeMap<String, Waiting> {
        self.lock().clone()
    }

    fn done(&self, key: &str) {
        self.lock().remove(key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Waiting>> {
        self.waiting
            .lock()
            .expect("the readiness gate lock is poisoned: a task panicked while holding it")
    }
}

/// Whether `p` waits for the gate: it lists it, runs on a node, and the condition is not True.
fn waiting(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let gated = spec
        .readiness_gates
        .iter()
        .flatten()
        .any(|g| g.condition_type == READINESS_GATE);
    let done = p
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == READINESS_GATE && c.status == "True")
        });
    (gated && !done && p.metadata.deletion_timestamp.is_none())
        .then(|| spec.node_name.clone())
        .flatten()
}

/// Sets the gate of waiting pods whose node reported them programmed, while this replica
/// leads; runs until the drain.
pub async fn run(
    client: Client,
    gate: Arc<Gate>,
    store: Arc<Store>,
    leadership: watch::Receiver<Leadership>,
    shutdown: Watcher,
) -> anyhow::Result<()> {
    let mut reported = store.reported();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = gate.changed.notified() => {}
            _ = reported.changed() => {}
            _ = tick.tick() => {}
            () = shutdown.signaled() => return Ok(()),
        }
        if !leadership.borrow().acting() {
            continue;
        }
        let waiting = gate.waiting();
        if waiting.is_empty() {
            continue;
        }
        let reports = store.reports();
        for (key, w) in waiting {
            let node = w.node;
            let programmed = reports
                .get(node.as_str())
                .is_some_and(|r| programmed_here(r, &key, w.ip));
            if !programmed {
                continue;
            }
            let Some((ns, name)) = key.split_once('/') else {
                continue;
            };
            let span = tracing::info_span!("readiness gate", pod = %key, %node);
            set_gate(&client, &gate, &key, ns, name, &node)
                .instrument(span)
                .await;
        }
    }
}

async fn set_gate(client: &Client, gate: &Gate, key: &str, ns: &str, name: &str, node: &str) {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({"status": {"conditions": [{
        "type": READINESS_GATE, "status": "True", "reason": reasons::PROGRAMMED,
        "message": format!("policy enforced by the agent of node {node}"),
        "lastTransitionTime": now,
    }]}});
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!("readiness gate {READINESS_GATE} set");
            gate.done(key);
        }
        Err(kube::Error::Api(e)) if e.code == 404 => gate.done(key),
        Err(e) => tracing::warn!(error = %e, "setting the readiness gate failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{collections::BTreeSet, net::Ipv4Addr, time::Instant};

    fn report(programmed: &[(&str, Option<[u8; 4]>)]) -> crate::store::Report {
        crate::store::Report {
            applied_version: 1,
            failed: None,
            policies: BTreeSet::new(),
            programmed: programmed.iter().map(|(k, _)| k.to_string()).collect(),
            programmed_at: programmed
                .iter()
                .filter_map(|(k, ip)| Some((k.to_string(), Ipv4Addr::from((*ip)?))))
                .collect(),
            trust_bundle: String::new(),
            at: Instant::now(),
        }
    }

    #[test]
    fn a_report_counts_for_the_pod_at_the_address_it_names_only() {
        let r = report(&[("db/web-0", Some([10, 0, 0, 5]))]);
        assert!(programmed_here(
            &r,
            "db/web-0",
            Some(Ipv4Addr::new(10, 0, 0, 5))
        ));
        // The pod re-created with the same name and a new address: not yet.
        assert!(!programmed_here(
            &r,
            "db/web-0",
            Some(Ipv4Addr::new(10, 0, 0, 9))
        ));
        assert!(!programmed_here(&r, "db/web-0", None));
        assert!(!programmed_here(
            &r,
            "db/web-1",
            Some(Ipv4Addr::new(10, 0, 0, 5))
        ));
        // An agent that predates addresses: by name.
        let old = report(&[("db/web-0", None)]);
        assert!(programmed_here(
            &old,
            "db/web-0",
            Some(Ipv4Addr::new(10, 0, 0, 9))
        ));
    }
}
