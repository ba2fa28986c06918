//! Types shared by the kernel programs (`cortexflow-ebpf`) and user space (`cortexflow-agent`).
//!
//! Every type here is `#[repr(C)]` with explicit integer widths, no `bool`, no `Option` and no
//! implicit padding, so that the kernel and user space agree on the byte layout of every map
//! key and value. With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Default bpffs directory under which the agent pins maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/cortexflow";
