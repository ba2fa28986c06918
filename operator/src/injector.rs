//! What the admission webhook does to a pod (docs/mtls.md, "Injection"): a pure function of
//! the pod, its namespace's annotation and the mTLS mode of the ServiceIdentity that claims it,
//! answering with a JSON patch (RFC 6902) or nothing.
//!
//! * **The proxy**, a native sidecar (an init container with `restartPolicy: Always`, first of
//!   the init containers, so that it runs before the others and for the pod's whole life), with a
//!   projected token for the CA (audience `cortexflow-ca`) and the annotation
//!   `mesh.cortexflow.io/proxy-injected` saying why. Wanted when the pod's annotation
//!   `mesh.cortexflow.io/inject` says `enabled`; else when its namespace's says so; else when the
//!   identity that claims it has `mtls: Permissive` or `Strict`. `disabled` (pod, then namespace)
//!   opts out. Another value is refused: a misspelt opt-in is never silently ignored. While
//!   `--inject-proxy` is off (this version has no proxy to run) nothing is injected and a pod
//!   that wants the proxy is admitted with a warning saying so.
//! * **The readiness gate** `mesh.cortexflow.io/programmed`, added to every pod that is an
//!   endpoint (not host-network) so that users never write it by hand (`--readiness-gate`).
//! * Pods of excluded namespaces (the system's and the control plane's) and host-network pods are
//!   admitted unchanged; so is a pod that needs neither. Injection is idempotent: a pod that has
//!   the proxy container (or the gate) does not get it again.
use cortexflow_crds::conditions::READINESS_GATE;
use cortexflow_operator_core::model::Mtls;
use serde_json::{Value, json};

/// The pod (and namespace) annotation that opts in or out.
pub const INJECT_ANNOTATION: &str = "mesh.cortexflow.io/inject";
/// Set on an injected pod, with the reason.
pub const INJECTED_ANNOTATION: &str = "mesh.cortexflow.io/proxy-injected";
/// The injected container's name.
pub const PROXY_CONTAINER: &str = "cortexflow-proxy";
/// The projected-token volume of the proxy.
pub const TOKEN_VOLUME: &str = "cortexflow-proxy-token";
/// Where the proxy finds its token.
pub const TOKEN_DIR: &str = "/var/run/secrets/cortexflow";
/// The proxy's mTLS port (between proxies), DNS and message ports.
pub const MTLS_PORT: u16 = 15443;
pub const DNS_PORT: u16 = 5053;
pub const MESSAGE_PORT: u16 = 5054;
/// The proxy's admin port: /metrics, /healthz, /readyz (ready once its certificate is there).
pub const ADMIN_PORT: u16 = 15090;

/// The injector's settings (operator flags).
#[derive(Clone, Debug)]
pub struct InjectorConfig {
    /// Whether the proxy is injected at all.
    pub inject_proxy: bool,
    /// The proxy's image.
    pub proxy_image: String,
    /// Where the proxy asks for its certificate (`host:port` of the operator's gRPC Service).
    pub ca_addr: String,
    pub trust_domain: String,
    /// The trust bundle (PEM) the proxy verifies the operator with until its first Sign answer
    /// brings the current one: the CA's bundle when the pod is created (the webhook sets it).
    pub trust_bundle: String,
    /// Whether the readiness gate is added.
    pub readiness_gate: bool,
    /// Namespaces whose pods are admitted unchanged.
    pub excluded_namespaces: Vec<String>,
}

/// The answer for one pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admitted with this patch (never empty); `what` says what it does; `warnings` are shown
    /// to the user.
    Patch {
        ops: Vec<Value>,
        what: Vec<String>,
        warnings: Vec<String>,
    },
    /// Admitted as it is, with the reason (and warnings for the user, if any).
    Unchanged { why: String, warnings: Vec<String> },
    /// Refused, with the message the user sees.
    Refused(String),
}

/// An annotation's opt-in: `Some(true)` enabled, `Some(false)` disabled, `None` absent.
fn opt(v: Option<&str>, whose: &str) -> Result<Option<bool>, String> {
    match v {
        None => Ok(None),
        Some("enabled") => Ok(Some(true)),
        Some("disabled") => Ok(Some(false)),
        Some(other) => Err(format!(
            "{whose} annotation {INJECT_ANNOTATION}: {other:?} is neither \"enabled\" nor \"disabled\""
        )),
    }
}

