#!/usr/bin/env bash
# Smoke test of the local real cluster (part of e2e/test; needs root for pod network
# namespaces). On a cluster of its own (own state dir and ports):
#   1. up; a blue and a green embedder Deployment + Service, applied with plain kubectl,
#      become Ready through the local kubelet's readiness probes;
#   2. an Ingress through Traefik (its ingress-nginx provider) returns embeddings;
#   3. a canary Ingress at canary-weight 30 sends 30% ± 7% of 1000 requests to green, whose
#      Service port has no name (as `kubectl expose` makes it)
#      (±7 points is about 4.8 standard deviations of a binomial(1000, 0.3)), counted exactly
#      from each pod's own embedder_requests_total;
#   4. Prometheus returns a non-empty histogram_quantile(0.95, ...) for the pods;
#   5. down leaves no process, port or network namespace behind.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${EMBEDROLL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/embedroll}"
export EMBEDROLL_CLUSTER_DIR="$cache/smoke-cluster"
export EMBEDROLL_APISERVER_PORT=16443 EMBEDROLL_ETCD_PORT=12379 EMBEDROLL_ETCD_PEER_PORT=12380
export EMBEDROLL_PROMETHEUS_PORT=19090 EMBEDROLL_INGRESS_PORT=18088
model_dir="$cache/models/all-MiniLM-L6-v2"
cluster="$root/e2e/cluster"

say() { printf 'smoke: %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }

if ip link show embedroll0 >/dev/null 2>&1; then
  fail "another local cluster is running (bridge embedroll0 exists); run e2e/cluster down first"
fi
[[ -f "$model_dir/model.safetensors" ]] || fail "model missing at $model_dir; run embedder/models/fetch.sh"

rm -rf "$EMBEDROLL_CLUSTER_DIR"
cleanup() {
  local status=$?
  if ((status != 0)) && [[ -d "$EMBEDROLL_CLUSTER_DIR/logs" ]]; then
    say "logs: $EMBEDROLL_CLUSTER_DIR/logs"
    tail -n 20 "$EMBEDROLL_CLUSTER_DIR"/logs/local-kubelet.log "$EMBEDROLL_CLUSTER_DIR"/logs/traefik.log 2>/dev/null || true
  fi
  "$cluster" down >/dev/null 2>&1 || true
}
trap cleanup EXIT

started=$SECONDS
"$cluster" up
eval "$("$cluster" env)"
say "cluster up in $((SECONDS - started))s"

for color in blue green; do
  # green's Service port has no name, like one `kubectl expose` makes.
  port='{name: http, port: 80, targetPort: http}'
  [[ $color == blue ]] || port='{port: 80, targetPort: 8080}'
  kubectl apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: embedder-$color}
spec:
  replicas: 1
  selector: {matchLabels: {app: embedder, color: $color}}
  template:
    metadata:
      labels: {app: embedder, color: $color, embedroll.dev/rollout: smoke, embedroll.dev/color: $color}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: embedder
        image: ghcr.io/embedroll/embedroll-embedder:smoke
        args: ["--listen", "\$(POD_IP):8080", "--model", "all-MiniLM-L6-v2=$model_dir", "--threads", "1"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /health/ready, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: embedder-$color}
spec: {selector: {app: embedder, color: $color}, ports: [$port]}
EOF
done
kubectl rollout status deployment/embedder-blue --timeout=120s
kubectl rollout status deployment/embedder-green --timeout=120s
kubectl get pods -o wide

ingress() { # name service [annotations-json]
  local annotations="${3:-}"
  [[ -n $annotations ]] || annotations='{}'
  kubectl apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: $1, annotations: $annotations}
spec:
  ingressClassName: nginx
  rules: [{host: api.example.com, http: {paths: [{path: /api/v1/embed, pathType: Prefix, backend: {service: {name: $2, port: {number: 80}}}}]}}]
