//! The leader's status writer: what the engine and the agents' reports say, written to the
//! `status` of every ServiceIdentity and MeshPolicy — only when it differs from what the object
//! already carries (conditions compared without their timestamps), by server-side apply with a
//! fixed field manager. A condition keeps its `lastTransitionTime` while its status does not
//! change. Notable transitions also become Kubernetes Events.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use cortexflow_crds::conditions::{self, reasons};
use cortexflow_domain::PolicyGeneration;
use cortexflow_operator_core::{Cond, CondReason, Kind, ObjKey, PolicyStatus};
use cortexflow_runtime::drain::Watcher;
use k8s_openapi::{api::core::v1::ObjectReference, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use opentelemetry::KeyValue;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::{allocator::FIELD_MANAGER, lease::Leadership, metrics::OperatorMetrics, store::Store};

/// The reason string the API shows for a reason of the engine.
fn reason(r: CondReason) -> &'static str {
    match r {
        CondReason::Accepted => reasons::ACCEPTED,
        CondReason::Invalid => reasons::INVALID,
        CondReason::ResolvedRefs => reasons::RESOLVED_REFS,
        CondReason::IdentityNotFound => reasons::IDENTITY_NOT_FOUND,
        CondReason::Pending => reasons::PENDING,
        CondReason::Allocated => reasons::ALLOCATED,
        CondReason::InvalidSelector => reasons::INVALID_SELECTOR,
        CondReason::ClaimedByOlderIdentity => reasons::CLAIMED_BY_OLDER_IDENTITY,
        CondReason::NoConflict => reasons::NO_CONFLICT,
        CondReason::MtlsDisabled => reasons::MTLS_DISABLED,
        CondReason::ProxyNotAvailable => reasons::PROXY_NOT_AVAILABLE,
    }
}

/// One condition as written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Condition {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
    generation: i64,
}

impl Condition {
    fn from(type_: &'static str, c: &Cond, generation: i64) -> Self {
        Self {
            type_,
            status: c.status,
            reason: reason(c.reason),
            message: c.message.clone(),
            generation,
        }
    }

    /// As JSON, keeping the observed transition time when the status did not change.
    fn to_json(&self, observed: Option<&Value>) -> Value {
        let status = if self.status { "True" } else { "False" };
        let kept = observed
            .filter(|o| o["status"] == status)
            .and_then(|o| o["lastTransitionTime"].as_str().map(str::to_string));
        json!({
            "type": self.type_,
            "status": status,
            "reason": self.reason,
            "message": self.message,
            "observedGeneration": self.generation,
            "lastTransitionTime": kept.unwrap_or_else(|| Timestamp::now().to_string()),
        })
    }

    /// Whether the observed condition says the same (timestamps aside).
    fn same_as(&self, observed: Option<&Value>) -> bool {
        observed.is_some_and(|o| {
            o["status"] == if self.status { "True" } else { "False" }
                && o["reason"] == self.reason
                && o["message"] == self.message.as_str()
                && o["observedGeneration"] == self.generation
        })
    }
}

fn observed_condition<'a>(status: Option<&'a Value>, type_: &str) -> Option<&'a Value> {
    status?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Whether an agent report says the node applied generation `g` of the policy.
fn applied(policies: &BTreeSet<PolicyGeneration>, key: &ObjKey, generation: i64) -> bool {
    policies.iter().any(|p| {
        *p.namespace == *key.namespace && *p.name == *key.name && p.generation >= generation
    })
}

/// The desired status of every object, with the conditions that make it up.
struct Desired {
    kind: Kind,
    key: ObjKey,
    fields: serde_json::Map<String, Value>,
    conditions: Vec<Condition>,
}

