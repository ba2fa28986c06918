//! The operator against a real kube-apiserver: statuses and conditions, references to nothing,
//! ids across restarts, one status writer among two replicas and the handover when it dies.
//! The tests run one at a time: each runs its own operator(s), which watch the whole cluster.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use cortexflow_crds::{MeshPolicy, ServiceIdentity};
use cortexflow_domain::NodeConfig;
use cortexflow_domain::spiffe;
use cortexflow_lab::{
    harness::{Ctx, run_suite_with, test},
    objects::{self, PodSpec, eventually},
};
use cortexflow_proto::agent::v1::{self, agent_config_client::AgentConfigClient};
use cortexflow_trust::{Bundle, Credentials, TOKEN_AUDIENCE, TrustStore};
use std::sync::Arc;
use tonic::transport::Channel;

const TD: &str = "cluster.local";
use cortexflow_testkit::process::{Operator, OperatorOptions};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::ConfigMap};
use kube::Api;
use serde_json::json;

fn main() -> ExitCode {
    run_suite_with(
        vec![
            test(
                "statuses_conditions_and_programmed_from_agent_reports",
                statuses,
            ),
            test(
                "identity_ids_survive_an_operator_restart",
                ids_survive_restart,
            ),
            test(
                "two_replicas_one_status_writer_and_handover_on_death",
                two_replicas,
            ),
            test(
                "any_dead_task_ends_the_operator_naming_it",
                dead_task_ends_the_operator,
            ),
            test(
                "a_deleted_or_garbled_id_table_renumbers_nothing",
                id_table_lost_renumbers_nothing,
            ),
            test(
                "an_invalid_generation_keeps_the_last_accepted_in_force_across_restarts",
                invalid_generation_keeps_the_last_accepted,
            ),
            test(
                "the_ca_issues_only_what_a_token_proves_and_the_channel_only_to_its_node",
                ca_negative_table,
            ),
        ],
        true,
    )
}

/// The chart's release name of a test (the ClusterRole is cluster-wide), short enough for Helm.
fn release(ctx: &Ctx) -> String {
    let h = ctx.ns.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("op{:08x}", h as u32)
}

/// The agents' ServiceAccount of a test's release.
fn agent_account(ctx: &Ctx) -> String {
    format!("{}-agent", release(ctx))
}

/// A kubeconfig of the operator's ServiceAccount with the chart's RBAC, for this test's
/// namespace (made once per test): the operator never runs with the admin's credentials.
fn operator_kubeconfig(ctx: &Ctx) -> PathBuf {
    let path = ctx.dir.join(format!("operator-{}.kubeconfig", ctx.ns));
    if !path.exists() {
        let release = release(ctx);
        cortexflow_lab::chart::operator_kubeconfig(&ctx.kubeconfig, &release, &ctx.ns, &path)
            .unwrap_or_else(|e| panic!("the operator's kubeconfig: {e:#}"));
    }
    path
}

fn options(ctx: &Ctx, identity: &str, lease_secs: u64) -> OperatorOptions {
    OperatorOptions {
        kubeconfig: operator_kubeconfig(ctx),
        // The test's namespace holds the Lease and the id table: every test starts afresh.
        namespace: ctx.ns.clone(),
        identity: identity.into(),
        lease_duration_secs: lease_secs,
        log_dir: ctx.dir.join("logs"),
        env: vec![(
            "CORTEXFLOW_AGENT_SERVICE_ACCOUNT".into(),
            agent_account(ctx),
        )],
    }
}

/// `kubectl create token <account>` in the test's namespace with `args`.
fn token(ctx: &Ctx, account: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["create", "token", "-n", &ctx.ns, account];
    all.extend(args);
    Ok(cortexflow_lab::kubectl::ok(&ctx.kubeconfig, &all)?
        .trim()
        .to_string())
}

/// The trust bundle the operator published in the test's namespace.
async fn bundle(ctx: &Ctx) -> anyhow::Result<Bundle> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let cm = eventually(
        Duration::from_secs(30),
        "the trust bundle ConfigMap",
        || async { Ok(api.get_opt("cortexflow-ca-bundle").await?) },
    )
    .await?;
    let pem = cm
        .data
        .and_then(|d| d.get("ca.crt").cloned())
        .context("cortexflow-ca-bundle has no ca.crt")?;
    Bundle::from_pem(pem.as_bytes())
}

/// A channel to the operator at `addr` over TLS, presenting `creds` (none: no certificate).
async fn tls_channel(
    ctx: &Ctx,
    addr: SocketAddr,
    creds: Option<Arc<Credentials>>,
) -> anyhow::Result<Channel> {
    let trust = TrustStore::new(TD, bundle(ctx).await?);
    let cfg = cortexflow_trust::tls::client_config(creds, trust, &spiffe::operator(TD))?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_with_connector(cortexflow_trust::tls::connector(cfg))
            .await?,
    )
}

/// Signs a certificate for `id` with `token` through the operator's real CA.
async fn obtain(
    ctx: &Ctx,
    addr: SocketAddr,
    token: &str,
    id: &str,
) -> Result<Arc<Credentials>, cortexflow_trust::client::ObtainError> {
    let channel = tls_channel(ctx, addr, None)
        .await
        .map_err(|e| cortexflow_trust::client::ObtainError::Bad(e.to_string()))?;
    let creds = Credentials::new();
    cortexflow_trust::client::obtain(channel, token, id, TD, &creds).await?;
    Ok(creds)
}

