//! The mesh CA in the operator (docs/security.md, "Trust"):
//!
//! * [`load_or_create`] — the CA's material from the Secret `cortexflow-ca` (the user's, or the
//!   one the first replica generated and stored); material that does not check out stops the
//!   replica — it is never overwritten.
//! * [`CertificateService`] — `cortexflow.identity.v1.Certificates.Sign`: the caller's projected
//!   ServiceAccount token is reviewed for the audience `cortexflow-ca` only (TokenReview); the
//!   identity it may obtain follows from it alone ([`Caller`]); the CSR must ask for exactly
//!   that id.
//! * [`serve_own`] — this replica's serving certificate (`spiffe://<td>/cortexflow/operator`),
//!   renewed at half-life; [`publish_bundle`] — the ConfigMap `cortexflow-ca-bundle` that agents
//!   bootstrap from and anything else may verify mesh certificates with.
use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use cortexflow_domain::spiffe;
use cortexflow_operator_core::ObjKey;
use cortexflow_proto::identity::v1::{self, certificates_server::Certificates};
use cortexflow_runtime::drain::Watcher;
use cortexflow_trust::{
    Authority, Bundle, Credentials, Issued, KeyPair, Refusal, TOKEN_AUDIENCE, TrustStore,
    ca::Material,
};
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{ConfigMap, Pod, Secret},
    },
};
use kube::api::{Api, PostParams};
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge},
};
use std::time::Instant;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::store::Store;

/// Where the CA lives and whom it serves.
#[derive(Clone, Debug)]
pub struct CaConfig {
    pub namespace: String,
    /// The Secret holding the CA's material.
    pub secret: String,
    /// The ConfigMap the trust bundle is published in (key `ca.crt`).
    pub bundle_configmap: String,
    pub trust_domain: String,
    /// The agents' ServiceAccount (in `namespace`): its tokens obtain node certificates.
    pub agent_service_account: String,
    /// Lifetime of the leaves (capped by `cortexflow_trust::ca::MAX_LEAF_LIFETIME`).
    pub leaf_lifetime: Duration,
}

/// The CA's metrics.
#[derive(Clone)]
pub struct CaMetrics {
    pub issued: Counter<u64>,
    pub refused: Counter<u64>,
    pub expiry: Gauge<f64>,
    /// Issuer switches.
    pub rotations: Counter<u64>,
    /// Agents that have not acknowledged the bundle a pending issuer switch waits for.
    pub rotation_waiting: Gauge<u64>,
    /// Roots in the published bundle.
    pub bundle_roots: Gauge<u64>,
}

/// Labels of `cortexflow_ca_certificates_refused_total`.
pub const REFUSAL_REASONS: &[&str] = &[
    "token",
    "token_audience",
    "token_binding",
    "pod_node",
    "pod_unknown",
    "malformed_csr",
    "csr_signature",
    "csr_key",
    "csr_subject",
    "csr_san",
    "csr_ca",
    "csr_extension",
    "internal",
];

impl CaMetrics {
    pub fn new(m: &cortexflow_runtime::Metrics) -> Self {
        let meter = m.meter();
        let me = Self {
            issued: meter
                .u64_counter("ca_certificates_issued")
                .with_description("Certificates the CA issued, by kind (node, workload, operator)")
                .build(),
            refused: meter
                .u64_counter("ca_certificates_refused")
                .with_description("Certificate requests the CA refused, by reason")
                .build(),
            expiry: meter
                .f64_gauge("ca_expiry_seconds")
                .with_description(
                    "Seconds until the CA's intermediate (the issuer of every leaf) expires",
                )
                .build(),
            rotations: meter
                .u64_counter("ca_issuer_rotations")
                .with_description("Times the CA switched to a new issuer")
                .build(),
            rotation_waiting: meter
                .u64_gauge("ca_rotation_waiting_agents")
                .with_description("Agents a pending issuer switch waits for (they have not acknowledged the new trust bundle)")
                .build(),
            bundle_roots: meter
                .u64_gauge("ca_bundle_roots")
                .with_description("Roots in the published trust bundle")
                .build(),
        };
        me.rotations.add(0, &[]);
        me.rotation_waiting.record(0, &[]);
        for r in REFUSAL_REASONS {
            me.refused.add(0, &[KeyValue::new("reason", *r)]);
        }
        for k in ["node", "workload", "operator"] {
            me.issued.add(0, &[KeyValue::new("kind", k)]);
        }
        me
    }
}

