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
    let out = Command::new(crate::tools::kubectl_bin())
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