/// An agent's client for `node`: a token of the agents' ServiceAccount bound to the Node, a
/// node certificate from the operator's CA, mTLS.
async fn agent_client(
    ctx: &Ctx,
    addr: SocketAddr,
    node: &str,
) -> anyhow::Result<AgentConfigClient<Channel>> {
    let t = token(
        ctx,
        &agent_account(ctx),
        &[
            "--audience",
            TOKEN_AUDIENCE,
            "--bound-object-kind",
            "Node",
            "--bound-object-name",
            node,
        ],
    )?;
    let creds = obtain(ctx, addr, &t, &spiffe::node_agent(TD, node)).await?;
    Ok(AgentConfigClient::new(
        tls_channel(ctx, addr, Some(creds)).await?,
    ))
}

async fn start(ctx: &Ctx, identity: &str, lease_secs: u64) -> anyhow::Result<Operator> {
    let mut op = Operator::start(&options(ctx, identity, lease_secs))?;
    op.wait_ready(Duration::from_secs(60)).await?;
    Ok(op)
}

/// The scene: a node, two pods, a ServiceIdentity for the web pods, a policy admitting it to the
/// db pods, and a policy that refers to an identity that does not exist.
async fn scene(ctx: &Ctx, node: &str, net: u8) -> anyhow::Result<()> {
    let c = &ctx.client;
    let ns = ctx.ns.as_str();
    objects::node(
        c,
        node,
        Ipv4Addr::new(172, 30, net, 1),
        &format!("10.{net}.1.0/24"),
    )
    .await?;
    for sa in ["web", "db"] {
        objects::service_account(c, ns, sa).await?;
    }
    objects::running_pod(
        c,
        ns,
        &PodSpec {
            name: "web-1",
            labels: &[("app", "web")],
            service_account: "web",
            node,
            ip: Ipv4Addr::new(10, net, 1, 10),
        },
    )
    .await?;
    objects::running_pod(
        c,
        ns,
        &PodSpec {
            name: "db-1",
            labels: &[("app", "db")],
            service_account: "db",
            node,
            ip: Ipv4Addr::new(10, net, 1, 11),
        },
    )
    .await?;
    objects::apply(
        c,
        ns,
        json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "ServiceIdentity", "metadata": {"name": "web"},
               "spec": {"selector": {"matchLabels": {"app": "web"}}}}),
    )
    .await?;
    objects::apply(
        c,
        ns,
        json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "db-in"},
               "spec": {"selector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"identity": "web"}], "ports": [{"port": 5432}]}]}}),
    )
    .await?;
    objects::apply(
        c,
        ns,
        json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "ghostly"},
               "spec": {"selector": {"matchLabels": {"app": "db"}},
                        "ingress": [{"from": [{"identity": "ghost"}, {"identity": "other-ns/web"}]}]}}),
    )
    .await?;
    Ok(())
}

fn condition(status: Option<&serde_json::Value>, type_: &str) -> Option<(String, String, String)> {
    let c = status?["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        c["message"].as_str()?.to_string(),
    ))
}

async fn policy_status(ctx: &Ctx, name: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    Ok(api
        .get(name)
        .await?
        .status
        .map(serde_json::to_value)
        .transpose()?)
}

async fn sid_status(ctx: &Ctx, name: &str) -> anyhow::Result<Option<serde_json::Value>> {
    let api: Api<ServiceIdentity> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    Ok(api
        .get(name)
        .await?
        .status
        .map(serde_json::to_value)
        .transpose()?)
}

/// A fake agent: subscribes for `node` and returns the first config that carries `policy`.
async fn subscribe_until_policy(
    ctx: &Ctx,
    addr: SocketAddr,
    node: &str,
    policy: &str,
) -> anyhow::Result<NodeConfig> {
    let mut client = agent_client(ctx, addr, node).await?;
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            node: node.into(),
            agent_version: "e2e".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Some(m) = tokio::time::timeout(Duration::from_secs(30), stream.message()).await??
        else {
            bail!("stream ended")
        };
        let c = NodeConfig::try_from(m).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
        if c.endpoints
            .as_ref()
            .is_some_and(|e| e.policies.iter().any(|p| p.name == policy))
        {
            return Ok(c);
        }
    }
    bail!("no config with policy {policy} for {node}")
}

/// Reports `config` applied, as an agent does.
async fn report(
    ctx: &Ctx,
    addr: SocketAddr,
    node: &str,
    config: &NodeConfig,
) -> anyhow::Result<()> {
    let mut client = agent_client(ctx, addr, node).await?;
    let status = v1::AgentStatus {
        node: node.into(),
        applied_version: config.version,
        failed_version: 0,
        error: String::new(),
        policies: config
            .endpoints
            .iter()
            .flat_map(|e| &e.policies)
            .map(v1::PolicyGeneration::from)
            .collect(),
        programmed: config
            .endpoints
            .iter()
            .flat_map(|e| &e.endpoints)
            .map(|e| format!("{}/{}", e.namespace, e.name))
            .collect(),
        programmed_endpoints: config
            .endpoints
            .iter()
            .flat_map(|e| &e.endpoints)
            .map(|e| v1::ProgrammedEndpoint {
                namespace: e.namespace.clone(),
                name: e.name.clone(),
                ip: u32::from(e.ip),
            })
            .collect(),
        trust_bundle: String::new(),
    };
    client
        .report_status(tokio_stream::iter(vec![status]))
        .await?;
    Ok(())
}