/// `/` and `~` in a JSON pointer segment.
fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The proxy's container.
pub fn proxy_container(cfg: &InjectorConfig) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    json!({
        "name": PROXY_CONTAINER,
        "image": cfg.proxy_image,
        "restartPolicy": "Always",
        "args": [
            format!("--ca-addr={}", cfg.ca_addr),
            format!("--trust-domain={}", cfg.trust_domain),
            format!("--token-file={TOKEN_DIR}/token"),
        ],
        "env": [
            field("POD_NAME", "metadata.name"),
            field("POD_NAMESPACE", "metadata.namespace"),
            field("NODE_NAME", "spec.nodeName"),
            field("POD_IP", "status.podIP"),
            {"name": "CORTEXFLOW_TRUST_BUNDLE", "value": cfg.trust_bundle},
        ],
        "ports": [
            {"name": "cf-mtls", "containerPort": MTLS_PORT, "protocol": "TCP"},
            {"name": "cf-dns", "containerPort": DNS_PORT, "protocol": "UDP"},
            {"name": "cf-dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
            {"name": "cf-messages", "containerPort": MESSAGE_PORT, "protocol": "TCP"},
            {"name": "cf-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        // The pod is not Ready (not in its Services) until its proxy holds its certificate.
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": ADMIN_PORT},
            "periodSeconds": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": ADMIN_PORT},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {
            "requests": {"cpu": "10m", "memory": "16Mi"},
            "limits": {"memory": "64Mi"},
        },
        "volumeMounts": [{"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}],
    })
}

/// The proxy's token volume.
pub fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {"sources": [{"serviceAccountToken": {
            "audience": "cortexflow-ca",
            "expirationSeconds": 3600,
            "path": "token",
        }}]},
    })
}

/// Appends `value` to the array at `path` of `obj` (creating the array), or inserts it first.
fn add_to_array(ops: &mut Vec<Value>, obj: &Value, path: &str, value: Value, first: bool) {
    let exists = obj
        .pointer(path)
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if exists {
        let at = if first { "0" } else { "-" };
        ops.push(json!({"op": "add", "path": format!("{path}/{at}"), "value": value}));
    } else {
        ops.push(json!({"op": "add", "path": path, "value": [value]}));
    }
}

/// Whether a pod of `namespace` asks for the proxy, and why: its own annotation, else its
/// namespace's, else its claiming ServiceIdentity's mTLS mode (`identity`). An annotation other
/// than `enabled`/`disabled` is an error naming it. (Exclusions — namespaces, host network — are
/// the caller's.)
pub fn wants_proxy(
    namespace: &str,
    pod_inject: Option<&str>,
    ns_inject: Option<&str>,
    identity: Option<(&str, Mtls)>,
) -> Result<Option<String>, String> {
    let by_pod = opt(pod_inject, "the pod's")?;
    let by_ns = opt(ns_inject, "the namespace's")?;
    Ok(match (by_pod, by_ns, identity) {
        (Some(true), _, _) => Some(format!("the pod's annotation {INJECT_ANNOTATION}")),
        (Some(false), _, _) => None,
        (None, Some(true), _) => Some(format!("the namespace's annotation {INJECT_ANNOTATION}")),
        (None, Some(false), _) => None,
        (None, None, Some((name, m))) if m != Mtls::Disabled => Some(format!(
            "ServiceIdentity {namespace}/{name} has mtls {}",
            m.as_str()
        )),
        (None, None, _) => None,
    })
}

/// The live pods that ask for the proxy (by [`wants_proxy`]) and run without it — created
/// while no injector answered (`failurePolicy: Ignore`), or before it was installed — with
/// why each asks, in key order. Nothing while injection is off (the ServiceIdentity's `MTLS`
/// condition and the creation warning say so then).
pub fn pods_without_proxy(
    cfg: &InjectorConfig,
    engine: &cortexflow_operator_core::Engine,
) -> Vec<(String, String)> {
    if !cfg.inject_proxy {
        return Vec::new();
    }
    let snap = engine.snapshot();
    snap.pods
        .values()
        .filter(|p| p.live() && !p.has_proxy)
        .filter(|p| {
            !cfg.excluded_namespaces
                .contains(&p.key.namespace.to_string())
        })
        .filter_map(|p| {
            let ns = &p.key.namespace;
            let ns_inject = snap
                .namespaces
                .get(ns.as_ref())
                .and_then(|n| n.inject.clone());
            let identity = engine
                .claiming_identity(p)
                .map(|s| (s.key.name.to_string(), s.mtls));
            let why = wants_proxy(
                ns,
                p.inject.as_deref(),
                ns_inject.as_deref(),
                identity.as_ref().map(|(n, m)| (n.as_str(), *m)),
            )
            .ok()
            .flatten()?;
            Some((format!("{ns}/{}", p.key.name), why))
        })
        .collect()
}

