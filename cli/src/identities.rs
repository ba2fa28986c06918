//! `cfcli identities`: numeric id ↔ name ↔ SPIFFE id ↔ pods, as the operator's own engine
//! resolves them from the cluster's objects and the id table (never a second implementation of
//! the selection rules).
use std::collections::BTreeMap;

use cortexflow_operator_core::IdentityPods;

use crate::{connect::Cluster, live::Live};

/// Every identity of the cluster (or of `namespace`), with its pods.
pub async fn list(cluster: &Cluster, namespace: Option<&str>) -> anyhow::Result<Vec<IdentityPods>> {
    let engine = Live::fetch(cluster).await?.engine(&[])?;
    Ok(engine
        .identities_with_pods()
        .into_iter()
        .filter(|i| namespace.is_none_or(|n| i.namespace == n))
        .collect())
}

/// As a table, or as JSON.
pub fn render(ids: &[IdentityPods], json: bool) -> String {
    if json {
        let v: Vec<_> = ids
            .iter()
            .map(|i| {
                serde_json::json!({
                    "id": i.id,
                    "kind": i.kind,
                    "namespace": i.namespace,
                    "name": i.name,
                    "spiffeId": i.spiffe_id,
                    "pods": i.pods,
                })
            })
            .collect();
        return serde_json::to_string_pretty(&v).unwrap_or_default() + "\n";
    }
    let mut out = format!(
        "{:<8}  {:<4}  {:<32}  {:<56}  PODS\n",
        "ID", "KIND", "NAME", "SPIFFE ID"
    );
    let mut by_ns: BTreeMap<&str, Vec<&IdentityPods>> = BTreeMap::new();
    for i in ids {
        by_ns.entry(&i.namespace).or_default().push(i);
    }
    for i in by_ns.values().flatten() {
        out.push_str(&format!(
            "{:<8}  {:<4}  {:<32}  {:<56}  {}\n",
            i.id.map(|n| n.to_string())
                .unwrap_or_else(|| "(none)".into()),
            i.kind,
            format!("{}/{}", i.namespace, i.name),
            i.spiffe_id,
            if i.pods.is_empty() {
                "-".to_string()
            } else {
                i.pods.join(", ")
            }
        ));
    }
    out
}
