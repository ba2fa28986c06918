//! `crdgen [--check]` (what `cargo xtask crdgen` runs): writes `charts/cortexflow/crds/*.yaml`
//! from the Rust types of this crate, removing files no type generates; `--check` only says
//! whether the checked-in files are current (exit 1 when not).
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

fn main() -> ExitCode {
    let check = std::env::args().skip(1).any(|a| a == "--check");
    match run(check) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Returns whether the files are (now) current.
fn run(check: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cortexflow/crds");
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
        eprintln!("out of date: {stale:?}; run `cargo xtask crdgen`");
        return Ok(false);
    }
    if stale.is_empty() {
        println!("CRDs up to date in {}", dir.display());
    }
    Ok(true)
}
