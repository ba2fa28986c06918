//! `cargo xtask test`: the one test command (the README's, the one `.ci/run` calls).
//!
//! Stages, in order: setup (idempotent), rustfmt, clippy `-D warnings` on every crate (the eBPF
//! crate also on its BPF target), unit tests, root-only kernel tests, and the end-to-end suite
//! against a real control plane. Every stage runs even when an earlier one failed, so one run
//! shows everything that is wrong; the last line is `N passed, N failed`.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use crate::run;

#[derive(clap::Args)]
pub struct Args {
    /// Run only these stages (setup, fmt, clippy, unit, kernel, e2e); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// Totals of one stage.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds a libtest summary line: `test result: ok. 5 passed; 0 failed; 1 ignored; …`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let (n, what) = match words.as_slice() {
                [.., n, what] => (n.parse::<u64>().ok(), *what),
                _ => continue,
            };
            let Some(n) = n else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

struct StageResult {
    name: &'static str,
    ok: bool,
    tally: Tally,
    took: Duration,
}

fn cargo() -> Command {
    cortexflow_testkit::cargo::cargo_command()
}

/// A stage that is a check, not a test binary: counts as one test.
fn check(ok: bool) -> Tally {
    Tally {
        passed: u64::from(ok),
        failed: u64::from(!ok),
        ignored: 0,
    }
}

/// Runs test commands, summing their libtest summaries; a command that fails without a failed
/// test (it did not compile, or crashed) counts as one failure.
fn tests(cmds: Vec<Command>) -> anyhow::Result<(bool, Tally)> {
    let mut tally = Tally::default();
    let mut all_ok = true;
    for mut c in cmds {
        let mut local = Tally::default();
        let ok = run::stream(&mut c, |l| local.add_line(l))?;
        if !ok && local.failed == 0 {
            local.failed += 1;
        }
        all_ok &= ok;
        tally.passed += local.passed;
        tally.failed += local.failed;
        tally.ignored += local.ignored;
    }
    Ok((all_ok, tally))
}

/// `cargo test` over every crate but the eBPF programs (another target) and the e2e suites (their
/// own stage).
const UNIT_SELECTION: [&str; 6] = [
    "test",
    "--workspace",
    "--exclude",
    "cortexflow-ebpf",
    "--exclude",
    "cortexflow-e2e",
];

/// `cargo test` of the e2e crate, as its own stage runs it.
const E2E_SELECTION: [&str; 3] = ["test", "--package", "cortexflow-e2e"];

fn is_root() -> bool {
    run::probe(Command::new("id").arg("-u")).is_some_and(|u| u.trim() == "0")
}

/// Free space a full run needs: the debug target directory of a fresh clone ends at ~6.5 GB
/// (with the test binaries and the lab's), plus room for the lab's files.
const DISK_NEEDED_GB: u64 = 10;

