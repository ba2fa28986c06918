//! `cfcli status` and `cfcli check`: what the mesh reports about itself — the Kubernetes
//! objects (Lease, id table, trust bundle, CRDs, policies, identities, nodes) and the daemons'
//! own /metrics (through the apiserver's pod proxy, or `--operator-metrics`/`--agent-metrics`
//! where they do not run as pods).
use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Node, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::api::{Api, ListParams};

use crate::connect::Cluster;

/// Where the daemons' metrics are when they do not run as pods (flags of `status`/`check`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct MetricsArgs {
    /// An operator replica's admin address, `HOST:PORT` (repeat per replica). Default: the
    /// operator pods' `admin` port through the apiserver's pod proxy.
    #[arg(long = "operator-metrics", value_name = "ADDR")]
    pub operator: Vec<String>,
    /// An agent's admin address, `NODE=HOST:PORT` (repeat per node). Default: the agent pods'
    /// `admin` port through the apiserver's pod proxy.
    #[arg(long = "agent-metrics", value_name = "NODE=ADDR")]
    pub agents: Vec<String>,
    /// A Prometheus to ask whether it scrapes every daemon (`http://HOST:PORT`).
    #[arg(long)]
    pub prometheus: Option<String>,
}

/// One sample: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// Parses the Prometheus text format (the daemons' /metrics).
pub fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let mut labels = BTreeMap::new();
                for kv in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = kv.split_once("=\"") {
                        labels.insert(k.trim().to_string(), v.trim_end_matches('"').to_string());
                    }
                }
                (n.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.push((name, labels, v));
    }
    out
}

/// Sum of the samples of `name` whose labels include `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for (n, labels, v) in samples {
        if n == name
            && with
                .iter()
                .all(|(k, want)| labels.get(*k).is_some_and(|x| x == want))
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Prometheus' `up` of one target: (job, instance, value).
pub type Up = (String, String, f64);

/// A daemon's metrics, or why they could not be read.
#[derive(Clone, Debug)]
pub struct Scraped {
    pub name: String,
    pub samples: Result<Vec<Sample>, String>,
}

/// Everything `status` shows and `check` judges.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub server_version: Result<(u32, u32), String>,
    pub crds: Vec<(String, Option<CustomResourceDefinition>)>,
    pub namespace_exists: bool,
    pub lease: Option<Lease>,
    pub id_table: Option<ConfigMap>,
    pub bundle: Option<ConfigMap>,
    pub nodes: Vec<String>,
    pub operators: Vec<Scraped>,
    /// Per node that runs an agent.
    pub agents: BTreeMap<String, Scraped>,
    pub policies: Vec<cortexflow_crds::MeshPolicy>,
    pub identities: Vec<cortexflow_crds::ServiceIdentity>,
    pub webhook: Option<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>,
    /// `up` per target, from `--prometheus`.
    pub prometheus_up: Option<Result<Vec<Up>, String>>,
}

async fn proxy_metrics(
    client: &kube::Client,
    ns: &str,
    pod: &str,
    port: i32,
) -> Result<String, String> {
    let req = http::Request::get(format!(
        "/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/metrics"
    ))
    .body(Vec::new())
    .map_err(|e| e.to_string())?;
    client.request_text(req).await.map_err(|e| e.to_string())
}

async fn direct_metrics(addr: &str) -> Result<String, String> {
    let url = format!("http://{addr}/metrics");
    http_get(&url).await
}

/// A plain HTTP/1.1 GET (the admin ports and Prometheus speak plain HTTP).
async fn http_get(url: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// is supported"))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let connect = tokio::net::TcpStream::connect(host);
    let mut s = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| format!("{host}: connect timed out"))?
        .map_err(|e| format!("{host}: {e}"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| format!("{url}: no answer within 10 s"))?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("a malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{url}: {}", head.lines().next().unwrap_or("")));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Pods of `label` in `ns` with their `port_name` port: `(pod, node, port)`.
async fn pods_with_port(
    client: &kube::Client,
    ns: &str,
    label: &str,
    port_name: &str,
) -> anyhow::Result<Vec<(String, String, i32)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for p in pods.list(&ListParams::default().labels(label)).await?.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let spec = p.spec.as_ref();
        let node = spec.and_then(|s| s.node_name.clone()).unwrap_or_default();
        let port = spec
            .into_iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(port_name))
            .map(|cp| cp.container_port);
        if let Some(port) = port {
            out.push((name, node, port));
        }
    }
    Ok(out)
}

