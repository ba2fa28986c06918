//! `cargo xtask protogen`: regenerates `proto/src/gen` from the `.proto` files (no `protoc`).
#[path = "../codegen.rs"]
mod codegen;

fn main() -> anyhow::Result<()> {
    let proto = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = proto.join("src/gen");
    codegen::generate(proto, &out)?;
    for (_, file) in codegen::PROTOS {
        println!("generated {}", out.join(file).display());
    }
    Ok(())
}
