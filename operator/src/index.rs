//! Watches: Kubernetes objects in, engine [`Change`]s out.
//!
//! Each watched kind runs a list-and-watch ([`crate::listwatch`]) whose events become engine
//! inputs: `Apply` and `Delete` one by one, and a (re-)list as one `Reset` of the whole kind, so
//! a restarted watch never leaves stale objects behind; every input carries the revision the
//! watch stands at (the store's sync gate and the revision on every config are made of them).
//! Objects are read through `DeserializeGuard`: one that does not deserialize is skipped,
//! logged and counted (`cortexflow_operator_watch_skipped_total`), never fatal — and its
//! deletion still deletes.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use cortexflow_crds::{
    MeshPolicy as MeshPolicyCr, PolicyAction, PolicyMode, ServiceIdentity as SidCr,
};
use cortexflow_domain::{Action, Mode, PortRange, Protocol};
use cortexflow_operator_core::{
    Allocations, Change, Kind, ObjKey, Object,
    model::{
        Created, EndpointSlice, MeshPolicy, Mtls, Namespace, Node, Pod, PolicyPeer, PolicyRule,
        Ref, Service, ServiceIdentity, ServicePort, SliceEndpoint, SlicePort,
    },
    selector::Selector,
};
use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{
            ConfigMap, Namespace as NamespaceK, Node as NodeK, Pod as PodK, Service as ServiceK,
        },
        discovery::v1::EndpointSlice as EndpointSliceK,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, Resource,
    core::{DeserializeGuard, error_boundary::InvalidObject},
};
use opentelemetry::KeyValue;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use cortexflow_runtime::{Supervisor, drain::Watcher};

use crate::{
    listwatch::{self, Seen},
    metrics::OperatorMetrics,
    readiness::Gate,
    store::{Input, Source, Store},
};

fn key(meta: &ObjectMeta) -> ObjKey {
    ObjKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn labels(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.labels.clone().unwrap_or_default()
}

fn created(meta: &ObjectMeta) -> Created {
    Created(
        meta.creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
    )
}

/// A label selector as the core validates it.
pub fn selector(s: &LabelSelector) -> Result<Selector, String> {
    let exprs = s
        .match_expressions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.key, e.operator, e.values.unwrap_or_default()))
        .collect();
    Selector::parse(s.match_labels.clone().unwrap_or_default(), exprs)
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

pub fn pod(p: &PodK) -> Pod {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    Pod {
        key: key(&p.metadata),
        labels: Arc::new(labels(&p.metadata)),
        service_account: spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .into(),
        node: spec
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty())
            .map(Into::into),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        terminated: matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ),
        inject: p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::injector::INJECT_ANNOTATION).cloned()),
        has_proxy: spec.is_some_and(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(&s.containers)
                .any(|c| c.name == crate::injector::PROXY_CONTAINER)
        }),
    }
}

pub fn namespace(n: &NamespaceK) -> Namespace {
    Namespace {
        name: n.metadata.name.clone().unwrap_or_default(),
        labels: labels(&n.metadata),
        inject: n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::injector::INJECT_ANNOTATION).cloned()),
    }
}

pub fn node(n: &NodeK) -> Node {
    let addresses = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    Node {
        name: n.metadata.name.clone().unwrap_or_default(),
        addresses,
        pod_cidr: n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| c.parse().ok()),
    }
}

pub fn service(s: &ServiceK) -> Service {
    let spec = s.spec.as_ref();
    Service {
        key: key(&s.metadata),
        cluster_ip: spec
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ports: spec
            .and_then(|s| s.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(ServicePort {
                    name: p.name.unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                    protocol: protocol(p.protocol.as_deref())?,
                })
            })
            .collect(),
    }
}

