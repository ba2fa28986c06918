//! `cargo xtask protogen`: regenerates `proto/src/gen` from the `.proto` files (no `protoc`).
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("proto/codegen has a parent")
        .to_path_buf();
    let out = proto.join("src/gen");
    cortexflow_protogen::generate(&proto, &out)?;
    for (_, file) in cortexflow_protogen::PROTOS {
        println!("generated {}", out.join(file).display());
    }
    Ok(())
}