/// The `Programmed` condition of a policy at `generation`, from the agents' reports, and how
/// many of the nodes that need it have it.
fn programmed(store: &Store, key: &ObjKey, generation: i64) -> (Condition, usize, usize) {
    let (nodes, _) = store.read(|e| e.policy_nodes(key)).unwrap_or_default();
    let reports = store.reports();
    let mut done = 0;
    let mut failed = Vec::new();
    for n in &nodes {
        match reports.get(n) {
            Some(r) if applied(&r.policies, key, generation) => done += 1,
            Some(r) => {
                if let Some((_, e)) = &r.failed {
                    failed.push(format!("{n}: {e}"));
                }
            }
            None => {}
        }
    }
    let total = nodes.len();
    let msg = format!("programmed on {done}/{total} nodes");
    let (status, reason, message) = if done == total {
        (true, reasons::PROGRAMMED, msg)
    } else if let Some(first) = failed.first() {
        (
            false,
            reasons::FAILED,
            format!(
                "{msg}; {} node(s) refused the config, first {first}",
                failed.len()
            ),
        )
    } else {
        (false, reasons::PENDING, msg)
    };
    let c = Condition {
        type_: conditions::PROGRAMMED,
        status,
        reason,
        message,
        generation,
    };
    (c, done, total)
}

/// The `Programmed` condition of a policy: about its generation when that is accepted; when it
/// is not, always False (`Invalid`), saying which generation is in force and where, or that
/// none is.
fn policy_programmed(store: &Store, key: &ObjKey, s: &PolicyStatus) -> Condition {
    if s.accepted.status {
        return programmed(store, key, s.generation).0;
    }
    let message = match &s.in_force {
        Some(f) => {
            let (c, _, _) = programmed(store, key, f.generation);
            format!(
                "generation {} is not in force (not accepted); generation {}, the last accepted, is {}",
                s.generation, f.generation, c.message
            )
        }
        None => format!(
            "generation {} is not in force (not accepted), nor is any other: no generation of this policy was accepted",
            s.generation
        ),
    };
    Condition {
        type_: conditions::PROGRAMMED,
        status: false,
        reason: reasons::INVALID,
        message,
        generation: s.generation,
    }
}

fn desired(store: &Store) -> Vec<Desired> {
    let mut out = Vec::new();
    let (sids, policies) = store.read(|e| {
        (
            e.sid_statuses_all()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect::<Vec<_>>(),
            e.policy_statuses()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect::<Vec<_>>(),
        )
    });
    for (key, s) in sids {
        let Some(id) = s.id else { continue };
        let mut fields = serde_json::Map::new();
        fields.insert("id".into(), json!(id));
        fields.insert("spiffeId".into(), json!(s.spiffe_id));
        fields.insert("endpoints".into(), json!(s.endpoints));
        fields.insert("observedGeneration".into(), json!(s.generation));
        out.push(Desired {
            kind: Kind::ServiceIdentity,
            key,
            fields,
            conditions: vec![
                Condition::from(conditions::ACCEPTED, &s.accepted, s.generation),
                Condition::from(conditions::CONFLICT, &s.conflict, s.generation),
                Condition::from(conditions::MTLS, &s.mtls, s.generation),
            ],
        });
    }
    for (key, s) in policies {
        if s.pending {
            continue;
        }
        let prog = policy_programmed(store, &key, &s);
        let mut fields = serde_json::Map::new();
        fields.insert("observedGeneration".into(), json!(s.generation));
        if let Some(f) = &s.in_force
            && let Ok(spec) = serde_json::from_str::<Value>(&f.spec_json)
        {
            fields.insert(
                "inForce".into(),
                json!({"generation": f.generation, "spec": spec}),
            );
        }
        out.push(Desired {
            kind: Kind::MeshPolicy,
            key,
            fields,
            conditions: vec![
                Condition::from(conditions::ACCEPTED, &s.accepted, s.generation),
                Condition::from(conditions::RESOLVED_REFS, &s.resolved_refs, s.generation),
                prog,
            ],
        });
    }
    out
}

fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::MeshPolicy => ApiResource::erase::<cortexflow_crds::MeshPolicy>(&()),
        _ => ApiResource::erase::<cortexflow_crds::ServiceIdentity>(&()),
    }
}

