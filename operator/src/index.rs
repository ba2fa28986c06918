//! Watches: Kubernetes objects in, engine [`Change`]s out.
//!
//! Each watched kind runs a kube-runtime `watcher` whose events become changes: `Apply` and
//! `Delete` one by one, and a (re-)list as one `Reset` of the whole kind, so a restarted watch
//! never leaves stale objects behind. Objects are read through `DeserializeGuard`: one that does
//! not deserialize is skipped, logged and counted (`cortexflow_operator_watch_skipped_total`),
//! never fatal.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use cortexflow_crds::{
    MeshPolicy as MeshPolicyCr, PolicyAction, PolicyMode, ServiceIdentity as SidCr,
};
use cortexflow_domain::{Action, Mode, PortRange, Protocol};
use cortexflow_operator_core::{
    Allocations, Change, Kind, ObjKey, Object,
    model::{
        Created, EndpointSlice, MeshPolicy, Namespace, Node, Pod, PolicyPeer, PolicyRule, Ref,
        Service, ServiceIdentity, ServicePort, SliceEndpoint, SlicePort,
    },
    selector::Selector,
};
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{
            ConfigMap, Namespace as NamespaceK, Node as NodeK, Pod as PodK, Service as ServiceK,
        },
        discovery::v1::EndpointSlice as EndpointSliceK,
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};
use kube::{
    Api, Client, Resource,
    core::DeserializeGuard,
    runtime::watcher::{self, Event},
};
use opentelemetry::KeyValue;
use tokio::sync::mpsc;

use cortexflow_runtime::{Supervisor, drain::Watcher};

use crate::{metrics::OperatorMetrics, readiness::Gate, store::Store};

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
    }
}

pub fn namespace(n: &NamespaceK) -> Namespace {
    Namespace {
        name: n.metadata.name.clone().unwrap_or_default(),
        labels: labels(&n.metadata),
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
    }
}

pub fn mesh_policy(p: &MeshPolicyCr) -> MeshPolicy {
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
        p.spec
            .ingress
            .iter()
            .map(|r| (r.from.clone(), r.ports.clone()))
            .collect(),
    );
    let egress = rules(
        p.spec
            .egress
            .iter()
            .map(|r| (r.to.clone(), r.ports.clone()))
            .collect(),
    );
    MeshPolicy {
        key: key(&p.metadata),
        generation: p.metadata.generation.unwrap_or(0),
        selector: selector(&p.spec.selector),
        action: match p.spec.action {
            PolicyAction::Allow => Action::Allow,
            PolicyAction::Deny => Action::Deny,
        },
        mode: match p.spec.mode {
            PolicyMode::Enforce => Mode::Enforce,
            PolicyMode::Audit => Mode::Audit,
        },
        ingress,
        egress,
        invalid,
    }
}

/// What a watch does with each object besides turning it into a change: `observe(object,
/// deleted)` (the status writer's view of the CRs' status, the readiness gate's waiting pods).
type Observe<K> = Box<dyn Fn(&K, bool) + Send + Sync>;

/// Where a watch sends what it sees.
struct Sinks {
    tx: mpsc::Sender<Change>,
    metrics: OperatorMetrics,
    synced: mpsc::Sender<Kind>,
    drain: Watcher,
}