pub fn endpoint_slice(s: &EndpointSliceK) -> Option<EndpointSlice> {
    if s.address_type != "IPv4" {
        return None;
    }
    let service = labels(&s.metadata)
        .get("kubernetes.io/service-name")?
        .clone();
    Some(EndpointSlice {
        key: key(&s.metadata),
        service,
        ports: s
            .ports
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(SlicePort {
                    name: p.name.unwrap_or_default(),
                    port: u16::try_from(p.port?).ok()?,
                    protocol: protocol(p.protocol.as_deref())?,
                })
            })
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .flatten()
            .map(|e| SliceEndpoint {
                addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
            .collect(),
    })
}

pub fn service_identity(s: &SidCr) -> ServiceIdentity {
    ServiceIdentity {
        key: key(&s.metadata),
        created: created(&s.metadata),
        generation: s.metadata.generation.unwrap_or(0),
        selector: selector(&s.spec.selector),
        service_accounts: s.spec.service_accounts.clone(),
        mtls: match s.spec.mtls {
            cortexflow_crds::MtlsMode::Disabled => Mtls::Disabled,
            cortexflow_crds::MtlsMode::Permissive => Mtls::Permissive,
            cortexflow_crds::MtlsMode::Strict => Mtls::Strict,
        },
    }
}

pub fn mesh_policy(p: &MeshPolicyCr) -> MeshPolicy {
    let generation = p.metadata.generation.unwrap_or(0);
    let mut m = policy_spec(&p.metadata, generation, &p.spec);
    m.in_force = p
        .status
        .as_ref()
        .and_then(|s| s.in_force.as_ref())
        .map(|f| Box::new(policy_spec(&p.metadata, f.generation, &f.spec)));
    m
}

/// One generation of a MeshPolicy (`in_force` left empty).
fn policy_spec(
    meta: &ObjectMeta,
    generation: i64,
    spec: &cortexflow_crds::MeshPolicySpec,
) -> MeshPolicy {
    let p = spec;
    let mut invalid = None;
    let mut rules = |rules: Vec<(Vec<cortexflow_crds::Peer>, Vec<cortexflow_crds::PortSpec>)>| -> Vec<PolicyRule> {
        rules
            .into_iter()
            .map(|(peers, ports)| PolicyRule {
                peers: peers
                    .into_iter()
                    .filter_map(|peer| {
                                                let mut r = |s: &str| Ref::parse(s).map_err(|e| invalid = Some(e)).ok();
                        match (peer.identity, peer.service_account, peer.namespace_selector, peer.ip_block) {
                            (Some(i), None, None, None) => r(&i).map(PolicyPeer::Identity),
                            (None, Some(sa), None, None) => r(&sa).map(PolicyPeer::ServiceAccount),
                            (None, None, Some(ns), None) => Some(PolicyPeer::NamespaceSelector(selector(&ns))),
                            (None, None, None, Some(b)) => Some(PolicyPeer::IpBlock {
                                cidr: b.cidr,
                                except: b.except,
                            }),
                            _ => {
                                invalid = Some("a peer must set exactly one of identity, serviceAccount, namespaceSelector, ipBlock".into());
                                None
                            }
                        }
                    })
                    .collect(),
                ports: ports
                    .into_iter()
                    .filter_map(|p| {
                        let first = u16::try_from(p.port).ok().filter(|p| *p > 0);
                        let last = u16::try_from(p.end_port.unwrap_or(p.port)).ok();
                        match (first, last) {
                            (Some(first), Some(last)) => Some(PortRange {
                                protocol: match p.protocol {
                                    cortexflow_crds::Protocol::Tcp => Protocol::Tcp,
                                    cortexflow_crds::Protocol::Udp => Protocol::Udp,
                                },
                                first,
                                last,
                            }),
                            _ => {
                                invalid = Some(format!("port {}-{:?} is not a port range", p.port, p.end_port));
                                None
                            }
                        }
                    })
                    .collect(),
            })
            .collect()
    };
    let ingress = rules(
        p.ingress
            .iter()
            .map(|r| (r.from.clone(), r.ports.clone()))
            .collect(),
    );
    let egress = rules(
        p.egress
            .iter()
            .map(|r| (r.to.clone(), r.ports.clone()))
            .collect(),
    );
    MeshPolicy {
        key: key(meta),
        generation,
        selector: selector(&p.selector),
        action: match p.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
        },
        mode: match p.mode {
            PolicyMode::Enforce => Mode::Enforce,
            PolicyMode::Audit => Mode::Audit,
        },
        ingress,
        egress,
        invalid,
        spec_json: serde_json::to_string(spec).unwrap_or_default().into(),
        in_force: None,
    }
}

