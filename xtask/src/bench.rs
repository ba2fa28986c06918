//! `cargo xtask bench <what> [--json FILE]`: benchmarks (not tests). Each runs its baseline and
//! its subject in the same run, on the same machine, and reports ratios.
use std::path::PathBuf;

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
        /// Also measure the mesh's parts alone (TC policy with and without flow events, the
        /// socket load balancer), to see where its cost is.
        #[arg(long)]
        breakdown: bool,
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
    /// The mesh CA and the control channel on one core: certificates issued per second (against
    /// bare ECDSA signatures) and the mutual-TLS handshake (against a TCP connect).
    Ca {
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 2000)]
        certs: usize,
        #[arg(long, default_value_t = 1000)]
        handshakes: usize,
    },
    /// The agent process on a node of 110 pods with a 50 000-entry cluster ipcache, fed by a
    /// scripted operator: memory (idle and with the config), full-config and one-policy-change
    /// apply times, resync and restart. Needs root.
    Agent {
        /// Also write the results as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 110)]
        pods: usize,
        #[arg(long, default_value_t = 50_000)]
        ipcache: u32,
        /// One-policy changes measured.
        #[arg(long, default_value_t = 30)]
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
            breakdown,
        } => example(
            "cortexflow-agent",
            "bench_datapath",
            &[
                ("--seconds", seconds.to_string()),
                ("--rounds", rounds.to_string()),
            ],
            breakdown.then_some("--breakdown"),
            json,
        ),
        Bench::Propagation {
            json,
            nodes,
            pods,
            changes,
        } => example(
            "cortexflow-lab",
            "bench_propagation",
            &[
                ("--nodes", nodes.to_string()),
                ("--pods", pods.to_string()),
                ("--changes", changes.to_string()),
            ],
            None,
            json,
        ),
        Bench::Ca {
            json,
            certs,
            handshakes,
        } => example(
            "cortexflow-trust",
            "bench_ca",
            &[
                ("--certs", certs.to_string()),
                ("--handshakes", handshakes.to_string()),
            ],
            None,
            json,
        ),
        Bench::Agent {
            json,
            pods,
            ipcache,
            changes,
        } => example(
            "cortexflow-agent",
            "bench_agent",
            &[
                ("--pods", pods.to_string()),
                ("--ipcache", ipcache.to_string()),
                ("--changes", changes.to_string()),
            ],
            None,
            json,
        ),
    }
}

/// Runs a benchmark example in release mode (the daemons it starts are release builds too).
fn example(
    package: &str,
    example: &str,
    args: &[(&str, String)],
    switch: Option<&str>,
    json: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut c = cortexflow_testkit::cargo::cargo_command();
    c.current_dir(cortexflow_testkit::workspace_root())
        .env("CORTEXFLOW_BUILD_PROFILE", "release")
        .args([
            "run",
            "--release",
            "--quiet",
            "-p",
            package,
            "--example",
            example,
            "--",
        ]);
    for (flag, value) in args {
        c.arg(flag).arg(value);
    }
    c.args(switch);
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
