#!/usr/bin/env bash
# Creates (once) the Python environment holding sentence-transformers, used only to make the
# parity fixtures and to run the benchmark's peer. Tests never need it.
# Usage: python-env.sh [--print-python]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
venv="$cache/st-venv"
if [[ "${1:-}" == "--print-python" ]]; then
  echo "$venv/bin/python"
  exit 0
fi
req="$here/requirements-reference.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "python-env: installing sentence-transformers into $venv (first time: a few GB, minutes)" >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
echo "$want" > "$stamp"
