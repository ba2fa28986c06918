//! `cfcli install` / `cfcli uninstall`: the chart through the `helm` binary.
//!
//! The chart is the one `cfcli` was built with (embedded, `build.rs`), written to a temporary
//! directory for helm, or `--chart DIR`. Install is `helm upgrade --install` (so running it again
//! upgrades), then — with `--wait` — cfcli watches the rollout itself and shows it: the
//! operator's ready replicas, the agents' ready nodes and the Lease holder, until all are there
//! or the timeout says what is not (and the pods' own reasons).
use std::{
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    coordination::v1::Lease,
    core::v1::Pod,
};
use kube::api::{Api, ListParams};

use crate::connect::Cluster;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/chart.rs"));
}

/// Flags of `install` and `uninstall`.
#[derive(clap::Args, Clone, Debug)]
pub struct HelmArgs {
    /// The Helm release name.
    #[arg(long, default_value = "cortexflow")]
    pub release: String,
    /// The helm binary.
    #[arg(long, env = "CFCLI_HELM", default_value = "helm")]
    pub helm: PathBuf,
    /// How long `--wait` waits.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
    /// Wait until the operator and every node's agent are ready (install) or every object is
    /// gone (uninstall), showing progress.
    #[arg(long)]
    pub wait: bool,
}

/// The embedded chart's files.
pub fn chart_files() -> &'static [(&'static str, &'static [u8])] {
    embedded::CHART
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_chart() -> anyhow::Result<TempDir> {
    let dir = std::env::temp_dir().join(format!(
        "cfcli-chart-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let guard = TempDir(dir.join("cortexflow"));
    for (path, bytes) in chart_files() {
        let f = guard.0.join(path);
        if let Some(parent) = f.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&f, bytes).with_context(|| format!("write {}", f.display()))?;
    }
    Ok(guard)
}

/// `helm <args>` with the cluster's kubeconfig and context; helm's own message on failure.
fn helm(cluster: &Cluster, h: &HelmArgs, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(&h.helm);
    cmd.args(args);
    if let Some(k) = &cluster.args.kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    if let Some(c) = &cluster.args.context {
        cmd.arg("--kube-context").arg(c);
    }
    let out = cmd.output().with_context(|| {
        format!(
            "run {} (install helm, or pass --helm PATH)",
            h.helm.display()
        )
    })?;
    if !out.status.success() {
        bail!(
            "helm {} failed: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The rollout as `--wait` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub operator_ready: i32,
    pub operator_wanted: i32,
    pub agents_ready: i32,
    pub agents_wanted: i32,
    pub leader: Option<String>,
}

impl Progress {
    pub fn done(&self) -> bool {
        self.operator_wanted > 0
            && self.operator_ready >= self.operator_wanted
            && self.agents_ready >= self.agents_wanted
            && self.leader.is_some()
    }

    pub fn line(&self) -> String {
        format!(
            "operator {}/{} ready, agents {}/{} nodes ready, leader {}",
            self.operator_ready,
            self.operator_wanted,
            self.agents_ready,
            self.agents_wanted,
            self.leader.as_deref().unwrap_or("none yet")
        )
    }
}

async fn progress(cluster: &Cluster, release: &str) -> anyhow::Result<Progress> {
    let ns = &cluster.args.cortexflow_namespace;
    let c = &cluster.client;
    let dep = Api::<Deployment>::namespaced(c.clone(), ns)
        .get_opt(&format!("{release}-operator"))
        .await?;
    let ds = Api::<DaemonSet>::namespaced(c.clone(), ns)
        .get_opt(&format!("{release}-agent"))
        .await?;
    let lease = Api::<Lease>::namespaced(c.clone(), ns)
        .get_opt("cortexflow-operator")
        .await?;
    let (operator_ready, operator_wanted) = dep.map_or((0, 0), |d| {
        (
            d.status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
            d.spec.replicas.unwrap_or(1),
        )
    });
    let (agents_ready, agents_wanted) = ds
        .and_then(|d| d.status)
        .map_or((0, 0), |s| (s.number_ready, s.desired_number_scheduled));
    let leader = lease
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty());
    Ok(Progress {
        operator_ready,
        operator_wanted,
        agents_ready,
        agents_wanted,
        leader,
    })
}

/// Why the release's pods are not ready, one line each (at most 10).
async fn pod_reasons(cluster: &Cluster, release: &str) -> Vec<String> {
    let api = Api::<Pod>::namespaced(cluster.client.clone(), &cluster.args.cortexflow_namespace);
    let lp = ListParams::default().labels(&format!("app.kubernetes.io/instance={release}"));
    let Ok(pods) = api.list(&lp).await else {
        return vec![];
    };
    let mut out = Vec::new();
    for p in pods.items {
        let name = p.metadata.name.clone().unwrap_or_default();
        let st = p.status.unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready {
            continue;
        }
        let why = st
            .container_statuses
            .iter()
            .flatten()
            .filter_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                Some(format!(
                    "{}: {} {}",
                    c.name,
                    w.reason.clone().unwrap_or_default(),
                    w.message.clone().unwrap_or_default()
                ))
            })
            .chain(
                st.conditions
                    .iter()
                    .flatten()
                    .filter(|c| c.status != "True")
                    .map(|c| {
                        format!(
                            "{} {}",
                            c.type_,
                            c.message
                                .clone()
                                .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
                        )
                    }),
            )
            .collect::<Vec<_>>()
            .join("; ");
        out.push(format!(
            "{name} ({}): {why}",
            st.phase.unwrap_or_else(|| "no phase".into())
        ));
        if out.len() == 10 {
            break;
        }
    }
    out
}

