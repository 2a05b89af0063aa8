#!/usr/bin/env bash
# The embedder as existing clients call it: the official `openai` Python client (float and
# base64, its default) and huggingface_hub's InferenceClient (TEI's API), pinned in
# requirements.txt and installed once into a cached venv, against the real server binary
# on a loopback port. Run by ./e2e/test after the cargo tests (which build the binary).
# Usage: embedder/tests/clients/run.sh [path/to/embedder]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
venv="$cache/clients-venv"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "clients: installing the pinned Python clients into $venv (first time, seconds)" >&2
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
  echo "$want" > "$stamp"
fi

binary="${1:-}"
if [[ -z "$binary" ]]; then
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
  (cd "$root" && cargo build -q -p embedder --locked)
  binary="$CARGO_TARGET_DIR/debug/embedder"
fi
port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
log="$(mktemp)"
EMBEDDER_LOG=warn "$binary" --listen "127.0.0.1:$port" --threads 2 \
  --model-cache "$cache/models" --served-model-name text-embedding-3-small >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
  curl -fsS "http://127.0.0.1:$port/health/ready" >/dev/null 2>&1 && break
  kill -0 "$server" 2>/dev/null || { cat "$log" >&2; echo "clients: the embedder exited" >&2; exit 1; }
  sleep 0.1
done
"$venv/bin/python" "$here/test_clients.py" "http://127.0.0.1:$port"
