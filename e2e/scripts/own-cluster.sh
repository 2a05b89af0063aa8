# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # label, cluster_name and ports come from the caller; tools and work go to it
# Sourced by e2e/packaging.sh and e2e/docs.sh: a fresh local cluster of the caller's own (state
# directory and ports, so a leftover of another suite cannot interfere), the pinned tools, a
# scratch directory, and teardown on exit. Before sourcing, the caller sets `label` (its log
# prefix), `cluster_name` and `ports` ("apiserver etcd etcd-peer prometheus ingress").
# Gives: root, cache, cluster, tools, work, say, fail, cleanup (the EXIT trap).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
export EMBEDROLL_CLUSTER_DIR="$cache/$cluster_name"
read -r EMBEDROLL_APISERVER_PORT EMBEDROLL_ETCD_PORT EMBEDROLL_ETCD_PEER_PORT \
  EMBEDROLL_PROMETHEUS_PORT EMBEDROLL_INGRESS_PORT <<<"$ports"
export EMBEDROLL_APISERVER_PORT EMBEDROLL_ETCD_PORT EMBEDROLL_ETCD_PEER_PORT \
  EMBEDROLL_PROMETHEUS_PORT EMBEDROLL_INGRESS_PORT
cluster="$root/e2e/cluster"
say() { printf '%s: %s\n' "$label" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

if ip link show embedroll0 >/dev/null 2>&1; then
  fail "another local cluster is running (bridge embedroll0 exists); run e2e/cluster down first"
fi
rm -rf "$EMBEDROLL_CLUSTER_DIR"
tools="$(e2e/scripts/build-tools.sh)"
work="$(mktemp -d)"
cleanup() {
  "$cluster" down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
