#!/usr/bin/env bash
# Packaging checks (part of e2e/test), with real tools installed by e2e/scripts/build-tools.sh:
#   1. the chart's copies of the CRD, the alerts and the dashboards are the ones in crds/ and
#      config/;
#   2. `helm lint --strict` of every chart with its default values and each ci/*-values.yaml;
#   3. every value of values.schema.json is documented in the chart's README; the schema and
#      the templates refuse bad values with a message naming them;
#   4. on a local real cluster of its own: every rendering (`helm template`) is accepted by the
#      apiserver with `kubectl apply --dry-run=server` (the Prometheus Operator's CRDs are
#      installed first, so ServiceMonitor/PodMonitor are checked against their real schemas);
#   5. promtool check rules on config/prometheus/ (the chart's PrometheusRule is a checked copy),
#      every runbook_url leads to a section of docs/runbook.md;
#      during the rollout of step 7, every alert is evaluated by the cluster's Prometheus without
#      error and its signal returns series, and so does every Grafana dashboard query;
#   6. hadolint on both Dockerfiles, actionlint (with shellcheck) on the workflows, shellcheck
#      on the project's scripts;
#   7. `helm install` of the operator chart on that cluster: its pods run with a token of the
#      chart's ServiceAccount (the local kubelet issues it), take the leader Lease and promote a
#      rollout through 50% and 100% gated on Prometheus, with traffic through Traefik; then the
#      embedder chart, whose pod serves embeddings.
set -euo pipefail
label=packaging cluster_name=packaging-cluster ports="26443 22379 22380 29090 28088"
# shellcheck source=e2e/scripts/own-cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/own-cluster.sh"
helm="$tools/helm"

cmp -s crds/embeddingrollouts.embedroll.dev.yaml charts/embedroll-operator/crds/embeddingrollouts.embedroll.dev.yaml ||
  fail "charts/embedroll-operator/crds/ differs from crds/; copy crds/embeddingrollouts.embedroll.dev.yaml there"
say "chart CRD matches crds/"
for board in config/grafana/*.json; do
  cmp -s "$board" "charts/embedroll-operator/files/dashboards/$(basename "$board")" ||
    fail "charts/embedroll-operator/files/dashboards/$(basename "$board") differs from $board; copy config/grafana/*.json there"
done
copies=(charts/embedroll-operator/files/dashboards/*) sources=(config/grafana/*.json)
[[ ${#copies[@]} == "${#sources[@]}" ]] ||
  fail "charts/embedroll-operator/files/dashboards/ holds dashboards config/grafana/ does not"
say "chart dashboards match config/grafana/"
cmp -s config/prometheus/embedroll.rules.yaml charts/embedroll-operator/files/embedroll.rules.yaml ||
  fail "charts/embedroll-operator/files/embedroll.rules.yaml differs from config/prometheus/embedroll.rules.yaml; copy it"
printf 'groups:\n  - name: bad\n    rules:\n      - alert: Bad\n        expr: rate(x[5m] > 1\n' >"$work/bad.rules.yaml"
if "$tools/promtool" check rules "$work/bad.rules.yaml" >/dev/null 2>&1; then fail "promtool passed a bad rule file"; fi
"$tools/promtool" check rules config/prometheus/*.rules.yaml >"$work/promtool.log" 2>&1 || { cat "$work/promtool.log"; fail "promtool check rules"; }
# Alerts that hinge on a missing series are unit-tested on series promtool makes up.
"$tools/promtool" test rules config/prometheus/embedroll.rules.test.yaml >"$work/promtool-test.log" 2>&1 ||
  { cat "$work/promtool-test.log"; fail "promtool test rules"; }
python3 - <<'PY' || fail "an alert's runbook_url has no section in docs/runbook.md"
import re
headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", re.sub(r"(?ms)^\s*```.*?^\s*```", "", open("docs/runbook.md").read()), re.M)}
urls = re.findall(r"runbook_url: \S+/docs/runbook\.md#(\S+)", open("config/prometheus/embedroll.rules.yaml").read())
missing = [u for u in urls if u not in headings]
for u in missing:
    print(f"packaging: runbook anchor #{u} not in docs/runbook.md")
raise SystemExit(1 if missing or not urls else 0)
PY
say "promtool check rules: $(grep -o 'SUCCESS: [0-9]* rules found' "$work/promtool.log" | tr '\n' ' ')(chart copy identical)"

renderings=()
for chart in charts/*/; do
  chart="${chart%/}"
  name="$(basename "$chart")"
  for values in "" "$chart"/ci/*-values.yaml; do
    [[ -z $values || -f $values ]] || continue
    rendering="$name${values:+ with $(basename "$values")}"
    args=(); [[ -n $values ]] && args=(-f "$values")
    "$helm" lint --strict "$chart" "${args[@]}" >"$work/lint.log" 2>&1 || { cat "$work/lint.log"; fail "helm lint: $rendering"; }
    out="$work/$name-$(basename "${values:-default}" .yaml).yaml"
    "$helm" template "$name" "$chart" -n embedroll-system --include-crds "${args[@]}" >"$out" ||
      fail "helm template: $rendering"
    renderings+=("$out")
    say "lint + template ok: $rendering ($(grep -c '^kind:' "$out") objects)"
  done
done

# Every value in the schema (which helm lint holds values.yaml to) is in the chart's README.
for chart in charts/*/; do
  python3 - "$chart" <<'PY' || fail "values missing from ${chart}README.md"
