#!/usr/bin/env bash
# The operator at scale: N EmbeddingRollouts (1 replica, pods on kwok's fake nodes, analysis
# without metrics) on a local real apiserver of their own. Prints the time until all are
# Healthy, the operator's RSS and CPU while idle at N, the API requests per minute it makes
# while idle (apiserver_request_total, the referee), the requests of a restarted operator
# reconciling all N again (a resync: nothing changed, so nothing is written), and the time and
# requests of an upgrade wave of 10% of them, each walking 1 -> 10 -> 50 -> 100.
#
#   e2e/bench/operator-scale.sh N [--check]
#
# --check (what ./e2e/test runs, at 200) fails unless idle makes 0 writes and every rollout of
# the wave is promoted. kwok (sigs.k8s.io/kwok, built from its Go module by
# e2e/scripts/build-kwok.sh) manages only nodes annotated kwok.x-k8s.io/node=fake, never the
# real local node, and gives fake pods addresses in 10.88.128.0/17 of the cluster's own bridge.
# No packet goes to them: their pods declare no port (Prometheus keeps only pods with an http
# or metrics port), their Ingresses have a class no controller serves, and nothing sends
# traffic. The cluster's own binaries are debug builds; the operator measured is a release
# build unless EMBEDROLL_OPERATOR_PROFILE=debug (what CI runs: one profile per CI run). The
# operator's client-side limits come from EMBEDROLL_KUBE_API_QPS / EMBEDROLL_KUBE_API_BURST
# (defaults 20 / 40); the time to Healthy at large N is bound by them.
set -euo pipefail
n="${1:?usage: e2e/bench/operator-scale.sh N [--check]}"
check="${2:-}"
[[ $n =~ ^[0-9]+$ && $n -ge 10 ]] || { echo "N must be a number >= 10" >&2; exit 2; }
# Below 32768: a port in the ephemeral range can be taken by any outgoing connection (it was).
label=operator-scale cluster_name=scale-cluster ports="25443 21379 21380 29290 28288"
# shellcheck source=e2e/scripts/own-cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/own-cluster.sh"
export EMBEDROLL_PROFILE=debug
operator_profile="${EMBEDROLL_OPERATOR_PROFILE:-release}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
ns=scale
metrics_port=18381
kwok_port=10347

kwok_bin="$(e2e/scripts/build-kwok.sh)"
stages="$(dirname "$kwok_bin")/stages"
say "N=$n; machine: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
"$cluster" up >/dev/null 2>"$work/up.log" || { cat "$work/up.log"; fail "cluster up"; }
eval "$("$cluster" env)"
"$cluster" crds >/dev/null
# Nothing here sends traffic or reads metrics: Traefik (which watches every Service and
# EndpointSlice) and Prometheus (which discovers every pod) would only take CPU from what is
# measured.
"$cluster" stop traefik >/dev/null
"$cluster" stop prometheus >/dev/null
logs="$EMBEDROLL_CLUSTER_DIR/logs"
if [[ $operator_profile == release ]]; then
  say "building the operator (release)"
  cargo build --release --locked --quiet -p embedroll-operator --bin embedroll-operator
  bin="$CARGO_TARGET_DIR/release"
else
  bin="$CARGO_TARGET_DIR/debug"
fi
qps="${EMBEDROLL_KUBE_API_QPS:-20}" burst="${EMBEDROLL_KUBE_API_BURST:-40}"
export EMBEDROLL_KUBE_API_QPS="$qps" EMBEDROLL_KUBE_API_BURST="$burst"
say "operator: $operator_profile build, client limits $qps QPS / burst $burst"

pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  cleanup
}
trap stop_all EXIT

# ---- kwok and its fake nodes
mkdir -p "$EMBEDROLL_CLUSTER_DIR/kwok"
KWOK_WORKDIR="$EMBEDROLL_CLUSTER_DIR/kwok" "$kwok_bin/kwok" \
  --kubeconfig "$KUBECONFIG" \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --cidr 10.88.128.0/17 \
  --node-lease-duration-seconds 40 \
  --server-address "127.0.0.1:$kwok_port" \
  --config "$stages/node-initialize.yaml" --config "$stages/node-heartbeat-with-lease.yaml" \
  --config "$stages/pod-ready.yaml" --config "$stages/pod-complete.yaml" \
  --config "$stages/pod-delete.yaml" >"$logs/kwok.log" 2>&1 &
pids+=($!)
nodes=$(((n + 999) / 1000))
for ((i = 0; i < nodes; i++)); do
  cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations: {kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: "0"}
  labels: {type: kwok, kubernetes.io/hostname: kwok-node-$i, kubernetes.io/os: linux, kubernetes.io/arch: amd64}
