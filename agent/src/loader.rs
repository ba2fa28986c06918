//! Loads the CortexFlow kernel programs.

/// The eBPF object built by `build.rs` from the `agent-ebpf` crate.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cortexflow"));

/// Loads the embedded object into the kernel (needs CAP_BPF / root).
pub fn load() -> Result<aya::Ebpf, aya::EbpfError> {
    aya::EbpfLoader::new().load(EBPF_OBJECT)
}
