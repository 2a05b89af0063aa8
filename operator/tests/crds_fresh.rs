//! `crds/` is generated from the Rust types; this fails when someone changes the types and
//! forgets `embedroll-operator crdgen > crds/embeddingrollouts.embedroll.dev.yaml`.

#[test]
fn committed_crd_matches_the_rust_types() {
    // The manifest dir at run time, not compile time: checkouts that share a target directory
    // reuse each other's test binaries (cargo hashes workspace members by relative path).
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let path = manifest_dir.join("../crds/embeddingrollouts.embedroll.dev.yaml");
    let committed =
        std::fs::read_to_string(&path).expect("crds/embeddingrollouts.embedroll.dev.yaml exists");
    let generated = embedroll_operator::crd_yaml();
    assert!(
        committed == generated,
        "crds/ is stale: run `cargo run -p embedroll-operator -- crdgen > crds/embeddingrollouts.embedroll.dev.yaml`"
    );
}

#[test]
fn crd_fits_client_side_apply() {
    // kubectl apply (client side) stores the object in an annotation limited to 256 KiB.
    let size = embedroll_operator::crd_yaml().len();
    assert!(size < 240 * 1024, "CRD is {size} bytes");
}