spec:
  taints: [{key: kwok.x-k8s.io/node, value: fake, effect: NoSchedule}]
---
EOF
done | kubectl create -f - >/dev/null
kubectl wait node -l type=kwok --for=condition=Ready --timeout=60s >/dev/null ||
  fail "kwok did not make its nodes Ready (log: $logs/kwok.log)"
real_node_kwok=$(kubectl get node embedroll-local -o jsonpath='{.metadata.annotations.kwok\.x-k8s\.io/node}')
[[ -z $real_node_kwok ]] || fail "kwok took over the real node"
say "kwok manages $nodes fake node(s); the real node is not one of them"
kubectl create namespace "$ns" >/dev/null

# ---- the operator (no Prometheus: the rollouts have no metrics)
"$bin/embedroll-operator" --metrics-listen "127.0.0.1:$metrics_port" --leader-election false \
  >"$logs/operator.log" 2>&1 &
operator=$!
pids+=("$operator")

# Prints N rollouts as YAML; $1 is a revision marker in the pod template (a new one upgrades).
rollouts() { # marker first count
  local marker=$1 first=$2 count=$3 i
  for ((i = first; i < first + count; i++)); do
    cat <<EOF
apiVersion: embedroll.dev/v1alpha1
kind: EmbeddingRollout
metadata: {name: s-$i, namespace: $ns}
spec:
  replicas: 1
  template:
    metadata: {annotations: {bench/marker: "$marker"}}
    spec:
      nodeSelector: {type: kwok}
      tolerations: [{key: kwok.x-k8s.io/node, operator: Exists, effect: NoSchedule}]
      containers: [{name: embedder, image: embedder:bench}]
  traffic: {nginx: {host: s-$i.scale.local, ingressClassName: no-controller}}
  strategy: {scaleDownDelaySeconds: 5, abortScaleDownDelaySeconds: 5, progressDeadlineSeconds: 600}
  analysis: {interval: 2s}
  # Fake (kwok) pods must never receive a packet: no vector-compatibility check to them.
  compatibility: {enabled: false}
---
EOF
  done
}