/// Runs the status writer until `shutdown`; it writes only while this replica leads.
pub async fn run(
    client: Client,
    store: Arc<Store>,
    metrics: OperatorMetrics,
    reporter: Reporter,
    mut leadership: watch::Receiver<Leadership>,
    shutdown: Watcher,
) -> anyhow::Result<()> {
    let recorder = Recorder::new(client.clone(), reporter);
    let mut versions = store.versions();
    let mut reported = store.reported();
    let mut propagating = Propagating::new();
    let mut first_round = true;
    loop {
        tokio::select! {
            _ = versions.changed() => {}
            _ = reported.changed() => {}
            _ = leadership.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            () = shutdown.signaled() => return Ok(()),
        }
        if !leadership.borrow().acting() {
            propagating.clear();
            first_round = true;
            continue;
        }
        // Let a burst settle into one round of writes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let round = desired(&store);
        track_propagation(&store, &metrics, &mut propagating, first_round);
        first_round = false;
        for d in round {
            if !leadership.borrow().acting() {
                break;
            }
            let span = tracing::info_span!("status write", kind = d.kind.as_str(), object = %d.key);
            write(&client, &store, &metrics, &recorder, d)
                .instrument(span)
                .await;
        }
    }
}

/// Per policy: the generation being timed, when it appeared, and whether it is done.
type Propagating = BTreeMap<ObjKey, (i64, Instant, bool)>;

/// Observes, for each policy generation that appears while this replica leads, the time from the
/// engine compiling it to every node that needs it reporting it applied.
fn track_propagation(
    store: &Store,
    metrics: &OperatorMetrics,
    propagating: &mut Propagating,
    first_round: bool,
) {
    let statuses: Vec<(ObjKey, i64, u64)> = store.read(|e| {
        e.policy_statuses()
            .filter(|(_, s)| !s.pending && s.accepted.status)
            .filter_map(|(k, s)| Some((k.clone(), s.generation, e.policy_nodes(k)?.1)))
            .collect()
    });
    let live: BTreeSet<&ObjKey> = statuses.iter().map(|(k, _, _)| k).collect();
    propagating.retain(|k, _| live.contains(k));
    for (key, generation, changed_at) in &statuses {
        let known = propagating
            .get(key)
            .is_some_and(|(g, _, _)| g == generation);
        if !known {
            // Generations already there when we became leader are not timed.
            let start = store.version_time(*changed_at).unwrap_or_else(Instant::now);
            propagating.insert(key.clone(), (*generation, start, first_round));
        }
        if let Some((_, start, done)) = propagating.get_mut(key)
            && !*done
        {
            let (_, n, total) = programmed(store, key, *generation);
            if total > 0 && n == total {
                metrics
                    .propagation
                    .record(start.elapsed().as_secs_f64(), &[]);
                *done = true;
            }
        }
    }
}

/// Status fields the writer sets only sometimes.
const OPTIONAL_FIELDS: [&str; 1] = ["inForce"];

