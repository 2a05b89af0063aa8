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
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="${TMPDIR:-/tmp}/embedder-noisy.log"
"$target/release/embedder" --listen "127.0.0.1:$port" --model "all-MiniLM-L6-v2=$model_dir" \
  --threads "$threads" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
python3 "$root/embedder/benches/noisy_neighbour.py" --port "$port" --requests "$requests" --threads "$threads"