# Counts of requests to the kinds only the operator writes, by verb (LIST/WATCH left out).
requests() {
  kubectl get --raw /metrics | awk '
    /^apiserver_request_total\{/ {
      if ($0 !~ /resource="(deployments|services|ingresses|embeddingrollouts)"/) next
      if ($0 ~ /resource="deployments"/ && $0 ~ /subresource="status"/) next
      match($0, /verb="[A-Z]+"/); verb = substr($0, RSTART + 6, RLENGTH - 7)
      if (verb == "LIST" || verb == "WATCH") next
      n[verb] += $NF
    }
    END { for (v in n) printf "%s %d\n", v, n[v] }' | sort
}
delta() { # before after -> "VERB n ..." and total, writes
  join -a2 -e0 -o 0,1.2,2.2 <(echo "$1") <(echo "$2") |
    awk '{d = $3 - $2; if (d > 0) { printf "%s=%d ", $1, d; t += d; if ($1 != "GET") w += d } } END { printf "| %d %d\n", t, w }'
}
# The bench's own polling is light (raw JSON, no decoding) and every few seconds at large N,
# so it takes little from what is measured; its LISTs are not counted.
poll=$((n >= 1000 ? 5 : 2))
healthy_count() {
  kubectl get --raw "/apis/embedroll.dev/v1alpha1/namespaces/$ns/embeddingrollouts" | grep -o '"phase":"Healthy"' | wc -l
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$operator/stat"; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$operator/status"; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$operator/status"; }

# ---- N rollouts
# The apiserver and etcd on 2 cores create about 130 rollouts' objects a minute: the limits
# grow with N.
limit=$((n * 3 / 4 > 1800 ? n * 3 / 4 : 1800))
started=$SECONDS
for ((first = 0; first < n; first += 500)); do
  count=$((n - first < 500 ? n - first : 500))
  rollouts v1 "$first" "$count" | kubectl apply --server-side --field-manager bench -f - >/dev/null
done
created=$((SECONDS - started))
while (($(healthy_count) < n)); do
  ((SECONDS - started < limit)) || fail "not all Healthy after ${limit}s ($(healthy_count)/$n)"
  sleep "$poll"
done
to_healthy=$((SECONDS - started))
say "$n rollouts created in ${created}s, all Healthy after ${to_healthy}s"

# ---- idle at N
sleep 10
window="${EMBEDROLL_SCALE_IDLE_SECONDS:-60}"
before=$(requests) ticks=$(cpu_ticks)
sleep "$window"
after=$(requests) ticks_after=$(cpu_ticks)
idle=$(delta "$before" "$after")
idle_total=${idle##*| }; idle_writes=${idle_total#* }; idle_total=${idle_total% *}
hz=$(getconf CLK_TCK)
cpu=$(awk -v t=$((ticks_after - ticks)) -v hz="$hz" -v w="$window" 'BEGIN { printf "%.2f", 100 * t / hz / w }')
rss=$(rss_mb) peak_rss=$(peak_rss_mb)
say "idle ${window}s at N=$n: ${idle_total} requests (${idle_writes} writes) = $(awk -v r="$idle_total" -v w="$window" 'BEGIN { printf "%.1f", r * 60 / w }')/min; operator RSS ${rss} MB (peak ${peak_rss} MB), CPU ${cpu}% of a core"

# ---- a restart: every rollout reconciled again from fresh caches, as after a resync
reconciles() { curl -s "http://127.0.0.1:$metrics_port/metrics" | awk '/^embedroll_operator_reconciles_total / {print $2}'; }
kill "$operator"
wait "$operator" 2>/dev/null || true
before=$(requests)
started=$SECONDS
"$bin/embedroll-operator" --metrics-listen "127.0.0.1:$metrics_port" --leader-election false \
  >>"$logs/operator.log" 2>&1 &
operator=$!
pids+=("$operator")
until (($(reconciles 2>/dev/null || echo 0) >= n)); do
  ((SECONDS - started < 600)) || fail "the restarted operator did not reconcile all $n rollouts in 10 minutes"
  sleep 1
done
resync_time=$((SECONDS - started))
sleep 5
after=$(requests)
resync=$(delta "$before" "$after")
resync_total=${resync##*| }; resync_writes=${resync_total#* }; resync_total=${resync_total% *}
say "restart at N=$n: all $n reconciled within ${resync_time}s; ${resync_total} requests, ${resync_writes} writes"

# ---- an upgrade wave of 10%
wave=$((n / 10))
before=$(requests)
started=$SECONDS
rollouts v2 0 "$wave" | kubectl apply --server-side --field-manager bench -f - >/dev/null
promoted() {
  # Wave rollouts are s-0 .. s-(wave-1); promoted = Healthy with nothing in flight and a
  # RolloutComplete that followed the new spec (observedGeneration caught up).
  kubectl get er -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.generation} {.status.observedGeneration} {.status.phase} {.status.canaryRevision}{"\n"}{end}' |
    awk -v wave="$wave" '{ split($1, p, "-"); if (p[2] + 0 < wave && $2 == $3 && $4 == "Healthy" && $5 == "") c++ } END { print c + 0 }'
}
sleep 3
while (($(promoted) < wave)); do
  ((SECONDS - started < limit)) || fail "wave not promoted after ${limit}s ($(promoted)/$wave)"
  sleep "$poll"
done
wave_time=$((SECONDS - started))
after=$(requests)
wave_delta=$(delta "$before" "$after")
wave_total=${wave_delta##*| }; wave_writes=${wave_total#* }; wave_total=${wave_total% *}
# Less the bench's own apply of each wave rollout.
wave_writes=$((wave_writes - wave))
wave_total=$((wave_total - wave))
revisions=$(kubectl get er -n "$ns" -o jsonpath='{range .items[*]}{.status.stableRevision}{"\n"}{end}' | sort | uniq -c | wc -l)
say "wave of $wave: all promoted in ${wave_time}s; ${wave_total} requests, ${wave_writes} writes ($(awk -v w="$wave_writes" -v n="$wave" 'BEGIN { printf "%.1f", w / n }') per rollout); stable revisions now: $revisions"
printf '\n| N | QPS/burst | all Healthy | RSS idle | CPU idle | requests/min idle | restart: writes | wave (%s) | wave writes/rollout |\n|---|---|---|---|---|---|---|---|---|\n' "$wave"
printf '| %s | %s/%s | %ss | %s MB | %s%% | %s (%s writes) | %s | %ss | %s |\n' "$n" "$qps" "$burst" "$to_healthy" "$rss" "$cpu" \
  "$(awk -v r="$idle_total" -v w="$window" 'BEGIN { printf "%.1f", r * 60 / w }')" "$idle_writes" "$resync_writes" "$wave_time" \
  "$(awk -v w="$wave_writes" -v n="$wave" 'BEGIN { printf "%.1f", w / n }')"

if [[ $check == --check ]]; then
  ((idle_writes == 0)) || fail "idle at N=$n made $idle_writes writes"
  ((resync_writes == 0)) || fail "reconciling $n unchanged rollouts after a restart made $resync_writes writes"
  ((revisions == 2)) || fail "expected two stable revisions after the wave, found $revisions"
  say "check passed: idle and a restart made 0 writes, every rollout of the wave promoted"
fi
