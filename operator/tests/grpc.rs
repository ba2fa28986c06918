//! The config stream in-process: a real tonic server over the store, real gRPC clients, no API
//! server — objects change in the engine and the test watches what subscribers receive. The
//! server speaks the operator's mTLS with a CA of the test's; clients hold node certificates
//! of that CA (or none, or the wrong ones, to be refused).
use std::{
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use cortexflow_domain::{self as domain, Action, Mode, NodeConfig};
use cortexflow_operator::{
    ReplicaReports,
    grpc::AgentConfigService,
    lease::Leadership,
    metrics::OperatorMetrics,
    store::{Input, Source, Store},
};
use cortexflow_operator_core::{
    Change, EngineConfig, ObjKey, Object,
    model::{MeshPolicy, Node, Pod, PolicyPeer, PolicyRule, Ref},
    selector::{Labels, Selector},
};
use cortexflow_proto::agent::v1::{self, agent_config_client::AgentConfigClient};
use cortexflow_runtime::drain;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use cortexflow_domain::spiffe;
use cortexflow_trust::{Authority, Credentials, TrustStore, ca::DEFAULT_LEAF_LIFETIME};

const TD: &str = "cluster.local";

struct Server {
    ca: Arc<Authority>,
    store: Arc<Store>,
    addr: std::net::SocketAddr,
    shutdown: drain::Trigger,
    task: tokio::task::JoinHandle<()>,
}

async fn server() -> Server {
    let s = server_unsynced().await;
    sync(&s.store);
    s
}

/// A server whose store has not been synced.
async fn server_unsynced() -> Server {
    let telemetry = cortexflow_runtime::Metrics::new("test").unwrap();
    let metrics = OperatorMetrics::new(&telemetry);
    let store = Store::new(EngineConfig::default(), metrics.clone());
    let (shutdown, watcher) = drain::channel();
    let leadership = watch::channel(Leadership {
        is_leader: true,
        ..Default::default()
    })
    .1;
    let (forward, _fwd_rx) = mpsc::channel(16);
    let reports = Arc::new(ReplicaReports {
        store: store.clone(),
        leadership,
        forward,
    });
    let ca = Arc::new(Authority::generate(TD, std::time::SystemTime::now()).unwrap());
    let trust = TrustStore::new(TD, ca.bundle().clone());
    let svc = AgentConfigService::new(
        store.clone(),
        reports,
        metrics,
        trust.clone(),
        watcher.clone(),
    );
    let tls =
        cortexflow_trust::tls::server_config(creds_of(&ca, &spiffe::operator(TD)), trust).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = cortexflow_trust::tls::serve(
            tonic::transport::Server::builder().add_service(svc.into_server()),
            listener,
            tls,
            watcher.into_signaled(),
        )
        .await;
    });
    Server {
        ca,
        store,
        addr,
        shutdown,
        task,
    }
}

/// A key and certificate for `id` from `ca`.
fn creds_of(ca: &Authority, id: &str) -> Arc<Credentials> {
    creds_at(ca, id, DEFAULT_LEAF_LIFETIME, std::time::SystemTime::now())
}

/// A key and certificate for `id` from `ca`, issued at `at` for `lifetime`.
fn creds_at(
    ca: &Authority,
    id: &str,
    lifetime: Duration,
    at: std::time::SystemTime,
) -> Arc<Credentials> {
    let (key, c) = ca.issue_own(id, lifetime, at).unwrap();
    let creds = Credentials::new();
    creds.set_issued(&key, c).unwrap();
    creds
}

/// A channel to `s` presenting `creds` (none: no client certificate).
async fn channel(
    s: &Server,
    creds: Option<Arc<Credentials>>,
) -> Result<Channel, tonic::transport::Error> {
    let trust = TrustStore::new(TD, s.ca.bundle().clone());
    let cfg = cortexflow_trust::tls::client_config(creds, trust, &spiffe::operator(TD)).unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect_with_connector(cortexflow_trust::tls::connector(cfg))
        .await
}

/// A client holding the agent certificate of `node`.
async fn client(s: &Server, node: &str) -> AgentConfigClient<Channel> {
    let creds = creds_of(&s.ca, &spiffe::node_agent(TD, node));
    AgentConfigClient::new(channel(s, Some(creds)).await.unwrap())
}

