#!/usr/bin/env bash
# The README's main job: a progressive rollout on a local real cluster, end to end.
#   1. fetches the model, brings up the local cluster (e2e/cluster up: apiserver, kubelet,
#      Traefik, Prometheus), installs the CRD and starts the operator;
#   2. installs an EmbeddingRollout and sends traffic through Traefik (its ingress-nginx
#      provider);
#   3. upgrades it: the new revision goes 1% -> 10% -> 50% -> 100%, gated on Prometheus;
#   4. upgrades it to a slow revision (--fault-latency-ms): rolled back automatically.
# Live `kubectl get er` lines show each step. The cluster stays up afterwards to explore
# (`eval "$(e2e/cluster env)"; kubectl get er,pods -A; target/.../embedroll status demo -n demo`);
# `e2e/cluster down` stops it. Needs root (pod network namespaces).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
profile="${EMBEDROLL_PROFILE:-release}"
bin="$CARGO_TARGET_DIR/$profile"
[[ $profile == debug ]] || bin="$CARGO_TARGET_DIR/release"
ns=demo

say() { printf '\n\033[1mdemo: %s\033[0m\n' "$*"; }

embedder/models/fetch.sh
e2e/cluster deps
e2e/cluster up
eval "$(e2e/cluster env)"
cluster_dir="${EMBEDROLL_CLUSTER_DIR:-$cache/cluster}"
e2e/cluster crds

# The pid file lets `e2e/cluster down` stop the operator with the cluster.
operator_pid="$cluster_dir/run/embedroll-operator.pid"
if ! { [[ -f $operator_pid ]] && kill -0 "$(cat "$operator_pid")" 2>/dev/null; }; then
  say "starting the operator (log: $cluster_dir/logs/operator.log, metrics: http://127.0.0.1:18080/metrics)"
  setsid "$bin/embedroll-operator" --metrics-listen 127.0.0.1:18080 --prometheus-url "$PROMETHEUS_URL" \
    >>"$cluster_dir/logs/operator.log" 2>&1 </dev/null &
  echo $! >"$operator_pid"
fi

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl delete embeddingrollout demo -n "$ns" --ignore-not-found --wait=true >/dev/null
kubectl delete events -n "$ns" --all >/dev/null  # a fresh story for `kubectl events`

rollout() { # extra embedder args...
  local args='"--listen", "0.0.0.0:8080", "--threads", "1"'
  for a in "$@"; do args+=", \"$a\""; done
  kubectl apply -n "$ns" -f - >/dev/null <<YAML
apiVersion: embedroll.dev/v1alpha1
kind: EmbeddingRollout
metadata: {name: demo}
spec:
  replicas: 1
  model: {name: all-MiniLM-L6-v2, dimensions: 384}
  template:
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: embedder
          image: ghcr.io/embedroll/embedroll-embedder:0.1.0
          args: [$args]
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /health/ready, port: http}, periodSeconds: 1}
  traffic:
    nginx: {host: demo.example.com, paths: [/api/v1/embed, /v1/embeddings]}
  strategy: {scaleDownDelaySeconds: 10}
  analysis:
    interval: 5s
    minRequests: 5
    failureLimit: 1
    metrics:
      - {name: p95-latency, preset: LatencyP95, max: 100ms}
      - {name: error-rate, preset: ErrorRate, max: "0.01"}
YAML
}

row() { # the `kubectl get er` columns, at fixed widths so successive lines line up
  kubectl get er demo -n "$ns" -o jsonpath='{.status.phase}{"\t"}{.status.stableRevision}{"\t"}{.status.canaryRevision}{"\t"}{.status.canaryWeight}{"\t"}{.status.currentStepIndex}{"\t"}{.status.analysis.latencyP95}{"\t"}{.status.analysis.errorRate}{"\t"}{.status.weightCheck.observedPercent}' 2>/dev/null |
    awk -F'\t' '{printf "%-12s %-11s %-11s %-7s %-5s %-8s %-7s %s\n", $1, $2, $3, $4, $5, $6, $7, $8}'
}

