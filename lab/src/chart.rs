//! The Helm chart (`charts/cortexflow`) as the tests and the lab use it: rendered with the real
//! `helm template`, its RBAC applied, and a kubeconfig that authenticates as the operator's
//! ServiceAccount (a TokenRequest token), so the operator runs with exactly the chart's
//! permissions — never with the admin's.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::kubectl;

/// `helm <args>`; fails with what helm said.
pub fn helm(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(cortexflow_testkit::tools::helm_bin())
        .args(args)
        .output()
        .context("run helm (is `cargo xtask setup` done?)")?;
    anyhow::ensure!(
        out.status.success(),
        "helm {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    cortexflow_testkit::workspace_root().join("charts/cortexflow")
}

/// `helm template <release> charts/cortexflow -n <namespace> [--set …]`.
pub fn render(release: &str, namespace: &str, set: &[&str]) -> anyhow::Result<String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template", release, &chart, "--namespace", namespace];
    for s in set {
        args.extend(["--set", s]);
    }
    helm(&args)
}

/// The documents of a rendering (YAML split on `---`), as JSON values.
pub fn documents(rendered: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for doc in rendered.split("\n---") {
        let doc = doc.trim();
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let v: serde_json::Value = serde_saphyr::from_str(doc)
            .with_context(|| format!("a rendered document does not parse:\n{doc}"))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The kinds of the operator's identity and permissions.
const RBAC_KINDS: [&str; 5] = [
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// The operator's ServiceAccount name for `release`.
pub fn operator_account(release: &str) -> String {
    format!("{release}-operator")
}

/// Applies the chart's ServiceAccounts and RBAC for `release` in `namespace` (the namespace
/// must exist) and writes a kubeconfig at `out` that authenticates as the operator's
/// ServiceAccount with a token from the TokenRequest API. Returns the cluster-scoped objects
/// created (`kind/name`), for [`remove_cluster_rbac`].
pub fn operator_kubeconfig(
    admin: &Path,
    release: &str,
    namespace: &str,
    out: &Path,
) -> anyhow::Result<Vec<String>> {
    let docs = documents(&render(release, namespace, &[])?)?;
    let rbac: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| RBAC_KINDS.contains(&d["kind"].as_str().unwrap_or("")))
        .collect();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rbac});
    let file = out.with_extension("rbac.json");
    std::fs::write(&file, list.to_string())?;
    kubectl::ok(admin, &["apply", "-f", &file.display().to_string()])
        .context("apply the chart's RBAC")?;
    let _ = std::fs::remove_file(&file);
    account_kubeconfig(admin, namespace, &operator_account(release), out)?;
    Ok(rbac
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "ClusterRoleBinding")
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("").to_lowercase(),
                d["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect())
}

/// A kubeconfig at `out` for the ServiceAccount `account` of `namespace` (a 24 h token from the
/// TokenRequest API), on the cluster of `admin`.
pub fn account_kubeconfig(
    admin: &Path,
    namespace: &str,
    account: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let token = kubectl::ok(
        admin,
        &[
            "create",
            "token",
            "-n",
            namespace,
            account,
            "--duration=24h",
        ],
    )?;
    let view = kubectl::ok(admin, &["config", "view", "--raw", "-o", "json"])?;
    let view: serde_json::Value = serde_json::from_str(&view)?;
    let cluster = view["clusters"][0]["cluster"].clone();
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "lab", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": token.trim()}}],
        "contexts": [{"name": account, "context": {"cluster": "lab", "user": account, "namespace": namespace}}],
        "current-context": account,
    });
    std::fs::write(out, kubeconfig.to_string())?;
    Ok(())
}

/// Deletes the cluster-scoped objects [`operator_kubeconfig`] created.
pub fn remove_cluster_rbac(admin: &Path, objects: &[String]) {
    for o in objects {
        let _ = kubectl::run(admin, &["delete", "--ignore-not-found", o]);
    }
}