/// Reads everything once.
pub async fn gather(cluster: &Cluster, m: &MetricsArgs) -> anyhow::Result<Snapshot> {
    let c = &cluster.client;
    let ns = cluster.args.cortexflow_namespace.as_str();
    let server_version = match c.apiserver_version().await {
        Ok(v) => {
            let num = |s: &str| s.trim_end_matches('+').parse::<u32>().unwrap_or(0);
            Ok((num(&v.major), num(&v.minor)))
        }
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &server_version {
        anyhow::bail!("the Kubernetes API does not answer: {e}");
    }
    // Every read at once: the objects, the daemons' metrics and Prometheus.
    let crd_api: Api<CustomResourceDefinition> = Api::all(c.clone());
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), ns);
    let crd = |name: &'static str| {
        let crd_api = crd_api.clone();
        async move { anyhow::Ok((name.to_string(), crd_api.get_opt(name).await?)) }
    };
    let objects = async {
        futures::try_join!(
            crd("meshpolicies.mesh.cortexflow.io"),
            crd("serviceidentities.mesh.cortexflow.io"),
            async {
                anyhow::Ok(
                    Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
                        .get_opt(ns)
                        .await?
                        .is_some(),
                )
            },
            async {
                anyhow::Ok(
                    Api::<Lease>::namespaced(c.clone(), ns)
                        .get_opt("cortexflow-operator")
                        .await?,
                )
            },
            async { anyhow::Ok(cms.get_opt(crate::live::ID_TABLE).await?) },
            async { anyhow::Ok(cms.get_opt("cortexflow-ca-bundle").await?) },
            async {
                anyhow::Ok(
                    Api::<Node>::all(c.clone())
                        .list(&ListParams::default())
                        .await?
                        .items
                        .into_iter()
                        .filter_map(|n| n.metadata.name)
                        .collect::<Vec<_>>(),
                )
            },
        )
    };
    let operators = async {
        if m.operator.is_empty() {
            let pods = pods_with_port(c, ns, "app.kubernetes.io/name=cortexflow-operator", "admin")
                .await?;
            anyhow::Ok(
                futures::future::join_all(pods.into_iter().map(|(pod, _, port)| async move {
                    let samples = proxy_metrics(c, ns, &pod, port)
                        .await
                        .map(|t| parse_metrics(&t));
                    Scraped { name: pod, samples }
                }))
                .await,
            )
        } else {
            Ok(
                futures::future::join_all(m.operator.iter().map(|addr| async move {
                    let samples = direct_metrics(addr).await.map(|t| parse_metrics(&t));
                    Scraped {
                        name: addr.clone(),
                        samples,
                    }
                }))
                .await,
            )
        }
    };
    let agents = async {
        if m.agents.is_empty() {
            let pods =
                pods_with_port(c, ns, "app.kubernetes.io/name=cortexflow-agent", "admin").await?;
            anyhow::Ok(
                futures::future::join_all(pods.into_iter().map(|(pod, node, port)| async move {
                    let samples = proxy_metrics(c, ns, &pod, port)
                        .await
                        .map(|t| parse_metrics(&t));
                    (node, Scraped { name: pod, samples })
                }))
                .await
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            )
        } else {
            let endpoints = m
                .agents
                .iter()
                .map(|a| crate::connect::parse_agent(a).context("--agent-metrics"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(
                futures::future::join_all(endpoints.into_iter().map(|e| async move {
                    let samples = direct_metrics(&e.addr).await.map(|t| parse_metrics(&t));
                    (
                        e.node,
                        Scraped {
                            name: e.addr,
                            samples,
                        },
                    )
                }))
                .await
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
            )
        }
    };
    let crs = async {
        futures::join!(
            async {
                Api::<cortexflow_crds::MeshPolicy>::all(c.clone())
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
            },
            async {
                Api::<cortexflow_crds::ServiceIdentity>::all(c.clone())
                    .list(&ListParams::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
            },
            async {
                Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
                    c.clone(),
                )
                .get_opt("cortexflow-injector")
                .await
                .ok()
                .flatten()
            },
        )
    };
    let prometheus = async {
        match &m.prometheus {
            None => None,
            Some(url) => Some(
                http_get(&format!(
                    "{}/api/v1/query?query=up",
                    url.trim_end_matches('/')
                ))
                .await
                .and_then(|body| {
                    let v: serde_json::Value =
                        serde_json::from_str(&body).map_err(|e| e.to_string())?;
                    Ok(v["data"]["result"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            (
                                r["metric"]["job"].as_str().unwrap_or("").to_string(),
                                r["metric"]["instance"].as_str().unwrap_or("").to_string(),
                                r["value"][1]
                                    .as_str()
                                    .and_then(|x| x.parse().ok())
                                    .unwrap_or(0.0),
                            )
                        })
                        .collect())
                }),
            ),
        }
    };
    let (objects, operators, agents, (policies, identities, webhook), prometheus_up) =
        futures::join!(objects, operators, agents, crs, prometheus);
    let (crd_mp, crd_sid, namespace_exists, lease, id_table, bundle, nodes) = objects?;
    let crds = vec![crd_mp, crd_sid];
    let (operators, agents) = (operators?, agents?);
    Ok(Snapshot {
        server_version,
        crds,
        namespace_exists,
        lease,
        id_table,
        bundle,
        nodes,
        operators,
        agents,
        policies,
        identities,
        webhook,
        prometheus_up,
    })
}

