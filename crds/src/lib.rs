//! CortexFlow custom resources, group `mesh.cortexflow.io`, version `v1alpha1`.
//!
//! * [`ServiceIdentity`] (short name `sid`) names a workload identity.
//! * [`MeshPolicy`] (short name `mp`) authorizes L3/L4 traffic between identities.
//!
//! The Rust types are the source of truth: their doc comments become the field descriptions
//! that `kubectl explain` prints, and everything that can be checked without looking at other
//! objects is validated by the OpenAPI schema or by CEL rules, so the apiserver rejects a bad
//! object with a message that names the field. `cargo xtask crdgen` writes the CRD YAML to
//! `charts/cortexflow/crds/`; a test fails when the checked-in YAML differs from these types.
#![forbid(unsafe_code)]
// `#[kube(printcolumn(...))]` repeats `type_`, `priority`, … per column by design.
#![allow(clippy::duplicated_attributes)]

mod identity;
mod policy;

pub use identity::{MtlsMode, ServiceIdentity, ServiceIdentitySpec, ServiceIdentityStatus};
pub use policy::{
    EgressRule, InForce, IngressRule, IpBlock, MeshPolicy, MeshPolicySpec, MeshPolicyStatus, Peer,
    PolicyAction, PolicyMode, PortSpec, Protocol,
};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every CortexFlow resource.
pub const GROUP: &str = "mesh.cortexflow.io";
/// API version of the resources in this crate.
pub const VERSION: &str = "v1alpha1";

/// Condition types and reasons written to the status of CortexFlow resources, and the pod
/// readiness gate. docs/policy.md ("Status") says when each is set; a test checks that it
/// lists every one.
pub mod conditions {
    /// The object is valid and has been compiled (MeshPolicy) or allocated (ServiceIdentity).
    pub const ACCEPTED: &str = "Accepted";
    /// Every reference in a MeshPolicy points at an existing object.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The agents of every node that needs the policy report it applied ("programmed on N/M nodes").
    pub const PROGRAMMED: &str = "Programmed";
    /// Some pods selected by a ServiceIdentity are claimed by an older ServiceIdentity.
    pub const CONFLICT: &str = "Conflict";
    /// Whether a ServiceIdentity's `spec.mtls` is honoured (False while the mesh cannot).
    pub const MTLS: &str = "MTLS";

    /// Every condition type.
    pub const ALL: [&str; 5] = [ACCEPTED, RESOLVED_REFS, PROGRAMMED, CONFLICT, MTLS];

    /// The pod condition (listed in a pod's `spec.readinessGates`) that the operator sets to True
    /// once the pod's node enforces its policy.
    pub const READINESS_GATE: &str = "mesh.cortexflow.io/programmed";

    /// The `reason` of every condition the operator writes.
    pub mod reasons {
        /// `Accepted=True` (MeshPolicy): valid and compiled.
        pub const ACCEPTED: &str = "Accepted";
        /// `Accepted=False`, `ResolvedRefs=False`, `Programmed=False` (MeshPolicy): this
        /// generation cannot be compiled (the last accepted one, if any, stays in force).
        pub const INVALID: &str = "Invalid";
        /// `ResolvedRefs=True`: every reference resolved.
        pub const RESOLVED_REFS: &str = "ResolvedRefs";
        /// `ResolvedRefs=False`: a reference points at nothing (the message names each).
        pub const IDENTITY_NOT_FOUND: &str = "IdentityNotFound";
        /// `Programmed=True`, and the readiness gate: applied on every node that needs it.
        pub const PROGRAMMED: &str = "Programmed";
        /// `Programmed=False`: some nodes have not applied it yet; `Accepted=False` while a
        /// number is not allocated yet.
        pub const PENDING: &str = "Pending";
        /// `Programmed=False`: some node refused its config.
        pub const FAILED: &str = "Failed";
        /// `Accepted=True` (ServiceIdentity): it has a number.
        pub const ALLOCATED: &str = "Allocated";
        /// `Accepted=False` (ServiceIdentity): its selector cannot be evaluated.
        pub const INVALID_SELECTOR: &str = "InvalidSelector";
        /// `Conflict=True`: some pods it selects carry an older ServiceIdentity.
        pub const CLAIMED_BY_OLDER_IDENTITY: &str = "ClaimedByOlderIdentity";
        /// `Conflict=False`.
        pub const NO_CONFLICT: &str = "NoConflict";
        /// `MTLS=True`: `spec.mtls` is `Disabled`, which is what the mesh does.
        pub const MTLS_DISABLED: &str = "Disabled";
        /// `MTLS=False`: `spec.mtls` asks for mTLS, which this version cannot provide yet (no
        /// proxy): traffic is plaintext, L3/L4 policy still applies.
        pub const PROXY_NOT_AVAILABLE: &str = "ProxyNotAvailable";

