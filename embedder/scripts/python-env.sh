#!/usr/bin/env bash
# Creates (once) a Python environment for the benchmarks' peers, used only to make the parity
# fixtures and to run the peers. Tests never need them.
#   st   sentence-transformers (requirements-reference.txt), the default
#   ort  the same plus ONNX Runtime and the ONNX exporter (requirements-onnx.txt), for the
#        int8 benchmark's ONNX Runtime dynamic-INT8 peer
# Usage: python-env.sh [st|ort] [--print-python]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
kind=st
if [[ "${1:-}" == "st" || "${1:-}" == "ort" ]]; then kind="$1"; shift; fi
case "$kind" in
  st) venv="$cache/st-venv" req="$here/requirements-reference.txt" ;;
  ort) venv="$cache/ort-venv" req="$here/requirements-onnx.txt" ;;
esac
if [[ "${1:-}" == "--print-python" ]]; then
  echo "$venv/bin/python"
  exit 0
fi
stamp="$venv/.requirements.sha256"
want="$(cat "$req" "$here/requirements-reference.txt" | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "python-env: installing $(basename "$req") into $venv (first time: a few GB, minutes)" >&2
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req" >&2
echo "$want" > "$stamp"