/// The decision for `pod` (the AdmissionReview's object) in namespace `namespace`, whose
/// annotation is `ns_inject`; `identity` is the claiming ServiceIdentity's name and mTLS mode.
pub fn decide(
    cfg: &InjectorConfig,
    pod: &Value,
    namespace: &str,
    ns_inject: Option<&str>,
    identity: Option<(&str, Mtls)>,
) -> Decision {
    if cfg.excluded_namespaces.iter().any(|n| n == namespace) {
        return Decision::Unchanged {
            why: format!("namespace {namespace} is excluded"),
            warnings: vec![],
        };
    }
    let spec = &pod["spec"];
    if spec["hostNetwork"] == true {
        return Decision::Unchanged {
            why: "a host-network pod is the node, not an endpoint".into(),
            warnings: vec![],
        };
    }
    let annotation = pod["metadata"]["annotations"][INJECT_ANNOTATION].as_str();
    let wanted = match wants_proxy(namespace, annotation, ns_inject, identity) {
        Ok(w) => w,
        Err(e) => return Decision::Refused(e),
    };
    let has_proxy = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .any(|c| c["name"] == PROXY_CONTAINER);
    let mut ops = Vec::new();
    let mut what = Vec::new();
    let mut warnings = Vec::new();
    match (&wanted, has_proxy, cfg.inject_proxy) {
        (Some(why), false, true) => {
            add_to_array(&mut ops, pod, "/spec/initContainers", proxy_container(cfg), true);
            add_to_array(&mut ops, pod, "/spec/volumes", token_volume(), false);
            if pod["metadata"]["annotations"].is_object() {
                ops.push(json!({"op": "add", "path": format!("/metadata/annotations/{}", escape(INJECTED_ANNOTATION)), "value": why}));
            } else {
                ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: why}}));
            }
            what.push(format!("the proxy ({why})"));
        }
        (Some(why), false, false) => warnings.push(format!(
            "CortexFlow: this pod asks for the mTLS proxy ({why}), but this version does not inject it (--inject-proxy is off): it runs without the proxy, in plaintext"
        )),
        _ => {}
    }
    let has_gate = spec["readinessGates"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|g| g["conditionType"] == READINESS_GATE);
    if cfg.readiness_gate && !has_gate {
        add_to_array(
            &mut ops,
            pod,
            "/spec/readinessGates",
            json!({"conditionType": READINESS_GATE}),
            false,
        );
        what.push(format!("the readiness gate {READINESS_GATE}"));
    }
    if ops.is_empty() {
        Decision::Unchanged {
            why: if has_proxy || has_gate {
                "already injected".into()
            } else {
                "nothing to inject".into()
            },
            warnings,
        }
    } else {
        Decision::Patch {
            ops,
            what,
            warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(inject: bool) -> InjectorConfig {
        InjectorConfig {
            inject_proxy: inject,
            proxy_image: "example.com/cortexflow-proxy:0.1.0".into(),
            ca_addr: "cortexflow-operator.cortexflow.svc:50051".into(),
            trust_domain: "cluster.local".into(),
            trust_bundle: "-----BEGIN CERTIFICATE-----\n…\n-----END CERTIFICATE-----\n".into(),
            readiness_gate: true,
            excluded_namespaces: vec!["kube-system".into(), "cortexflow".into()],
        }
    }

    fn pod(annotations: Option<Value>, extra_spec: Value) -> Value {
        let mut p = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "web-", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "app", "image": "web:1"}]},
        });
        if let Some(a) = annotations {
            p["metadata"]["annotations"] = a;
        }
        if let (Some(s), Some(e)) = (p["spec"].as_object_mut(), extra_spec.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        p
    }

    fn gate_op() -> Value {
        json!({"op": "add", "path": "/spec/readinessGates", "value": [{"conditionType": READINESS_GATE}]})
    }

    fn proxy_ops(why: &str, annotations_exist: bool) -> Vec<Value> {
        vec![
            json!({"op": "add", "path": "/spec/initContainers", "value": [proxy_container(&cfg(true))]}),
            json!({"op": "add", "path": "/spec/volumes", "value": [token_volume()]}),
            if annotations_exist {
                json!({"op": "add", "path": "/metadata/annotations/mesh.cortexflow.io~1proxy-injected", "value": why})
            } else {
                json!({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: why}})
            },
        ]
    }

    fn ops(d: Decision) -> Vec<Value> {
        match d {
            Decision::Patch { ops, .. } => ops,
            other => panic!("not a patch: {other:?}"),
        }
    }

    #[test]
    fn the_table() {
        let c = cfg(true);
        let strict = Some(("web", Mtls::Strict));
        let permissive = Some(("web", Mtls::Permissive));
        let disabled = Some(("web", Mtls::Disabled));
        let why_sid = "ServiceIdentity shop/web has mtls Strict";
        // Opted in by identity (Strict, Permissive): proxy, volume, annotation, gate.
        let mut want = proxy_ops(why_sid, false);
        want.push(gate_op());
        assert_eq!(
            ops(decide(&c, &pod(None, json!({})), "shop", None, strict)),
            want
        );
        let d = ops(decide(&c, &pod(None, json!({})), "shop", None, permissive));
        assert_eq!(
            d[2]["value"][INJECTED_ANNOTATION],
            "ServiceIdentity shop/web has mtls Permissive"
        );
        // Identity Disabled, nothing else: the gate only.
        assert_eq!(
            ops(decide(&c, &pod(None, json!({})), "shop", None, disabled)),
            vec![gate_op()]
        );
        assert_eq!(
            ops(decide(&c, &pod(None, json!({})), "shop", None, None)),
            vec![gate_op()]
        );
        // Opted in by the pod's annotation (annotations exist: one key added).
        let p = pod(Some(json!({INJECT_ANNOTATION: "enabled"})), json!({}));
        let mut want = proxy_ops("the pod's annotation mesh.cortexflow.io/inject", true);
        want.push(gate_op());
        assert_eq!(ops(decide(&c, &p, "shop", None, None)), want);
        // By the namespace's.
        let d = ops(decide(
            &c,
            &pod(None, json!({})),
            "shop",
            Some("enabled"),
            None,
        ));
        assert_eq!(
            d[2]["value"][INJECTED_ANNOTATION],
            "the namespace's annotation mesh.cortexflow.io/inject"
        );
        // Opted out: the pod's `disabled` beats the namespace and the identity.
        let out = pod(Some(json!({INJECT_ANNOTATION: "disabled"})), json!({}));
        assert_eq!(
            ops(decide(&c, &out, "shop", Some("enabled"), strict)),
            vec![gate_op()]
        );
        // The namespace's `disabled` beats the identity; the pod's `enabled` beats it.
        assert_eq!(
            ops(decide(
                &c,
                &pod(None, json!({})),
                "shop",
                Some("disabled"),
                strict
            )),
            vec![gate_op()]
        );
        let p = pod(Some(json!({INJECT_ANNOTATION: "enabled"})), json!({}));
        assert_eq!(ops(decide(&c, &p, "shop", Some("disabled"), None)).len(), 4);
        // Already injected (proxy and gate there): unchanged, no patch at all.
        let injected = pod(
            Some(json!({INJECTED_ANNOTATION: why_sid})),
            json!({
                "initContainers": [proxy_container(&c)],
                "volumes": [token_volume()],
                "readinessGates": [{"conditionType": READINESS_GATE}],
            }),
        );
        assert_eq!(
            decide(&c, &injected, "shop", None, strict),
            Decision::Unchanged {
                why: "already injected".into(),
                warnings: vec![]
            }
        );
        // Existing init containers and volumes: the proxy goes first, the volume last.
        let busy = pod(
            None,
            json!({
                "initContainers": [{"name": "migrate", "image": "m:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "readinessGates": [{"conditionType": "example.com/other"}],
            }),
        );
        let d = ops(decide(&c, &busy, "shop", None, strict));
        assert_eq!(d[0]["path"], "/spec/initContainers/0");
        assert_eq!(d[0]["value"]["restartPolicy"], "Always");
        assert_eq!(d[1]["path"], "/spec/volumes/-");
        assert_eq!(
            d[3],
            json!({"op": "add", "path": "/spec/readinessGates/-", "value": {"conditionType": READINESS_GATE}})
        );
        // The patch applies (json-patch, as the apiserver applies it): proxy first, the pod's
        // own init container after it, the gate beside the other one.
        let mut applied = busy.clone();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(d)).unwrap();
        json_patch::patch(&mut applied, &patch).unwrap();
        let names: Vec<_> = applied["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].clone())
            .collect();
        assert_eq!(names, vec![json!(PROXY_CONTAINER), json!("migrate")]);
        assert_eq!(applied["spec"]["volumes"][1]["name"], TOKEN_VOLUME);
        assert_eq!(
            applied["spec"]["readinessGates"][1]["conditionType"],
            READINESS_GATE
        );
        assert_eq!(
            applied["metadata"]["annotations"][INJECTED_ANNOTATION],
            why_sid
        );
        // Host network, excluded namespaces: unchanged.
        let host = pod(
            Some(json!({INJECT_ANNOTATION: "enabled"})),
            json!({"hostNetwork": true}),
        );
        assert!(matches!(
            decide(&c, &host, "shop", None, strict),
            Decision::Unchanged { .. }
        ));
        for ns in ["kube-system", "cortexflow"] {
            assert!(matches!(
                decide(&c, &pod(None, json!({})), ns, Some("enabled"), strict),
                Decision::Unchanged { .. }
            ));
        }
        // A misspelt opt-in is refused, naming it.
        let typo = pod(Some(json!({INJECT_ANNOTATION: "enable"})), json!({}));
        assert_eq!(
            decide(&c, &typo, "shop", None, None),
            Decision::Refused("the pod's annotation mesh.cortexflow.io/inject: \"enable\" is neither \"enabled\" nor \"disabled\"".into())
        );
        assert!(
            matches!(decide(&c, &pod(None, json!({})), "shop", Some("yes"), None), Decision::Refused(m) if m.starts_with("the namespace's"))
        );
    }

    #[test]
    fn without_the_proxy_a_wanting_pod_gets_a_warning_and_the_gate() {
        let strict = |c: &InjectorConfig| {
            decide(
                c,
                &pod(None, json!({})),
                "shop",
                None,
                Some(("web", Mtls::Strict)),
            )
        };
        let c = cfg(false);
        match strict(&c) {
            Decision::Patch { ops, warnings, .. } => {
                assert_eq!(ops, vec![gate_op()]);
                assert!(warnings[0].contains("does not inject it"), "{warnings:?}");
            }
            other => panic!("{other:?}"),
        }
        let mut c = cfg(false);
        c.readiness_gate = false;
        match strict(&c) {
            Decision::Unchanged { warnings, .. } => {
                assert_eq!(warnings.len(), 1);
                assert!(
                    warnings[0].contains("runs without the proxy"),
                    "{warnings:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Nothing wanted, no gate: no patch, no warning.
        assert_eq!(
            decide(&c, &pod(None, json!({})), "shop", None, None),
            Decision::Unchanged {
                why: "nothing to inject".into(),
                warnings: vec![]
            }
        );
    }

    #[test]
    fn pods_that_ask_for_the_proxy_and_lack_it_are_found() {
        use std::sync::Arc;

        use cortexflow_operator_core::{
            Change, Engine, EngineConfig, ObjKey, Object,
            model::{Created, Namespace, Pod, ServiceIdentity},
            selector::Selector,
        };
        let ns = |name: &str, inject: Option<&str>| {
            Change::Apply(Object::Namespace(Namespace {
                name: name.into(),
                labels: Default::default(),
                inject: inject.map(str::to_string),
            }))
        };
        let pod = |ns: &str, name: &str, app: &str, inject: Option<&str>, has_proxy: bool| {
            Change::Apply(Object::Pod(Pod {
                key: ObjKey::new(ns, name),
                labels: Arc::new([("app".to_string(), app.to_string())].into()),
                service_account: "default".into(),
                node: Some("n1".into()),
                ip: None,
                host_network: false,
                terminated: false,
                inject: inject.map(str::to_string),
                has_proxy,
            }))
        };
        let mut e = Engine::new(EngineConfig::default());
        e.apply(vec![
            ns("opted", Some("enabled")),
            ns("plain", None),
            ns("kube-system", Some("enabled")),
            pod("opted", "bare", "web", None, false),
            pod("opted", "injected", "web", None, true),
            pod("opted", "out", "web", Some("disabled"), false),
            pod("plain", "strict", "secure", None, false),
            pod("plain", "asks", "web", Some("enabled"), false),
            pod("plain", "none", "web", None, false),
            pod("kube-system", "sys", "web", None, false),
            Change::Apply(Object::ServiceIdentity(ServiceIdentity {
                key: ObjKey::new("plain", "secure"),
                created: Created(1),
                generation: 1,
                selector: Ok(Selector {
                    match_labels: [("app".to_string(), "secure".to_string())].into(),
                    match_expressions: vec![],
                }),
                service_accounts: vec![],
                mtls: Mtls::Strict,
            })),
        ]);
        let got: Vec<String> = pods_without_proxy(&cfg(true), &e)
            .into_iter()
            .map(|(p, why)| format!("{p}: {why}"))
            .collect();
        assert_eq!(
            got,
            [
                "opted/bare: the namespace's annotation mesh.cortexflow.io/inject",
                "plain/asks: the pod's annotation mesh.cortexflow.io/inject",
                "plain/strict: ServiceIdentity plain/secure has mtls Strict",
            ]
        );
        assert!(
            pods_without_proxy(&cfg(false), &e).is_empty(),
            "injection off"
        );
    }
}
