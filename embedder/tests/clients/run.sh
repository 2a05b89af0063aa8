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
# shellcheck source=embedder/scripts/serve-local.sh
. "$root/embedder/scripts/serve-local.sh"
export EMBEDDER_LOG=warn
start_embedder "$binary" "${TMPDIR:-/tmp}/embedder-clients.log" --threads 2 \
  --model-cache "$cache/models" --served-model-name text-embedding-3-small
"$venv/bin/python" "$here/test_clients.py" "http://127.0.0.1:$EMBEDDER_PORT"