async fn statuses(ctx: Ctx) -> anyhow::Result<()> {
    let op = start(&ctx, "op-a", 15).await?;
    scene(&ctx, "node-a", 51).await?;
    let t = Duration::from_secs(30);
    // ServiceIdentity: id, SPIFFE id, endpoints, Accepted.
    let s = eventually(t, "ServiceIdentity web status", || async {
        let s = sid_status(&ctx, "web").await?;
        Ok(s.filter(|s| s["id"].as_u64().is_some() && s["endpoints"] == 1))
    })
    .await?;
    ensure!(s["id"].as_u64().unwrap_or(0) >= 256, "{s}");
    ensure!(
        s["spiffeId"] == format!("spiffe://cluster.local/ns/{}/sid/web", ctx.ns),
        "{s}"
    );
    ensure!(
        condition(Some(&s), "Accepted").is_some_and(|c| c.0 == "True"),
        "{s}"
    );
    ensure!(
        condition(Some(&s), "Conflict").is_some_and(|c| c.0 == "False"),
        "{s}"
    );
    ensure!(
        condition(Some(&s), "MTLS").is_some_and(|c| c.0 == "True" && c.1 == "Disabled"),
        "{s}"
    );

    // MeshPolicy: Accepted, ResolvedRefs, Programmed 0/1 (no agent yet).
    let p = eventually(t, "MeshPolicy db-in status", || async {
        let p = policy_status(&ctx, "db-in").await?;
        Ok(p.filter(|p| condition(Some(p), "Programmed").is_some()))
    })
    .await?;
    ensure!(
        condition(Some(&p), "Accepted").is_some_and(|c| c.0 == "True"),
        "{p}"
    );
    ensure!(
        condition(Some(&p), "ResolvedRefs").is_some_and(|c| c.0 == "True"),
        "{p}"
    );
    let prog = condition(Some(&p), "Programmed").unwrap_or_default();
    ensure!(
        prog.0 == "False" && prog.2 == "programmed on 0/1 nodes",
        "{prog:?}"
    );
    ensure!(p["observedGeneration"] == 1, "{p}");
    ensure!(
        p["inForce"]["generation"] == 1
            && p["inForce"]["spec"]["ingress"][0]["ports"][0]["port"] == 5432,
        "status.inForce records generation 1: {p}"
    );

    // A missing reference is named.
    let g = eventually(t, "MeshPolicy ghostly ResolvedRefs", || async {
        let p = policy_status(&ctx, "ghostly").await?;
        Ok(condition(p.as_ref(), "ResolvedRefs").filter(|c| c.0 == "False"))
    })
    .await?;
    ensure!(g.1 == "IdentityNotFound", "{g:?}");
    ensure!(
        g.2.contains(&format!("identity {}/ghost", ctx.ns))
            && g.2.contains("identity other-ns/web"),
        "{g:?}"
    );

    // An agent for the node applies its config and reports: Programmed 1/1.
    let config = subscribe_until_policy(&ctx, op.grpc, "node-a", "db-in").await?;
    let eps = config.endpoints.as_ref().context("endpoints")?;
    ensure!(eps.endpoints.iter().any(|e| e.name == "db-1"), "{eps:?}");
    report(&ctx, op.grpc, "node-a", &config).await?;
    eventually(t, "Programmed 1/1", || async {
        let p = policy_status(&ctx, "db-in").await?;
        Ok(condition(p.as_ref(), "Programmed")
            .filter(|c| c.0 == "True" && c.2 == "programmed on 1/1 nodes"))
    })
    .await?;

    // A younger identity claiming the same pods reports Conflict, naming the older one.
    objects::apply(
        &ctx.client,
        &ctx.ns,
        json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "ServiceIdentity", "metadata": {"name": "web-too"},
               "spec": {"selector": {"matchLabels": {"app": "web"}}, "mtls": "Strict"}}),
    )
    .await?;
    // mTLS cannot be honoured yet: the status says so, it is not silently ignored.
    let mtls = eventually(t, "MTLS on web-too", || async {
        let s = sid_status(&ctx, "web-too").await?;
        Ok(condition(s.as_ref(), "MTLS"))
    })
    .await?;
    ensure!(
        mtls.0 == "False"
            && mtls.1 == "ProxyNotAvailable"
            && mtls.2.contains("Strict is not honoured"),
        "{mtls:?}"
    );
    let conflict = eventually(t, "Conflict on web-too", || async {
        let s = sid_status(&ctx, "web-too").await?;
        Ok(condition(s.as_ref(), "Conflict").filter(|c| c.0 == "True"))
    })
    .await?;
    ensure!(
        conflict.2.contains(&format!("{}/web", ctx.ns)),
        "{conflict:?}"
    );

    // kubectl shows it all.
    let out = ctx.kubectl(&["get", "mp", "-n", &ctx.ns, "-o", "wide"])?;
    ensure!(
        out.lines().any(|l| l.starts_with("db-in")
            && l.contains("True")
            && l.contains("programmed on 1/1 nodes")),
        "{out}"
    );
    let events = ctx.kubectl(&["get", "events", "-n", &ctx.ns])?;
    ensure!(
        events.contains("ClaimedByOlderIdentity") || events.contains("IdentityNotFound"),
        "no events:\n{events}"
    );

    // Metrics of the operator.
    ensure!(op.metric("cortexflow_operator_identities").await? >= 2.0);
    ensure!(op.metric("cortexflow_operator_status_writes_total").await? >= 3.0);
    ensure!(
        op.metric("cortexflow_operator_policy_propagation_duration_seconds_count")
            .await?
            >= 1.0,
        "the propagation of db-in (Programmed 1/1) is measured"
    );
    Ok(())
}

