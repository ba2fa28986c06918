//! What CortexFlow's tests, benchmarks and developer tools share, without Kubernetes.
//!
//! Always there (what `cargo xtask` uses; nothing but `anyhow`):
//! * [`tools`] — versions and cache paths of the external binaries (`cargo xtask setup` builds
//!   them from Go modules into a cache outside the repository, keyed by version).
//! * [`cargo`] — the workspace's binaries built on demand, the target directory, a clean
//!   `cargo` command.
//!
//! With the `fixtures` feature (the default), for tests and benchmarks:
//! * [`net`] — network namespaces, veth pairs, routes, cgroups, test servers and clients.
//! * [`process`] — the project's daemons as real processes (started with `setpriv --pdeathsig`,
//!   killed on drop), a free port, a minimal HTTP GET.
//! * [`node`] — the real agent on a node made of network namespaces.
//! * [`scripted_operator`] — a real tonic `AgentConfig` server whose stream a test drives.
//!
//! The control plane, the node simulator and the lab are in `cortexflow-lab`; this crate never
//! links the Kubernetes client.
#![forbid(unsafe_code)]

pub mod cargo;
pub mod tools;

#[cfg(feature = "fixtures")]
pub mod net;
#[cfg(feature = "fixtures")]
pub mod node;
#[cfg(feature = "fixtures")]
pub mod process;
#[cfg(feature = "fixtures")]
pub mod scripted_operator;

use std::path::{Path, PathBuf};

/// Root of the workspace (the directory holding the workspace `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}
