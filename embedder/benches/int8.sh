#!/usr/bin/env bash
# Benchmarks --quantize int8 against the embedder's f32, sentence-transformers and ONNX
# Runtime's dynamic INT8 of all-MiniLM-L6-v2: same texts, same threads, one run. Prints a
# markdown table with the CPU flags it ran on. Not part of the tests: timings are reported,
# never asserted (the accuracy bar is tests/int8_accuracy.rs).
# Usage: embedder/benches/int8.sh [--threads N] [--int8-kernel NAME] [--dry-run] [int8.py flags, e.g. --texts short, in any order]
# --dry-run prints the int8 kernel and int8.py's own flags, installs nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
threads=2 kernel=auto passthrough=() dry_run=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --int8-kernel) kernel="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    # The Python side's flags (e.g. --texts short) pass through, before or after ours.
    *) passthrough+=("$1"); shift ;;
  esac
done
if $dry_run; then
  echo "int8 kernel: $kernel"
  echo "int8.py: --threads $threads${passthrough[*]:+ ${passthrough[*]}}"
  exit 0
fi

"$root/embedder/scripts/python-env.sh" ort
py="$("$root/embedder/scripts/python-env.sh" ort --print-python)"
"$root/embedder/models/fetch.sh" all-MiniLM-L6-v2
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
model_dir="$cache/models/all-MiniLM-L6-v2"

echo "bench: building the embedder (release)" >&2
cargo build --release --quiet -p embedder --manifest-path "$root/Cargo.toml"
binary="${CARGO_TARGET_DIR:-$root/target}/release/embedder"
# shellcheck source=embedder/scripts/serve-local.sh
. "$root/embedder/scripts/serve-local.sh"
start_embedder "$binary" "${TMPDIR:-/tmp}/embedder-bench-f32.log" \
  --model "all-MiniLM-L6-v2=$model_dir" --threads "$threads"
f32_port="$EMBEDDER_PORT" f32_pid="$EMBEDDER_PID"
start_embedder "$binary" "${TMPDIR:-/tmp}/embedder-bench-int8.log" \
  --model "all-MiniLM-L6-v2=$model_dir:int8" --int8-kernel "$kernel" --threads "$threads"
int8_port="$EMBEDDER_PORT" int8_pid="$EMBEDDER_PID"

# The peers get the same thread count; OMP/MKL pools follow torch.set_num_threads.
OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$py" "$root/embedder/benches/int8.py" --root "$root" --model-dir "$model_dir" \
  --onnx-dir "$cache/onnx/all-MiniLM-L6-v2" --threads "$threads" \
  --f32-url "http://127.0.0.1:$f32_port" --f32-pid "$f32_pid" \
  --int8-url "http://127.0.0.1:$int8_port" --int8-pid "$int8_pid" "${passthrough[@]}"
