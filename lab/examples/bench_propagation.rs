//! `cargo xtask bench propagation [--json FILE]`: policy propagation through the real operator.
//!
//! A real control plane (etcd, kube-apiserver, kube-scheduler; no controller manager, so that
//! nothing reacts to a thousand nodes nobody heartbeats) carries every object: 1 000 Nodes,
//! 100 namespaces, 50 000 pods bound to the nodes with addresses in their status, 200
//! ServiceIdentities and 2 000 MeshPolicies. The real operator binary watches them; 1 000
//! simulated agents (gRPC subscribers in this process) hold a stream each. The benchmark changes
//! one policy at a time through the apiserver and measures the time until every subscriber whose
//! node hosts a pod the policy selects holds a config with the change; it also reports the
//! operator's memory per pod (RSS growth while the pods arrive, divided by their number).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use cortexflow_lab::{
    cluster::{Cluster, Lifetime},
    kubectl,
};
use cortexflow_proto::agent::v1::{self, agent_config_client::AgentConfigClient};
use cortexflow_testkit::process::{Operator, OperatorOptions};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

struct Args {
    json: Option<PathBuf>,
    nodes: usize,
    pods: usize,
    namespaces: usize,
    policies_per_ns: usize,
    changes: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        nodes: 1000,
        pods: 50_000,
        namespaces: 100,
        policies_per_ns: 20,
        changes: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut num = |what: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{what} needs a number"))
        };
        match x.as_str() {
            "--json" => a.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--nodes" => a.nodes = num("--nodes")?,
            "--pods" => a.pods = num("--pods")?,
            "--namespaces" => a.namespaces = num("--namespaces")?,
            "--policies-per-namespace" => a.policies_per_ns = num("--policies-per-namespace")?,
            "--changes" => a.changes = num("--changes")?,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

const APPS: usize = 10;

fn ns_of(j: usize, a: &Args) -> usize {
    j % a.namespaces
}
fn app_of(j: usize, a: &Args) -> usize {
    (j / a.namespaces) % APPS
}
fn node_of(j: usize, a: &Args) -> usize {
    j % a.nodes
}
fn ip_of(j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + j as u32 + 1)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `n` futures with at most `limit` in flight, failing on the first error.
async fn bounded<F, Fut>(n: usize, limit: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut s = futures::stream::iter((0..n).map(f)).buffer_unordered(limit);
    while let Some(r) = s.next().await {
        r?;
    }
    Ok(())
}

fn policy(ns: &str, k: usize, port: u16) -> serde_json::Value {
    json!({
        "apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": format!("p-{k}"), "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": format!("a{}", k % APPS)}},
            "ingress": [
                {"from": [{"identity": "front"}, {"serviceAccount": format!("svc-{}", k % 5)}], "ports": [{"port": port}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", k % 3)}}}], "ports": [{"port": 9000, "endPort": 9100}]},
            ],
        },
    })
}

/// What each simulated agent last saw: the ports of its rules.
type Seen = Arc<Mutex<BTreeMap<usize, (Instant, BTreeSet<u32>)>>>;