/// What a watch does with each object besides turning it into a change: `observe(object,
/// deleted)` (the status writer's view of the CRs' status, the readiness gate's waiting pods).
type Observe<K> = Box<dyn Fn(&K, bool) + Send + Sync>;

/// Where a watch sends what it sees.
struct Sinks {
    tx: mpsc::Sender<Input>,
    metrics: OperatorMetrics,
    drain: Watcher,
}

/// The key of an object that did not deserialize (its metadata did).
fn invalid_key(e: &InvalidObject) -> ObjKey {
    key(&e.metadata)
}

/// Turns one kind's list-and-watch into engine inputs: `convert` maps an object (or `None` to
/// ignore it), `observe` sees every object too. Each input carries the revision the watch
/// stands at. Ends on the drain; the watch itself never ends.
async fn pump<K>(
    kind: Kind,
    api: Api<DeserializeGuard<K>>,
    convert: impl Fn(&K) -> Option<Object> + Send,
    observe: Observe<K>,
    sinks: Sinks,
) -> anyhow::Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let name = kind.as_str();
    let Sinks { tx, metrics, drain } = sinks;
    let source = Source::Kind(kind);
    let mut stream = std::pin::pin!(listwatch::list_watch(api, None));
    let skip = |e: &InvalidObject| {
        tracing::warn!(object = %invalid_key(e), error = %e.error, "skipping an object that does not deserialize");
        metrics.watch_skipped.add(1, &[KeyValue::new("kind", name)]);
    };
    loop {
        let seen = tokio::select! {
            s = stream.next() => match s {
                Some(s) => s,
                None => anyhow::bail!("the {name} watch ended"),
            },
            () = drain.signaled() => return Ok(()),
        };
        let (change, revision) = match seen {
            Seen::Listed(objects, revision) => {
                let mut out = Vec::with_capacity(objects.len());
                for o in objects {
                    match o {
                        Ok(o) => {
                            observe(&o, false);
                            out.extend(convert(&o));
                        }
                        Err(e) => skip(&e),
                    }
                }
                tracing::debug!(objects = out.len(), revision, "listed");
                (Some(Change::Reset(kind, out)), revision)
            }
            Seen::Applied(Ok(o), revision) => {
                observe(&o, false);
                (convert(&o).map(Change::Apply), revision)
            }
            Seen::Applied(Err(e), revision) => {
                skip(&e);
                (None, revision)
            }
            Seen::Deleted(Ok(o), revision) => {
                observe(&o, true);
                (convert(&o).map(|o| Change::Delete(kind, o.key())), revision)
            }
            // Gone is gone, readable or not.
            Seen::Deleted(Err(e), revision) => {
                (Some(Change::Delete(kind, invalid_key(&e))), revision)
            }
            Seen::Progress(revision) => (None, revision),
            Seen::Failed(e, wait) => {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "watch failed; retrying");
                metrics.watch_errors.add(1, &[KeyValue::new("kind", name)]);
                continue;
            }
        };
        let input = Input {
            source,
            revision,
            change,
        };
        if tx.send(input).await.is_err() {
            anyhow::bail!("the engine is gone");
        }
    }
}

/// What the watches feed.
pub struct WatchSinks {
    /// The engine's inputs.
    pub changes: mpsc::Sender<Input>,
    pub metrics: OperatorMetrics,
    /// The status the CRs carry (the status writer compares against it).
    pub store: Arc<Store>,
    /// Pods waiting for the readiness gate (fed by the same Pod watch as the engine).
    pub gate: Arc<Gate>,
    pub drain: Watcher,
}