        /// Every reason.
        pub const ALL: [&str; 13] = [
            ACCEPTED,
            INVALID,
            RESOLVED_REFS,
            IDENTITY_NOT_FOUND,
            PROGRAMMED,
            PENDING,
            FAILED,
            ALLOCATED,
            INVALID_SELECTOR,
            CLAIMED_BY_OLDER_IDENTITY,
            NO_CONFLICT,
            MTLS_DISABLED,
            PROXY_NOT_AVAILABLE,
        ];
    }
}

/// The CustomResourceDefinitions of every CortexFlow kind, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        reflowed(MeshPolicy::crd()),
        reflowed(ServiceIdentity::crd()),
    ]
}

/// Doc comments keep their source line breaks; `kubectl explain` prints them verbatim in the
/// middle of its own wrapping. Join the lines of each paragraph so that it can wrap them.
fn reflowed(mut crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if k == "description" => {
                            *text = reflow(text)
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    for version in &mut crd.spec.versions {
        let schema = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut());
        if let Some(schema) = schema
            && let Ok(mut v) = serde_json::to_value(&*schema)
        {
            walk(&mut v);
            if let Ok(s) = serde_json::from_value(v) {
                *schema = s;
            }
        }
    }
    crd
}

/// Joins the lines of every paragraph (paragraphs are separated by a blank line).
fn reflow(text: &str) -> String {
    text.split("\n\n")
        .map(|para| {
            para.split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The file name (under `charts/cortexflow/crds/`) a CRD is written to.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// Renders a CRD as the YAML document checked into the chart.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    let body = serde_saphyr::to_string(crd)?;
    Ok(format!(
        "# Generated by `cargo xtask crdgen` from the Rust types in crds/. Do not edit by hand.\n{body}"
    ))
}

/// The CRD files as `(file name, YAML)` pairs, as `cargo xtask crdgen` writes them.
pub fn crd_files() -> Result<Vec<(String, String)>, serde_saphyr::ser::Error> {
    crds()
        .iter()
        .map(|crd| Ok((crd_file_name(crd), crd_yaml(crd)?)))
        .collect()
}

/// Pattern of a label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters (alphanumerics, `-`, `_`, `.`; alphanumeric at both ends). The prefix's length
/// (at most 253) is checked apart (`indexOf('/') <= 253`).
pub const LABEL_KEY_PATTERN: &str = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";
/// Pattern of a label value: empty, or at most 63 characters (alphanumerics, `-`, `_`, `.`;
/// alphanumeric at both ends).
pub const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$";

/// Schema of a label selector (`selector`, `namespaceSelector`): Kubernetes' `LabelSelector`
/// with what the apiserver does not check on its own for custom resources — label key and
/// value syntax, the four operators, values exactly for `In`/`NotIn` — so that a typo is an
/// admission error naming the field, not a selector the operator has to refuse.
pub(crate) fn label_selector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let key_rule = format!(
        "self.all(k, k.matches('{}') && k.indexOf('/') <= 253)",
        LABEL_KEY_PATTERN.replace('\\', "\\\\")
    );
    schemars::json_schema!({
        "type": "object",
        "description": "A label query: matchLabels and matchExpressions are ANDed; an empty selector matches everything.",
        "properties": {
            "matchLabels": {
                "type": "object",
                "description": "Labels that must all be present with these values.",
                "maxProperties": 64,
                "additionalProperties": {
                    "type": "string",
                    "maxLength": 63,
                    "pattern": LABEL_VALUE_PATTERN,
                },
                "x-kubernetes-validations": [{
                    "rule": key_rule,
                    "message": "label keys must be a name of at most 63 characters (alphanumerics, '-', '_', '.'; alphanumeric at both ends), optionally prefixed by a DNS subdomain of at most 253 characters and '/'",
                }],
            },
            "matchExpressions": {
                "type": "array",
                "description": "Requirements that must all hold.",
                "maxItems": 32,
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {
                            "type": "string",
                            "description": "The label key.",
                            "maxLength": 317,
                            "pattern": LABEL_KEY_PATTERN,
                        },
                        "operator": {
                            "type": "string",
                            "description": "In, NotIn, Exists or DoesNotExist.",
                            "enum": ["In", "NotIn", "Exists", "DoesNotExist"],
                        },
                        "values": {
                            "type": "array",
                            "description": "For In and NotIn: the values (at least one). Exists and DoesNotExist take none.",
                            "maxItems": 128,
                            "items": {
                                "type": "string",
                                "maxLength": 63,
                                "pattern": LABEL_VALUE_PATTERN,
                            },
                        },
                    },
                    "x-kubernetes-validations": [
                        {
                            "rule": "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : (!has(self.values) || size(self.values) == 0)",
                            "message": "In and NotIn need values; Exists and DoesNotExist take none",
                            "fieldPath": ".values",
                        },
                        {
                            "rule": "self.key.indexOf('/') <= 253",
                            "message": "the prefix of a label key is at most 253 characters",
                            "fieldPath": ".key",
                        },
                    ],
                },
            },
        },
        "x-kubernetes-map-type": "atomic",
    })
}

