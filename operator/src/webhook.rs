//! The admission webhook's transport (docs/security.md, "The webhook's certificate"): HTTPS on
//! `--webhook-addr` with a serving certificate from the mesh CA for `--webhook-dns-names`,
//! renewed at half-life and after an issuer switch (each handshake takes the current one: hot
//! reload), and the `caBundle` of the MutatingWebhookConfiguration `--webhook-configuration`
//! kept equal to the trust bundle (re-written whenever it differs).
//!
//! `POST /mutate` answers AdmissionReview v1 for pod creations with what [`crate::injector`]
//! decides — a JSON patch, nothing, or a refusal — from the replica's engine (the namespace's
//! annotation and the ServiceIdentity that claims the pod). Until the replica has listed every
//! source once it refuses (`503`): with the chart's `failurePolicy: Fail` the apiserver then
//! refuses the pod and its controller retries, so no pod is admitted on a partial view.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use cortexflow_runtime::drain::Watcher;
use cortexflow_trust::Credentials;
use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::api::{Api, PostParams};
use opentelemetry::{KeyValue, metrics::Counter};
use tokio::sync::watch;

use crate::{
    ca::CaState,
    injector::{self, Decision, InjectorConfig},
    lease::Leadership,
    store::Store,
};

/// Where the webhook listens and what it is called.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    /// The host names the apiserver reaches it by (`<service>.<namespace>.svc`).
    pub dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub configuration: String,
    pub injector: InjectorConfig,
}

#[derive(Clone)]
struct Hook {
    requests: Counter<u64>,
    store: Arc<Store>,
    synced: watch::Receiver<bool>,
    injector: Arc<InjectorConfig>,
    /// The trust bundle the proxy starts from is the CA's at the pod's creation.
    ca: Arc<CaState>,
}

/// Results of the webhook's requests metric.
const RESULTS: [&str; 5] = ["patched", "admitted", "refused", "unavailable", "malformed"];

/// The AdmissionReview response for `uid`, with the metric's result.
fn answer(h: &Hook, review: &serde_json::Value) -> (&'static str, serde_json::Value) {
    let req = &review["request"];
    let uid = req["uid"].clone();
    let malformed = |why: &str| {
        (
            "malformed",
            serde_json::json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": why}}),
        )
    };
    if !uid.is_string() {
        return malformed("not an AdmissionReview v1 request");
    }
    // Only pod creations are this webhook's (the configuration sends nothing else).
    if req["kind"]["kind"] != "Pod" || req["operation"] != "CREATE" {
        return ("admitted", serde_json::json!({"uid": uid, "allowed": true}));
    }
    let namespace = req["namespace"].as_str().unwrap_or_default().to_string();
    let object = &req["object"];
    let Ok(mut pod) = serde_json::from_value::<k8s_openapi::api::core::v1::Pod>(object.clone())
    else {
        return malformed("the request's object is not a Pod");
    };
    if !*h.synced.borrow() {
        return (
            "unavailable",
            serde_json::json!({"uid": uid, "allowed": false, "status": {"code": 503,
                "message": "CortexFlow's operator is starting (it has not read the cluster's identities yet); retry"}}),
        );
    }
    pod.metadata.namespace = Some(namespace.clone());
    let model = crate::index::pod(&pod);
    let (ns_inject, identity) = h.store.read(|e| {
        (
            e.snapshot()
                .namespaces
                .get(&namespace)
                .and_then(|n| n.inject.clone()),
            e.claiming_identity(&model)
                .map(|s| (s.key.name.to_string(), s.mtls)),
        )
    });
    let bundle = h.ca.bundle();
    if h.injector.inject_proxy && bundle.ders().is_empty() {
        return (
            "unavailable",
            serde_json::json!({"uid": uid, "allowed": false, "status": {"code": 503,
                "message": "CortexFlow's mesh CA is not loaded yet (the proxy needs its trust bundle); retry"}}),
        );
    }
    let cfg = InjectorConfig {
        trust_bundle: bundle.to_pem(),
        ..(*h.injector).clone()
    };
    let decision = injector::decide(
        &cfg,
        object,
        &namespace,
        ns_inject.as_deref(),
        identity.as_ref().map(|(n, m)| (n.as_str(), *m)),
    );
    let who = format!(
        "{namespace}/{}",
        pod.metadata
            .name
            .clone()
            .or(pod.metadata.generate_name.clone().map(|g| format!("{g}*")))
            .unwrap_or_default()
    );
    match decision {
        Decision::Patch {
            ops,
            what,
            warnings,
        } => {
            // Checked against the JSON patch grammar before it is sent.
            let patch = match serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(
                ops,
            )) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(pod = %who, error = %e, "the injector built an invalid patch");
                    return (
                        "refused",
                        serde_json::json!({"uid": uid, "allowed": false,
                        "status": {"code": 500, "message": format!("CortexFlow's injector built an invalid patch: {e}")}}),
                    );
                }
            };
            tracing::debug!(pod = %who, adds = ?what, "pod patched");
            let bytes = serde_json::to_vec(&patch).unwrap_or_default();
            (
                "patched",
                serde_json::json!({"uid": uid, "allowed": true, "patchType": "JSONPatch",
                    "patch": ByteString(bytes), "warnings": warnings}),
            )
        }
        Decision::Unchanged { why, warnings } => {
            tracing::debug!(pod = %who, %why, "pod admitted unchanged");
            (
                "admitted",
                serde_json::json!({"uid": uid, "allowed": true, "warnings": warnings}),
            )
        }
        Decision::Refused(message) => {
            tracing::info!(pod = %who, %message, "pod refused");
            (
                "refused",
                serde_json::json!({"uid": uid, "allowed": false, "status": {"code": 400, "message": message}}),
            )
        }
    }
}