import json, sys
chart = sys.argv[1]
schema = json.load(open(chart + "values.schema.json"))
readme = open(chart + "README.md").read()
def leaves(node, path):
    props = node.get("properties")
    if not props or not path == "" and node.get("additionalProperties") is not False:
        yield path
        return
    for key, child in props.items():
        yield from leaves(child, f"{path}.{key}" if path else key)
missing = [p for p in leaves(schema, "") if f"`{p}`" not in readme]
for p in missing:
    print(f"packaging: {chart}README.md does not document `{p}`")
sys.exit(1 if missing else 0)
PY
  say "every value documented in ${chart}README.md"
done

# Bad values: refused, with the value named.
expect_refused() { # chart, expected text, helm args...
  local chart=$1 expected=$2; shift 2
  if "$helm" template x "$chart" "$@" >"$work/bad.log" 2>&1; then fail "accepted: $*"; fi
  grep -q -- "$expected" "$work/bad.log" || { cat "$work/bad.log"; fail "no '$expected' in the error for $*"; }
  say "refused as expected: $* ($(grep -m1 -- "$expected" "$work/bad.log" | sed 's/^ *//'))"
}
expect_refused charts/embedroll-operator "logFormat" --set operator.logFormat=xml
expect_refused charts/embedroll-operator "prometheusUrl" --set operator.prometheusUrl=prometheus:9090
expect_refused charts/embedroll-operator "replicaCount" --set replicaCount=0
expect_refused charts/embedroll-operator "leaderElection" --set replicaCount=2 --set operator.leaderElection=false
expect_refused charts/embedroll-operator "additional properties" --set operatr.logFormat=json
expect_refused charts/embedroll-operator "leaseName" --set operator.leaseName=Not_A_Name
expect_refused charts/embedder "modelCache/type" --set modelCache.type=nfs
expect_refused charts/embedder "embedder/models" --set "embedder.models={sre}"
expect_refused charts/embedder "ingress/paths" --set "ingress.paths={api}"
expect_refused charts/embedder "leaves no time" --set terminationGracePeriodSeconds=6
expect_refused charts/embedder "exceed terminationGracePeriodSeconds" --set embedder.shutdownTimeoutMs=40000

# Values that render differently: what the pod is told, and which objects exist.
expect_rendered() { # chart, what, python condition on the rendering `text` (re imported), helm args...
  local chart=$1 what=$2 condition=$3; shift 3
  "$helm" template x "$chart" "$@" >"$work/rendered.yaml" 2>"$work/rendered.log" ||
    { cat "$work/rendered.log"; fail "helm template: $*"; }
  python3 -c 'import re, sys; text = open(sys.argv[1]).read(); sys.exit(0 if eval(sys.argv[2]) else 1)' \
    "$work/rendered.yaml" "$condition" || fail "$what: not so with $*"
  say "rendered as expected: $what ($*)"
}
log_env='re.findall(r"- name: EMBEDDER_LOG_JSON\n\s+value: \"?(\w+)", text)'
# The image sets EMBEDDER_LOG_JSON=true: text logs need the chart to say false.
expect_rendered charts/embedder "text logs" "$log_env == ['false']" --set embedder.logJson=false
expect_rendered charts/embedder "JSON logs" "$log_env == ['true']"
expect_rendered charts/embedder "extraEnv's own log setting" "$log_env == ['false']" \
  --set 'embedder.extraEnv[0].name=EMBEDDER_LOG_JSON' --set-string 'embedder.extraEnv[0].value=false'