async fn ids_survive_restart(ctx: Ctx) -> anyhow::Result<()> {
    let mut op = start(&ctx, "op-b", 15).await?;
    scene(&ctx, "node-b", 52).await?;
    let t = Duration::from_secs(30);
    let id = eventually(t, "identity allocated", || async {
        Ok(sid_status(&ctx, "web")
            .await?
            .and_then(|s| s["id"].as_u64()))
    })
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let table = |cm: ConfigMap| cm.data.unwrap_or_default();
    let before = eventually(
        t,
        "id table with db's implicit identity and both policies",
        || async {
            let t = table(cms.get("cortexflow-identities").await?);
            let ns = &ctx.ns;
            let complete = t.contains_key(&format!("sa_{ns}_db"))
                && t.contains_key(&format!("mp_{ns}_db-in"))
                && t.contains_key(&format!("mp_{ns}_ghostly"));
            Ok(complete.then_some(t))
        },
    )
    .await?;
    let config_before = subscribe_until_policy(&ctx, op.grpc, "node-b", "db-in").await?;

    op.daemon
        .stop(Duration::from_secs(10))
        .context("operator exited")?;
    let op = start(&ctx, "op-b", 15).await?;
    let config_after = subscribe_until_policy(&ctx, op.grpc, "node-b", "db-in").await?;
    ensure!(
        sid_status(&ctx, "web")
            .await?
            .and_then(|s| s["id"].as_u64())
            == Some(id),
        "ServiceIdentity id changed"
    );
    let after = table(cms.get("cortexflow-identities").await?);
    ensure!(
        before == after,
        "id table changed across the restart:\n{before:?}\n{after:?}"
    );
    let ids = |c: &NodeConfig| {
        c.endpoints.as_ref().map(|e| {
            e.endpoints
                .iter()
                .map(|e| (e.name.clone(), e.identity))
                .collect::<Vec<_>>()
        })
    };
    ensure!(
        ids(&config_before) == ids(&config_after),
        "pod identities changed"
    );
    ensure!(
        config_after.version > config_before.version,
        "versions increase across restarts: {} then {}",
        config_before.version,
        config_after.version
    );
    Ok(())
}