/// Warns when the target directory's file system has less free space than a run needs: a
/// full disk otherwise shows up late, as linker or `rlib` errors in whichever stage hit it.
fn check_disk(root: &std::path::Path) {
    let target = cortexflow_testkit::cargo::target_dir();
    let dir = if target.exists() {
        target
    } else {
        root.to_path_buf()
    };
    let free_kb = run::probe(Command::new("df").arg("-Pk").arg(&dir)).and_then(|out| {
        out.lines()
            .nth(1)?
            .split_whitespace()
            .nth(3)?
            .parse::<u64>()
            .ok()
    });
    if let Some(kb) = free_kb {
        let gb = kb / (1024 * 1024);
        if gb < DISK_NEEDED_GB {
            println!(
                "WARNING: {gb} GB free on the file system of {}; a full run needs about \
                 {DISK_NEEDED_GB} GB: stages may fail with `No space left on device`",
                dir.display()
            );
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<bool> {
    let start = Instant::now();
    let root = cortexflow_testkit::workspace_root();
    std::env::set_current_dir(&root)?;
    check_disk(&root);
    let wanted = |s: &str| args.only.is_empty() || args.only.iter().any(|o| o == s);
    let mut results: Vec<StageResult> = Vec::new();
    let mut stage = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<(bool, Tally)>| {
        if !wanted(name) {
            return;
        }
        println!("\n======== stage {name} ========");
        let t = Instant::now();
        let (ok, tally) = match f() {
            Ok(r) => r,
            Err(e) => {
                println!("stage {name} failed: {e:#}");
                (false, check(false))
            }
        };
        println!(
            "======== stage {name}: {} in {:.0?}",
            if ok { "ok" } else { "FAILED" },
            t.elapsed()
        );
        results.push(StageResult {
            name,
            ok,
            tally,
            took: t.elapsed(),
        });
    };

    stage("setup", &mut || {
        crate::setup::run().map(|_| (true, check(true)))
    });
    stage("fmt", &mut || {
        let ok = run::cmd(cargo().args(["fmt", "--all", "--", "--check"])).is_ok();
        Ok((ok, check(ok)))
    });
    stage("clippy", &mut || {
        // The kernel crate is no_std for a BPF target: checked below on that target.
        let host = run::cmd(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "cortexflow-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
        .is_ok();
        // The kernel crate for real: its BPF target, with the pinned nightly aya-build uses.
        let bpf = run::cmd(
            Command::new("rustup")
                .args([
                    "run",
                    &crate::setup::ebpf_toolchain(),
                    "cargo",
                    "clippy",
                    "--package",
                    "cortexflow-ebpf",
                ])
                .args([
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--release",
                ])
                .args(["--", "-D", "warnings"]),
        )
        .is_ok();
        let ok = host && bpf;
        Ok((
            ok,
            Tally {
                passed: u64::from(host) + u64::from(bpf),
                failed: u64::from(!host) + u64::from(!bpf),
                ignored: 0,
            },
        ))
    });
    stage("unit", &mut || {
        let mut workspace = cargo();
        workspace.args(UNIT_SELECTION);
        tests(vec![workspace])
    });
    stage("kernel", &mut || {
        if !is_root() {
            anyhow::bail!(
                "the kernel tests load eBPF programs and create network namespaces: run as root"
            );
        }
        // Root-only tests arrive with the datapath; every crate marks them with the
        // CORTEXFLOW_KERNEL_TESTS switch and `kernel` in the test target's name.
        let kernel_targets = kernel_test_targets()?;
        if kernel_targets.is_empty() {
            println!("no kernel test targets yet");
            return Ok((true, Tally::default()));
        }
        // The same package selection as the unit stage (and, for the e2e crate, as the e2e
        // stage): cargo resolves dependency features per selection, so another selection would
        // compile much of the dependency tree again.
        let (e2e, rest): (Vec<_>, Vec<_>) = kernel_targets
            .into_iter()
            .partition(|(pkg, _)| pkg == "cortexflow-e2e");
        let mut cmds = Vec::new();
        for (selection, targets) in [(&UNIT_SELECTION[..], rest), (&E2E_SELECTION[..], e2e)] {
            if targets.is_empty() {
                continue;
            }
            let mut c = cargo();
            c.env("CORTEXFLOW_KERNEL_TESTS", "1").args(selection);
            for (_, target) in &targets {
                c.args(["--test", target]);
            }
            cmds.push(c);
        }
        tests(cmds)
    });
    stage("e2e", &mut || {
        let mut c = cargo();
        c.args(E2E_SELECTION).args(["--test", "*"]);
        tests(vec![c])
    });

    println!("\n======== summary ========");
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for r in &results {
        println!(
            "{:<8} {:<6} {:>4} passed {:>3} failed {:>3} ignored  {:>6.0?}",
            r.name,
            if r.ok { "ok" } else { "FAILED" },
            r.tally.passed,
            r.tally.failed,
            r.tally.ignored,
            r.took
        );
        passed += r.tally.passed;
        failed += r.tally.failed;
        ignored += r.tally.ignored;
    }
    let all_ok = results.iter().all(|r| r.ok) && failed == 0;
    if ignored > 0 {
        println!("({ignored} ignored)");
    }
    println!("total time {:.0?}", start.elapsed());
    println!("{passed} passed, {failed} failed");
    Ok(all_ok)
}

/// `(package, test target)` of every integration-test target whose name starts with `kernel`.
fn kernel_test_targets() -> anyhow::Result<Vec<(String, String)>> {
    let out = cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()?;
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut found = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        let name = pkg["name"].as_str().unwrap_or_default();
        for t in pkg["targets"].as_array().into_iter().flatten() {
            let is_test = t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|x| x == "test"));
            let tname = t["name"].as_str().unwrap_or_default();
            if is_test && tname.starts_with("kernel") {
                found.push((name.to_string(), tname.to_string()));
            }
        }
    }
    Ok(found)
}