watch_until() { # phase... : print the rollout's row whenever it changes
  local last="" line phase deadline=$((SECONDS + 300)) t0=$SECONDS
  printf '%-5s %-12s %-11s %-11s %-7s %-5s %-8s %-7s %s\n' TIME PHASE STABLE CANARY WEIGHT STEP P95 ERRORS OBSERVED%
  while ((SECONDS < deadline)); do
    line="$(row || true)"
    if [[ -n $line && $line != "$last" ]]; then
      printf '%-5s %s\n' "+$((SECONDS - t0))s" "$line"
      last="$line"
    fi
    phase="${line%% *}"  # from the row just printed, so the last state is always shown
    for want in "$@"; do [[ $phase == "$want" ]] && return 0; done
    sleep 0.5
  done
  echo "demo: gave up waiting for $*" >&2
  return 1
}

say "1/3 install: revision 1 goes straight to 100% once Ready"
rollout
watch_until Healthy

say "traffic: 4 clients posting embeddings through Traefik (Host demo.example.com)"
# Enough requests that even the 1% step sees minRequests canary requests per interval.
python3 - "${INGRESS_URL#http://}" >/dev/null 2>&1 <<'PY' &
import http.client, json, sys, threading, time
host, port = sys.argv[1].split(":")
def client(worker):
    n = 0
    while True:
        n += 1
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("POST", "/api/v1/embed", json.dumps({"texts": [f"demo client {worker} request {n}"]}),
                         {"Host": "demo.example.com", "Content-Type": "application/json"})
            conn.getresponse().read()
            conn.close()
        except Exception:
            time.sleep(0.1)
for worker in range(4):
    threading.Thread(target=client, args=(worker,), daemon=True).start()
while True:
    time.sleep(60)
PY
traffic=$!
trap 'kill $traffic 2>/dev/null || true' EXIT
sleep 3

say "2/3 upgrade: revision 2 on the idle color, 1% -> 10% -> 50% -> 100%, each step gated on P95 and error rate"
rollout --max-batch-tokens 8192
sleep 1
watch_until Healthy
kubectl events -n "$ns" --for embeddingrollout/demo | tail -n 12

say "3/3 faulty upgrade: revision 3 answers 300 ms slower; the P95 check fails and it is rolled back"
rollout --max-batch-tokens 8192 --fault-latency-ms 300
sleep 1
watch_until Failed
"$bin/embedroll" status demo -n "$ns"
kubectl events -n "$ns" --for embeddingrollout/demo --types Warning | tail -n 6

say "operator: reconcile latency and memory"
pid="$(cat "$operator_pid")"
curl -s http://127.0.0.1:18080/metrics | python3 -c '
import re, sys
text = sys.stdin.read()
def value(name):
    m = re.search(r"^" + name + r"(?:\{[^}]*\})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0
count, total = value("embedroll_operator_reconcile_duration_seconds_count"), value("embedroll_operator_reconcile_duration_seconds_sum")
buckets = [(float(le), float(v)) for le, v in re.findall(r"^embedroll_operator_reconcile_duration_seconds_bucket\{le=\"([0-9.e+-]+)\"\} ([0-9.e+-]+)$", text, re.M)]
p95 = next((le for le, v in sorted(buckets) if count and v >= 0.95 * count), float("nan"))
print(f"{count:.0f} reconciles, mean {1000 * total / max(count, 1):.1f} ms, P95 <= {1000 * p95:.0f} ms (histogram bucket)")'
grep -E "VmRSS|VmHWM" "/proc/$pid/status" | tr -s ' \t' ' '

say "done. The cluster stays up: eval \"\$(e2e/cluster env)\"; kubectl get er -A; $bin/embedroll status demo -n $ns. Stop it with e2e/cluster down."
