//! Generates the Rust code of the `.proto` files (pure Rust: protox parses, tonic-prost-build
//! generates; no `protoc`). Used by `cargo xtask protogen` (this crate's binary) and by the
//! drift test of `cortexflow-proto`, so that both generate exactly the same way. A crate of its
//! own: generating must not need the code it generates (a new field would not compile before
//! its code exists).
#![forbid(unsafe_code)]

use std::path::Path;

/// The `.proto` files, relative to the `proto/` directory, and the file each generates.
pub const PROTOS: &[(&str, &str)] = &[
    ("cortexflow/agent/v1/agent.proto", "cortexflow.agent.v1.rs"),
    ("cortexflow/flows/v1/flows.proto", "cortexflow.flows.v1.rs"),
    (
        "cortexflow/identity/v1/identity.proto",
        "cortexflow.identity.v1.rs",
    ),
];

/// Writes the generated code for [`PROTOS`] (under `proto_dir`) into `out_dir`.
pub fn generate(proto_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let files: Vec<&str> = PROTOS.iter().map(|(p, _)| *p).collect();
    let fds = protox::compile(files, [proto_dir])?;
    std::fs::create_dir_all(out_dir)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out_dir)
        .compile_fds(fds)?;
    Ok(())
}
