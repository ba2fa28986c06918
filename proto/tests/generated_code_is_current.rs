//! The checked-in generated code must be what the `.proto` files generate today.

#[path = "../codegen.rs"]
mod codegen;

use std::path::Path;

#[test]
fn generated_code_matches_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("cortexflow-protogen-{}", std::process::id()));
    let result = codegen::generate(root, &out);
    let cleanup = || {
        let _ = std::fs::remove_dir_all(&out);
    };
    if let Err(e) = result {
        cleanup();
        panic!("generating from the .proto files failed: {e:#}");
    }
    let file = "cortexflow.agent.v1.rs";
    let fresh = std::fs::read_to_string(out.join(file)).unwrap_or_default();
    cleanup();
    let checked_in = std::fs::read_to_string(root.join("src/gen").join(file)).unwrap_or_default();
    assert!(
        fresh == checked_in,
        "proto/src/gen/{file} differs from what proto/cortexflow/agent/v1/agent.proto generates: run `cargo xtask protogen` and commit the result"
    );
}
