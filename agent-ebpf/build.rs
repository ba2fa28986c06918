//! Rebuild the eBPF object when the linker changes: the object depends on `bpf-linker`, which
//! cargo does not know about.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