async fn run(a: Args) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("cortexflow-bench-{}", std::process::id()));
    eprintln!("starting the control plane (etcd, kube-apiserver, kube-scheduler)");
    let cluster = Cluster::start_with(&dir, Lifetime::Owned, false).await?;
    let client = cluster.client().await?;
    kubectl::install_crds(&cluster.kubeconfig())?;
    let t = Instant::now();
    // Namespaces and service accounts (no controller manager makes them).
    let nss: Api<Namespace> = Api::all(client.clone());
    for i in 0..=a.namespaces {
        let name = if i == a.namespaces {
            "cortexflow".to_string()
        } else {
            format!("bench-{i}")
        };
        let ns: Namespace = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"team": format!("t{}", i % 3)}}}),
        )?;
        nss.create(&PostParams::default(), &ns).await?;
    }
    bounded(a.namespaces * 6, 32, |x| {
        let client = client.clone();
        async move {
            let (i, s) = (x / 6, x % 6);
            let name = if s == 5 {
                "default".to_string()
            } else {
                format!("svc-{s}")
            };
            let api: Api<ServiceAccount> = Api::namespaced(client, &format!("bench-{i}"));
            api.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}}))?,
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    // Nodes.
    bounded(a.nodes, 32, |i| {
        let client = client.clone();
        async move {
            let api: Api<Node> = Api::all(client);
            let n: Node = serde_json::from_value(json!({"metadata": {"name": format!("bn-{i}")},
                "spec": {"podCIDR": format!("10.{}.{}.0/24", 64 + i / 256, i % 256)}}))?;
            api.create(&PostParams::default(), &n).await?;
            let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 20, 0, 0)) + i as u32 + 1);
            api.patch_status(
                &format!("bn-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"addresses": [{"type": "InternalIP", "address": addr.to_string()}]}})),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    // ServiceIdentities and policies.
    let pp = PatchParams::apply("bench").force();
    bounded(a.namespaces, 16, |i| {
        let client = client.clone();
        let pp = pp.clone();
        let per = a.policies_per_ns;
        async move {
            let ns = format!("bench-{i}");
            let sids: Api<kube::api::DynamicObject> =
                Api::namespaced_with(client.clone(), &ns, &kube::api::ApiResource::erase::<cortexflow_crds::ServiceIdentity>(&()));
            for (name, app) in [("front", "a0"), ("back", "a1")] {
                let o = json!({"apiVersion": "mesh.cortexflow.io/v1alpha1", "kind": "ServiceIdentity",
                    "metadata": {"name": name, "namespace": ns}, "spec": {"selector": {"matchLabels": {"app": app}}}});
                sids.patch(name, &pp, &Patch::Apply(&o)).await?;
            }
            let mps: Api<kube::api::DynamicObject> =
                Api::namespaced_with(client, &ns, &kube::api::ApiResource::erase::<cortexflow_crds::MeshPolicy>(&()));
            for k in 0..per {
                mps.patch(&format!("p-{k}"), &pp, &Patch::Apply(&policy(&ns, k, 1000 + k as u16))).await?;
            }
            Ok(())
        }
    })
    .await?;
    eprintln!(
        "{} nodes, {} namespaces, {} ServiceIdentities, {} MeshPolicies in {:.0?}",
        a.nodes,
        a.namespaces,
        a.namespaces * 2,
        a.namespaces * a.policies_per_ns,
        t.elapsed()
    );

    // The operator, before the pods (for the memory baseline).
    let mut op = Operator::start(&OperatorOptions {
        kubeconfig: cluster.kubeconfig(),
        namespace: "cortexflow".into(),
        identity: "bench".into(),
        lease_duration_secs: 15,
        log_dir: cluster.dir().join("logs"),
        env: Vec::new(),
    })?;
    op.wait_ready(Duration::from_secs(120)).await?;
    let pid = op.daemon.pid().context("operator pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss0 = rss_kib(pid);

    // A probe agent that counts the addresses the operator knows.
    let channels: Vec<tonic::transport::Channel> = {
        let mut v = Vec::new();
        for _ in 0..20 {
            v.push(
                tonic::transport::Endpoint::from_shared(format!("http://{}", op.grpc))?
                    .connect()
                    .await?,
            );
        }
        v
    };
    let known = Arc::new(Mutex::new(0usize));
    {
        let known = known.clone();
        let mut c =
            AgentConfigClient::new(channels[0].clone()).max_decoding_message_size(256 << 20);
        let mut s = c
            .subscribe(v1::SubscribeRequest {
                node: "probe".into(),
                agent_version: "bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        tokio::spawn(async move {
            let mut table = BTreeSet::new();
            while let Ok(Some(m)) = s.message().await {
                if let Some(ip) = m.ipcache {
                    if ip.full {
                        table.clear();
                    }
                    table.extend(ip.upserts.iter().map(|u| u.ip));
                    for r in ip.removals {
                        table.remove(&r);
                    }
                    if let Ok(mut k) = known.lock() {
                        *k = table.len();
                    }
                }
            }
        });
    }

    // The pods.
    let t = Instant::now();
    bounded(a.pods, 64, |j| {
        let client = client.clone();
        let ns = format!("bench-{}", ns_of(j, &a));
        let app = format!("a{}", app_of(j, &a));
        let node = format!("bn-{}", node_of(j, &a));
        async move {
            let api: Api<Pod> = Api::namespaced(client, &ns);
            let name = format!("pod-{j}");
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": app}},
                "spec": {"nodeName": node, "serviceAccountName": format!("svc-{}", j % 5),
                         "automountServiceAccountToken": false,
                         "containers": [{"name": "app", "image": "cortexflow/workload"}]},
            }))?;
            api.create(&PostParams::default(), &pod).await?;
            let ip = ip_of(j).to_string();
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}),
                ),
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let created_in = t.elapsed();
    eprintln!(
        "{} pods created in {created_in:.0?}; waiting for the operator to hold them",
        a.pods
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    while known.lock().map(|k| *k).unwrap_or(0) < a.pods {
        if Instant::now() > deadline {
            bail!(
                "the operator holds {} of {} pod addresses",
                known.lock().map(|k| *k).unwrap_or(0),
                a.pods
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss1 = rss_kib(pid);
    let per_pod_bytes = (rss1.saturating_sub(rss0) * 1024) as f64 / a.pods as f64;
    eprintln!(
        "operator RSS {rss0} KiB before the pods, {rss1} KiB after: {per_pod_bytes:.0} B per pod"
    );

    // The simulated agents.
    let seen: Seen = Arc::new(Mutex::new(BTreeMap::new()));
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<usize>(a.nodes);
    for i in 0..a.nodes {
        let mut c = AgentConfigClient::new(channels[i % channels.len()].clone())
            .max_decoding_message_size(256 << 20);
        let seen = seen.clone();
        let ready = ready_tx.clone();
        tokio::spawn(async move {
            let Ok(r) = c
                .subscribe(v1::SubscribeRequest {
                    node: format!("bn-{i}"),
                    agent_version: "bench".into(),
                    ..Default::default()
                })
                .await
            else {
                return;
            };
            let mut s = r.into_inner();
            let mut first = true;
            while let Ok(Some(m)) = s.message().await {
                let at = Instant::now();
                if let Some(eps) = m.endpoints {
                    let ports: BTreeSet<u32> = eps
                        .policy_sets
                        .iter()
                        .flat_map(|p| p.ingress.iter())
                        .flat_map(|r| r.ports.iter().map(|p| p.first))
                        .collect();
                    if let Ok(mut s) = seen.lock() {
                        s.insert(i, (at, ports));
                    }
                }
                if first {
                    first = false;
                    let _ = ready.send(i).await;
                }
            }
        });
    }
    let t = Instant::now();
    for _ in 0..a.nodes {
        ready_rx.recv().await.context("a subscriber failed")?;
    }
    eprintln!(
        "{} agents subscribed and hold their snapshot after {:.1?}",
        a.nodes,
        t.elapsed()
    );

    // Changes.
    let mut lat = Vec::new();
    let mps_api = |ns: &str| -> Api<kube::api::DynamicObject> {
        Api::namespaced_with(
            client.clone(),
            ns,
            &kube::api::ApiResource::erase::<cortexflow_crds::MeshPolicy>(&()),
        )
    };
    for c in 0..a.changes {
        let i = (c * 37) % a.namespaces;
        let k = (c * 11) % a.policies_per_ns;
        let ns = format!("bench-{i}");
        let port = 20_000 + c as u16;
        // Affected nodes: those hosting a pod of the namespace with the policy's app.
        let affected: BTreeSet<usize> = (0..a.pods)
            .filter(|j| ns_of(*j, &a) == i && app_of(*j, &a) == k % APPS)
            .map(|j| node_of(j, &a))
            .collect();
        let start = Instant::now();
        mps_api(&ns)
            .patch(&format!("p-{k}"), &pp, &Patch::Apply(&policy(&ns, k, port)))
            .await?;
        let deadline = start + Duration::from_secs(30);
        loop {
            let done = seen.lock().map(|s| {
                affected
                    .iter()
                    .filter_map(|n| s.get(n))
                    .filter(|(_, ports)| ports.contains(&u32::from(port)))
                    .map(|(at, _)| *at)
                    .collect::<Vec<_>>()
            });
            let done = done.unwrap_or_default();
            if done.len() == affected.len() {
                let last = done.into_iter().max().unwrap_or(start);
                lat.push(last.saturating_duration_since(start).as_secs_f64());
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "change {c}: {} of {} nodes got it within 30 s",
                    done.len(),
                    affected.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lat.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| {
        lat[((lat.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(lat.len() - 1)]
    };
    let (p50, p99, max) = (pct(0.50), pct(0.99), lat[lat.len() - 1]);
    let affected_per_change = (a.pods / a.namespaces / APPS).min(a.nodes);
    println!();
    println!(
        "propagation benchmark: {} nodes (simulated agents), {} pods, {} namespaces, {} ServiceIdentities, {} MeshPolicies — all in the real apiserver",
        a.nodes,
        a.pods,
        a.namespaces,
        a.namespaces * 2,
        a.namespaces * a.policies_per_ns
    );
    println!(
        "policy change → every affected agent holds it ({} changes, ~{affected_per_change} nodes each): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        a.changes,
        p50 * 1e3,
        p99 * 1e3,
        max * 1e3
    );
    println!(
        "operator memory: {rss0} KiB RSS without pods, {rss1} KiB with {} pods: {per_pod_bytes:.0} B per pod",
        a.pods
    );
    let targets = json!({"p99_le_1s": p99 <= 1.0, "per_pod_le_2kib": per_pod_bytes <= 2048.0});
    println!("targets: {targets}");
    if let Some(path) = &a.json {
        let doc = json!({
            "benchmark": "propagation",
            "nodes": a.nodes, "pods": a.pods, "namespaces": a.namespaces,
            "service_identities": a.namespaces * 2, "policies": a.namespaces * a.policies_per_ns,
            "objects_in_apiserver": {"nodes": a.nodes, "pods": a.pods, "policies": a.namespaces * a.policies_per_ns},
            "changes": a.changes,
            "latency_seconds": {"p50": p50, "p99": p99, "max": max, "all": lat},
            "operator_rss_kib": {"without_pods": rss0, "with_pods": rss1},
            "bytes_per_pod": per_pod_bytes,
            "pod_creation_seconds": created_in.as_secs_f64(),
            "targets_met": targets,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
        println!("wrote {}", path.display());
    }
    drop(op);
    drop(cluster);
    Ok(())
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench propagation: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench propagation failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
