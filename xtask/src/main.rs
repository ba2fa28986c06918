//! `cargo xtask …`: the developer and CI entry points of CortexFlow.
//!
//! * `setup`   — idempotent bootstrap of a fresh machine (apt packages, pinned nightly + rust-src,
//!   bpf-linker, the Kubernetes control plane, etcd and helm built from Go modules).
//! * `test`    — the one test command: setup, fmt, clippy, unit, kernel and e2e tests.
//! * `cluster` — a real local control plane: `up`, `down`, `status`.
//! * `crdgen`  — write the CRD YAML of the chart from the Rust types.
//! * `protogen` — regenerate the checked-in gRPC code from the `.proto` files.
//! * `lab`     — a local mesh on a real control plane (`--smoke`, `exec`).
//! * `bench`   — benchmarks (`bench datapath`, `bench propagation`, `bench agent`).
#![forbid(unsafe_code)]

mod bench;
mod cluster;
#[path = "../../proto/codegen.rs"]
mod codegen;
mod run;
mod setup;
mod test;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
        action: cluster::Action,
    },
    /// Write charts/cortexflow/crds/*.yaml from the Rust types in crds/.
    Crdgen {
        /// Only check that the checked-in files are up to date.
        #[arg(long)]
        check: bool,
    },
    /// Run a local mesh on a real control plane: `lab [--nodes N] [--smoke]`, or
    /// `lab exec <ns>/<pod> -- <cmd…>` to run a command inside a lab pod.
    Lab {
        /// Arguments of the lab (see `cargo xtask lab --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate proto/src/gen from the .proto files (no protoc needed).
    Protogen,
    /// Benchmarks: baseline and subject in one run, reported as ratios.
    Bench {
        #[command(subcommand)]
        what: bench::Bench,
    },
}

/// Root of the workspace (the directory holding the workspace Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
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
        Cmd::Cluster { action } => cluster::run(action),
        Cmd::Crdgen { check } => crdgen(check),
        Cmd::Bench { what } => bench::run(what),
        Cmd::Protogen => {
            let proto = workspace_root().join("proto");
            codegen::generate(&proto, &proto.join("src/gen"))?;
            println!("generated {}", proto.join("src/gen").display());
            Ok(())
        }
        Cmd::Lab { args } => {
            let exec = args.first().is_some_and(|a| a == "exec");
            if !exec {
                setup::run()?;
            }
            let mut c = cortexflow_e2e::process::cargo_command();
            c.current_dir(workspace_root()).args([
                "run",
                "--quiet",
                "-p",
                "cortexflow-e2e",
                "--bin",
                "cortexflow-lab",
                "--",
            ]);
            c.args(&args);
            let status = c.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn crdgen(check: bool) -> anyhow::Result<()> {
    let dir = workspace_root().join("charts/cortexflow/crds");
    std::fs::create_dir_all(&dir)?;
    let files = cortexflow_crds::crd_files()?;
    let mut stale = Vec::new();
    for (name, yaml) in &files {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(yaml.as_str()) {
            stale.push(path.clone());
            if !check {
                std::fs::write(&path, yaml)?;
                println!("wrote {}", path.display());
            }
        }
    }
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !files.iter().any(|(n, _)| *n == name) {
            stale.push(entry.path());
            if !check {
                std::fs::remove_file(entry.path())?;
                println!("removed {}", entry.path().display());
            }
        }
    }
    if check && !stale.is_empty() {
        anyhow::bail!("out of date: {stale:?}; run `cargo xtask crdgen`");
    }
    if stale.is_empty() {
        println!("CRDs up to date in {}", dir.display());
    }
    Ok(())
}
