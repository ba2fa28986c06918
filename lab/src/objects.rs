//! Creating Kubernetes objects in tests: nodes, service accounts, pods bound to nodes with an
//! address in their status (what a kubelet would report), CortexFlow resources.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// Creates (or keeps) a Node with an internal address and a pod CIDR.
pub async fn node(
    client: &Client,
    name: &str,
    address: Ipv4Addr,
    pod_cidr: &str,
) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    }))?;
    match api.create(&PostParams::default(), &n).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e).context("create node"),
    }
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": address.to_string()}, {"type": "Hostname", "address": name}],
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "simulated",
                        "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string(),
                        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string()}],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("set node status")?;
    Ok(())
}

/// Creates a ServiceAccount (pods that name it are admitted only once it exists).
pub async fn service_account(client: &Client, ns: &str, name: &str) -> anyhow::Result<()> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e).context("create service account"),
    }
}

/// A pod as a test describes it.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub service_account: &'a str,
    pub node: &'a str,
    pub ip: Ipv4Addr,
}

/// Creates a pod bound to a node, then sets its status as a kubelet would (Running, podIP).
pub async fn running_pod(client: &Client, ns: &str, p: &PodSpec<'_>) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let labels: serde_json::Map<String, Value> = p
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": p.name, "labels": labels},
        "spec": {
            "nodeName": p.node,
            "serviceAccountName": p.service_account,
            "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "cortexflow/workload"}],
        },
    }))?;
    api.create(&PostParams::default(), &pod)
        .await
        .context("create pod")?;
    let ip = p.ip.to_string();
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    api.patch_status(p.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("set pod status")?;
    Ok(())
}

/// Applies a resource given as JSON (server-side apply, field manager `e2e`).
pub async fn apply(client: &Client, ns: &str, obj: Value) -> anyhow::Result<()> {
    let ar = match obj["kind"].as_str() {
        Some("MeshPolicy") => kube::api::ApiResource::erase::<cortexflow_crds_api::MeshPolicy>(&()),
        Some("ServiceIdentity") => {
            kube::api::ApiResource::erase::<cortexflow_crds_api::ServiceIdentity>(&())
        }
        other => anyhow::bail!("apply: unsupported kind {other:?}"),
    };
    let name = obj["metadata"]["name"]
        .as_str()
        .context("metadata.name")?
        .to_string();
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(
        &name,
        &PatchParams::apply("e2e").force(),
        &Patch::Apply(&obj),
    )
    .await
    .with_context(|| format!("apply {} {name}", ar.kind))?;
    Ok(())
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + timeout;
    let mut last = String::from("never checked");
    while std::time::Instant::now() < deadline {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{what}: not within {timeout:?} ({last})")
}

use cortexflow_crds as cortexflow_crds_api;
