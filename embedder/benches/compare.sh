#!/usr/bin/env bash
# Benchmarks the embedder (release build, over HTTP) against sentence-transformers (in process)
# on all-MiniLM-L6-v2, same texts and thread count, in one run. Prints a markdown table with
# ratios and the CPU flags it ran with. Not part of the tests: timings are reported, never
# asserted.
#   --avx2-only   both sides as on a CPU without AVX-512: the embedder built without its
#                 avx512 feature, torch/MKL/oneDNN capped at AVX2 by their own variables
#   --quantize int8 the embedder serves the model in int8 (the peer stays f32), with
#                 --int8-kernel NAME to force its kernel (e.g. avx2, what a CPU without VNNI runs)
#   --texts short 6-20-word texts instead of the default mixed 4-60 words
#   --dry-run     print what the run would serve and pass to compare.py, install nothing
# Usage: embedder/benches/compare.sh [--threads N] [--avx2-only] [--quantize int8 [--int8-kernel NAME]]
#        [compare.py flags, e.g. --texts short, in any order]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
threads=2 features=() suffix="" kernel=() passthrough=() dry_run=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --avx2-only)
      features=(--no-default-features)
      export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
      shift ;;
    --quantize) suffix=":$2"; shift 2 ;;
    --int8-kernel) kernel=(--int8-kernel "$2"); shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    # The Python side's flags (e.g. --texts short) pass through, before or after ours.
    *) passthrough+=("$1"); shift ;;
  esac
done
if $dry_run; then
  echo "build: release${features[*]:+ ${features[*]}}"
  echo "embedder: --model all-MiniLM-L6-v2=MODEL_DIR$suffix${kernel[*]:+ ${kernel[*]}} --threads $threads"
  echo "compare.py: --threads $threads${passthrough[*]:+ ${passthrough[*]}}"
  exit 0
fi

"$root/embedder/scripts/python-env.sh"
py="$("$root/embedder/scripts/python-env.sh" --print-python)"
"$root/embedder/models/fetch.sh" all-MiniLM-L6-v2
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
model_dir="$cache/models/all-MiniLM-L6-v2"

echo "bench: building the embedder (release${features[*]:+, ${features[*]}})" >&2
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release --quiet -p embedder --bin embedder --manifest-path "$root/Cargo.toml" "${features[@]}"
# A copy per feature set, so the two builds do not overwrite each other's binary mid-run.
binary="$target/release/embedder${features[*]:+-avx2-only}"
[[ ${#features[@]} -eq 0 ]] || cp "$target/release/embedder" "$binary"
# shellcheck source=embedder/scripts/serve-local.sh
. "$root/embedder/scripts/serve-local.sh"
start_embedder "$binary" "${TMPDIR:-/tmp}/embedder-bench.log" \
  --model "all-MiniLM-L6-v2=$model_dir$suffix" "${kernel[@]}" --threads "$threads"
port="$EMBEDDER_PORT"

# The peer gets the same thread count; OMP/MKL pools follow torch.set_num_threads.
OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$py" "$root/embedder/benches/compare.py" --url "http://127.0.0.1:$port" --model-dir "$model_dir" \
  --threads "$threads" "${passthrough[@]}"
