//! Records the optimisation level this crate is compiled at, as `EMBEDDER_OPT_LEVEL`.
//!
//! The crate's own SIMD kernels (short attention, GELU, softmax) are chains of intrinsics that
//! only inlining turns into register code: unoptimised they run several times slower. The e2e
//! scenarios run the dev profile, so a profile that left this crate at opt-level 0 would fail
//! latency gates for no reason a user could see; the server warns at start-up, and a unit test
//! fails, when that happens.
fn main() {
    let level = std::env::var("OPT_LEVEL").unwrap_or_else(|_| "unknown".into());
    println!("cargo:rustc-env=EMBEDDER_OPT_LEVEL={level}");
    println!("cargo:rerun-if-changed=build.rs");
}
