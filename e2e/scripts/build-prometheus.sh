#!/usr/bin/env bash
# Builds Prometheus and promtool from their Go module, pinned, into
# ${EMBEDROLL_CACHE:-~/.cache/embedroll}/prometheus-$PROMETHEUS_MODULE_VERSION/ and prints the
# prometheus binary's path. Debian's prometheus package is built without Kubernetes service
# discovery, which the cluster needs; only that discovery plugin is compiled in (remove_all_sd +
# enable_kubernetes_sd), which also keeps out plugins whose dependencies the Go proxy lacks.
# Idempotent: an existing stamped binary is reused.
set -euo pipefail
# Go module v0.316.0 is Prometheus 3.16.0.
PROMETHEUS_MODULE_VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-3.16.0}"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
root="$cache/prometheus-$PROMETHEUS_MODULE_VERSION"
binary="$root/prometheus"
stamp="$root/.embedroll-build"
want="prometheus=$PROMETHEUS_MODULE_VERSION go=$(go env GOVERSION)"
if [[ -x "$binary" && -x "$root/promtool" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "$binary"
  exit 0
fi
mkdir -p "$root/src"
cat > "$root/src/go.mod" <<MOD
module embedroll.dev/prometheus-build

go 1.26

require github.com/prometheus/prometheus $PROMETHEUS_MODULE_VERSION
MOD
cat > "$root/src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
	_ "github.com/prometheus/prometheus/cmd/promtool"
)
GO
echo "build-prometheus: building Prometheus $PROMETHEUS_VERSION (cold: about 2 minutes)" >&2
started=$SECONDS
(
  cd "$root/src"
  export CGO_ENABLED=0 GOFLAGS="-mod=mod -buildvcs=false" GOTOOLCHAIN=local
  go build -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    -o "$binary.tmp" github.com/prometheus/prometheus/cmd/prometheus
  # promtool (rule checks) from the same module and version.
  go build -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION" \
    -o "$root/promtool" github.com/prometheus/prometheus/cmd/promtool
)
mv "$binary.tmp" "$binary"
echo "$want" > "$stamp"
echo "build-prometheus: done in $((SECONDS - started))s" >&2
echo "$binary"