async fn write(
    client: &Client,
    store: &Store,
    metrics: &OperatorMetrics,
    recorder: &Recorder,
    d: Desired,
) {
    let observed = store.observed_status(d.kind, &d.key);
    let unchanged = d
        .fields
        .iter()
        .all(|(k, v)| observed.as_ref().and_then(|o| o.get(k)) == Some(v))
        // A field the writer owns that the desired status leaves out is removed.
        && OPTIONAL_FIELDS
            .iter()
            .all(|f| d.fields.contains_key(*f) || observed.as_ref().and_then(|o| o.get(*f)).is_none())
        && d.conditions
            .iter()
            .all(|c| c.same_as(observed_condition(observed.as_ref(), c.type_)));
    if unchanged {
        return;
    }
    let mut status = d.fields.clone();
    status.insert(
        "conditions".into(),
        Value::Array(
            d.conditions
                .iter()
                .map(|c| c.to_json(observed_condition(observed.as_ref(), c.type_)))
                .collect(),
        ),
    );
    let ar = api_resource(d.kind);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &d.key.namespace, &ar);
    let body = json!({"apiVersion": ar.api_version, "kind": ar.kind, "status": Value::Object(status.clone())});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch_status(&d.key.name, &params, &Patch::Apply(&body))
        .await
    {
        Ok(_) => {
            metrics
                .status_writes
                .add(1, &[KeyValue::new("kind", ar.kind.clone())]);
            store.observe_status(d.kind, d.key.clone(), Some(Value::Object(status)));
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => {
            tracing::warn!(kind = %ar.kind, object = %d.key, error = %e, "status write failed");
            metrics
                .reconcile_errors
                .add(1, &[KeyValue::new("kind", ar.kind.clone())]);
            return;
        }
    }
    // Events for transitions of a condition's status.
    let reference = ObjectReference {
        api_version: Some(ar.api_version.clone()),
        kind: Some(ar.kind.clone()),
        name: Some(d.key.name.to_string()),
        namespace: Some(d.key.namespace.to_string()),
        ..Default::default()
    };
    for c in &d.conditions {
        let before = observed_condition(observed.as_ref(), c.type_).map(|o| o["status"] == "True");
        if before == Some(c.status)
            || (before.is_none() && c.status && c.type_ != conditions::CONFLICT)
        {
            continue;
        }
        let warning = (c.type_ == conditions::CONFLICT) == c.status;
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.to_string(),
            note: Some(c.message.clone()),
            action: format!("Update{}", c.type_),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            tracing::debug!(error = %e, "publishing an event failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: bool, message: &str) -> Condition {
        Condition {
            type_: conditions::PROGRAMMED,
            status,
            reason: if status {
                reasons::PROGRAMMED
            } else {
                reasons::PENDING
            },
            message: message.into(),
            generation: 3,
        }
    }

    #[test]
    fn a_condition_is_the_same_only_when_everything_but_the_time_is() {
        let c = cond(true, "programmed on 2/2 nodes");
        let written = c.to_json(None);
        assert!(c.same_as(Some(&written)));
        let mut other_time = written.clone();
        other_time["lastTransitionTime"] = json!("2020-01-01T00:00:00Z");
        assert!(c.same_as(Some(&other_time)), "timestamps do not count");
        for (field, value) in [
            ("status", json!("False")),
            ("reason", json!("Pending")),
            ("message", json!("programmed on 1/2 nodes")),
            ("observedGeneration", json!(2)),
        ] {
            let mut o = written.clone();
            o[field] = value;
            assert!(!c.same_as(Some(&o)), "{field} differs");
        }
        assert!(!c.same_as(None));
    }

    #[test]
    fn the_transition_time_changes_only_with_the_status() {
        let old = json!({"type": "Programmed", "status": "True", "reason": "Programmed",
                         "message": "x", "observedGeneration": 2,
                         "lastTransitionTime": "2020-01-01T00:00:00Z"});
        // Same status, new message and generation: the time is kept.
        let kept = cond(true, "programmed on 3/3 nodes").to_json(Some(&old));
        assert_eq!(kept["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(kept["message"], "programmed on 3/3 nodes");
        // Flipped: a new time.
        let flipped = cond(false, "programmed on 1/3 nodes").to_json(Some(&old));
        assert_ne!(flipped["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_eq!(flipped["status"], "False");
    }

    #[test]
    fn every_engine_reason_is_a_distinct_reason_of_the_api() {
        let mut written: Vec<&str> = CondReason::ALL.iter().map(|r| reason(*r)).collect();
        for r in &written {
            assert!(
                reasons::ALL.contains(r),
                "{r} is not in cortexflow_crds::conditions::reasons"
            );
        }
        written.sort();
        written.dedup();
        assert_eq!(
            written.len(),
            CondReason::ALL.len(),
            "two engine reasons map to one string"
        );
    }
}