# A PDB needs a pod it may evict: none when the fewest pods that may run are minAvailable.
pdb='"kind: PodDisruptionBudget" in text'
expect_rendered charts/embedder "a PDB" "$pdb" --set replicaCount=2
expect_rendered charts/embedder "no PDB at 1 replica" "not $pdb" --set replicaCount=1
expect_rendered charts/embedder "no PDB when autoscaling may leave 1" "not $pdb" \
  --set autoscaling.enabled=true --set autoscaling.minReplicas=1
expect_rendered charts/embedder "no PDB when minAvailable is every pod" "not $pdb" \
  --set replicaCount=3 --set podDisruptionBudget.minAvailable=3
expect_rendered charts/embedder "a PDB by percentage" "$pdb" \
  --set replicaCount=2 --set-string podDisruptionBudget.minAvailable=50%
# Two operator releases in one namespace each need a Lease of their own.
expect_rendered charts/embedroll-operator "a Lease of its own" '"--lease-name=search-operator" in text' \
  --set operator.leaseName=search-operator
expect_rendered charts/embedroll-operator "the binary's Lease by default" '"--lease-name" not in text'

# Dockerfiles and workflows (no Docker engine or GitHub here: the release workflow builds and
# pushes the images; these are the checks that can run). Each tool is shown failing on a
# known-bad input first, so a silent pass cannot hide a broken tool.
printf 'FROM debian:latest\nRUN apt-get install curl\n' >"$work/Dockerfile.bad"
if "$tools/hadolint" "$work/Dockerfile.bad" >/dev/null 2>&1; then fail "hadolint passed a bad Dockerfile"; fi
"$tools/hadolint" Dockerfile.operator Dockerfile.embedder || fail "hadolint"
say "hadolint: Dockerfile.operator and Dockerfile.embedder clean"
mkdir -p "$work/bad/.github/workflows"
# shellcheck disable=SC2016 # the ${{ }} is GitHub's expression syntax, for actionlint
printf 'on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run: echo "${{ github.evnt }}"\n' \
  >"$work/bad/.github/workflows/bad.yml"
