//! The checked-in generated code must be what the `.proto` files generate today.

use std::path::Path;

#[test]
fn generated_code_matches_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::temp_dir().join(format!("cortexflow-protogen-{}", std::process::id()));
    let result = cortexflow_protogen::generate(root, &out);
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let stale: Vec<(&str, &str)> = cortexflow_protogen::PROTOS
        .iter()
        .filter(|(_, file)| read(&out, file) != read(&root.join("src/gen"), file))
        .copied()
        .collect();
    let _ = std::fs::remove_dir_all(&out);
    if let Err(e) = result {
        panic!("generating from the .proto files failed: {e:#}");
    }
    assert!(
        stale.is_empty(),
        "proto/src/gen differs from what the .proto files generate for {stale:?}: run `cargo xtask protogen` and commit the result"
    );
    // Nothing generated lies around without its .proto.
    let mut checked_in: Vec<String> = std::fs::read_dir(root.join("src/gen"))
        .expect("proto/src/gen")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    checked_in.sort();
    let mut expected: Vec<String> = cortexflow_protogen::PROTOS
        .iter()
        .map(|(_, f)| f.to_string())
        .collect();
    expected.sort();
    assert_eq!(checked_in, expected, "files in proto/src/gen");
}
