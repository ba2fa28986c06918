//! Cargo from inside tests, benchmarks and `cargo xtask`: the workspace's binaries built on
//! demand, the target directory, and a `cargo` command that does not leak the running crate's
//! variables into the build.
use std::{path::PathBuf, process::Command, sync::Mutex};

use anyhow::{Context as _, bail};

static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Path of a workspace binary, built the first time it is asked for: debug, or release when
/// `CORTEXFLOW_BUILD_PROFILE=release` (benchmarks).
pub fn binary(package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let release = std::env::var("CORTEXFLOW_BUILD_PROFILE").is_ok_and(|p| p == "release");
    let root = crate::workspace_root();
    let target = target_dir();
    let mut built = BUILT
        .lock()
        .map_err(|_| anyhow::anyhow!("build lock poisoned"))?;
    if !built.iter().any(|b| b == bin) {
        let mut cmd = cargo_command();
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
        if release {
            cmd.arg("--release");
        }
        let out = cmd
            .current_dir(&root)
            .output()
            .with_context(|| format!("run cargo build -p {package}"))?;
        if !out.status.success() {
            bail!(
                "building {bin} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        built.push(bin.to_string());
    }
    Ok(target
        .join(if release { "release" } else { "debug" })
        .join(bin))
}

/// The workspace's cargo target directory (`CARGO_TARGET_DIR`, else `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
}

/// `cargo` (the one running us, if any) without the variables cargo sets for the crate it runs
/// (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, …). Build scripts such as ring's watch
/// `CARGO_MANIFEST_DIR`: passed on, it would differ between `cargo xtask`, a test binary and a
/// shell, and every switch would rebuild ring and all that depends on it.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    for (k, _) in std::env::vars_os() {
        let Some(k) = k.to_str() else { continue };
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            )
        {
            cmd.env_remove(k);
        }
    }
    cmd
}
