#!/usr/bin/env bash
# Builds the local cluster's upstream binaries from their published Go modules, pinned, into
# ${EMBEDROLL_CACHE:-~/.cache/embedroll}/k8s-$K8S_VERSION/bin (never into the repository):
# kube-apiserver, kube-controller-manager, kube-scheduler, kubectl from k8s.io/kubernetes and
# etcd from go.etcd.io/etcd/server/v3 at the version that Kubernetes release pins.
# Idempotent: a complete, stamped bin directory is reused. Prints its bin directory last.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
# k8s.io/kubernetes v1.36.3's go.mod pins the etcd v3.6.8 libraries.
ETCD_VERSION="${ETCD_VERSION:-v3.6.8}"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
root="$cache/k8s-$K8S_VERSION"
bin="$root/bin"
stamp="$bin/.embedroll-build"
want="k8s=$K8S_VERSION etcd=$ETCD_VERSION go=$(go env GOVERSION)"
components=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

log() { printf 'build-k8s: %s\n' "$*" >&2; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$bin" "$root/kubernetes" "$root/etcd"
export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local
started=$SECONDS

# --- Kubernetes: a wrapper module that requires k8s.io/kubernetes and maps every staging
# module (k8s.io/api, ...) to its published v0.Y.Z, as k8s.io/kubernetes itself cannot be
# required without those replace lines.
log "resolving k8s.io/kubernetes $K8S_VERSION"
kmod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')"
staging_version="v0.${K8S_VERSION#v1.}"
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
{
  echo "module embedroll.dev/k8s-build"
  echo
  echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$kmod" | awk -v v="$staging_version" '{ print "\t" $1 " => " $1 " " v }'
  echo ")"
} > "$root/kubernetes/go.mod"
log "$(grep -c ' => ' "$root/kubernetes/go.mod") staging modules mapped to $staging_version"

ldflags="-s -w"
for kv in "gitVersion=$K8S_VERSION" "gitMajor=1" "gitMinor=$minor" "gitTreeState=clean" \
          "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
  ldflags+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
done
(
  cd "$root/kubernetes"
  for component in "${components[@]}"; do
    log "building $component (cold: several minutes each on 2 cores)"
    t=$SECONDS
    go build -trimpath -ldflags "$ldflags" -o "$bin/$component.tmp" "k8s.io/kubernetes/cmd/$component"
    mv "$bin/$component.tmp" "$bin/$component"
    log "$component built in $((SECONDS - t))s"
  done
)

# --- etcd: its main package lives in a module that cannot be required, so a three-line main
# calls the server's etcdmain, exactly what the etcd binary does.
log "building etcd $ETCD_VERSION"
cat > "$root/etcd/go.mod" <<MOD
module embedroll.dev/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
cat > "$root/etcd/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
(
  cd "$root/etcd"
  go mod tidy >/dev/null 2>&1 || go mod tidy
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" .
  mv "$bin/etcd.tmp" "$bin/etcd"
)

"$bin/kube-apiserver" --version >&2
# sed reads to the end: head would close the pipe and fail the script under pipefail.
"$bin/etcd" --version | sed -n 1p >&2
echo "$want" > "$stamp"
log "done in $((SECONDS - started))s"
echo "$bin"
