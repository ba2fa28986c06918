//! The admission webhook's transport (docs/security.md, "The webhook's certificate"): HTTPS on
//! `--webhook-addr` with a serving certificate from the mesh CA for `--webhook-dns-names`,
//! renewed at half-life and after an issuer switch (each handshake takes the current one: hot
//! reload), and the `caBundle` of the MutatingWebhookConfiguration `--webhook-configuration`
//! kept equal to the trust bundle (re-written whenever it differs).
//!
//! `POST /mutate` answers AdmissionReview v1. This version injects nothing: every object is
//! admitted unchanged, with no patch (the proxy injector of the mTLS issue decides here).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, routing::post};
use cortexflow_runtime::drain::Watcher;
use cortexflow_trust::Credentials;
use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use kube::api::{Api, PostParams};
use opentelemetry::{KeyValue, metrics::Counter};
use tokio::sync::watch;

use crate::{ca::CaState, lease::Leadership};

/// Where the webhook listens and what it is called.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    /// The host names the apiserver reaches it by (`<service>.<namespace>.svc`).
    pub dns_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub configuration: String,
}

#[derive(Clone)]
struct Hook {
    requests: Counter<u64>,
}

async fn mutate(
    State(h): State<Hook>,
    Json(review): Json<serde_json::Value>,
) -> Json<serde_json::Value> {
    let uid = review["request"]["uid"].clone();
    let result = if uid.is_string() {
        "admitted"
    } else {
        "malformed"
    };
    h.requests.add(1, &[KeyValue::new("result", result)]);
    Json(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true},
    }))
}

/// Binds the webhook and registers its tasks: the HTTPS server, its certificate's renewal and
/// the `caBundle` reconciliation. Returns the address bound.
pub async fn spawn(
    sup: &mut cortexflow_runtime::Supervisor,
    client: kube::Client,
    state: Arc<CaState>,
    cfg: WebhookConfig,
    meter: &opentelemetry::metrics::Meter,
    leadership: watch::Receiver<Leadership>,
    drain: Watcher,
) -> anyhow::Result<SocketAddr> {
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
            .with_description("AdmissionReview requests the webhook answered, by result")
            .build(),
    };
    for r in ["admitted", "malformed"] {
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
    sup.spawn(
        "webhook/ca bundle",
        reconcile_ca_bundle(client, state, cfg.configuration, leadership, drain),
    );
    Ok(local)
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