async fn lease_holder(ctx: &Ctx) -> anyhow::Result<Option<String>> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    Ok(api
        .get_opt("cortexflow-operator")
        .await?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

async fn two_replicas(ctx: Ctx) -> anyhow::Result<()> {
    const LEASE: u64 = 6;
    let a = start(&ctx, "op-1", LEASE).await?;
    let b = start(&ctx, "op-2", LEASE).await?;
    scene(&ctx, "node-c", 53).await?;
    let t = Duration::from_secs(30);
    let leader = eventually(t, "a lease holder", || lease_holder(&ctx)).await?;
    eventually(t, "statuses written", || async {
        Ok(policy_status(&ctx, "db-in")
            .await?
            .filter(|p| condition(Some(p), "Accepted").is_some()))
    })
    .await?;
    let (mut lead, follow) = if leader == a.identity { (a, b) } else { (b, a) };
    // Only the leader writes status; the follower serves gRPC all the same.
    ensure!(
        lead.metric("cortexflow_operator_status_writes_total")
            .await?
            > 0.0
    );
    ensure!(
        follow
            .metric("cortexflow_operator_status_writes_total")
            .await?
            == 0.0,
        "the follower wrote status"
    );
    let config = subscribe_until_policy(&ctx, follow.grpc, "node-c", "db-in").await?;
    ensure!(config.full || config.endpoints.is_some());

    // The leader dies without releasing the lease: the follower takes over within the lease
    // duration (plus its 1 s polling).
    let died = Instant::now();
    lead.daemon.kill();
    let new = eventually(
        Duration::from_secs(LEASE * 3),
        "a new lease holder",
        || async { Ok(lease_holder(&ctx).await?.filter(|h| *h == follow.identity)) },
    )
    .await?;
    let handover = died.elapsed();
    eprintln!("handover to {new} after {handover:?} (lease {LEASE} s)");
    ensure!(
        handover <= Duration::from_secs(LEASE + 2),
        "handover took {handover:?}"
    );
    // The new leader writes status: a new policy gets its conditions.
    objects::apply(
        &ctx.client,
        &ctx.ns,
        json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "after-handover"},
               "spec": {"selector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]}}),
    )
    .await?;
    eventually(t, "status by the new leader", || async {
        let p = policy_status(&ctx, "after-handover").await?;
        Ok(condition(p.as_ref(), "Accepted").filter(|c| c.0 == "True"))
    })
    .await?;
    ensure!(
        follow
            .metric("cortexflow_operator_status_writes_total")
            .await?
            > 0.0
    );
    Ok(())
}

/// Every long-running task the supervisor registered, killed one at a time (the supervisor's
/// test hook panics the named task on SIGUSR2, from inside it, as a bug would): the process
/// must exit with code 1, naming the task — never stay up answering `/readyz`. The exit takes
/// the supervisor's 500 ms drain at most; the test allows [`EXIT_BOUND`] and prints what it
/// measured: it proves that the process ends, not how fast (a timed assertion at 1 s once
/// failed on a CI machine stalled by the previous suite's I/O). The task list comes from the
/// operator itself, so a task added later is covered too.
/// How long a daemon with a dead task may take to be gone, in the supervision tests.
const EXIT_BOUND: Duration = Duration::from_secs(10);

async fn dead_task_ends_the_operator(ctx: Ctx) -> anyhow::Result<()> {
    let mut probe = start(&ctx, "op-tasks", 15).await?;
    let tasks = probe.daemon.supervised_tasks();
    probe.daemon.stop(Duration::from_secs(10));
    for must in [
        "engine",
        "lease",
        "grpc",
        "admin",
        "watch/Pod",
        "readiness gate",
    ] {
        ensure!(
            tasks.iter().any(|t| t == must),
            "task {must} is not supervised: {tasks:?}"
        );
    }
    // One operator per task, a few started together (each waits for its initial sync; a
    // machine busy with many starting operators would measure the load, not the exit).
    let mut slowest = Duration::ZERO;
    for batch in tasks.chunks(4) {
        let mut ops = Vec::new();
        for task in batch {
            let mut o = options(
                &ctx,
                &format!("op-kill-{}", task.replace(['/', ' '], "-")),
                15,
            );
            o.env.push(("CORTEXFLOW_FAIL_TASK".into(), task.clone()));
            ops.push((task.clone(), Operator::start(&o)?));
        }
        for (_, op) in &mut ops {
            op.wait_ready(Duration::from_secs(60)).await?;
        }
        for (task, op) in &mut ops {
            let t = std::time::Instant::now();
            op.daemon.signal(nix::sys::signal::Signal::SIGUSR2)?;
            let status = tokio::task::block_in_place(|| op.daemon.wait_exit(EXIT_BOUND));
            let took = t.elapsed();
            let log = op.daemon.log();
            let status = status
                .with_context(|| format!("the operator lived on after task {task} died:\n{log}"))?;
            ensure!(
                status.code() == Some(1),
                "task {task}: exit {status} (want 1)\n{log}"
            );
            ensure!(
                took < EXIT_BOUND,
                "task {task}: the operator took {took:?} to exit"
            );
            ensure!(
                log.contains(&format!("task {task} panicked: injected failure")),
                "task {task}: the log does not say which task died:\n{log}"
            );
            eprintln!("  {task}: exit 1 after {:.0} ms", took.as_secs_f64() * 1e3);
            slowest = slowest.max(took);
        }
    }
    eprintln!(
        "{} tasks killed one by one; slowest exit {:.0} ms",
        tasks.len(),
        slowest.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The id ConfigMap deleted, garbled, renumbered, given a reused number: the leader keeps the
/// numbers it holds and writes them back each time; nothing is renumbered. An operator that
/// starts while the table is lost (and objects carry statuses) serves nothing and allocates
/// nothing until it is restored — then every number is the old one.
async fn id_table_lost_renumbers_nothing(ctx: Ctx) -> anyhow::Result<()> {
    const NAME: &str = "cortexflow-identities";
    let mut op = start(&ctx, "op-t", 15).await?;
    scene(&ctx, "node-t", 56).await?;
    let t = Duration::from_secs(30);
    let id = eventually(t, "identity allocated", || async {
        Ok(sid_status(&ctx, "web")
            .await?
            .and_then(|s| s["id"].as_u64()))
    })
    .await?;
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.ns);
    let data = |cm: ConfigMap| cm.data.unwrap_or_default();
    let good = eventually(
        t,
        "a table with db's implicit identity and both policies",
        || async {
            let d = data(cms.get(NAME).await?);
            let ns = &ctx.ns;
            let complete = d.contains_key(&format!("sa_{ns}_db"))
                && d.contains_key(&format!("mp_{ns}_db-in"))
                && d.contains_key(&format!("mp_{ns}_ghostly"));
            Ok(complete.then_some(d))
        },
    )
    .await?;
    let written_back = |what: &'static str| {
        let (cms, good) = (cms.clone(), good.clone());
        async move {
            eventually(t, what, || async {
                Ok(cms.get_opt(NAME).await?.map(data).filter(|d| *d == good))
            })
            .await
        }
    };
    // Deleted: written back from memory.
    cms.delete(NAME, &Default::default()).await?;
    written_back("the table written back after its deletion").await?;
    // Garbage, a renumbering, a reused number, counters going back: each refused and
    // overwritten with the numbers in use.
    let sa_key = good
        .keys()
        .find(|k| k.starts_with("sa_"))
        .cloned()
        .context("an sa key")?;
    type Edit = Box<dyn Fn(&mut std::collections::BTreeMap<String, String>) + Send + Sync>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "garbage",
            Box::new(|d| {
                d.clear();
                d.insert("oops".into(), "not a table".into());
            }),
        ),
        (
            "u32::MAX",
            Box::new({
                let k = sa_key.clone();
                move |d| {
                    d.insert(k.clone(), u32::MAX.to_string());
                }
            }),
        ),
        (
            "renumbered",
            Box::new({
                let k = sa_key.clone();
                move |d| {
                    let n: u32 = d[&k].parse().unwrap_or(0);
                    d.insert(k.clone(), (n + 1000).to_string());
                    d.insert("next-identity".into(), (n + 2000).to_string());
                }
            }),
        ),
        (
            "counters back",
            Box::new(|d| {
                d.insert("next-identity".into(), "256".into());
            }),
        ),
    ];
    for (what, edit) in edits {
        let mut cm = cms.get(NAME).await?;
        let mut d = cm.data.take().unwrap_or_default();
        edit(&mut d);
        cm.data = Some(d);
        cms.replace(NAME, &Default::default(), &cm).await?;
        written_back(what).await?;
    }
    ensure!(
        sid_status(&ctx, "web")
            .await?
            .and_then(|s| s["id"].as_u64())
            == Some(id),
        "the ServiceIdentity's id changed"
    );
    ensure!(op.daemon.running(), "{}", op.daemon.log_tail(30));

    // The operator down, the table deleted meanwhile: the next one must not number afresh.
    op.daemon.stop(Duration::from_secs(10));
    cms.delete(NAME, &Default::default()).await?;
    let mut held = Operator::start(&options(&ctx, "op-t", 15))?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (code, body) = held.admin_get("/readyz").await?;
    ensure!(code == 503, "ready with a lost table: {code} {body}");
    ensure!(
        held.daemon.log().contains("the id table is lost"),
        "{}",
        held.daemon.log_tail(20)
    );
    ensure!(
        cms.get_opt(NAME).await?.is_none(),
        "a new table was written while the old one is lost"
    );
    // Restored (as from a backup): the same numbers come back; the replica syncs.
    cms.create(
        &Default::default(),
        &ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(NAME.into()),
                ..Default::default()
            },
            data: Some(good.clone()),
            ..Default::default()
        },
    )
    .await?;
    held.wait_ready(Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(
        data(cms.get(NAME).await?) == good,
        "the restored table changed"
    );
    ensure!(
        sid_status(&ctx, "web")
            .await?
            .and_then(|s| s["id"].as_u64())
            == Some(id),
        "the ServiceIdentity's id changed after the restore"
    );
    Ok(())
}

