//! The benchmark scripts take their own flags in any position and hand the rest to their
//! Python side (`--dry-run` prints what they resolved and installs nothing). A Python flag
//! first once stopped the parsing, so `compare.sh --texts short --quantize int8` passed
//! `--quantize` to compare.py, which refused it.

use std::path::Path;
use std::process::Command;

fn dry_run(script: &str, args: &str) -> String {
    let args: Vec<&str> = args.split_whitespace().collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches")
        .join(script);
    let out = Command::new("bash")
        .arg(&path)
        .arg("--dry-run")
        .args(&args)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "{script} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn compare_sh_takes_its_flags_after_the_python_ones() {
    for args in [
        "--avx2-only --texts short --quantize int8 --int8-kernel avx2",
        "--texts short --avx2-only --quantize int8 --int8-kernel avx2",
    ] {
        assert_eq!(
            dry_run("compare.sh", args),
            "build: release --no-default-features\n\
             embedder: --model all-MiniLM-L6-v2=MODEL_DIR:int8 --int8-kernel avx2 --threads 2\n\
             compare.py: --threads 2 --texts short\n",
            "{args}"
        );
    }
}

#[test]
fn int8_sh_takes_its_flags_after_the_python_ones() {
    assert_eq!(
        dry_run("int8.sh", "--texts short --int8-kernel avx2"),
        "int8 kernel: avx2\nint8.py: --threads 2 --texts short\n"
    );
}