fn pod(name: &str, app: &str, node: &str, ip: u8) -> Change {
    Change::Apply(Object::Pod(Pod {
        key: ObjKey::new("shop", name),
        labels: std::sync::Arc::new([("app".to_string(), app.to_string())].into()),
        service_account: app.into(),
        node: Some(node.into()),
        ip: Some(Ipv4Addr::new(10, 244, 0, ip)),
        host_network: false,
        terminated: false,
        inject: None,
        has_proxy: false,
    }))
}

fn policy(generation: i64, port: u16) -> Change {
    Change::Apply(Object::MeshPolicy(MeshPolicy {
        key: ObjKey::new("shop", "db"),
        generation,
        selector: Ok(Selector {
            match_labels: [("app".to_string(), "db".to_string())].into(),
            match_expressions: vec![],
        }),
        action: Action::Allow,
        mode: Mode::Enforce,
        ingress: vec![PolicyRule {
            peers: vec![PolicyPeer::ServiceAccount(Ref::parse("web").unwrap())],
            ports: vec![domain::PortRange {
                protocol: domain::Protocol::Tcp,
                first: port,
                last: port,
            }],
        }],
        egress: vec![],
        invalid: None,
        spec_json: "{}".into(),
        in_force: None,
    }))
}

static REVISION: AtomicU64 = AtomicU64::new(100);

/// Changes as the watches would send them, each at the next revision.
fn inputs(changes: Vec<Change>) -> Vec<Input> {
    changes
        .into_iter()
        .map(|c| Input {
            source: match &c {
                Change::Apply(o) => Source::Kind(o.kind()),
                Change::Delete(k, _) | Change::Reset(k, _) => Source::Kind(*k),
                Change::Allocations(_) | Change::TableUnreadable { .. } => Source::IdTable,
            },
            revision: REVISION.fetch_add(1, Ordering::Relaxed),
            change: Some(c),
        })
        .collect()
}

/// Every source listed (empty), as a replica's first sync: the store's gate opens.
fn sync(store: &Store) {
    sync_but(store, &[]);
}

/// Every source but `listed` listed (empty).
fn sync_but(store: &Store, listed: &[Source]) {
    store.apply(
        Source::ALL
            .iter()
            .filter(|s| !listed.contains(s))
            .map(|s| Input {
                source: *s,
                revision: REVISION.fetch_add(1, Ordering::Relaxed),
                change: Some(match s {
                    Source::Kind(k) => Change::Reset(*k, Vec::new()),
                    Source::IdTable => Change::Allocations(Default::default()),
                }),
            })
            .collect(),
    );
}

/// The leader's allocation step, in-process.
fn allocate(store: &Store) {
    let next = store.read(|e| e.allocations().allocate(&e.needed_allocations()).table);
    if let Some(a) = next {
        store.apply(inputs(vec![Change::Allocations(a)]));
    }
}

async fn next(stream: &mut tonic::Streaming<v1::NodeConfig>) -> NodeConfig {
    let m = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("a config within 5 s")
        .expect("stream ok")
        .expect("stream open");
    NodeConfig::try_from(m).expect("valid config")
}

