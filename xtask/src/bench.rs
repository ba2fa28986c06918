//! `cargo xtask bench <what> [--json FILE]`: benchmarks (not tests). Each runs its baseline and
//! its subject in the same run, on the same machine, and reports ratios.
use std::{path::PathBuf, process::Command};

use clap::Subcommand;

use crate::run;

#[derive(Subcommand)]
pub enum Bench {
    /// The datapath against no mesh and a sidecar mesh (latency, connection rate, throughput)
    /// and the per-packet program cost with 10 vs 10 000 rules. Needs root.
    Datapath {
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Rounds (scenarios interleaved; the median is reported).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Policy propagation through the real operator: 1 000 simulated agents, 50 000 pods,
    /// 2 000 policies in a real apiserver; p50/p99 change-to-every-agent time and operator
    /// memory per pod.
    Propagation {
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 50_000)]
        pods: usize,
        /// Policy changes measured.
        #[arg(long, default_value_t = 100)]
        changes: usize,
    },
}

pub fn run(bench: Bench) -> anyhow::Result<()> {
    crate::setup::run()?;
    match bench {
        Bench::Datapath {
            json,
            seconds,
            rounds,
        } => {
            let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            c.current_dir(crate::workspace_root())
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "cortexflow-agent",
                    "--example",
                    "bench_datapath",
                    "--",
                ])
                .args([
                    "--seconds",
                    &seconds.to_string(),
                    "--rounds",
                    &rounds.to_string(),
                ]);
            if let Some(j) = json {
                let j = if j.is_absolute() {
                    j
                } else {
                    std::env::current_dir()?.join(j)
                };
                c.arg("--json").arg(j);
            }
            run::cmd(&mut c)
        }
        Bench::Propagation {
            json,
            nodes,
            pods,
            changes,
        } => {
            let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            c.current_dir(crate::workspace_root())
                .env("CORTEXFLOW_BUILD_PROFILE", "release")
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "-p",
                    "cortexflow-e2e",
                    "--example",
                    "bench_propagation",
                    "--",
                ])
                .args([
                    "--nodes",
                    &nodes.to_string(),
                    "--pods",
                    &pods.to_string(),
                    "--changes",
                    &changes.to_string(),
                ]);
            if let Some(j) = json {
                let j = if j.is_absolute() {
                    j
                } else {
                    std::env::current_dir()?.join(j)
                };
                c.arg("--json").arg(j);
            }
            run::cmd(&mut c)
        }
    }
}
