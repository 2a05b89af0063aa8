#!/usr/bin/env bash
# Benchmarks the embedder (release build, over HTTP) against sentence-transformers (in process)
# on all-MiniLM-L6-v2, same texts and thread count, in one run. Prints a markdown table with
# ratios. Not part of the tests: timings are reported, never asserted.
# Usage: embedder/benches/compare.sh [--threads N] [compare.py flags...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
threads=2
if [[ "${1:-}" == "--threads" ]]; then threads="$2"; shift 2; fi

"$root/embedder/scripts/python-env.sh"
py="$("$root/embedder/scripts/python-env.sh" --print-python)"
"$root/embedder/models/fetch.sh" all-MiniLM-L6-v2
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
model_dir="$cache/models/all-MiniLM-L6-v2"

echo "bench: building the embedder (release)" >&2
cargo build --release --quiet -p embedder --manifest-path "$root/Cargo.toml"
# shellcheck source=embedder/scripts/serve-local.sh
. "$root/embedder/scripts/serve-local.sh"
start_embedder "${CARGO_TARGET_DIR:-$root/target}/release/embedder" "${TMPDIR:-/tmp}/embedder-bench.log" \
  --model "all-MiniLM-L6-v2=$model_dir" --threads "$threads"
port="$EMBEDDER_PORT"

# The peer gets the same thread count; OMP/MKL pools follow torch.set_num_threads.
OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  "$py" "$root/embedder/benches/compare.py" --url "http://127.0.0.1:$port" --model-dir "$model_dir" \
  --threads "$threads" "$@"