/// The MeshPolicy CRD as an older release installed it: no checks on selector operators. An
/// object stored under it can be one only the operator finds invalid.
async fn install_lax_crd(ctx: &Ctx) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let name = "meshpolicies.mesh.cortexflow.io";
    let mut crd = serde_json::to_value(api.get(name).await?)?;
    let items = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["selector"]["properties"]["matchExpressions"]["items"];
    ensure!(items.is_object(), "no matchExpressions schema");
    if let Some(o) = items.as_object_mut() {
        o.remove("x-kubernetes-validations");
    }
    if let Some(o) = items["properties"]["operator"].as_object_mut() {
        o.remove("enum");
    }
    api.replace(name, &Default::default(), &serde_json::from_value(crd)?)
        .await?;
    Ok(())
}

/// Puts the CRD of this version back.
async fn restore_crd(ctx: &Ctx) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    let mut want = cortexflow_crds::crds()
        .into_iter()
        .find(|c| c.metadata.name.as_deref() == Some("meshpolicies.mesh.cortexflow.io"))
        .context("the MeshPolicy CRD")?;
    let live = api.get("meshpolicies.mesh.cortexflow.io").await?;
    want.metadata.resource_version = live.metadata.resource_version;
    api.replace(
        "meshpolicies.mesh.cortexflow.io",
        &Default::default(),
        &want,
    )
    .await?;
    Ok(())
}

/// A typo in a selector operator is an apiserver error. For a generation only the operator
/// can judge invalid (stored under an older, laxer CRD), the last accepted generation stays in
/// force — recorded in `status.inForce`, so also for an operator that restarts — and
/// `Programmed` is False (`Invalid`), saying which generation is in force.
async fn invalid_generation_keeps_the_last_accepted(ctx: Ctx) -> anyhow::Result<()> {
    let mut op = start(&ctx, "op-f", 15).await?;
    scene(&ctx, "node-f", 57).await?;
    let t = Duration::from_secs(30);
    let ns = ctx.ns.clone();
    eventually(t, "db-in generation 1 recorded in force", || async {
        let p = policy_status(&ctx, "db-in").await?;
        Ok(p.filter(|p| p["inForce"]["generation"] == 1))
    })
    .await?;
    let config = subscribe_until_policy(&ctx, op.grpc, "node-f", "db-in").await?;
    report(&ctx, op.grpc, "node-f", &config).await?;
    let typo = json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "db-in"},
                      "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "Inn", "values": ["db"]}]},
                               "ingress": [{"from": [{"identity": "web"}], "ports": [{"port": 6432}]}]}});
    let refused = objects::apply(&ctx.client, &ns, typo.clone()).await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("spec.selector.matchExpressions[0].operator")),
        "the apiserver rejects the typo, naming the field: {refused:?}"
    );

    install_lax_crd(&ctx).await?;
    let run = async {
        // The apiserver picks the new schema up shortly.
        eventually(
            Duration::from_secs(20),
            "the lax schema admits the typo",
            || async { Ok(objects::apply(&ctx.client, &ns, typo.clone()).await.ok()) },
        )
        .await?;
        let in_force = |p: &serde_json::Value| {
            let a = condition(Some(p), "Accepted").unwrap_or_default();
            let g = condition(Some(p), "Programmed").unwrap_or_default();
            (a, g)
        };
        let p = eventually(t, "generation 2 refused", || async {
            let p = policy_status(&ctx, "db-in").await?;
            Ok(p.filter(|p| p["observedGeneration"] == 2))
        })
        .await?;
        let (accepted, programmed) = in_force(&p);
        ensure!(
            accepted.0 == "False"
                && accepted.1 == "Invalid"
                && accepted.2.contains("Inn")
                && accepted
                    .2
                    .contains("generation 1 (the last accepted) stays in force"),
            "{accepted:?}"
        );
        ensure!(
            programmed.0 == "False"
                && programmed.1 == "Invalid"
                && programmed
                    .2
                    .contains("generation 1, the last accepted, is programmed on 1/1 nodes"),
            "{programmed:?}"
        );
        ensure!(p["inForce"]["generation"] == 1, "{p}");
        // What the node gets: generation 1 (port 5432), not nothing.
        let enforced = |c: &NodeConfig| -> anyhow::Result<(i64, Vec<u16>)> {
            let e = c.endpoints.as_ref().context("endpoints")?;
            let g = e
                .policies
                .iter()
                .find(|p| p.name == "db-in")
                .map(|p| p.generation)
                .context("db-in in the config")?;
            let db = e
                .endpoints
                .iter()
                .find(|e| e.name == "db-1")
                .context("db-1")?;
            let ports = e.policy_sets[&db.policy_set]
                .ingress
                .iter()
                .flat_map(|r| r.ports.iter().map(|p| p.first))
                .collect();
            Ok((g, ports))
        };
        let c = subscribe_until_policy(&ctx, op.grpc, "node-f", "db-in").await?;
        let got = enforced(&c)?;
        ensure!(got.0 == 1 && got.1.contains(&5432), "{got:?}");

        // A restarted operator knows only the objects: the same.
        op.daemon
            .stop(Duration::from_secs(10))
            .context("operator exited")?;
        op = start(&ctx, "op-f", 15).await?;
        let c = subscribe_until_policy(&ctx, op.grpc, "node-f", "db-in").await?;
        let got = enforced(&c)?;
        ensure!(
            got.0 == 1 && got.1.contains(&5432),
            "after a restart: {got:?}"
        );
        let p = policy_status(&ctx, "db-in").await?.context("status")?;
        let (accepted, _) = in_force(&p);
        ensure!(accepted.2.contains("generation 1"), "{accepted:?}");
        anyhow::Ok(())
    };
    let result = run.await;
    let restored = restore_crd(&ctx).await;
    result?;
    restored
}