EOF
}
ingress embedder embedder-blue
post() { curl -s -o "$1" -w '%{http_code}' -H 'Host: api.example.com' "$INGRESS_URL/api/v1/embed" -d '{"texts":["Hello world"]}'; }
body="$(mktemp)"
for _ in $(seq 1 100); do [[ "$(post "$body")" == 200 ]] && break; sleep 0.2; done
python3 - "$body" <<'PY' || fail "no embedding through Traefik"
import json, sys
r = json.load(open(sys.argv[1]))
v = r["embeddings"][0]
assert len(v) == 384 and abs(sum(x * x for x in v) - 1) < 1e-3, r
PY
say "embedding through Traefik: ok"

ingress embedder-canary embedder-green \
  '{"nginx.ingress.kubernetes.io/canary": "true", "nginx.ingress.kubernetes.io/canary-weight": "30"}'
sleep 2 # Traefik applies the change (providersThrottleDuration 500ms)
count() { # pod IP → its 200s on the native route
  curl -s "http://$1:8080/metrics" | awk '/^embedder_requests_total\{.*route="\/api\/v1\/embed".*code="200"\}/ {s += $2} END {print s + 0}'
}
blue_ip="$(kubectl get pod -l color=blue -o jsonpath='{.items[0].status.podIP}')"
green_ip="$(kubectl get pod -l color=green -o jsonpath='{.items[0].status.podIP}')"
blue0=$(count "$blue_ip"); green0=$(count "$green_ip")
python3 - "${INGRESS_URL#http://}" <<'PY' || fail "requests through Traefik failed"
import http.client, json, sys
host, port = sys.argv[1].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=30)
for i in range(1000):
    conn.request("POST", "/api/v1/embed", json.dumps({"texts": [f"request {i}"]}), {"Host": "api.example.com"})
    response = conn.getresponse()
    response.read()
    assert response.status == 200, response.status
PY
blue=$(( $(count "$blue_ip") - blue0 )); green=$(( $(count "$green_ip") - green0 ))
share=$(python3 -c "print(round($green / ($blue + $green), 3))")
say "canary-weight 30: green got $green of $((blue + green)) (share $share; accepted 0.23–0.37)"
(( blue + green == 1000 )) || fail "expected 1000 requests counted, got $((blue + green))"
python3 -c "import sys; sys.exit(0 if 0.23 <= $share <= 0.37 else 1)" || fail "canary share $share outside 0.30 ± 0.07"

query='histogram_quantile(0.95, sum by (le, color) (rate(embedder_request_duration_seconds_bucket{rollout="smoke"}[1m])))'
result=""
for _ in $(seq 1 30); do
  result="$(curl -s "$PROMETHEUS_URL/api/v1/query" --data-urlencode "query=$query")"
  # Both colors, each with a rate: a color scraped once since its traffic is NaN for a moment.
  python3 -c "import json,sys; r=json.loads(sys.argv[1])['data']['result']; sys.exit(0 if len(r) == 2 and all(float(x['value'][1]) > 0 for x in r) else 1)" "$result" && break
  sleep 1
done
python3 - "$result" <<'PY' || fail "Prometheus returned no P95 for both colors: $result"
import json, sys
r = json.loads(sys.argv[1])["data"]["result"]
p95 = {x["metric"]["color"]: float(x["value"][1]) for x in r}
assert set(p95) == {"blue", "green"} and all(v > 0 for v in p95.values()), p95
print("smoke: Prometheus P95 by color (s):", {k: round(v, 4) for k, v in p95.items()})
PY

trap - EXIT
"$cluster" down
leftovers=$(pgrep -f "$EMBEDROLL_CLUSTER_DIR|embedder --listen 10\.88\." || true)
[[ -z "$leftovers" ]] || fail "processes left after down: $leftovers"
for port in 16443 12379 12380 19090 18088 18089 18090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then fail "port $port still open after down"; fi
done
if ip netns list | grep -q '^embedroll-pod-'; then fail "pod network namespaces left after down"; fi
say "down left nothing running; smoke test passed in $((SECONDS - started))s"
