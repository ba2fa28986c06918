//! Builds the kernel programs (`agent-ebpf`) for the BPF target with aya-build and leaves the
//! object in `OUT_DIR`, where `loader.rs` embeds it.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../agent-ebpf");
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The pinned nightly of agent-ebpf/rust-toolchain.toml (its LLVM must match bpf-linker's).
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let text = std::fs::read_to_string(&toolchain_file)?;
    let channel = toolchain_channel(&text)
        .ok_or_else(|| anyhow::anyhow!("no channel in {}", toolchain_file.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "cortexflow-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(channel),
    )
}

/// `channel = "…"` of a rust-toolchain.toml.
fn toolchain_channel(text: &str) -> Option<&str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "channel").then(|| v.trim().trim_matches('"'))
    })
}