/// Pattern of a Kubernetes object name (DNS-1123 subdomain).
pub(crate) const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";
/// Pattern of a reference `<name>` or `<namespace>/<name>`.
pub(crate) const REF_PATTERN: &str =
    r"^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/)?[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$";

/// Schema of the `conditions` list of a status: a list map keyed by `type`.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema =
        generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert("maxItems".into(), 16.into());
    schema
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn chart_crd_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/cortexflow/crds")
    }

    #[test]
    fn checked_in_crd_yaml_matches_the_types() {
        let dir = chart_crd_dir();
        for (name, want) in crd_files().expect("render CRDs") {
            let path = dir.join(&name);
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                have == want,
                "{} differs from the Rust types in crds/: run `cargo xtask crdgen` and commit the result",
                path.display()
            );
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("read chart crd dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut expected: Vec<String> = crds().iter().map(crd_file_name).collect();
        expected.sort();
        assert_eq!(on_disk, expected, "stale files in {}", dir.display());
    }

    /// docs/policy.md is where users read what a condition means: it must list every condition
    /// type and reason the operator writes, and the readiness gate.
    #[test]
    fn docs_list_every_condition_reason_and_the_gate() {
        let doc = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/policy.md"),
        )
        .expect("docs/policy.md");
        let missing: Vec<&str> = conditions::ALL
            .iter()
            .chain(conditions::reasons::ALL.iter())
            .chain([conditions::READINESS_GATE].iter())
            .copied()
            .filter(|name| !doc.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/policy.md does not name {missing:?}"
        );
        let mut unique = conditions::reasons::ALL.to_vec();
        unique.sort();
        unique.dedup();
        assert_eq!(
            unique.len(),
            conditions::reasons::ALL.len(),
            "a reason listed twice"
        );
    }

    /// Every property of both schemas carries a description, so `kubectl explain` helps.
    #[test]
    fn every_field_has_a_description() {
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            let Some(obj) = v.as_object() else { return };
            if let Some(props) = obj.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let p = format!("{path}.{name}");
                    // apiVersion/kind/metadata are described by Kubernetes itself.
                    let top_level_meta = path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
                    if !top_level_meta
                        && prop
                            .get("description")
                            .and_then(|d| d.as_str())
                            .is_none_or(str::is_empty)
                    {
                        missing.push(p.clone());
                    }
                    walk(&p, prop, missing);
                }
            }
            if let Some(items) = obj.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
            if let Some(extra) = obj.get("additionalProperties") {
                walk(&format!("{path}{{}}"), extra, missing);
            }
        }
        for crd in crds() {
            let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
            let root = &schema["openAPIV3Schema"];
            let mut missing = Vec::new();
            walk("", root, &mut missing);
            assert!(
                missing.is_empty(),
                "{}: fields without description: {missing:?}",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn reflow_joins_paragraph_lines() {
        assert_eq!(reflow("a\nb\n\nc\n d"), "a b\n\nc d");
    }

    #[test]
    fn names_short_names_and_status_subresource() {
        for (crd, plural, short) in [
            (MeshPolicy::crd(), "meshpolicies", "mp"),
            (ServiceIdentity::crd(), "serviceidentities", "sid"),
        ] {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(crd.spec.names.plural, plural);
            assert_eq!(
                crd.spec.names.short_names.as_deref(),
                Some(&[short.to_string()][..])
            );
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, VERSION);
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some()
            );
        }
    }

    #[test]
    fn printer_columns() {
        let cols = |crd: CustomResourceDefinition| -> Vec<String> {
            crd.spec.versions[0]
                .additional_printer_columns
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|c| c.name)
                .collect()
        };
        let mp = cols(MeshPolicy::crd());
        for want in ["Action", "Mode", "Accepted", "Programmed", "Age"] {
            assert!(
                mp.contains(&want.to_string()),
                "MeshPolicy lacks column {want}: {mp:?}"
            );
        }
        let sid = cols(ServiceIdentity::crd());
        for want in ["ID", "Endpoints", "mTLS", "Age"] {
            assert!(
                sid.contains(&want.to_string()),
                "ServiceIdentity lacks column {want}: {sid:?}"
            );
        }
    }
}
