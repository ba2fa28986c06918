//! `cargo xtask …`: the developer and CI entry points of CortexFlow.
//!
//! * `setup`   — idempotent bootstrap of a fresh machine (apt packages, pinned nightly + rust-src,
//!   bpf-linker, the Kubernetes control plane, etcd and helm built from Go modules).
//! * `test`    — the one test command: setup, fmt, clippy, unit, kernel and e2e tests.
//! * `cluster` — a real local control plane: `up`, `down`, `status`.
//! * `crdgen`  — write the CRD YAML of the chart from the Rust types.
//! * `protogen` — regenerate the checked-in gRPC code from the `.proto` files.
//! * `lab`     — a local mesh on a real control plane (`--smoke`, `exec`).
//! * `bench`   — benchmarks (`bench datapath`, `bench propagation`, `bench agent`, `bench ca`).
//! * `images`  — the daemons' container images, named as the chart names them.
//!
//! xtask itself links no Kubernetes client, gRPC or TLS stack (so that `cargo xtask setup`
//! compiles in seconds on a fresh clone): whatever needs them is a binary of the crate that
//! owns it, which xtask builds and runs — `cortexflow-lab` (lab, cluster), the `crdgen` binary
//! of `cortexflow-crds`, `cortexflow-protogen`, the benchmarks' examples.
#![forbid(unsafe_code)]

mod bench;
mod images;
mod run;
mod setup;
mod test;

use clap::{Parser, Subcommand};
use cortexflow_testkit::{cargo::cargo_command, workspace_root};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "CortexFlow developer and CI entry points"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks (idempotent; a second run does nothing).
    Setup,
    /// Run every check: setup, fmt, clippy, unit, kernel and end-to-end tests.
    Test(test::Args),
    /// Start, stop or inspect a real local Kubernetes control plane on loopback.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Write charts/cortexflow/crds/*.yaml from the Rust types in crds/.
    Crdgen {
        /// Only check that the checked-in files are up to date.
        #[arg(long)]
        check: bool,
    },
    /// Run a local mesh on a real control plane: `lab [--nodes N] [--smoke]`, or
    /// `lab exec <ns>/<pod>|node/<name> -- <cmd…>` to run a command inside a lab pod or node.
    Lab {
        /// Arguments of the lab (see `cargo xtask lab --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate proto/src/gen from the .proto files (no protoc needed).
    Protogen,
    /// Build the operator, agent and proxy images (images/*.Dockerfile) with the chart's names and
    /// appVersion tag, with docker, podman, nerdctl or buildah.
    Images(images::Args),
    /// Benchmarks: baseline and subject in one run, reported as ratios.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

#[derive(Subcommand)]
enum ClusterAction {
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run().map(|_| ()),
        Cmd::Test(args) => {
            let ok = test::run(args)?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Cluster { action } => {
            let args: Vec<String> = match action {
                ClusterAction::Up { crds } => {
                    setup::run()?;
                    vec!["up".into(), format!("--crds={crds}")]
                }
                ClusterAction::Down => vec!["down".into()],
                ClusterAction::Status => vec!["status".into()],
            };
            let mut all = vec!["cluster".to_string()];
            all.extend(args);
            exec(LAB, &all)
        }
        Cmd::Crdgen { check } => exec(
            &[
                "run",
                "--quiet",
                "-p",
                "cortexflow-crds",
                "--bin",
                "crdgen",
                "--",
            ],
            &check
                .then(|| "--check".to_string())
                .into_iter()
                .collect::<Vec<_>>(),
        ),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Images(a) => images::run(a),
        Cmd::Protogen => exec(&["run", "--quiet", "-p", "cortexflow-protogen"], &[]),
        Cmd::Lab { args } => {
            let exec_in_pod = args.first().is_some_and(|a| a == "exec");
            if !exec_in_pod {
                setup::run()?;
            }
            exec(LAB, &args)
        }
    }
}

/// `cargo run` of the lab's binary (the lab, `exec`, `cluster`).
const LAB: &[&str] = &[
    "run",
    "--quiet",
    "-p",
    "cortexflow-lab",
    "--bin",
    "cortexflow-lab",
    "--",
];

/// Runs `cargo <cargo_args> <args>` in the workspace *in place of this process* (`exec`), so
/// that a signal sent to `cargo xtask …` reaches the program it runs — `cargo run` replaces
/// itself with the binary too — and the caller waits for that program's own cleanup. (A child
/// process here would outlive an `xtask` stopped by a script: a lab left running.)
fn exec(cargo_args: &[&str], args: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let mut c = cargo_command();
    c.current_dir(workspace_root()).args(cargo_args).args(args);
    Err(anyhow::Error::from(c.exec()).context("exec cargo"))
}