async fn mutate(
    State(h): State<Hook>,
    Json(review): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    let (result, response) = answer(&h, &review);
    h.requests.add(1, &[KeyValue::new("result", result)]);
    Json(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// Binds the webhook and registers its tasks: the HTTPS server, its certificate's renewal and
/// the `caBundle` reconciliation. Returns the address bound.
/// What the webhook reads: the API (its configuration), the CA (its certificate) and the
/// replica's engine (the pods' identities).
pub struct WebhookDeps {
    pub client: kube::Client,
    pub ca: Arc<CaState>,
    pub store: Arc<Store>,
}

pub async fn spawn(
    sup: &mut cortexflow_runtime::Supervisor,
    deps: WebhookDeps,
    cfg: WebhookConfig,
    meter: &opentelemetry::metrics::Meter,
    leadership: watch::Receiver<Leadership>,
    drain: Watcher,
) -> anyhow::Result<SocketAddr> {
    let WebhookDeps {
        client,
        ca: state,
        store,
    } = deps;
    let creds = Credentials::new();
    let names = cfg.dns_names.clone();
    sup.spawn(
        "webhook/serving certificate",
        crate::ca::keep_issued(
            state.clone(),
            creds.clone(),
            "webhook",
            drain.clone(),
            move |ca, lifetime, now| ca.issue_dns_server(&names, lifetime, now),
        )?,
    );
    let hook = Hook {
        requests: meter
            .u64_counter("operator_webhook_requests")
            .with_description("AdmissionReview requests the webhook answered, by result: patched, admitted (unchanged), refused, unavailable (not synced yet), malformed")
            .build(),
        synced: store.synced(),
        store: store.clone(),
        injector: Arc::new(cfg.injector.clone()),
        ca: state.clone(),
    };
    for r in RESULTS {
        hook.requests.add(0, &[KeyValue::new("result", r)]);
    }
    let app = Router::new()
        .route("/mutate", post(mutate))
        .with_state(hook);
    let tls = cortexflow_trust::tls::server_config_http(creds)?;
    let listener = tokio::net::TcpListener::bind(cfg.addr)
        .await
        .map_err(|e| anyhow::anyhow!("bind the webhook {}: {e}", cfg.addr))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, names = ?cfg.dns_names, "serving the admission webhook");
    {
        let drain = drain.clone();
        sup.spawn("webhook", async move {
            cortexflow_trust::tls::serve_http(app, listener, tls, drain.clone().into_signaled())
                .await?;
            drop(drain);
            Ok(())
        });
    }
    let without_proxy = meter
        .u64_gauge("operator_pods_without_proxy")
        .with_description("Live pods that ask for the mTLS proxy (annotation or ServiceIdentity mtls) but run without it: created while the injector did not answer; re-create them")
        .build();
    sup.spawn(
        "proxy audit",
        audit_proxies(store, cfg.injector.clone(), without_proxy, drain.clone()),
    );
    sup.spawn(
        "webhook/ca bundle",
        reconcile_ca_bundle(client, state, cfg.configuration, leadership, drain),
    );
    Ok(local)
}

/// Never an opted-in pod running without its proxy unnoticed: after every change of the
/// engine's state (at most once a second), the pods that ask for the proxy and lack it
/// ([`injector::pods_without_proxy`]) are counted in `cortexflow_operator_pods_without_proxy`
/// (which `cfcli check` reads) and each newly found one is logged as a warning with why it asks.
async fn audit_proxies(
    store: Arc<Store>,
    cfg: InjectorConfig,
    gauge: opentelemetry::metrics::Gauge<u64>,
    drain: Watcher,
) -> anyhow::Result<()> {
    gauge.record(0, &[]);
    let mut versions = store.versions();
    let mut known = std::collections::BTreeSet::new();
    loop {
        let missing = store.read(|e| injector::pods_without_proxy(&cfg, e));
        gauge.record(missing.len() as u64, &[]);
        let now: std::collections::BTreeSet<String> =
            missing.iter().map(|(p, _)| p.clone()).collect();
        for (pod, why) in &missing {
            if !known.contains(pod) {
                tracing::warn!(%pod, why = %why, "this pod asks for the mTLS proxy but runs without it (created while the injector did not answer?): re-create it");
            }
        }
        known = now;
        tokio::select! {
            r = versions.changed() => if r.is_err() { return Ok(()) },
            () = drain.signaled() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = drain.signaled() => return Ok(()),
        }
    }
}

/// On the leader, keeps every webhook of the configuration `name` carrying the trust bundle as
/// its `caBundle`: on every bundle change and every 10 s (a configuration created later, or
/// changed by someone else, is set right within that).
async fn reconcile_ca_bundle(
    client: kube::Client,
    state: Arc<CaState>,
    name: String,
    mut leadership: watch::Receiver<Leadership>,
    drain: Watcher,
) -> anyhow::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let mut bundles = state.bundles();
    loop {
        let pem = bundles.borrow_and_update().to_pem();
        let leads = leadership.borrow_and_update().is_leader;
        match if leads {
            api.get_opt(&name).await
        } else {
            Ok(None)
        } {
            Ok(Some(mut mwc)) => {
                let want = ByteString(pem.into_bytes());
                let mut changed = false;
                for w in mwc.webhooks.iter_mut().flatten() {
                    if w.client_config.ca_bundle.as_ref() != Some(&want) {
                        w.client_config.ca_bundle = Some(want.clone());
                        changed = true;
                    }
                }
                if changed {
                    match api.replace(&name, &PostParams::default(), &mwc).await {
                        Ok(_) => {
                            tracing::info!(configuration = %name, "webhook caBundle set to the trust bundle")
                        }
                        Err(e) => {
                            tracing::warn!(configuration = %name, error = %e, "setting the webhook caBundle failed; retrying")
                        }
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "reading the webhook configuration failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            r = bundles.changed() => if r.is_err() { return Ok(()) },
            r = leadership.changed() => if r.is_err() { return Ok(()) },
            () = drain.signaled() => return Ok(()),
        }
    }
}
