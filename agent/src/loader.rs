//! The kernel programs, as built by `build.rs` from the `agent-ebpf` crate.

/// The eBPF object (ELF) embedded in the agent binary.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cortexflow"));
