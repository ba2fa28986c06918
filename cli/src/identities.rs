//! `cfcli identities`: numeric id ↔ name ↔ SPIFFE id ↔ pods, as the operator's own engine
//! resolves them from the cluster's objects and the id table (never a second implementation of
//! the selection rules).
use std::collections::BTreeMap;

use anyhow::Context as _;
use cortexflow_operator::index;
use cortexflow_operator_core::{
    Allocations, Change, Engine, EngineConfig, IdentityPods, Kind, Object,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ListParams};

use crate::connect::Cluster;

/// The id table's ConfigMap (the chart's default, `--identities-configmap` of the operator).
pub const ID_TABLE: &str = "cortexflow-identities";

/// Every identity of the cluster (or of `namespace`), with its pods.
pub async fn list(cluster: &Cluster, namespace: Option<&str>) -> anyhow::Result<Vec<IdentityPods>> {
    let c = &cluster.client;
    let lp = ListParams::default();
    let (namespaces, pods, sids, table) = futures::try_join!(
        async { anyhow::Ok(Api::<Namespace>::all(c.clone()).list(&lp).await?.items) },
        async { anyhow::Ok(Api::<Pod>::all(c.clone()).list(&lp).await?.items) },
        async {
            anyhow::Ok(
                Api::<cortexflow_crds::ServiceIdentity>::all(c.clone())
                    .list(&lp)
                    .await?
                    .items,
            )
        },
        async {
            Ok(
                Api::<ConfigMap>::namespaced(c.clone(), &cluster.args.cortexflow_namespace)
                    .get_opt(ID_TABLE)
                    .await?,
            )
        },
    )?;
    let table = table.with_context(|| {
        format!(
            "no id table (ConfigMap {}/{ID_TABLE}): is the operator running?",
            cluster.args.cortexflow_namespace
        )
    })?;
    let alloc = Allocations::from_map(
        &table.data.unwrap_or_default(),
        table.metadata.resource_version.as_deref().unwrap_or(""),
    )
    .map_err(|e| anyhow::anyhow!("the id table does not read: {e}"))?;
    let mut engine = Engine::new(EngineConfig {
        trust_domain: cluster.args.trust_domain.clone(),
        ..EngineConfig::default()
    });
    engine.apply(vec![
        Change::Allocations(alloc),
        Change::Reset(
            Kind::Namespace,
            namespaces
                .iter()
                .map(|n| Object::Namespace(index::namespace(n)))
                .collect(),
        ),
        Change::Reset(
            Kind::ServiceIdentity,
            sids.iter()
                .map(|s| Object::ServiceIdentity(index::service_identity(s)))
                .collect(),
        ),
        Change::Reset(
            Kind::Pod,
            pods.iter().map(|p| Object::Pod(index::pod(p))).collect(),
        ),
    ]);
    if let Some(why) = engine.table_problem() {
        anyhow::bail!("the id table is not usable: {why}");
    }
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