/// The CA and the channel against the real apiserver (TokenRequest, TokenReview): the
/// certificates a token proves are issued; every forgery in the table is refused with its
/// code, and counted by reason.
async fn ca_negative_table(ctx: Ctx) -> anyhow::Result<()> {
    use tonic::Code;
    let op = start(&ctx, "op-ca", 15).await?;
    let c = &ctx.client;
    let ns = ctx.ns.as_str();
    objects::node(c, "node-ca", Ipv4Addr::new(172, 30, 61, 1), "10.61.1.0/24").await?;
    objects::node(c, "node-cb", Ipv4Addr::new(172, 30, 62, 1), "10.62.1.0/24").await?;
    let agent_sa = agent_account(&ctx);
    let pod = |name: &'static str, sa: &'static str, node: &'static str, ip: u8| PodSpec {
        name,
        labels: &[("app", "web")],
        service_account: sa,
        node,
        ip: Ipv4Addr::new(10, 61, 1, ip),
    };
    objects::running_pod(c, ns, &pod("web-0", "default", "node-ca", 10)).await?;
    objects::running_pod(c, ns, &pod("gone-0", "default", "node-ca", 11)).await?;
    let agent_sa_static: &'static str = Box::leak(agent_sa.clone().into_boxed_str());
    objects::running_pod(c, ns, &pod("agent-b", agent_sa_static, "node-cb", 12)).await?;
    let bound = |sa: &str, kind: &str, name: &str| {
        token(
            &ctx,
            sa,
            &[
                "--audience",
                TOKEN_AUDIENCE,
                "--bound-object-kind",
                kind,
                "--bound-object-name",
                name,
            ],
        )
    };
    let web_id = spiffe::service_account(TD, ns, "default");
    let node_a = spiffe::node_agent(TD, "node-ca");

    // Issued: a node certificate for a token bound to the Node; the pod's own identity for a
    // token bound to the pod (once the operator has seen the pod).
    let node_creds = obtain(
        &ctx,
        op.grpc,
        &bound(&agent_sa, "Node", "node-ca")?,
        &node_a,
    )
    .await?;
    let web_token = bound("default", "Pod", "web-0")?;
    let web_creds = eventually(Duration::from_secs(30), "the pod's certificate", || async {
        match obtain(&ctx, op.grpc, &web_token, &web_id).await {
            Ok(c) => Ok(Some(c)),
            Err(cortexflow_trust::client::ObtainError::Refused(s))
                if s.code() == Code::Unavailable =>
            {
                Ok(None)
            }
            Err(e) => Err(anyhow::anyhow!("{e}")),
        }
    })
    .await?;
    assert_eq!(web_creds.current().map(|c| c.0), Some(web_id.clone()));

    let gone_token = bound("default", "Pod", "gone-0")?;
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), ns)
        .delete(
            "gone-0",
            &kube::api::DeleteParams::default().grace_period(0),
        )
        .await?;
    eventually(Duration::from_secs(30), "gone-0 deleted", || async {
        Ok(
            Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), ns)
                .get_opt("gone-0")
                .await?
                .is_none()
                .then_some(()),
        )
    })
    .await?;

    // A pod token whose expiry passed (the apiserver's own token with its times moved back and
    // signed again with the cluster's service-account key, as only the apiserver could); the
    // same copy left valid is issued, so the refusal is the expiry's.
    let sa_key = std::fs::read_to_string(ctx.dir.join("sa.key"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let resigned_valid = resign(&web_token, &sa_key, now - 60, now + 600)?;
    obtain(&ctx, op.grpc, &resigned_valid, &web_id)
        .await
        .context("a re-signed token that is still valid must be issued")?;
    let expired = resign(&web_token, &sa_key, now - 1200, now - 60)?;

    let table: Vec<(&str, String, String, Code)> = vec![
        (
            "an expired token",
            expired,
            web_id.clone(),
            Code::Unauthenticated,
        ),
        (
            "a token with another audience",
            token(
                &ctx,
                "default",
                &[
                    "--audience",
                    "not-cortexflow",
                    "--bound-object-kind",
                    "Pod",
                    "--bound-object-name",
                    "web-0",
                ],
            )?,
            web_id.clone(),
            Code::Unauthenticated,
        ),
        (
            "a token of a deleted pod",
            gone_token,
            web_id.clone(),
            Code::Unauthenticated,
        ),
        (
            "the agent of node-cb asking for node-ca (its pod runs on node-cb)",
            bound(&agent_sa, "Pod", "agent-b")?,
            node_a.clone(),
            Code::PermissionDenied,
        ),
        (
            "a pod asking for another identity",
            web_token.clone(),
            spiffe::service_account(TD, ns, "admin"),
            Code::PermissionDenied,
        ),
        (
            "a pod asking for a node certificate",
            web_token.clone(),
            node_a.clone(),
            Code::PermissionDenied,
        ),
        (
            "a workload token bound to nothing",
            token(&ctx, "default", &["--audience", TOKEN_AUDIENCE])?,
            web_id.clone(),
            Code::PermissionDenied,
        ),
        (
            "an agent token bound to nothing",
            token(&ctx, &agent_sa, &["--audience", TOKEN_AUDIENCE])?,
            node_a.clone(),
            Code::PermissionDenied,
        ),
        (
            "no token",
            String::new(),
            web_id.clone(),
            Code::Unauthenticated,
        ),
    ];
    for (what, tok, id, code) in &table {
        match obtain(&ctx, op.grpc, tok, id).await {
            Err(cortexflow_trust::client::ObtainError::Refused(s)) => {
                ensure!(
                    s.code() == *code,
                    "{what}: {} ({}), not {code:?}",
                    s.code(),
                    s.message()
                );
                eprintln!(
                    "refused as it must be: {what}: {:?}: {}",
                    s.code(),
                    s.message()
                );
            }
            other => bail!("{what}: not refused: {other:?}"),
        }
    }

    // The channel: the node certificate is served node-ca's config; the workload's certificate,
    // no certificate, and the node certificate for another node are refused.
    let sub = |node: &str| v1::SubscribeRequest {
        node: node.into(),
        ..Default::default()
    };
    let mut agent = AgentConfigClient::new(tls_channel(&ctx, op.grpc, Some(node_creds)).await?);
    let mut stream = agent.subscribe(sub("node-ca")).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await??
        .context("no config")?;
    ensure!(first.full, "the first message is a full snapshot");
    let e = agent.subscribe(sub("node-cb")).await.unwrap_err();
    ensure!(
        e.code() == Code::PermissionDenied,
        "node-ca's agent as node-cb: {e}"
    );
    let mut web = AgentConfigClient::new(tls_channel(&ctx, op.grpc, Some(web_creds)).await?);
    let e = web.subscribe(sub("node-ca")).await.unwrap_err();
    ensure!(
        e.code() == Code::PermissionDenied,
        "a workload as an agent: {e}"
    );
    let mut anon = AgentConfigClient::new(tls_channel(&ctx, op.grpc, None).await?);
    let e = anon.subscribe(sub("node-ca")).await.unwrap_err();
    ensure!(e.code() == Code::Unauthenticated, "no certificate: {e}");
    // The attack of the issue: a hand-made SubscribeRequest in plaintext HTTP/2.
    let plain = async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", op.grpc))?
            .connect()
            .await?;
        AgentConfigClient::new(ch)
            .subscribe(sub("node-ca"))
            .await
            .map_err(anyhow::Error::from)
    };
    ensure!(
        tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .map(|r| r.is_err())
            .unwrap_or(true),
        "a plaintext subscriber was served"
    );

    // Counted by reason.
    let (_, metrics) = op.admin_get("/metrics").await.context("operator metrics")?;
    let count = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("cortexflow_ca_certificates_refused_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    for (reason, n) in [("token", 4.0), ("token_binding", 2.0), ("csr_san", 3.0)] {
        ensure!(
            count(reason) == n,
            "{reason} refusals: {}, not {n}",
            count(reason)
        );
    }
    Ok(())
}

/// `token` (a JWT of the apiserver) with its `iat`/`nbf` at `from` and `exp` at `until`, signed
/// again with the cluster's service-account key (ES256, PKCS#8 PEM).
fn resign(token: &str, key_pem: &str, from: i64, until: i64) -> anyhow::Result<String> {
    use base64::Engine as _;
    use rustls_pki_types::pem::PemObject as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let (header, payload) = (
        parts.next().context("JWT header")?,
        parts.next().context("JWT payload")?,
    );
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(payload)?)?;
    claims["iat"] = json!(from);
    claims["nbf"] = json!(from);
    claims["exp"] = json!(until);
    let input = format!("{header}.{}", b64.encode(serde_json::to_vec(&claims)?));
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key_pem.as_bytes())?;
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("the service-account key: {e}"))?;
    let sig = key
        .sign(&rng, input.as_bytes())
        .map_err(|e| anyhow::anyhow!("sign: {e}"))?;
    Ok(format!("{input}.{}", b64.encode(sig.as_ref())))
}