/// The condition `type` of a status's conditions: (status is "True", reason, message).
pub fn condition(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(bool, String, String)> {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status == "True", c.reason.clone(), c.message.clone()))
}

/// Configs an agent refused (invalid or not fitting) since it started.
pub fn configs_refused(samples: &[Sample]) -> f64 {
    ["refused", "invalid"]
        .iter()
        .filter_map(|r| sum(samples, "cortexflow_agent_configs_total", &[("result", r)]))
        .sum()
}

/// `namespace/name` of an object.
pub fn object_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The fullest map of an agent: (map, entries / capacity).
pub fn fullest_map(samples: &[Sample]) -> Option<(String, f64)> {
    let mut best: Option<(String, f64)> = None;
    for (n, labels, entries) in samples {
        if n != "cortexflow_agent_map_entries" {
            continue;
        }
        let Some(map) = labels.get("map") else {
            continue;
        };
        let Some(cap) = sum(samples, "cortexflow_agent_map_capacity", &[("map", map)]) else {
            continue;
        };
        if cap > 0.0 {
            let r = entries / cap;
            if best.as_ref().is_none_or(|(_, b)| r > *b) {
                best = Some((map.clone(), r));
            }
        }
    }
    best
}

/// Seconds since the Lease was last renewed, and its duration.
pub fn lease_age(l: &Lease) -> Option<(f64, f64)> {
    let spec = l.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref()?.0;
    let age = (k8s_openapi::jiff::Timestamp::now() - renewed)
        .total(k8s_openapi::jiff::Unit::Second)
        .ok()?;
    Some((age, f64::from(spec.lease_duration_seconds.unwrap_or(15))))
}

fn human_secs(s: f64) -> String {
    if s >= 86_400.0 {
        format!("{:.0} d", s / 86_400.0)
    } else if s >= 3600.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{s:.0} s")
    }
}

/// `cfcli status`: one screen.
pub fn render(s: &Snapshot, cluster_td: &str) -> String {
    let mut out = String::new();
    let holder = s
        .lease
        .as_ref()
        .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
        .unwrap_or_else(|| "(none)".into());
    let age = s
        .lease
        .as_ref()
        .and_then(lease_age)
        .map(|(a, _)| format!(", renewed {a:.0} s ago"))
        .unwrap_or_default();
    out.push_str(&format!("Operator: leader {holder}{age}\n"));
    for o in &s.operators {
        match &o.samples {
            Ok(m) => out.push_str(&format!(
                "  {}: {}, engine version {}, {} agent streams, {} identities, CA intermediate expires in {}\n",
                o.name,
                if sum(m, "cortexflow_operator_leader", &[]) == Some(1.0) {
                    "leading"
                } else {
                    "following"
                },
                sum(m, "cortexflow_operator_config_version", &[]).unwrap_or(0.0),
                sum(m, "cortexflow_operator_connected_agents", &[]).unwrap_or(0.0),
                sum(m, "cortexflow_operator_identities", &[]).unwrap_or(0.0),
                sum(m, "cortexflow_ca_expiry_seconds", &[]).map(human_secs).unwrap_or("?".into()),
            )),
            Err(e) => out.push_str(&format!("  {}: metrics unreadable: {e}\n", o.name)),
        }
    }
    out.push_str(&format!(
        "\n{:<16}  {:<9}  {:>20}  {:>7}  {:<22}  {:>11}  {:>5}\n",
        "NODE", "CONNECTED", "APPLIED", "REFUSED", "FULLEST MAP", "CERT EXPIRY", "ROOTS"
    ));
    for node in &s.nodes {
        match s.agents.get(node).map(|a| &a.samples) {
            None => out.push_str(&format!("{node:<16}  no agent\n")),
            Some(Err(e)) => out.push_str(&format!("{node:<16}  agent unreadable: {e}\n")),
            Some(Ok(m)) => {
                let refused = configs_refused(m);
                out.push_str(&format!(
                    "{:<16}  {:<9}  {:>20}  {:>7}  {:<22}  {:>11}  {:>5}\n",
                    node,
                    if sum(m, "cortexflow_agent_operator_connected", &[]) == Some(1.0) {
                        "yes"
                    } else {
                        "NO"
                    },
                    sum(m, "cortexflow_agent_config_version", &[]).unwrap_or(0.0),
                    refused,
                    fullest_map(m)
                        .map(|(n, r)| format!("{n} {:.1} %", r * 100.0))
                        .unwrap_or("-".into()),
                    sum(m, "cortexflow_agent_certificate_expiry_seconds", &[])
                        .map(human_secs)
                        .unwrap_or("?".into()),
                    sum(m, "cortexflow_agent_trust_bundle_roots", &[]).unwrap_or(0.0),
                ));
            }
        }
    }
    let programmed = s
        .policies
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|st| condition(&st.conditions, "Programmed"))
                .is_some_and(|c| c.0)
        })
        .count();
    out.push_str(&format!(
        "\nPolicies: {} ({programmed} Programmed)   ServiceIdentities: {}   trust domain {cluster_td}\n",
        s.policies.len(),
        s.identities.len()
    ));
    out
}