if (cd "$work/bad" && PATH="$tools:$PATH" "$tools/actionlint" >/dev/null 2>&1); then fail "actionlint passed a bad workflow"; fi
PATH="$tools:$PATH" "$tools/actionlint" .github/workflows/*.yml || fail "actionlint"
say "actionlint (with shellcheck): $(basename -a .github/workflows/*.yml | tr '\n' ' ')clean"
# The project's own shell scripts: the ones that install, run and test everything.
scripts=(.ci/run e2e/test e2e/cluster e2e/*.sh e2e/scripts/*.sh e2e/bench/*.sh)
# shellcheck disable=SC2016 # the bad script's $1 is meant literally
printf '#!/usr/bin/env bash\nrm -rf $1/\n' >"$work/bad.sh"
if "$tools/shellcheck" "$work/bad.sh" >/dev/null 2>&1; then fail "shellcheck passed a bad script"; fi
"$tools/shellcheck" -x "${scripts[@]}" || fail "shellcheck found problems in the project's scripts"
say "shellcheck: ${#scripts[@]} scripts clean"

say "cluster up for server-side dry runs"
"$cluster" up >/dev/null 2>"$work/up.log" || { cat "$work/up.log"; fail "cluster up"; }
eval "$("$cluster" env)"
kubectl apply --server-side -f "$tools/../crds/" >/dev/null
"$cluster" crds
for crd in servicemonitors podmonitors prometheusrules; do
  kubectl wait --for=condition=Established "crd/$crd.monitoring.coreos.com" --timeout=30s >/dev/null
done
for ns in embedroll-system search monitoring; do kubectl create namespace "$ns" >/dev/null; done
for out in "${renderings[@]}"; do
  kubectl apply --dry-run=server -f "$out" >"$work/dry.log" 2>&1 || { cat "$work/dry.log"; fail "apiserver refused $(basename "$out")"; }
  say "apiserver accepts $(basename "$out") (dry run): $(wc -l <"$work/dry.log") objects"
done
# The chart installed for real: the operator runs as two pods of the local kubelet, each with
# a token of the chart's ServiceAccount (so only the chart's RBAC lets it work), and completes
# a rollout gated on Prometheus with traffic through Traefik.
say "helm install of the operator chart (operator pods on the local kubelet)"
"$helm" install embedroll-operator charts/embedroll-operator -n embedroll-system --wait --timeout 3m \
  --set operator.prometheusUrl="$POD_PROMETHEUS_URL" --set operator.logFormat=text >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; kubectl -n embedroll-system get pods -o wide; fail "helm install"; }
kubectl -n embedroll-system rollout status deployment/embedroll-operator --timeout=90s >/dev/null ||
  { kubectl -n embedroll-system get pods -o wide; fail "the operator Deployment did not become Ready"; }
kubectl -n embedroll-system get pods -l app.kubernetes.io/instance=embedroll-operator --no-headers
lease_holder() { kubectl -n embedroll-system get lease embedroll-operator -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
for _ in $(seq 1 60); do [[ -n "$(lease_holder)" ]] && break; sleep 1; done
[[ -n "$(lease_holder)" ]] || fail "no operator pod took the leader Lease"
kubectl -n embedroll-system get pod "$(lease_holder)" >/dev/null 2>&1 ||
  fail "the Lease holder $(lease_holder) is not an operator pod"
say "leader: pod $(lease_holder)"

rollout() { # --max-batch-tokens value: a different value is a new revision
  kubectl apply -n search -f - >/dev/null <<YAML
apiVersion: embedroll.dev/v1alpha1
kind: EmbeddingRollout
metadata: {name: chart-check}
spec:
  replicas: 1
  model: {name: all-MiniLM-L6-v2, dimensions: 384}
  template:
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: embedder
          image: ghcr.io/embedroll/embedroll-embedder:0.1.0
          args: ["--listen", "0.0.0.0:8080", "--threads", "1", "--max-batch-tokens", "$1"]
          ports: [{name: http, containerPort: 8080}]
          readinessProbe: {httpGet: {path: /health/ready, port: http}, periodSeconds: 1}
  traffic: {nginx: {host: chart-check.example.com, paths: [/api/v1/embed]}}
  strategy: {steps: [{setWeight: 50}, {setWeight: 100}], scaleDownDelaySeconds: 5}
  analysis:
    interval: 3s
    minRequests: 3
    failureLimit: 1
    metrics: [{name: error-rate, preset: ErrorRate, max: "0.05"}]
YAML
}
wait_healthy() { # what, seconds, [a stable revision that must have been replaced]
  local what=$1 timeout=$2 old=${3:-} phase stable
  for _ in $(seq 1 $((timeout * 2))); do
    phase="$(kubectl -n search get er chart-check -o jsonpath='{.status.phase}' 2>/dev/null || true)"
    stable="$(kubectl -n search get er chart-check -o jsonpath='{.status.stableRevision}' 2>/dev/null || true)"
    [[ $phase == Healthy && $stable != "$old" ]] && return 0
    sleep 0.5
  done
  kubectl -n search get er chart-check -o yaml | sed -n '/^status:/,$p'
  tail -n 30 "$EMBEDROLL_CLUSTER_DIR"/logs/pods/embedroll-system_*operator*.log 2>/dev/null || true
  fail "chart-check: $what did not happen (phase ${phase:-none})"
}
rollout 16384
wait_healthy "first install Healthy" 120
first="$(kubectl -n search get er chart-check -o jsonpath='{.status.stableRevision}')"
( while :; do
    curl -s -o /dev/null -H 'Host: chart-check.example.com' -H 'Content-Type: application/json' \
      -d '{"texts":["chart check"]}' "$INGRESS_URL/api/v1/embed" || sleep 0.1
  done ) &
traffic=$!
trap 'kill $traffic 2>/dev/null || true; cleanup' EXIT
sleep 2
rollout 8192
wait_healthy "the upgrade promoted" 120 "$first"
second="$(kubectl -n search get er chart-check -o jsonpath='{.status.stableRevision}')"
# Every alert, loaded by the cluster's Prometheus from config/prometheus/: evaluated without
# error, and its signal (the expression before its threshold) returns series now, with
# embedders and operator pods scraped and traffic flowing.
sleep 5
python3 - "$PROMETHEUS_URL" <<'PY' || fail "alert expressions do not all evaluate to series"
import json, re, sys, urllib.parse, urllib.request
base = sys.argv[1]
def get(path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)["data"]

def signal(expr):
    """The expression before its last top-level comparison (`<signal> <op> <threshold>`)."""
    depth, quote, cut = 0, None, None
    for i, c in enumerate(expr):
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in "<>=!" and expr[i + 1 : i + 2] != "~":
            if c in "=!" and expr[i + 1 : i + 2] != "=":
                continue
            if i and expr[i - 1] in "<>=!":
                continue
            cut = i
    if cut is None:
        sys.exit(f"no threshold comparison in {expr!r}")
    signal = expr[:cut].strip()
    # A fallback for no series at all (`(... or vector(0))`) always answers: check what it
    # guards, so a misspelt metric still shows.
    guarded = re.fullmatch(r"\((.*) or vector\(0\)\)", signal)
    return guarded.group(1).strip() if guarded else signal

rules = [r for g in get("/api/v1/rules")["groups"] for r in g["rules"]]
bad = 0
for rule in rules:
    name = rule.get("name")
    if rule.get("health") != "ok":
        print(f"packaging: rule {name}: health {rule.get('health')}: {rule.get('lastError')}")
        bad += 1
        continue
    series = get("/api/v1/query", query=signal(rule["query"]))["result"]
    if not series:
        print(f"packaging: rule {name}: signal {signal(rule['query'])!r} returned no series")
        bad += 1
    else:
        print(f"packaging: rule {name}: evaluates ok; signal returns {len(series)} series")
print(f"packaging: {len(rules)} rules checked against the running Prometheus")
sys.exit(1 if bad or not rules else 0)
PY
# Every dashboard query (panels and template variables) parses and returns series, with
# Grafana's variables set to "All" and its range variables to fixed windows.
python3 - "$PROMETHEUS_URL" config/grafana/*.json <<'PY' || fail "dashboard queries do not all return series"
import json, re, sys, urllib.parse, urllib.request
base, files = sys.argv[1], sys.argv[2:]
def query(expr):
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"]["result"], None
    except urllib.error.HTTPError as e:
        return [], json.load(e).get("error", str(e))
def concrete(expr):
    expr = expr.replace("$__rate_interval", "1m").replace("$__range", "1h").replace("$__interval", "1m")
    return re.sub(r"\$\{?[a-z]+\}?", ".+", expr)
bad = checked = 0
for path in files:
    board = json.load(open(path))
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        if key not in board:
            print(f"packaging: {path}: no {key}"); bad += 1
    exprs = [(f"variable {v['name']}", re.sub(r"^label_values\((.*), *\w+\)$", r"\1", v["query"]["query"]))
             for v in board["templating"]["list"] if v.get("type") == "query"]
    exprs += [(f"panel {p['title']!r}", t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for what, expr in exprs:
        checked += 1
        series, error = query(concrete(expr))
        if error or not series:
            print(f"packaging: {path}: {what}: {error or 'no series'}: {concrete(expr)}"); bad += 1
    print(f"packaging: {path}: {len(board['panels'])} panels, {len(exprs)} queries return series")
sys.exit(1 if bad or not checked else 0)
PY
kill $traffic 2>/dev/null || true
analysis="$(kubectl -n search get er chart-check -o jsonpath='{.status.analysis.metrics[0].name}={.status.analysis.metrics[0].value} {.status.analysis.result}')"
[[ $analysis == *Passed* ]] || fail "the last analysis did not pass: $analysis"
kubectl -n search get events --field-selector reason=Promoted -o name | grep -q . || fail "no Promoted Event"
say "the chart's operator promoted $first -> $second through 50% and 100% (last analysis: $analysis)"
if grep -l -i "forbidden" "$EMBEDROLL_CLUSTER_DIR"/logs/pods/embedroll-system_*.log 2>/dev/null; then
  grep -h -i -m3 "forbidden" "$EMBEDROLL_CLUSTER_DIR"/logs/pods/embedroll-system_*.log
  fail "the operator pods hit RBAC denials"
fi
say "no RBAC denial in the operator pods' logs"
"$helm" uninstall embedroll-operator -n embedroll-system --wait >/dev/null

# The embedder chart installed for real: its pod (no service-account token: it needs none)
# becomes Ready and answers embeddings.
say "helm install of the embedder chart"
"$helm" install embedder charts/embedder -n plain-embedder --create-namespace --wait --timeout 3m \
  --set replicaCount=1 --set embedder.threads=1 --set resources.requests.cpu=500m >"$work/install.log" 2>&1 ||
  { cat "$work/install.log"; kubectl -n plain-embedder get pods -o wide; fail "helm install embedder"; }
ip="$(kubectl -n plain-embedder get pods -l app.kubernetes.io/instance=embedder -o jsonpath='{.items[0].status.podIP}')"
dims="$(curl -sf "http://$ip:8080/api/v1/embed" -H 'Content-Type: application/json' -d '{"texts":["hello from the chart"]}' |
  python3 -c 'import json, sys; print(len(json.load(sys.stdin)["embeddings"][0]))')" || fail "no embedding from the embedder chart's pod"
[[ $dims == 384 ]] || fail "the embedder chart's pod answered $dims dimensions, not 384"
say "the embedder chart's pod ($ip) serves 384-dimension embeddings"
"$helm" uninstall embedder -n plain-embedder --wait >/dev/null
say "passed"