/// The CA in use, the published trust bundle, and the rotation between them.
///
/// The bundle and the issuer change separately, in the order that fails no connection
/// (docs/security.md, "Rotation"): a new root is published first; the issuer switches to an
/// intermediate of it only once every agent that reports acknowledged that bundle; a root leaves
/// the bundle only when the issuer in use does not chain to it and a leaf lifetime has passed
/// since the issuer last switched (the leaves it signed have expired).
pub struct CaState {
    cfg: CaConfig,
    active: std::sync::RwLock<Arc<Authority>>,
    bundle: watch::Sender<Arc<Bundle>>,
    /// The operator's own verifier of client certificates.
    trust: Arc<TrustStore>,
    /// When the issuer last switched (the process start, for all this replica knows).
    switched_at: std::sync::Mutex<Instant>,
    /// Counts issuer switches: wakes the renewal of the certificates the operator issues to
    /// itself (its gRPC server's, the webhook's).
    switches: watch::Sender<u64>,
    metrics: CaMetrics,
}

impl CaState {
    pub fn new(cfg: CaConfig, authority: Authority, metrics: CaMetrics) -> Arc<Self> {
        let bundle = authority.bundle().clone();
        Arc::new(Self {
            trust: TrustStore::new(&cfg.trust_domain, bundle.clone()),
            cfg,
            active: std::sync::RwLock::new(Arc::new(authority)),
            bundle: watch::channel(Arc::new(bundle)).0,
            switched_at: std::sync::Mutex::new(Instant::now()),
            switches: watch::channel(0).0,
            metrics,
        })
    }

