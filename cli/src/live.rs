//! The cluster's live state as the operator's engine sees it: the objects it watches and the id
//! table, read once, and the engine built from them (never a second implementation of the
//! selection or compilation rules).
use anyhow::Context as _;
use cortexflow_crds::{MeshPolicy as MeshPolicyCr, ServiceIdentity};
use cortexflow_operator::index;
use cortexflow_operator_core::{Allocations, Change, Engine, EngineConfig, Kind, ObjKey, Object};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ListParams};

use crate::connect::Cluster;

/// The id table's ConfigMap (the chart's default, `--identities-configmap` of the operator).
pub const ID_TABLE: &str = "cortexflow-identities";

/// What the engine needs, as read from the API.
pub struct Live {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub sids: Vec<ServiceIdentity>,
    pub policies: Vec<MeshPolicyCr>,
    pub alloc: Allocations,
    pub trust_domain: String,
}

impl Live {
    /// Reads the objects (concurrently) and the id table.
    pub async fn fetch(cluster: &Cluster) -> anyhow::Result<Self> {
        let c = &cluster.client;
        let lp = ListParams::default();
        let (namespaces, pods, sids, policies, table) = futures::try_join!(
            async { anyhow::Ok(Api::<Namespace>::all(c.clone()).list(&lp).await?.items) },
            async { anyhow::Ok(Api::<Pod>::all(c.clone()).list(&lp).await?.items) },
            async {
                anyhow::Ok(
                    Api::<ServiceIdentity>::all(c.clone())
                        .list(&lp)
                        .await?
                        .items,
                )
            },
            async { anyhow::Ok(Api::<MeshPolicyCr>::all(c.clone()).list(&lp).await?.items) },
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
        Ok(Self {
            namespaces,
            pods,
            sids,
            policies,
            alloc,
            trust_domain: cluster.args.trust_domain.clone(),
        })
    }

    /// The engine on the live state, with `edit` applied to the MeshPolicies first: the objects
    /// it returns replace the live ones (`Some`) or delete them (`None`), keyed by
    /// namespace/name. A policy the id table has no number for yet (a new one) gets the number
    /// the leader would give it, so that it compiles; identities keep exactly the numbers of the
    /// table.
    pub fn engine(&self, edit: &[(ObjKey, Option<&MeshPolicyCr>)]) -> anyhow::Result<Engine> {
        let key_of = |p: &MeshPolicyCr| {
            ObjKey::new(
                p.metadata.namespace.clone().unwrap_or_default(),
                p.metadata.name.clone().unwrap_or_default(),
            )
        };
        let mut policies: Vec<Object> = self
            .policies
            .iter()
            .filter(|p| !edit.iter().any(|(k, _)| *k == key_of(p)))
            .map(|p| Object::MeshPolicy(index::mesh_policy(p)))
            .collect();
        policies.extend(
            edit.iter()
                .filter_map(|(_, p)| p.map(|p| Object::MeshPolicy(index::mesh_policy(p)))),
        );
        let mut engine = Engine::new(EngineConfig {
            trust_domain: self.trust_domain.clone(),
            ..EngineConfig::default()
        });
        engine.apply(vec![
            Change::Allocations(self.alloc.clone()),
            Change::Reset(
                Kind::Namespace,
                self.namespaces
                    .iter()
                    .map(|n| Object::Namespace(index::namespace(n)))
                    .collect(),
            ),
            Change::Reset(
                Kind::ServiceIdentity,
                self.sids
                    .iter()
                    .map(|s| Object::ServiceIdentity(index::service_identity(s)))
                    .collect(),
            ),
            Change::Reset(
                Kind::Pod,
                self.pods
                    .iter()
                    .map(|p| Object::Pod(index::pod(p)))
                    .collect(),
            ),
            Change::Reset(Kind::MeshPolicy, policies),
        ]);
        if let Some(why) = engine.table_problem() {
            anyhow::bail!("the id table is not usable: {why}");
        }
        if !edit.is_empty() {
            let needed = engine
                .needed_allocations()
                .into_iter()
                .filter(|k| k.is_policy() || self.alloc.get(k).is_some())
                .collect();
            let allocated = self.alloc.allocate(&needed);
            if let Some(why) = allocated.reason {
                anyhow::bail!("the operator could not number the policy: {why}");
            }
            if let Some(table) = allocated.table {
                engine.apply(vec![Change::Allocations(table)]);
            }
            if let Some(why) = engine.table_problem() {
                anyhow::bail!("the simulated id table is not usable: {why}");
            }
        }
        Ok(engine)
    }
}