/// Registers one watch per kind (`watch/<Kind>`) with the supervisor; each sends changes to the
/// engine and reports its first full sync.
pub fn spawn_watches(sup: &mut Supervisor, client: Client, w: WatchSinks) {
    let sinks = || Sinks {
        tx: w.changes.clone(),
        metrics: w.metrics.clone(),
        drain: w.drain.clone(),
    };
    fn nothing<K>() -> Observe<K> {
        Box::new(|_, _| {})
    }
    fn status_of<K: Resource + 'static>(
        store: Arc<Store>,
        kind: Kind,
        status: fn(&K) -> Option<serde_json::Value>,
    ) -> Observe<K> {
        Box::new(move |o: &K, deleted| {
            let key = key(o.meta());
            store.observe_status(kind, key, if deleted { None } else { status(o) });
        })
    }
    macro_rules! watch {
        ($k:ty, $kind:expr, $conv:expr, $observe:expr) => {{
            let api: Api<DeserializeGuard<$k>> = Api::all(client.clone());
            sup.spawn(
                format!("watch/{}", $kind.as_str()),
                pump::<$k>($kind, api, $conv, $observe, sinks()),
            );
        }};
    }
    watch!(
        NamespaceK,
        Kind::Namespace,
        |o: &NamespaceK| Some(Object::Namespace(namespace(o))),
        nothing()
    );
    watch!(
        NodeK,
        Kind::Node,
        |o: &NodeK| Some(Object::Node(node(o))),
        nothing()
    );
    let gate = w.gate.clone();
    watch!(
        PodK,
        Kind::Pod,
        |o: &PodK| Some(Object::Pod(pod(o))),
        Box::new(move |p: &PodK, deleted| gate.observe(p, deleted))
    );
    watch!(
        SidCr,
        Kind::ServiceIdentity,
        |o: &SidCr| Some(Object::ServiceIdentity(service_identity(o))),
        status_of(w.store.clone(), Kind::ServiceIdentity, |o: &SidCr| o
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok()))
    );
    watch!(
        MeshPolicyCr,
        Kind::MeshPolicy,
        |o: &MeshPolicyCr| Some(Object::MeshPolicy(mesh_policy(o))),
        status_of(w.store.clone(), Kind::MeshPolicy, |o: &MeshPolicyCr| o
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok()))
    );
    watch!(
        ServiceK,
        Kind::Service,
        |o: &ServiceK| Some(Object::Service(service(o))),
        nothing()
    );
    watch!(
        EndpointSliceK,
        Kind::EndpointSlice,
        |o: &EndpointSliceK| endpoint_slice(o).map(Object::EndpointSlice),
        nothing()
    );
}

