#!/usr/bin/env bash
# Small requests beside heavy and slow clients: the P50/P95 of one-text requests alone, then
# while one client keeps posting maximal requests (256 texts of ~220 words), then while 200
# slow-loris connections are open (headers and the start of a body, then nothing). Release
# build, default flags, 2 compute threads. Prints ratios against the alone run; timings are
# reported, never asserted. Goal: heavy neighbour P95 <= 3x alone; slow-loris changes nothing.
# Usage: embedder/benches/noisy-neighbour.sh [--threads N] [--requests N]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
threads=2
requests=200
while (($#)); do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --requests) requests="$2"; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
"$root/embedder/models/fetch.sh" all-MiniLM-L6-v2
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
model_dir="$cache/models/all-MiniLM-L6-v2"
target="${CARGO_TARGET_DIR:-$root/target}"

echo "bench: building the embedder (release)" >&2
cargo build --release --quiet -p embedder --manifest-path "$root/Cargo.toml"
# shellcheck source=embedder/scripts/serve-local.sh
. "$root/embedder/scripts/serve-local.sh"
start_embedder "$target/release/embedder" "${TMPDIR:-/tmp}/embedder-noisy.log" \
  --model "all-MiniLM-L6-v2=$model_dir" --threads "$threads"
port="$EMBEDDER_PORT"
python3 "$root/embedder/benches/noisy_neighbour.py" --port "$port" --requests "$requests" --threads "$threads"
