//! `cortexflow-lab cluster up|down|status` (what `cargo xtask cluster …` runs): a real local
//! control plane for users and developers, detached from this process.
use std::path::PathBuf;

use anyhow::bail;
use cortexflow_lab::{
    cluster::{self, Cluster, Lifetime},
    kubectl,
};
use cortexflow_testkit::{tools, workspace_root};

/// Where the detached cluster of this checkout keeps its state.
fn state_dir() -> PathBuf {
    std::env::var_os("CORTEXFLOW_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/cortexflow/cluster"))
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let dir = state_dir();
    match args.first().map(String::as_str) {
        Some("up") => {
            let crds = match args.get(1).map(String::as_str) {
                None | Some("--crds=true") => true,
                Some("--crds=false") => false,
                Some(other) => bail!("unknown argument {other}; usage: cluster up [--crds=false]"),
            };
            up(&dir, crds)
        }
        Some("down") => {
            if cluster::stop_detached(&dir)? {
                println!("cluster stopped; removed {}", dir.display());
            } else {
                println!("no cluster in {}", dir.display());
            }
            Ok(())
        }
        Some("status") => status(&dir),
        _ => bail!("usage: cluster up [--crds=false] | down | status"),
    }
}

fn up(dir: &std::path::Path, crds: bool) -> anyhow::Result<()> {
    if let Some(status) = cluster::detached_status(dir)? {
        if status.processes.iter().all(|(_, _, running)| *running) {
            println!("cluster already running ({})", status.server);
            println!("export KUBECONFIG={}", status.kubeconfig.display());
            return Ok(());
        }
        println!("cleaning up a cluster that is no longer fully running");
        cluster::stop_detached(dir)?;
    }
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "starting etcd {}, kube-apiserver, kube-controller-manager, kube-scheduler {} in {}",
        tools::ETCD_VERSION,
        tools::KUBERNETES_VERSION,
        dir.display()
    );
    let c = rt.block_on(Cluster::start(dir, Lifetime::Detached))?;
    if crds {
        print!("{}", kubectl::install_crds(&c.kubeconfig())?);
    }
    println!("control plane ready at {}", c.server_url());
    println!(
        "kubectl {}: {}",
        tools::KUBERNETES_VERSION,
        tools::kubectl_bin().display()
    );
    println!("stop it with: cargo xtask cluster down");
    println!("export KUBECONFIG={}", c.kubeconfig().display());
    Ok(())
}

fn status(dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(status) = cluster::detached_status(dir)? else {
        println!(
            "no cluster in {} (start one with `cargo xtask cluster up`)",
            dir.display()
        );
        return Ok(());
    };
    for (name, pid, running) in &status.processes {
        println!(
            "{name:<24} pid {pid:<8} {}",
            if *running { "running" } else { "NOT RUNNING" }
        );
    }
    match kubectl::run(&status.kubeconfig, &["get", "--raw", "/readyz"]) {
        Ok(o) if o.success => println!("apiserver {}: ready", status.server),
        Ok(o) => println!(
            "apiserver {}: not ready: {}",
            status.server,
            o.stderr.trim()
        ),
        Err(e) => println!("apiserver {}: {e:#}", status.server),
    }
    println!("export KUBECONFIG={}", status.kubeconfig.display());
    Ok(())
}