    /// The CA that signs now.
    pub fn authority(&self) -> Arc<Authority> {
        match self.active.read() {
            Ok(a) => a.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// The published bundle.
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    pub fn bundles(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    /// The verifier of the operator's servers (it follows the published bundle).
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    fn publish(&self, b: Bundle) {
        tracing::info!(roots = b.ders().len(), digest = %b.digest(), "trust bundle published");
        self.trust.set(b.clone());
        self.metrics.bundle_roots.record(b.ders().len() as u64, &[]);
        self.bundle.send_replace(Arc::new(b));
    }

    fn switch(&self, next: Authority) {
        let issuer_changed = next.issuer_der() != self.authority().issuer_der();
        match self.active.write() {
            Ok(mut a) => *a = Arc::new(next),
            Err(p) => *p.into_inner() = Arc::new(next),
        }
        if issuer_changed {
            if let Ok(mut t) = self.switched_at.lock() {
                *t = Instant::now();
            }
            self.metrics.rotations.add(1, &[]);
            tracing::info!("the CA switched to the new issuer");
            self.switches.send_modify(|n| *n += 1);
        }
    }

    /// Why the bundle may not become `next` now, if it may not.
    fn bundle_change_refused(&self, next: &Bundle) -> Option<String> {
        let published = self.bundle();
        let removed: Vec<_> = published
            .ders()
            .iter()
            .filter(|r| !next.ders().contains(r))
            .collect();
        if removed.is_empty() {
            return None;
        }
        let active = self.authority();
        if removed.contains(&active.issuer_root()) {
            return Some(
                "the new bundle drops the root of the issuer in use: switch the issuer (issuer.crt, issuer.key) to one of a remaining root first".into(),
            );
        }
        let since = self
            .switched_at
            .lock()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        if since < self.cfg.leaf_lifetime {
            return Some(format!(
                "the new bundle drops a root whose leaves may still be valid: it is published {} s from now, a leaf lifetime after the issuer switched",
                (self.cfg.leaf_lifetime - since).as_secs()
            ));
        }
        None
    }
}

/// Follows the CA Secret every `poll` (a rotation is an edit of it, docs/security.md): new
/// roots are published at once, an issuer switch waits for every reporting agent's
/// acknowledgement of the bundle, a root is dropped only when that is safe; material that does
/// not check out is refused and the CA in use kept.
pub async fn rotate(
    client: kube::Client,
    state: Arc<CaState>,
    store: Arc<Store>,
    poll: Duration,
    drain: Watcher,
) -> anyhow::Result<()> {
    let api: Api<Secret> = Api::namespaced(client, &state.cfg.namespace);
    // What the last warning said (each is logged once, not at every poll).
    let mut said = String::new();
    let say = |said: &mut String, what: String| {
        if what != *said {
            tracing::warn!("CA rotation: {what}");
            *said = what;
        }
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            () = drain.signaled() => return Ok(()),
        }
        let material = match api.get_opt(&state.cfg.secret).await {
            Ok(Some(s)) => match secret_material(&s) {
                Ok(m) => m,
                Err(e) => {
                    say(
                        &mut said,
                        format!("the Secret is refused ({e:#}); the CA in use is kept"),
                    );
                    continue;
                }
            },
            Ok(None) => {
                say(
                    &mut said,
                    "the Secret is gone; the CA in use is kept (in memory)".into(),
                );
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the CA Secret failed");
                continue;
            }
        };
        let active = state.authority();
        if material == *active.material() {
            state.metrics.rotation_waiting.record(0, &[]);
            continue;
        }
        let next = match Authority::from_material(&state.cfg.trust_domain, material) {
            Ok(a) => a,
            Err(e) => {
                say(
                    &mut said,
                    format!("the Secret is refused ({e:#}); the CA in use is kept"),
                );
                continue;
            }
        };
        if next.bundle().ders() != state.bundle().ders() {
            if let Some(why) = state.bundle_change_refused(next.bundle()) {
                say(&mut said, why);
                continue;
            }
            state.publish(next.bundle().clone());
        }
        if next.issuer_der() != active.issuer_der() {
            let digest = state.bundle().digest();
            let waiting: Vec<String> = store
                .reports()
                .into_iter()
                .filter(|(_, r)| r.trust_bundle != digest)
                .map(|(n, _)| n)
                .collect();
            state
                .metrics
                .rotation_waiting
                .record(waiting.len() as u64, &[]);
            if !waiting.is_empty() {
                say(
                    &mut said,
                    format!(
                        "the new issuer waits for {} agent(s) to take the new bundle: {}",
                        waiting.len(),
                        waiting.join(", ")
                    ),
                );
                continue;
            }
        }
        state.metrics.rotation_waiting.record(0, &[]);
        said.clear();
        state.switch(next);
    }
}

fn secret_material(s: &Secret) -> anyhow::Result<Material> {
    let data = s.data.clone().unwrap_or_default();
    let get = |k: &str| -> anyhow::Result<Option<String>> {
        data.get(k)
            .map(|b| {
                String::from_utf8(b.0.clone()).with_context(|| format!("key {k} is not UTF-8 PEM"))
            })
            .transpose()
    };
    let need = |k: &str| -> anyhow::Result<String> {
        get(k)?.with_context(|| format!("the Secret has no key {k}"))
    };
    Ok(Material {
        roots_pem: need(cortexflow_trust::ca::SECRET_ROOTS)?,
        root_key_pem: get(cortexflow_trust::ca::SECRET_ROOT_KEY)?,
        issuer_pem: need(cortexflow_trust::ca::SECRET_ISSUER)?,
        issuer_key_pem: need(cortexflow_trust::ca::SECRET_ISSUER_KEY)?,
    })
}

fn material_secret(cfg: &CaConfig, m: &Material) -> Secret {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(cortexflow_trust::ca::SECRET_ROOTS, &m.roots_pem);
    if let Some(k) = &m.root_key_pem {
        put(cortexflow_trust::ca::SECRET_ROOT_KEY, k);
    }
    put(cortexflow_trust::ca::SECRET_ISSUER, &m.issuer_pem);
    put(cortexflow_trust::ca::SECRET_ISSUER_KEY, &m.issuer_key_pem);
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(cfg.secret.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "cortexflow".to_string(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The CA from its Secret, generating and storing it when there is none (the first replica
/// to start wins; the others read what it stored).
pub async fn load_or_create(client: &kube::Client, cfg: &CaConfig) -> anyhow::Result<Authority> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let name = format!("Secret {}/{}", cfg.namespace, cfg.secret);
    for _ in 0..3 {
        if let Some(s) = api
            .get_opt(&cfg.secret)
            .await
            .with_context(|| format!("read {name}"))?
        {
            let m = secret_material(&s).with_context(|| name.clone())?;
            return Authority::from_material(&cfg.trust_domain, m)
                .with_context(|| format!("the CA in {name} is not usable (it is left as it is)"));
        }
        let ca = Authority::generate(&cfg.trust_domain, SystemTime::now())?;
        match api
            .create(&PostParams::default(), &material_secret(cfg, ca.material()))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %name, "generated the mesh CA");
                return Ok(ca);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("store the new CA in {name}")),
        }
    }
    anyhow::bail!("{name} was created and removed under us three times")
}

/// Keeps `cortexflow-ca-bundle` holding the published bundle (on every change, and checked
/// every minute: restored when something changes or removes it).
pub async fn publish_bundle(
    client: kube::Client,
    state: Arc<CaState>,
    drain: Watcher,
) -> anyhow::Result<()> {
    let cfg = state.cfg.clone();
    let api: Api<ConfigMap> = Api::namespaced(client, &cfg.namespace);
    let mut bundles = state.bundles();
    loop {
        let pem = bundles.borrow_and_update().to_pem();
        let want = BTreeMap::from([("ca.crt".to_string(), pem)]);
        let r: kube::Result<()> = async {
            match api.get_opt(&cfg.bundle_configmap).await? {
                Some(mut cm) if cm.data.as_ref() != Some(&want) => {
                    cm.data = Some(want);
                    api.replace(&cfg.bundle_configmap, &PostParams::default(), &cm)
                        .await?;
                    tracing::info!(configmap = %cfg.bundle_configmap, "trust bundle ConfigMap written");
                }
                Some(_) => {}
                None => {
                    let cm = ConfigMap {
                        metadata: kube::api::ObjectMeta {
                            name: Some(cfg.bundle_configmap.clone()),
                            namespace: Some(cfg.namespace.clone()),
                            ..Default::default()
                        },
                        data: Some(want),
                        ..Default::default()
                    };
                    match api.create(&PostParams::default(), &cm).await {
                        Ok(_) => tracing::info!(configmap = %cfg.bundle_configmap, "trust bundle ConfigMap created"),
                        Err(kube::Error::Api(e)) if e.code == 409 => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok(())
        }
        .await;
        let wait = match r {
            Ok(()) => Duration::from_secs(60),
            Err(e) => {
                tracing::warn!(error = %e, "publishing the trust bundle failed; retrying");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = bundles.changed() => if r.is_err() { return Ok(()) },
            () = drain.signaled() => return Ok(()),
        }
    }
}

/// Installs this replica's serving certificate into `creds` now and keeps it renewed
/// ([`keep_issued`]).
pub fn serve_own(
    state: Arc<CaState>,
    creds: Arc<Credentials>,
    drain: Watcher,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>> {
    keep_issued(state, creds, "operator", drain, |ca, lifetime, now| {
        ca.issue_own(&spiffe::operator(ca.trust_domain()), lifetime, now)
    })
}

/// Installs a certificate the operator issues to itself (`kind`: the issued metric's label)
/// into `creds` now, and again at every half-life and right after the issuer switched. The
/// first one is installed before this returns the task to run.
pub fn keep_issued(
    state: Arc<CaState>,
    creds: Arc<Credentials>,
    kind: &'static str,
    drain: Watcher,
    issue: impl Fn(&Authority, Duration, SystemTime) -> Result<(KeyPair, Issued), Refusal>
    + Send
    + 'static,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>> {
    let install = {
        let state = state.clone();
        move || -> anyhow::Result<Duration> {
            let ca = state.authority();
            let now = SystemTime::now();
            let (key, issued) = issue(&ca, state.cfg.leaf_lifetime, now)
                .map_err(|e| anyhow::anyhow!("issue the {kind} certificate: {e}"))?;
            let not_after = issued.not_after;
            creds.set_issued(&key, issued)?;
            state.metrics.issued.add(1, &[KeyValue::new("kind", kind)]);
            state.metrics.expiry.record(
                ca.issuer_not_after()
                    .duration_since(now)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                &[],
            );
            Ok(not_after.duration_since(now).unwrap_or_default() / 2)
        }
    };
    let mut next = install()?;
    let mut switches = state.switches.subscribe();
    Ok(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next.max(Duration::from_secs(1))) => {}
                r = switches.changed() => if r.is_err() { return Ok(()) },
                () = drain.signaled() => return Ok(()),
            }
            next = install()?;
            tracing::info!(kind, "renewed a certificate the operator serves with");
        }
    })
}

/// Who a reviewed token belongs to, and so which id it may obtain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The agent of `node`.
    Node(String),
    /// The pod `pod` (its ServiceIdentity's or its service account's id).
    Pod(ObjKey),
}

/// A refused request: the gRPC status and the metric's reason.
struct Refused(Status, &'static str);

impl Refused {
    fn auth(reason: &'static str, msg: impl Into<String>) -> Self {
        Refused(Status::unauthenticated(msg.into()), reason)
    }
    fn denied(reason: &'static str, msg: impl Into<String>) -> Self {
        Refused(Status::permission_denied(msg.into()), reason)
    }
}

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// `cortexflow.identity.v1.Certificates`.
pub struct CertificateService {
    client: kube::Client,
    cfg: CaConfig,
    state: Arc<CaState>,
    store: Arc<Store>,
    metrics: CaMetrics,
    drain: Watcher,
}

impl CertificateService {
    pub fn new(
        client: kube::Client,
        state: Arc<CaState>,
        store: Arc<Store>,
        drain: Watcher,
    ) -> Self {
        Self {
            client,
            cfg: state.cfg.clone(),
            metrics: state.metrics.clone(),
            state,
            store,
            drain,
        }
    }

    pub fn into_server(self) -> v1::certificates_server::CertificatesServer<Self> {
        v1::certificates_server::CertificatesServer::new(self).max_decoding_message_size(64 << 10)
    }

    /// The caller a token proves, by a TokenReview for the audience `cortexflow-ca` only.
    async fn review(&self, token: &str) -> Result<Caller, Refused> {
        if token.is_empty() {
            return Err(Refused::auth("token", "SignRequest.token is empty"));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![TOKEN_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let r = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                Refused(
                    Status::unavailable(format!("TokenReview failed: {e}")),
                    "internal",
                )
            })?;
        let st = r.status.unwrap_or_default();
        if st.authenticated != Some(true) {
            return Err(Refused::auth(
                "token",
                format!(
                    "the token does not authenticate: {}",
                    st.error.unwrap_or_else(|| "no reason given".into())
                ),
            ));
        }
        if !st
            .audiences
            .unwrap_or_default()
            .iter()
            .any(|a| a == TOKEN_AUDIENCE)
        {
            return Err(Refused::auth(
                "token_audience",
                format!("the token is not for the audience {TOKEN_AUDIENCE}"),
            ));
        }
        let user = st.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((ns, sa)) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
        else {
            return Err(Refused::auth(
                "token",
                format!("{username} is not a ServiceAccount"),
            ));
        };
        let extra = user.extra.unwrap_or_default();
        let one = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let pod = one(EXTRA_POD_NAME).zip(one(EXTRA_POD_UID));
        let node = one(EXTRA_NODE_NAME);
        if ns == self.cfg.namespace && sa == self.cfg.agent_service_account {
            let Some(node) = node else {
                return Err(Refused::denied(
                    "token_binding",
                    "an agent's token must be bound to its pod or its Node",
                ));
            };
            if let Some((pod, uid)) = pod {
                self.check_pod(ns, &pod, &uid, Some(&node)).await?;
            }
            return Ok(Caller::Node(node));
        }
        let Some((pod, uid)) = pod else {
            return Err(Refused::denied(
                "token_binding",
                format!("the token of {ns}/{sa} is not bound to a pod"),
            ));
        };
        self.check_pod(ns, &pod, &uid, None).await?;
        Ok(Caller::Pod(ObjKey::new(ns, pod)))
    }

    /// The bound pod exists with that uid (and runs on `node`).
    async fn check_pod(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        node: Option<&str>,
    ) -> Result<(), Refused> {
        let pod = Api::<Pod>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(|e| {
                Refused(
                    Status::unavailable(format!("read pod {ns}/{name}: {e}")),
                    "internal",
                )
            })?;
        let Some(pod) = pod.filter(|p| p.metadata.uid.as_deref() == Some(uid)) else {
            return Err(Refused::auth(
                "token_binding",
                format!("the token's pod {ns}/{name} (uid {uid}) does not exist"),
            ));
        };
        if let Some(node) = node {
            let on = pod.spec.and_then(|s| s.node_name).unwrap_or_default();
            if on != node {
                return Err(Refused::denied(
                    "pod_node",
                    format!("the token's pod {ns}/{name} runs on node {on:?}, not {node}"),
                ));
            }
        }
        Ok(())
    }

    /// A refusal counted and logged, or the answer.
    fn answer<T>(&self, r: Result<T, Refused>) -> Result<Response<T>, Status> {
        r.map(Response::new).map_err(|Refused(status, reason)| {
            self.metrics
                .refused
                .add(1, &[KeyValue::new("reason", reason)]);
            tracing::warn!(reason, error = %status.message(), "certificate request refused");
            status
        })
    }

    /// The SPIFFE id `token` proves now, and its kind (the metric's label).
    async fn identity_of(&self, token: &str) -> Result<(String, &'static str), Refused> {
        let caller = self.review(token).await?;
        let td = &self.cfg.trust_domain;
        Ok(match &caller {
            Caller::Node(n) => (spiffe::node_agent(td, n), "node"),
            Caller::Pod(p) => (
                self.store.read(|e| e.pod_spiffe_id(p)).ok_or_else(|| {
                    Refused(
                        Status::unavailable(format!(
                            "the identity of pod {p} is not known yet (the operator has not seen the pod); retry"
                        )),
                        "pod_unknown",
                    )
                })?,
                "workload",
            ),
        })
    }

    async fn sign_inner(&self, req: v1::SignRequest) -> Result<v1::SignResponse, Refused> {
        let (id, kind) = self.identity_of(&req.token).await?;
        let issued = self
            .state
            .authority()
            .sign(&req.csr, &id, self.cfg.leaf_lifetime, SystemTime::now())
            .map_err(|e| {
                let reason = e.reason();
                let status = match e {
                    cortexflow_trust::Refusal::San { .. } => {
                        Status::permission_denied(e.to_string())
                    }
                    cortexflow_trust::Refusal::Internal(_) => Status::internal(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                };
                Refused(status, reason)
            })?;
        self.metrics.issued.add(1, &[KeyValue::new("kind", kind)]);
        tracing::info!(spiffe_id = %id, "certificate issued");
        Ok(v1::SignResponse {
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle: self
                .state
                .bundle()
                .ders()
                .iter()
                .map(|c| c.to_vec())
                .collect(),
            spiffe_id: issued.spiffe_id,
            not_after: cortexflow_trust::unix_secs(issued.not_after),
        })
    }
}

type BundleStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::TrustBundle, Status>> + Send>>;

#[tonic::async_trait]
impl Certificates for CertificateService {
    type WatchBundleStream = BundleStream;

    #[tracing::instrument(name = "WatchBundle", skip_all)]
    async fn watch_bundle(
        &self,
        req: Request<v1::WatchBundleRequest>,
    ) -> Result<Response<Self::WatchBundleStream>, Status> {
        match cortexflow_trust::tls::peer_id(&req, &self.state.trust()) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(Status::unauthenticated(
                    "WatchBundle needs a client certificate of the mesh",
                ));
            }
            Err(e) => return Err(Status::unauthenticated(e.to_string())),
        }
        let mut bundles = self.state.bundles();
        let drain = self.drain.clone();
        Ok(Response::new(Box::pin(async_stream::stream! {
            loop {
                let b = bundles.borrow_and_update().clone();
                yield Ok(v1::TrustBundle {
                    roots: b.ders().iter().map(|c| c.to_vec()).collect(),
                    digest: b.digest(),
                });
                tokio::select! {
                    r = bundles.changed() => if r.is_err() { break },
                    () = drain.signaled() => break,
                }
            }
        })))
    }

    #[tracing::instrument(name = "Sign", skip_all)]
    async fn sign(
        &self,
        req: Request<v1::SignRequest>,
    ) -> Result<Response<v1::SignResponse>, Status> {
        let r = self.sign_inner(req.into_inner()).await;
        self.answer(r)
    }

    #[tracing::instrument(name = "Identity", skip_all)]
    async fn identity(
        &self,
        req: Request<v1::IdentityRequest>,
    ) -> Result<Response<v1::IdentityResponse>, Status> {
        let r = self
            .identity_of(&req.into_inner().token)
            .await
            .map(|(spiffe_id, _)| v1::IdentityResponse { spiffe_id });
        self.answer(r)
    }
}
