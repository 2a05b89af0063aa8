#!/usr/bin/env bash
# Builds kwok (sigs.k8s.io/kwok/cmd/kwok) from its published Go module, pinned, into
# ${EMBEDROLL_CACHE:-~/.cache/embedroll}/kwok-$KWOK_VERSION/bin (never into the repository), and
# copies the node and pod lifecycle Stage manifests that module ships (kustomize/stage/...) into
# kwok-$KWOK_VERSION/stages/, one Stage per file, for `kwok --config FILE --config FILE ...`:
#   node-initialize.yaml            node/fast: a managed node becomes Ready (addresses, capacity)
#   node-heartbeat-with-lease.yaml  node/heartbeat-with-lease: slow status refresh; Ready is kept
#                                   by the node Lease kwok renews (--node-lease-duration-seconds)
#   node-heartbeat.yaml             node/heartbeat: status heartbeat every ~20-45s, for use
#                                   instead of the lease variant when leases are off
#   pod-ready.yaml                  pod/fast: a scheduled pod becomes Running/Ready with an IP
#   pod-complete.yaml               pod/fast: a Job's running pod Succeeds
#   pod-delete.yaml                 pod/fast: a deleted pod is removed at once
# node-initialize + node-heartbeat-with-lease + pod-ready/-complete/-delete is kwok's own
# default set (kustomize/stage/fast). Idempotent: a complete, stamped directory is reused.
# Prints its bin directory last.
set -euo pipefail

KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
root="$cache/kwok-$KWOK_VERSION"
bin="$root/bin"
stages="$root/stages"
stamp="$root/.embedroll-build"
want="kwok=$KWOK_VERSION go=$(go env GOVERSION)"
# module path (under kustomize/stage/) => file name in $stages
stage_files=(
  node/fast/node-initialize.yaml
  node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
  node/heartbeat/node-heartbeat.yaml
  pod/fast/pod-ready.yaml
  pod/fast/pod-complete.yaml
  pod/fast/pod-delete.yaml
)

log() { printf 'build-kwok: %s\n' "$*" >&2; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$bin/kwok" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$bin" "$stages"
# sigs.k8s.io/kwok has no replace directives, so `go install module/cmd@version` works as is;
# its version string is compiled in (pkg/consts.Version), no -X needed.
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local GOBIN="$bin"
started=$SECONDS

log "building kwok $KWOK_VERSION (cold: several minutes on 2 cores)"
go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
"$bin/kwok" --version >&2

log "copying Stage manifests from the module source"
dir="$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
if [[ -z "$dir" || ! -d "$dir/kustomize/stage" ]]; then
  log "no kustomize/stage in the module source ($dir)"
  exit 1
fi
for f in "${stage_files[@]}"; do
  install -m 0644 "$dir/kustomize/stage/$f" "$stages/$(basename "$f")"
done

echo "$want" > "$stamp"
log "done in $((SECONDS - started))s"
echo "$bin"