/// `cfcli status -o json`.
pub fn to_json(s: &Snapshot) -> serde_json::Value {
    let scraped = |x: &Scraped, keys: &[&str]| {
        let mut v = serde_json::json!({"name": x.name});
        match &x.samples {
            Ok(m) => {
                for k in keys {
                    v[*k] = serde_json::json!(sum(m, k, &[]));
                }
                if let Some((map, r)) = fullest_map(m) {
                    v["fullestMap"] = serde_json::json!({"map": map, "fill": r});
                }
            }
            Err(e) => v["error"] = serde_json::json!(e),
        }
        v
    };
    serde_json::json!({
        "leader": s.lease.as_ref().and_then(|l| l.spec.as_ref()?.holder_identity.clone()),
        "operators": s.operators.iter().map(|o| scraped(o, &[
            "cortexflow_operator_leader",
            "cortexflow_operator_config_version",
            "cortexflow_operator_connected_agents",
            "cortexflow_operator_identities",
            "cortexflow_ca_expiry_seconds",
        ])).collect::<Vec<_>>(),
        "nodes": s.nodes.iter().map(|n| {
            let mut v = match s.agents.get(n) {
                Some(a) => scraped(a, &[
                    "cortexflow_agent_operator_connected",
                    "cortexflow_agent_config_version",
                    "cortexflow_agent_certificate_expiry_seconds",
                    "cortexflow_agent_trust_bundle_roots",
                    "cortexflow_agent_flow_events_lost_total",
                ]),
                None => serde_json::json!({"error": "no agent"}),
            };
            v["node"] = serde_json::json!(n);
            if let Some(Ok(m)) = s.agents.get(n).map(|a| &a.samples) {
                v["configsRefused"] = serde_json::json!(configs_refused(m));
            }
            v
        }).collect::<Vec<_>>(),
        "policies": s.policies.len(),
        "serviceIdentities": s.identities.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_text() {
        let m = parse_metrics(
            "# HELP x y\ncortexflow_agent_map_entries{map=\"ipcache\"} 90\ncortexflow_agent_map_capacity{map=\"ipcache\"} 100\ncortexflow_agent_map_entries{map=\"policy\"} 1\ncortexflow_agent_map_capacity{map=\"policy\"} 1000\ncortexflow_agent_configs_total{result=\"refused\",x=\"a,b\"} 2\nup 1\n",
        );
        assert_eq!(sum(&m, "up", &[]), Some(1.0));
        assert_eq!(
            sum(
                &m,
                "cortexflow_agent_configs_total",
                &[("result", "refused")]
            ),
            Some(2.0)
        );
        assert_eq!(
            sum(
                &m,
                "cortexflow_agent_configs_total",
                &[("result", "invalid")]
            ),
            None
        );
        assert_eq!(fullest_map(&m), Some(("ipcache".into(), 0.9)));
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }
}
