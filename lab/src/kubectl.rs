//! Runs the real `kubectl` (of the Kubernetes version the cluster runs) against a kubeconfig.
use std::{path::Path, process::Command};

use anyhow::Context as _;

/// What a kubectl run printed.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `kubectl <args>` with `KUBECONFIG=kubeconfig` and returns its output, successful or not.
pub fn run(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cortexflow_testkit::tools::kubectl_bin())
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .context("run kubectl (is `cargo xtask setup` done?)")?;
    Ok(Output {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `kubectl <args>` and fails, with what kubectl said, unless it succeeds.
pub fn ok(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = run(kubeconfig, args)?;
    if !out.success {
        anyhow::bail!(
            "kubectl {} failed: {}{}",
            args.join(" "),
            out.stderr,
            out.stdout
        );
    }
    Ok(out.stdout)
}

/// Installs the CortexFlow CRDs from the chart (`charts/cortexflow/crds`) as a user would, with
/// `kubectl apply --server-side`, and waits until the apiserver serves them; returns what
/// kubectl printed.
pub fn install_crds(kubeconfig: &Path) -> anyhow::Result<String> {
    let crds = cortexflow_testkit::workspace_root().join("charts/cortexflow/crds");
    let out = ok(
        kubeconfig,
        &["apply", "--server-side", "-f", &crds.display().to_string()],
    )
    .context("install the CRDs from the chart")?;
    ok(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd",
            "-l",
            "app.kubernetes.io/part-of=cortexflow",
        ],
    )?;
    Ok(out)
}
