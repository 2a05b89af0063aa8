#!/usr/bin/env bash
# The operator's load on the apiserver, as the apiserver itself counts it
# (apiserver_request_total by verb, for the kinds only the operator writes), per rollout per
# minute in three states: idle Healthy, held at a weight with analysis running, and a canary
# held partly Ready (one of its two pods stopped, so it stays unready); plus the writes of a
# whole 1 -> 10 -> 50 -> 100 rollout. Goals: idle 0 requests/min, held partly Ready <= 6
# requests/min, a whole rollout <= 60 writes.
#
# It is the rollout scenario l_operator_api_load (e2e/tests/rollouts.rs) on a local cluster
# of its own, with minute-long windows; ./e2e/test runs the same scenario with 20s windows.
#   e2e/bench/operator-load.sh [WINDOW_SECONDS]   (default 60)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export EMBEDROLL_LOAD_WINDOW_SECONDS="${1:-60}"
printf 'operator-load: %ss windows; machine: %s, %s cores\n' "$EMBEDROLL_LOAD_WINDOW_SECONDS" \
  "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" "$(nproc)"
exec "$root/e2e/scenarios.sh" l_operator_api_load