#[tokio::test]
async fn a_subscriber_gets_a_snapshot_then_exactly_the_changes() {
    let s = server().await;
    s.store.apply(inputs(vec![
        Change::Apply(Object::Node(Node {
            name: "n1".into(),
            addresses: vec![Ipv4Addr::new(172, 16, 0, 1)],
            pod_cidr: None,
        })),
        pod("web-1", "web", "n2", 2),
    ]));
    allocate(&s.store);
    let mut c = client(&s, "n1").await;
    let mut stream = c
        .subscribe(v1::SubscribeRequest {
            node: "n1".into(),
            agent_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert!(first.full);
    assert_eq!(
        first.node.as_ref().unwrap().addresses,
        vec![Ipv4Addr::new(172, 16, 0, 1)]
    );
    assert!(
        first.endpoints.as_ref().unwrap().endpoints.is_empty(),
        "no pod on n1 yet"
    );
    let ipcache = first.ipcache.as_ref().unwrap();
    assert!(ipcache.full && ipcache.upserts.len() == 1, "{ipcache:?}");

    // A db pod lands on n1, a policy selects it.
    s.store
        .apply(inputs(vec![pod("db-1", "db", "n1", 3), policy(1, 5432)]));
    allocate(&s.store);
    let mut got = next(&mut stream).await;
    while got
        .endpoints
        .as_ref()
        .is_none_or(|e| e.policy_sets.values().all(|p| p.ingress.is_empty()))
    {
        got = next(&mut stream).await;
    }
    assert!(!got.full);
    assert!(got.version > first.version);
    let eps = got.endpoints.as_ref().unwrap();
    assert_eq!(eps.endpoints.len(), 1);
    assert_eq!(eps.endpoints[0].name, "db-1");
    let rules = &eps.policy_sets[&eps.endpoints[0].policy_set].ingress;
    assert_eq!(rules[0].ports[0].first, 5432);
    assert!(
        eps.policies
            .iter()
            .any(|p| p.name == "db" && p.generation == 1)
    );

    // A change that does not touch n1's endpoints (a pod on n2) reaches n1 as an ipcache delta
    // only.
    s.store.apply(inputs(vec![pod("web-2", "web", "n2", 4)]));
    let delta = next(&mut stream).await;
    assert!(
        delta.endpoints.is_none() && delta.node.is_none() && delta.services.is_none(),
        "{delta:?}"
    );
    let ip = delta.ipcache.unwrap();
    assert!(!ip.full);
    assert_eq!(ip.upserts.len(), 1);
    assert_eq!(ip.upserts[0].0, Ipv4Addr::new(10, 244, 0, 4));

    s.shutdown.start();
    let _ = s.task.await;
}

#[tokio::test]
async fn a_slow_agent_only_sees_the_latest_state() {
    let s = server().await;
    s.store.apply(inputs(vec![
        pod("db-1", "db", "n1", 3),
        pod("web-1", "web", "n1", 2),
    ]));
    allocate(&s.store);
    let mut c = client(&s, "n1").await;
    let mut stream = c
        .subscribe(v1::SubscribeRequest {
            node: "n1".into(),
            agent_version: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    // 200 policy changes while the agent does not read.
    for port in 1..=200u16 {
        s.store
            .apply(inputs(vec![policy(port as i64, 1000 + port)]));
        allocate(&s.store);
    }
    let latest = s.store.read(|e| e.version());
    let mut received = 0;
    let mut last_port = 0;
    loop {
        let m = next(&mut stream).await;
        received += 1;
        if let Some(eps) = &m.endpoints
            && let Some(p) = eps.policy_sets.values().flat_map(|p| &p.ingress).next()
        {
            last_port = p.ports[0].first;
        }
        if m.version == s.store.wire_version(latest) {
            break;
        }
    }
    assert_eq!(last_port, 1200, "the final state arrived");
    assert!(
        received <= 3,
        "intermediate versions were skipped, not queued: {received} messages"
    );
    assert!(first.full);
    s.shutdown.start();
    let _ = s.task.await;
}

#[tokio::test]
async fn streams_close_cleanly_on_shutdown_and_bad_requests_are_refused() {
    let s = server().await;
    let mut c = client(&s, "n9").await;
    let err = c
        .subscribe(v1::SubscribeRequest {
            node: String::new(),
            agent_version: String::new(),
            ..Default::default()
        })
        .await
        .expect_err("an empty node name is refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut stream = c
        .subscribe(v1::SubscribeRequest {
            node: "n9".into(),
            agent_version: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let _ = next(&mut stream).await;
    s.shutdown.start();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("ends promptly");
    assert!(
        matches!(end, Ok(None)),
        "clean end of stream, not an error: {end:?}"
    );
    let _ = s.task.await;
}

#[tokio::test]
async fn reports_reach_the_store_and_leave_with_their_node() {
    let s = server().await;
    s.store.apply(inputs(vec![Change::Apply(Object::Node(Node {
        name: "n1".into(),
        addresses: vec![Ipv4Addr::new(172, 16, 0, 1)],
        pod_cidr: None,
    }))]));
    // Another replica forwarding its agents' reports (the operator's certificate may report for
    // any node).
    let mut c = AgentConfigClient::new(
        channel(&s, Some(creds_of(&s.ca, &spiffe::operator(TD))))
            .await
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel(4);
    // From a node that does not exist: not kept.
    tx.send(v1::AgentStatus {
        node: "ghost".into(),
        applied_version: 7,
        ..Default::default()
    })
    .await
    .unwrap();
    tx.send(v1::AgentStatus {
        node: "n1".into(),
        applied_version: 42,
        failed_version: 0,
        error: String::new(),
        policies: vec![v1::PolicyGeneration {
            namespace: "shop".into(),
            name: "db".into(),
            generation: 3,
        }],
        programmed: vec!["shop/db-0".into()],
        programmed_endpoints: vec![v1::ProgrammedEndpoint {
            namespace: "shop".into(),
            name: "db-0".into(),
            ip: u32::from(Ipv4Addr::new(10, 0, 0, 3)),
        }],
        trust_bundle: "0a1b".into(),
    })
    .await
    .unwrap();
    // An invalid report (no node) ends the stream with InvalidArgument.
    tx.send(v1::AgentStatus::default()).await.unwrap();
    drop(tx);
    let r = c
        .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    assert_eq!(
        r.expect_err("invalid report refused").code(),
        tonic::Code::InvalidArgument
    );
    let reports = s.store.reports();
    assert_eq!(reports["n1"].applied_version, 42);
    assert!(reports["n1"].policies.iter().any(|p| p.generation == 3));
    assert!(reports["n1"].programmed.contains("shop/db-0"));
    assert_eq!(
        reports["n1"].programmed_at.get("shop/db-0"),
        Some(&Ipv4Addr::new(10, 0, 0, 3)),
        "the address of each programmed endpoint reaches the store"
    );
    assert!(!reports.contains_key("ghost"), "{:?}", reports.keys());
    assert_eq!(
        reports["n1"].trust_bundle, "0a1b",
        "the bundle acknowledgement reaches the store (the CA's rotation waits for it)"
    );
    // The node leaves: its report goes with it.
    s.store.apply(inputs(vec![Change::Delete(
        cortexflow_operator_core::Kind::Node,
        ObjKey::new("", "n1"),
    )]));
    assert!(
        s.store.reports().is_empty(),
        "{:?}",
        s.store.reports().keys()
    );
    s.shutdown.start();
    let _ = s.task.await;
    let _ = Labels::new();
}

/// The sync gate: a replica that has not listed and applied every kind and the id table sends
/// nothing — not a snapshot lacking the node's pods that would replace the agent's state.
#[tokio::test]
async fn nothing_is_sent_before_every_kind_and_the_id_table_are_applied() {
    let s = server_unsynced().await;
    let mut c = client(&s, "n1").await;
    let mut stream = c
        .subscribe(v1::SubscribeRequest {
            node: "n1".into(),
            agent_version: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Nodes and pods are listed, policies and the id table are not.
    s.store.apply(inputs(vec![
        Change::Reset(
            cortexflow_operator_core::Kind::Node,
            vec![Object::Node(Node {
                name: "n1".into(),
                addresses: vec![Ipv4Addr::new(172, 16, 0, 1)],
                pod_cidr: None,
            })],
        ),
        Change::Reset(cortexflow_operator_core::Kind::Pod, Vec::new()),
        pod("db-1", "db", "n1", 3),
    ]));
    assert_eq!(s.store.revision(), None);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.message())
            .await
            .is_err(),
        "a message before the sync"
    );
    // The rest is listed: the first message is the full snapshot, stamped with the revision.
    sync_but(
        &s.store,
        &[
            Source::Kind(cortexflow_operator_core::Kind::Node),
            Source::Kind(cortexflow_operator_core::Kind::Pod),
        ],
    );
    allocate(&s.store);
    let first = next(&mut stream).await;
    assert!(first.full);
    let revision = s.store.revision().expect("synced");
    assert!(
        first.revision > 0 && first.revision <= revision,
        "{first:?}"
    );
    assert_eq!(
        first.node.expect("node").addresses,
        [Ipv4Addr::new(172, 16, 0, 1)]
    );
    // Later messages carry a revision that never goes back.
    s.store.apply(inputs(vec![pod("db-2", "db", "n1", 4)]));
    allocate(&s.store);
    let mut last = first.revision;
    for _ in 0..2 {
        let m = next(&mut stream).await;
        assert!(
            m.revision >= last,
            "revision went back: {} after {last}",
            m.revision
        );
        last = m.revision;
        if m.endpoints.as_ref().is_some_and(|e| e.endpoints.len() == 2) {
            break;
        }
    }
    s.shutdown.start();
    let _ = s.task.await;
}

/// An agent whose kernel holds a newer state than this replica (it last heard from a replica
/// that had listed later) keeps that state over this stream's older snapshot. When this replica
/// catches up — here only its revision rises, as bookmarks or an unchanged relist raise it;
/// nothing of the node changes — the stream sends a full snapshot at once. Without it the agent
/// would hold until the node's next change, which may never come.
#[tokio::test]
async fn a_held_agent_gets_a_snapshot_as_soon_as_the_replica_catches_up() {
    let s = server().await;
    s.store.apply(inputs(vec![pod("db-1", "db", "n1", 3)]));
    allocate(&s.store);
    let now = s.store.revision().expect("synced");
    let kernel = now + 50;
    let mut c = client(&s, "n1").await;
    let mut stream = c
        .subscribe(v1::SubscribeRequest {
            node: "n1".into(),
            agent_version: "test".into(),
            kernel_revision: kernel,
        })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await;
    assert!(first.full && first.revision < kernel, "{first:?}");
    // Only some sources move past the kernel's revision: still older, nothing to send.
    REVISION.fetch_max(kernel + 1, Ordering::Relaxed);
    let progress = |sources: &[Source]| {
        s.store.apply(
            sources
                .iter()
                .map(|src| Input {
                    source: *src,
                    revision: REVISION.fetch_add(1, Ordering::Relaxed),
                    change: None,
                })
                .collect(),
        )
    };
    progress(&Source::ALL[..Source::ALL.len() - 1]);
    assert!(s.store.revision().unwrap() < kernel);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "a message while the replica is still older than the kernel"
    );
    // Every source past it: a full snapshot at the new revision, unasked.
    progress(&Source::ALL[Source::ALL.len() - 1..]);
    assert!(s.store.revision().unwrap() >= kernel);
    let second = next(&mut stream).await;
    assert!(second.full, "{second:?}");
    assert!(second.revision >= kernel, "{second:?}");
    assert_eq!(second.endpoints.expect("endpoints").endpoints.len(), 1);
    // And only once.
    progress(&Source::ALL);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "a second unasked snapshot"
    );
    s.shutdown.start();
    let _ = s.task.await;
}

/// The forged-RPC table: who may not subscribe to node n1's config or report its status, and
/// with which code each is refused.
#[tokio::test]
async fn only_the_agent_of_a_node_gets_its_config_or_reports_its_status() {
    let s = server().await;
    let subscribe = |node: &str| v1::SubscribeRequest {
        node: node.into(),
        ..Default::default()
    };
    // The real agent of n1: served.
    let mut ok = client(&s, "n1").await;
    let mut stream = ok.subscribe(subscribe("n1")).await.unwrap().into_inner();
    assert!(next(&mut stream).await.full);

    // No client certificate: UNAUTHENTICATED (the TLS handshake itself succeeds).
    let mut anon = AgentConfigClient::new(channel(&s, None).await.unwrap());
    let e = anon.subscribe(subscribe("n1")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");

    // Certificates of this CA, but not n1's agent: PERMISSION_DENIED.
    for id in [
        spiffe::node_agent(TD, "n2"),
        spiffe::service_account(TD, "shop", "backend"),
        spiffe::operator(TD),
    ] {
        let mut c = AgentConfigClient::new(channel(&s, Some(creds_of(&s.ca, &id))).await.unwrap());
        let e = c.subscribe(subscribe("n1")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{id}: {e}");
    }

    // n2's agent reporting for n1: PERMISSION_DENIED, and nothing reaches the store.
    let mut n2 = client(&s, "n2").await;
    let (tx, rx) = mpsc::channel(4);
    tx.send(v1::AgentStatus {
        node: "n1".into(),
        applied_version: 99,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let e = n2
        .report_status(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    assert!(!s.store.reports().contains_key("n1"));

    // A certificate for n1 from another CA, and one of ours that expired: the handshake fails.
    let other = Authority::generate(TD, std::time::SystemTime::now()).unwrap();
    let foreign = creds_of(&other, &spiffe::node_agent(TD, "n1"));
    let expired = creds_at(
        &s.ca,
        &spiffe::node_agent(TD, "n1"),
        Duration::from_secs(60),
        std::time::SystemTime::now() - Duration::from_secs(3600),
    );
    for (what, creds) in [("another CA", foreign), ("expired", expired)] {
        let refused = match channel(&s, Some(creds)).await {
            Err(_) => true,
            // TLS 1.3: the client may finish before the server's verdict; the first call fails.
            Ok(ch) => AgentConfigClient::new(ch)
                .subscribe(subscribe("n1"))
                .await
                .is_err(),
        };
        assert!(refused, "a client certificate of {what} was accepted");
    }

    // A server that is not the operator (another CA's): the agent refuses it.
    let trust = TrustStore::new(TD, other.bundle().clone());
    let cfg = cortexflow_trust::tls::client_config(None, trust, &spiffe::operator(TD)).unwrap();
    let r = tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect_with_connector(cortexflow_trust::tls::connector(cfg))
        .await;
    assert!(r.is_err(), "an operator of another CA was trusted");

    s.shutdown.start();
    let _ = s.task.await;
}
