#!/usr/bin/env bash
# Rollout scenarios (e2e/tests/rollouts.rs) on a local real cluster of their own (own state
# dir and ports), with the operator binary run out of cluster against it. Part of e2e/test.
#   a) first install  b) upgrade 1->10->50->100 with traffic shares  c) latency breach
#   d) error-rate breach  e) Prometheus down  f) operator killed at weight 10
#   g) invalid specs  h) manual promote/abort/retry  i) superseded canary
#   j)–r) samples, lost status, Gateway API, vectors, int8 (see the tests)
#   s) a refused traffic write loses no Event  t) the traffic provider switched mid-rollout
# Extra arguments go to the test binary, e.g. `e2e/scenarios.sh c_latency` runs one scenario.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
export EMBEDROLL_CLUSTER_DIR="$cache/scenarios-cluster"
export EMBEDROLL_APISERVER_PORT=26443 EMBEDROLL_ETCD_PORT=22379 EMBEDROLL_ETCD_PEER_PORT=22380
export EMBEDROLL_PROMETHEUS_PORT=29090 EMBEDROLL_INGRESS_PORT=28088
export EMBEDROLL_PROFILE="${EMBEDROLL_PROFILE:-debug}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cluster="$root/e2e/cluster"

say() { printf 'scenarios: %s\n' "$*"; }

if ip link show embedroll0 >/dev/null 2>&1; then
  say "another local cluster is running (bridge embedroll0 exists); run e2e/cluster down first"
  exit 1
fi
for model in all-MiniLM-L6-v2 sre-embedding-model; do
  [[ -f "$cache/models/$model/model.safetensors" ]] || { say "model $model missing; run embedder/models/fetch.sh"; exit 1; }
done

rm -rf "$EMBEDROLL_CLUSTER_DIR"
cleanup() {
  local status=$?
  pkill -f "embedroll-operator --metrics-listen 127.0.0.1:18181" 2>/dev/null || true
  if ((status != 0)); then
    say "logs: $EMBEDROLL_CLUSTER_DIR/logs (operator: $EMBEDROLL_CLUSTER_DIR/logs/operator.log)"
    tail -n 30 "$EMBEDROLL_CLUSTER_DIR/logs/operator.log" 2>/dev/null || true
  fi
  "$cluster" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

started=$SECONDS
"$cluster" up
eval "$("$cluster" env)"
"$cluster" crds
say "cluster up with the CRD in $((SECONDS - started))s"

if [[ $EMBEDROLL_PROFILE == release ]]; then bin_dir="$CARGO_TARGET_DIR/release"; else bin_dir="$CARGO_TARGET_DIR/debug"; fi
export EMBEDROLL_BIN_DIR="$bin_dir" EMBEDROLL_CLUSTER="$cluster" EMBEDROLL_E2E_LOGS="$EMBEDROLL_CLUSTER_DIR/logs"
export EMBEDROLL_MODELS_DIR="$cache/models"
profile_flag=()
[[ $EMBEDROLL_PROFILE == release ]] && profile_flag=(--release)
cargo test "${profile_flag[@]}" --locked -p embedroll-e2e --test rollouts -- --test-threads=1 --nocapture "$@"
say "scenarios done in $((SECONDS - started))s"