/// `cfcli install`.
pub async fn install(
    cluster: &Cluster,
    h: &HelmArgs,
    chart: Option<&Path>,
    values: &[PathBuf],
    set: &[String],
) -> anyhow::Result<()> {
    let ns = cluster.args.cortexflow_namespace.clone();
    let written = match chart {
        Some(_) => None,
        None => Some(write_chart()?),
    };
    let dir = written
        .as_ref()
        .map(|w| w.0.display().to_string())
        .or_else(|| chart.map(|c| c.display().to_string()))
        .context("no chart")?;
    let mut args: Vec<String> = [
        "upgrade",
        "--install",
        &h.release,
        &dir,
        "--namespace",
        &ns,
        "--create-namespace",
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for v in values {
        args.push("--values".into());
        args.push(v.display().to_string());
    }
    for s in set {
        args.push("--set".into());
        args.push(s.clone());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm(cluster, h, &argv)?;
    drop(written);
    let rel: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    println!(
        "Release {} in namespace {ns}: {} (revision {}, chart {})",
        h.release,
        rel["info"]["status"].as_str().unwrap_or("unknown"),
        rel["version"],
        rel["chart"]["metadata"]["version"].as_str().unwrap_or("?")
    );
    if !h.wait {
        println!(
            "Not waiting for the rollout: `cfcli install --wait` or `cfcli check` shows when it is ready."
        );
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(h.timeout_seconds);
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let p = progress(cluster, &h.release).await?;
        let line = p.line();
        if line != last {
            if tty {
                eprint!("\r\x1b[2K  waiting: {line}");
            } else {
                eprintln!("  waiting: {line}");
            }
            let _ = std::io::stderr().flush();
            last = line;
        }
        if p.done() {
            if tty {
                eprintln!();
            }
            println!("CortexFlow is ready: {}", p.line());
            return Ok(());
        }
        if Instant::now() >= deadline {
            if tty {
                eprintln!();
            }
            let reasons = pod_reasons(cluster, &h.release).await;
            bail!(
                "not ready after {} s: {}{}\nhint: `kubectl -n {ns} get pods -o wide` and `kubectl -n {ns} describe pods`; the release stays installed (`cfcli uninstall` removes it)",
                h.timeout_seconds,
                p.line(),
                if reasons.is_empty() {
                    " (no pod of the release exists yet)".to_string()
                } else {
                    format!("\n  {}", reasons.join("\n  "))
                }
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `cfcli uninstall`: the release, then what stays (by design) and how to remove it.
pub async fn uninstall(cluster: &Cluster, h: &HelmArgs) -> anyhow::Result<()> {
    let ns = cluster.args.cortexflow_namespace.clone();
    let timeout = format!("{}s", h.timeout_seconds);
    let mut args = vec!["uninstall", &h.release, "--namespace", &ns];
    if h.wait {
        args.extend(["--wait", "--timeout", &timeout]);
    }
    helm(cluster, h, &args)?;
    println!("Release {} removed from namespace {ns}.", h.release);
    let c = &cluster.client;
    let lp = ListParams::default();
    let (policies, identities) = (
        Api::<cortexflow_crds::MeshPolicy>::all(c.clone())
            .list(&lp)
            .await
            .map(|l| l.items.len()),
        Api::<cortexflow_crds::ServiceIdentity>::all(c.clone())
            .list(&lp)
            .await
            .map(|l| l.items.len()),
    );
    println!("Kept on purpose:");
    match (policies, identities) {
        (Ok(p), Ok(i)) => println!(
            "  - the CRDs, with {p} MeshPolicies and {i} ServiceIdentities (Helm never deletes CRDs): \
             `kubectl delete crd meshpolicies.mesh.cortexflow.io serviceidentities.mesh.cortexflow.io`"
        ),
        _ => println!(
            "  - the CRDs (Helm never deletes CRDs): `kubectl delete crd meshpolicies.mesh.cortexflow.io serviceidentities.mesh.cortexflow.io`"
        ),
    }
    println!(
        "  - what the operator created in {ns} (the CA Secret cortexflow-ca, the id table and the bundle ConfigMaps, the Lease): \
         `kubectl delete namespace {ns}`"
    );
    println!(
        "  - the kernel state on every node (pinned programs and maps keep enforcing the last policy): \
         `cortexflow-agent --uninstall --pin-dir /sys/fs/bpf/cortexflow` on each node (README, \"Uninstall\")"
    );
    Ok(())
}