/// Turns one watch stream into engine changes: `convert` maps an object (or `None` to ignore
/// it), `observe` sees every object too. Ends on the drain; the stream ending before that is a
/// failure.
async fn pump<K, S>(
    kind: Kind,
    stream: S,
    convert: impl Fn(&K) -> Option<Object> + Send,
    observe: Observe<K>,
    sinks: Sinks,
) -> anyhow::Result<()>
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<Event<DeserializeGuard<K>>, watcher::Error>> + Send,
{
    let name = kind.as_str();
    let Sinks {
        tx,
        metrics,
        synced,
        drain,
    } = sinks;
    let mut stream = std::pin::pin!(stream);
    let mut buffer: Option<Vec<Object>> = None;
    let mut first_sync = true;
    let skip = |e: &kube::core::error_boundary::InvalidObject| {
        tracing::warn!(error = %e, "skipping an object that does not deserialize");
        metrics.watch_skipped.add(1, &[KeyValue::new("kind", name)]);
    };
    loop {
        let ev = tokio::select! {
            ev = stream.next() => match ev {
                Some(ev) => ev,
                None => anyhow::bail!("the {name} watch stream ended"),
            },
            () = drain.signaled() => return Ok(()),
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(error = %e, "watch error; the watcher retries with backoff");
                metrics.watch_errors.add(1, &[KeyValue::new("kind", name)]);
                continue;
            }
        };
        let change = match ev {
            Event::Init => {
                buffer = Some(Vec::new());
                None
            }
            Event::InitApply(DeserializeGuard(obj)) => {
                match obj {
                    Ok(o) => {
                        observe(&o, false);
                        if let (Some(b), Some(o)) = (buffer.as_mut(), convert(&o)) {
                            b.push(o);
                        }
                    }
                    Err(e) => skip(&e),
                }
                None
            }
            Event::InitDone => {
                let objs = buffer.take().unwrap_or_default();
                tracing::debug!(objects = objs.len(), "listed");
                Some(Change::Reset(kind, objs))
            }
            Event::Apply(DeserializeGuard(obj)) => match obj {
                Ok(o) => {
                    observe(&o, false);
                    convert(&o).map(Change::Apply)
                }
                Err(e) => {
                    skip(&e);
                    None
                }
            },
            Event::Delete(DeserializeGuard(obj)) => match obj {
                Ok(o) => {
                    observe(&o, true);
                    convert(&o).map(|o| Change::Delete(kind, o.key()))
                }
                Err(e) => {
                    skip(&e);
                    None
                }
            },
        };
        if let Some(c) = change {
            let reset = matches!(c, Change::Reset(..));
            if tx.send(c).await.is_err() {
                anyhow::bail!("the engine is gone");
            }
            if reset && first_sync {
                first_sync = false;
                let _ = synced.send(kind).await;
            }
        }
    }
}

/// What the watches feed.
pub struct WatchSinks {
    /// The engine's changes.
    pub changes: mpsc::Sender<Change>,
    pub metrics: OperatorMetrics,
    /// Each kind, once, after its first full list.
    pub synced: mpsc::Sender<Kind>,
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
        synced: w.synced.clone(),
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
            let stream = watcher::watcher(api, watcher::Config::default());
            sup.spawn(
                format!("watch/{}", $kind.as_str()),
                pump::<$k, _>($kind, stream, $conv, $observe, sinks()),
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

/// Watches the id table ConfigMap and sends its content as [`Change::Allocations`].
pub fn allocation_watch(
    client: Client,
    namespace: &str,
    name: &str,
    tx: mpsc::Sender<Change>,
    synced: mpsc::Sender<()>,
    drain: Watcher,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + use<> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let stream = watcher::watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    );
    async move {
        let mut stream = std::pin::pin!(stream);
        let parse = |cm: ConfigMap| {
            let (a, bad) = Allocations::from_map(&cm.data.unwrap_or_default());
            if !bad.is_empty() {
                tracing::warn!(?bad, "id table entries that do not parse were skipped");
            }
            a
        };
        let mut buffered: Option<Allocations> = None;
        let mut first = true;
        loop {
            let ev = tokio::select! {
                ev = stream.next() => match ev {
                    Some(ev) => ev,
                    None => anyhow::bail!("the id table watch stream ended"),
                },
                () = drain.signaled() => return Ok(()),
            };
            let table = match ev {
                Ok(Event::Init) => {
                    buffered = None;
                    continue;
                }
                Ok(Event::InitApply(cm)) => {
                    buffered = Some(parse(cm));
                    continue;
                }
                Ok(Event::InitDone) => buffered.take().unwrap_or_default(),
                Ok(Event::Apply(cm)) => parse(cm),
                Ok(Event::Delete(_)) => {
                    // The engine keeps the ids it has; the leader writes the table again.
                    tracing::warn!("the id table ConfigMap was deleted; the leader recreates it");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "id table watch error");
                    continue;
                }
            };
            if tx.send(Change::Allocations(table)).await.is_err() {
                anyhow::bail!("the engine is gone");
            }
            if first {
                first = false;
                let _ = synced.send(()).await;
            }
        }
    }
}
