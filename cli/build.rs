//! Embeds `charts/cortexflow` into `cfcli`, so that `cfcli install` installs the chart of its own
//! version (written to a temporary directory for `helm`).
use std::{fmt::Write as _, path::Path};

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(root, &p, out);
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let chart = Path::new(&manifest).join("../charts/cortexflow");
    println!("cargo:rerun-if-changed={}", chart.display());
    let mut files = Vec::new();
    walk(&chart, &chart, &mut files);
    let mut src = String::from(
        "/// The chart's files: (path inside the chart, contents).\npub const CHART: &[(&str, &[u8])] = &[\n",
    );
    for f in &files {
        let abs = chart.join(f);
        let _ = writeln!(
            src,
            "    ({f:?}, include_bytes!({:?})),",
            abs.display().to_string()
        );
        println!("cargo:rerun-if-changed={}", abs.display());
    }
    src.push_str("];\n");
    let out = std::env::var("OUT_DIR").unwrap_or_else(|_| ".".into());
    if let Err(e) = std::fs::write(Path::new(&out).join("chart.rs"), src) {
        println!("cargo:warning=cannot write the embedded chart: {e}");
    }
}
