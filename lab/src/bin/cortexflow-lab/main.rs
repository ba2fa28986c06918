//! `cortexflow-lab` (what `cargo xtask lab` and `cargo xtask cluster` run):
//!
//! ```text
//! cortexflow-lab [--nodes N] [--smoke]      start the lab, print the matrix; run until Ctrl-C
//!                                           (--smoke: exit 0 only when the matrix is as expected)
//! cortexflow-lab exec <ns>/<pod> -- <cmd…>  run a command inside a lab pod
//! cortexflow-lab exec node/<name> -- <cmd…> run a command in a lab node's network namespace
//! cortexflow-lab cluster up [--crds=false] | down | status
//!                                           a detached control plane for users and developers
//! ```
#![forbid(unsafe_code)]

mod cluster;

use std::{process::ExitCode, time::Instant};

use cortexflow_lab::lab::{self, Lab, LabOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("cluster") {
        return match cluster::run(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cluster: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("exec") {
        let Some(target) = args.get(1) else {
            eprintln!("usage: cargo xtask lab exec <ns>/<pod>|node/<name> -- <cmd…>");
            return ExitCode::from(2);
        };
        let rest: Vec<String> = args[2..]
            .iter()
            .skip_while(|a| *a == "--")
            .cloned()
            .collect();
        // In place of this process: a signal to `cargo xtask lab exec …` reaches the command.
        let err = match lab::exec_command(&lab::default_state_dir(), target, &rest) {
            Ok(mut cmd) => {
                use std::os::unix::process::CommandExt as _;
                anyhow::Error::from(cmd.exec())
            }
            Err(e) => e,
        };
        eprintln!("lab exec: {err:#}");
        return ExitCode::FAILURE;
    }
    let mut opts = LabOptions::new(lab::default_state_dir());
    let mut smoke = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--smoke" => smoke = true,
            "--nodes" => match it.next().and_then(|n| n.parse().ok()) {
                Some(n) => opts.nodes = n,
                None => {
                    eprintln!("--nodes needs a number");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!(
                    "unknown argument {other}; usage: cargo xtask lab [--nodes N] [--smoke] | exec <ns>/<pod>|node/<name> -- <cmd…>"
                );
                return ExitCode::from(2);
            }
        }
    }
    if lab::running(&opts.state_dir) {
        eprintln!(
            "a lab is already running (state in {}); stop it with Ctrl-C first",
            opts.state_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let _ = std::fs::remove_dir_all(&opts.state_dir);
    cortexflow_runtime::init_logging("warn,kube_client=off", cortexflow_runtime::LogFormat::Plain);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(run(opts.clone(), smoke));
    let _ = std::fs::remove_dir_all(&opts.state_dir);
    code
}

async fn run(opts: LabOptions, smoke: bool) -> ExitCode {
    let t = Instant::now();
    println!(
        "starting the lab: a real control plane, {} simulated nodes with their agents, the operator, the demo of examples/lab …",
        opts.nodes
    );
    // Ctrl-C while starting drops what was made so far (each part removes itself).
    let started = tokio::select! {
        l = Lab::start(&opts) => l,
        _ = cortexflow_runtime::shutdown_signal() => {
            eprintln!("interrupted; removing what was started");
            return ExitCode::FAILURE;
        }
    };
    let lab = match started {
        Ok(l) => l,
        Err(e) => {
            eprintln!("the lab did not start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let phases: Vec<String> = lab
        .timings
        .iter()
        .map(|(what, d)| format!("{what} {:.1} s", d.as_secs_f64()))
        .collect();
    println!(
        "lab up in {:.1} s ({})",
        t.elapsed().as_secs_f64(),
        phases.join(", ")
    );
    let cells = match lab.matrix().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("probing the matrix failed: {e:#}");
            lab.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    println!(
        "\nconnectivity (probes from inside the pods; verdicts and reasons from the agents' flow events):\n"
    );
    print!("{}", lab::render(&cells));
    let ok = cells.iter().all(|c| c.as_expected());
    println!(
        "\n{}",
        if ok {
            "the matrix is as examples/lab says it should be"
        } else {
            "the matrix DIFFERS from what examples/lab says"
        }
    );
    println!();
    for l in lab.endpoints() {
        println!("{l}");
    }
    if smoke {
        lab.shutdown().await;
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let frontend = lab
        .pods("shop", "frontend")
        .ok()
        .and_then(|p| p.into_iter().next())
        .map_or_else(|| "<frontend pod>".to_string(), |p| p.0);
    let backend = lab
        .cluster_ip("shop", "backend")
        .map_or_else(|_| "<backend ClusterIP>".to_string(), |ip| ip.to_string());
    println!(
        "\ntry: kubectl get mp,sid -A\n     cargo xtask lab exec shop/{frontend} -- {} probe tcp {backend}:80\n\nrunning; Ctrl-C removes everything",
        lab.workload_bin.display()
    );
    let _ = cortexflow_runtime::shutdown_signal().await;
    println!("removing the lab …");
    lab.shutdown().await;
    ExitCode::SUCCESS
}