/// Watches the id table ConfigMap and sends its content as [`Change::Allocations`], or
/// [`Change::TableUnreadable`] when it is missing or does not parse (the engine then keeps the
/// numbers it has, and the leader writes the table again).
pub fn allocation_watch(
    client: Client,
    namespace: &str,
    name: &str,
    lease: &str,
    tx: mpsc::Sender<Input>,
    drain: Watcher,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + use<> {
    let api: Api<DeserializeGuard<ConfigMap>> = Api::namespaced(client.clone(), namespace);
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    let lease = lease.to_string();
    let fields = format!("metadata.name={name}");
    async move {
        let mut stream = std::pin::pin!(listwatch::list_watch(api, Some(fields)));
        // Whether the Lease records counters: then a table existed (it is lost, not new).
        let watermark = || async {
            let l = tokio::time::timeout(listwatch::LIST_TIMEOUT, leases.get_opt(&lease)).await;
            match l {
                // Counters past their first values: numbers were handed out.
                Ok(Ok(Some(l))) => crate::lease::counters_of(&l)
                    .filter(|c| *c != (cortexflow_domain::identity::FIRST_ALLOCATED, 1)),
                _ => None,
            }
        };
        let unreadable = |why: String, watermark: Option<(u32, u32)>| {
            tracing::error!(%why, ?watermark, "the id table is unreadable; keeping the numbers in use (the leader writes them back)");
            Change::TableUnreadable { why, watermark }
        };
        let parse = |cm: ConfigMap| {
            let version = cm.metadata.resource_version.clone().unwrap_or_default();
            Allocations::from_map(&cm.data.unwrap_or_default(), &version)
                .map(Change::Allocations)
                .map_err(|e| format!("the id table ConfigMap is invalid: {e}"))
        };
        loop {
            let seen = tokio::select! {
                s = stream.next() => match s {
                    Some(s) => s,
                    None => anyhow::bail!("the id table watch ended"),
                },
                () = drain.signaled() => return Ok(()),
            };
            let (change, revision) = match seen {
                Seen::Listed(objects, revision) => {
                    let read = match objects.into_iter().next() {
                        Some(Ok(cm)) => parse(cm),
                        Some(Err(e)) => Err(format!(
                            "the id table ConfigMap does not deserialize: {}",
                            e.error
                        )),
                        None => Err("there is no id table ConfigMap".into()),
                    };
                    let change = match read {
                        Ok(c) => c,
                        Err(why) => match watermark().await {
                            Some(w) => unreadable(why, Some(w)),
                            // Nothing says a table existed: a new installation.
                            None => Change::TableUnreadable {
                                why,
                                watermark: None,
                            },
                        },
                    };
                    (Some(change), revision)
                }
                Seen::Applied(Ok(cm), revision) => (
                    Some(parse(cm).unwrap_or_else(|why| unreadable(why, None))),
                    revision,
                ),
                Seen::Applied(Err(e), revision) => (
                    Some(unreadable(
                        format!("the id table ConfigMap does not deserialize: {}", e.error),
                        None,
                    )),
                    revision,
                ),
                Seen::Deleted(_, revision) => (
                    Some(unreadable(
                        "the id table ConfigMap was deleted".into(),
                        None,
                    )),
                    revision,
                ),
                Seen::Progress(revision) => (None, revision),
                Seen::Failed(e, wait) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "id table watch failed; retrying");
                    continue;
                }
            };
            let input = Input {
                source: Source::IdTable,
                revision,
                change,
            };
            if tx.send(input).await.is_err() {
                anyhow::bail!("the engine is gone");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cortexflow_crds::{
        InForce, IngressRule, MeshPolicySpec, MeshPolicyStatus, MtlsMode, Peer as PeerCr, PortSpec,
        ServiceIdentitySpec,
    };
    use cortexflow_operator_core::selector::{label_key, label_value};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn policy(generation: i64, spec: MeshPolicySpec) -> MeshPolicyCr {
        let mut p = MeshPolicyCr::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(generation);
        p
    }

    fn spec(port: i32, operator: &str) -> MeshPolicySpec {
        MeshPolicySpec {
            selector: LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "app".into(),
                    operator: operator.into(),
                    values: Some(vec!["db".into()]),
                }]),
                ..Default::default()
            },
            ingress: vec![IngressRule {
                from: vec![PeerCr {
                    identity: Some("web".into()),
                    ..Default::default()
                }],
                ports: vec![PortSpec {
                    port,
                    end_port: None,
                    protocol: cortexflow_crds::Protocol::Tcp,
                }],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_policy_converts_with_its_spec_and_the_generation_in_force() {
        let mut p = policy(3, spec(5432, "NotIn"));
        let m = mesh_policy(&p);
        assert_eq!(m.key, ObjKey::new("shop", "p"));
        assert_eq!(m.generation, 3);
        assert!(m.selector.is_ok());
        assert_eq!(m.ingress[0].ports[0].first, 5432);
        assert_eq!(m.invalid, None);
        assert_eq!(m.in_force, None);
        let json: serde_json::Value = serde_json::from_str(&m.spec_json).unwrap();
        assert_eq!(json, serde_json::to_value(&p.spec).unwrap());

        // A typo the schema would reject, with the last accepted generation in the status.
        p.spec = spec(5432, "Inn");
        p.status = Some(MeshPolicyStatus {
            in_force: Some(InForce {
                generation: 2,
                spec: spec(6432, "In"),
            }),
            ..Default::default()
        });
        let m = mesh_policy(&p);
        let e = m.selector.as_ref().unwrap_err();
        assert!(e.contains("Inn"), "{e}");
        let f = m.in_force.as_deref().expect("in force");
        assert_eq!((f.generation, f.key.clone()), (2, m.key.clone()));
        assert!(f.selector.is_ok());
        assert_eq!(f.ingress[0].ports[0].first, 6432);
        assert_eq!(f.in_force, None);
    }

    #[test]
    fn bad_references_and_ports_make_the_policy_invalid() {
        let mut s = spec(80, "In");
        s.ingress[0].from[0].identity = Some("a/b/c".into());
        assert!(mesh_policy(&policy(1, s)).invalid.is_some());
        let s = spec(0, "In");
        let m = mesh_policy(&policy(1, s));
        assert!(
            m.invalid.as_deref().is_some_and(|e| e.contains("port 0")),
            "{:?}",
            m.invalid
        );
        let mut s = spec(80, "In");
        s.ingress[0].from[0].service_account = Some("web".into());
        let m = mesh_policy(&policy(1, s));
        assert!(
            m.invalid
                .as_deref()
                .is_some_and(|e| e.contains("exactly one")),
            "{:?}",
            m.invalid
        );
    }

    #[test]
    fn a_service_identity_converts_with_its_mtls_mode() {
        for (mode, want) in [
            (MtlsMode::Disabled, Mtls::Disabled),
            (MtlsMode::Permissive, Mtls::Permissive),
            (MtlsMode::Strict, Mtls::Strict),
        ] {
            let mut s = SidCr::new(
                "web",
                ServiceIdentitySpec {
                    selector: LabelSelector::default(),
                    service_accounts: vec!["web".into()],
                    mtls: mode,
                },
            );
            s.metadata.namespace = Some("shop".into());
            let m = service_identity(&s);
            assert_eq!(m.mtls, want);
            assert_eq!(m.service_accounts, vec!["web".to_string()]);
        }
    }

    /// The operator's label syntax (for objects the schema did not check) is the schema's:
    /// compared on many strings over the characters that matter.
    #[test]
    fn label_syntax_matches_the_crd_schema() {
        let key_re = regex::Regex::new(cortexflow_crds::LABEL_KEY_PATTERN).unwrap();
        let value_re = regex::Regex::new(cortexflow_crds::LABEL_VALUE_PATTERN).unwrap();
        let alphabet: Vec<char> = "aZ09-_./ .A".chars().collect();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut checked = 0;
        for _ in 0..200_000 {
            let len = (next() % 12) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let schema_key = key_re.is_match(&s) && s.find('/').is_none_or(|i| i <= 253);
            assert_eq!(label_key(&s).is_ok(), schema_key, "key {s:?}");
            assert_eq!(
                label_value(&s).is_ok(),
                value_re.is_match(&s),
                "value {s:?}"
            );
            checked += 1;
        }
        // Lengths at the limits.
        for s in [
            "k".repeat(63),
            "k".repeat(64),
            format!("{}/k", "p".repeat(253)),
            format!("{}/k", "p".repeat(254)),
            format!("{}.{}/k", "p".repeat(63), "q".repeat(63)),
        ] {
            let schema_key = key_re.is_match(&s) && s.find('/').is_none_or(|i| i <= 253);
            assert_eq!(
                label_key(&s).is_ok(),
                schema_key,
                "key of {} chars",
                s.len()
            );
            assert_eq!(
                label_value(&s).is_ok(),
                value_re.is_match(&s) && s.len() <= 63
            );
        }
        assert_eq!(checked, 200_000);
    }
}
