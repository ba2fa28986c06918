//! `cargo xtask cluster up|down|status`: a real local control plane for users and developers.
use std::path::PathBuf;

use clap::Subcommand;
use cortexflow_e2e::cluster::{self, Cluster, Lifetime};

#[derive(Subcommand)]
pub enum Action {
    /// Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback and
    /// print the `export KUBECONFIG=…` line.
    Up {
        /// Also install the CortexFlow CRDs (charts/cortexflow/crds).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        crds: bool,
    },
    /// Stop the control plane and remove everything it wrote.
    Down,
    /// Show whether the control plane runs and is healthy.
    Status,
}

/// Where the detached cluster of this checkout keeps its state.
fn state_dir() -> PathBuf {
    std::env::var_os("CORTEXFLOW_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/cortexflow/cluster"))
}

pub fn run(action: Action) -> anyhow::Result<()> {
    let dir = state_dir();
    match action {
        Action::Up { crds } => {
            if let Some(status) = cluster::detached_status(&dir)? {
                if status.processes.iter().all(|(_, _, running)| *running) {
                    println!("cluster already running ({})", status.server);
                    println!("export KUBECONFIG={}", status.kubeconfig.display());
                    return Ok(());
                }
                println!("cleaning up a cluster that is no longer fully running");
                cluster::stop_detached(&dir)?;
            }
            crate::setup::run()?;
            let rt = tokio::runtime::Runtime::new()?;
            println!(
                "starting etcd {}, kube-apiserver, kube-controller-manager, kube-scheduler {} in {}",
                cortexflow_e2e::tools::ETCD_VERSION,
                cortexflow_e2e::tools::KUBERNETES_VERSION,
                dir.display()
            );
            let c = rt.block_on(Cluster::start(&dir, Lifetime::Detached))?;
            if crds {
                let chart_crds = crate::workspace_root().join("charts/cortexflow/crds");
                let out = cortexflow_e2e::kubectl::ok(
                    &c.kubeconfig(),
                    &[
                        "apply",
                        "--server-side",
                        "-f",
                        &chart_crds.display().to_string(),
                    ],
                )?;
                print!("{out}");
                cortexflow_e2e::kubectl::ok(
                    &c.kubeconfig(),
                    &[
                        "wait",
                        "--for=condition=Established",
                        "--timeout=60s",
                        "crd",
                        "-l",
                        "app.kubernetes.io/part-of=cortexflow",
                    ],
                )?;
            }
            println!("control plane ready at {}", c.server_url());
            println!(
                "kubectl {}: {}",
                cortexflow_e2e::tools::KUBERNETES_VERSION,
                cortexflow_e2e::tools::kubectl_bin().display()
            );
            println!("stop it with: cargo xtask cluster down");
            println!("export KUBECONFIG={}", c.kubeconfig().display());
            Ok(())
        }
        Action::Down => {
            if cluster::stop_detached(&dir)? {
                println!("cluster stopped; removed {}", dir.display());
            } else {
                println!("no cluster in {}", dir.display());
            }
            Ok(())
        }
        Action::Status => {
            let Some(status) = cluster::detached_status(&dir)? else {
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
            let ready =
                cortexflow_e2e::kubectl::run(&status.kubeconfig, &["get", "--raw", "/readyz"]);
            match ready {
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
    }
}
