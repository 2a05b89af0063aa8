#!/usr/bin/env bash
# Runs the commands of the operations docs as written (part of e2e/test), on a local real
# cluster of its own, in the order a platform team would:
#   docs/install.md     the operator chart, the samples, the embedder chart
#   docs/operations.md  revisions, pause/promote/abort/retry, scale, tuning, deletion
#   docs/runbook.md     against a rollout this script has just had rolled back
#                       automatically (a crash-looping canary past its progress deadline)
#   docs/upgrade.md     CRDs, helm upgrade, settings, rollback, uninstall
# Every ```sh block runs, in one shell per document (variables carry over, as in a reader's
# terminal), from the checkout's root, with `set -euo pipefail`. A block preceded by
# `<!-- docs-test: skip: REASON -->` is shown as skipped with its reason; a ```yaml block
# preceded by `<!-- docs-test: prometheus-config -->` is checked with `promtool check config`.
# The addresses the docs ask the reader to set (PROM_IN_CLUSTER, PROM, INGRESS) are set to
# the local cluster's. See docs/README.md.
set -euo pipefail
label=docs cluster_name=docs-cluster ports="27443 23379 23380 29190 28188"
# shellcheck source=e2e/scripts/own-cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/own-cluster.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
profile="${EMBEDROLL_PROFILE:-release}"
bin="$CARGO_TARGET_DIR/$profile"

# Turns one document into a bash script: each runnable block is announced with its place, shown,
# then run. Prometheus configuration fragments are checked with promtool.
extract() { # doc.md -> script on stdout
  python3 - "$1" "$tools/promtool" "$work" <<'PY'
import re, shlex, sys
doc, promtool, work = sys.argv[1:]
lines = open(doc).read().split("\n")
out, ran, skipped, heading, marker, i = [], 0, 0, "", None, 0
while i < len(lines):
    line = lines[i]
    if line.startswith("#") and not line.startswith("#!"):
        heading = line.lstrip("#").strip()
    m = re.match(r"^\s*<!-- docs-test: (skip: .+|prometheus-config) -->\s*$", line)
    if m:
        marker = m.group(1)
        i += 1
        continue
    fence = re.match(r"^(\s*)```(\w*)\s*$", line)
    if not fence:
        if line.strip():
            marker = None
        i += 1
        continue
    indent, lang, start = fence.group(1), fence.group(2), i + 1
    body = []
    i += 1
    while i < len(lines) and lines[i].strip() != "```":
        body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
        i += 1
    i += 1
    text = "\n".join(body)
    where = f"{doc}:{start}"
    if marker and marker.startswith("skip: "):
        out.append(f"printf '\\n--- %s (%s): skipped: %s\\n' {shlex.quote(where)} {shlex.quote(heading)} {shlex.quote(marker[6:])}")
        skipped += 1
    elif marker == "prometheus-config":
        path = f"{work}/prometheus-{start}.yml"
        out.append(f"printf '\\n--- %s (%s): promtool check config\\n' {shlex.quote(where)} {shlex.quote(heading)}")
        out.append(f"cat >{shlex.quote(path)} <<'__DOCS_BLOCK__'\n{text}\n__DOCS_BLOCK__")
        out.append(f"__docs_at={shlex.quote(where)}; {shlex.quote(promtool)} check config --syntax-only {shlex.quote(path)}")
        ran += 1
    elif lang in ("sh", "bash"):
        out.append(f"printf '\\n--- %s (%s)\\n' {shlex.quote(where)} {shlex.quote(heading)}")
        out.append(f"sed 's/^/$ /' <<'__DOCS_BLOCK__'\n{text}\n__DOCS_BLOCK__")
        out.append(f"__docs_at={shlex.quote(where)}\n{text}")
        ran += 1
    marker = None
if ran == 0:
    sys.exit(f"{doc}: no command block to run")
print("set -euo pipefail")
print("trap 'printf \"docs: FAILED in the block at %s (exit %s)\\n\" \"$__docs_at\" $?' ERR")
print("\n".join(out))
print(f"printf '\\n--- {doc}: {ran} blocks run, {skipped} skipped\\n'")
PY
}

run_doc() { # doc.md
  extract "$1" >"$work/doc.sh" || fail "cannot read the blocks of $1"
  say "running $1"
  timeout 900 bash "$work/doc.sh" || fail "$1: a command as written failed (see the block above)"
}

say "cluster up"
"$cluster" up >/dev/null 2>"$work/up.log" || { cat "$work/up.log"; fail "cluster up"; }
eval "$("$cluster" env)"
# What install.md lists as prerequisites: ingress-nginx (Traefik's ingress-nginx provider, IngressClass
# nginx), Prometheus (the local one), and the Prometheus Operator's CRDs for the chart's
# monitors, rules and dashboards.
kubectl apply --server-side -f "$tools/../crds/" >/dev/null
export PATH="$tools:$bin:$PATH"
export PROM_IN_CLUSTER="$POD_PROMETHEUS_URL" PROM="$PROMETHEUS_URL" INGRESS="$INGRESS_URL"

run_doc docs/install.md
run_doc docs/operations.md
# What the guide says happened, checked: the foreground delete returned after the children
# were gone, and the scale and HPA took.
left="$(kubectl -n search get deployments,services,ingresses -l embedroll.dev/rollout=minilm-custom -o name)"
[[ -z $left ]] || fail "objects of the deleted rollout minilm-custom remain: $left"
[[ "$(kubectl -n search get er minilm -o jsonpath='{.spec.replicas} {.status.phase}')" == "3 Healthy" ]] ||
  fail "minilm is not Healthy at 3 replicas after operations.md"
# Under the release-managers admission policy the operator still removed the promote it was
# given (removing is always allowed), and no write of the operator's was refused.
[[ "$(kubectl -n search get er minilm -o jsonpath='{.metadata.annotations}')" != *embedroll.dev/promote* ]] ||
  fail "the promote annotation is still on minilm: the operator could not remove it under the policy"
if grep -h -m3 "denied request" "$EMBEDROLL_CLUSTER_DIR"/logs/pods/embedroll-system_*.log; then
  fail "the admission policy refused a write of the operator's"
fi

# An incident for the runbook: a revision whose model directory does not exist crash-loops,
# its pods never become Ready, and the progress deadline rolls it back automatically.
say "preparing an incident: minilm's next revision cannot load its model"
good_args="$(kubectl -n search get er minilm -o jsonpath='{.spec.template.spec.containers[0].args}')"
kubectl -n search patch er minilm --type json -p '[
  {"op": "replace", "path": "/spec/strategy/progressDeadlineSeconds", "value": 20},
  {"op": "replace", "path": "/spec/template/spec/containers/0/args",
   "value": ["--listen", "0.0.0.0:8080", "--threads", "1", "--model", "all-MiniLM-L6-v2=/models/missing"]}]' >/dev/null
kubectl -n search wait er/minilm --for=jsonpath='{.status.phase}'=Failed --timeout=2m >/dev/null ||
  fail "the crash-looping revision was not rolled back"
reason="$(kubectl -n search get er minilm -o jsonpath='{.status.conditions[?(@.type=="RolledBack")].reason}')"
[[ $reason == ProgressDeadlineExceeded ]] || fail "rolled back with reason '$reason', expected ProgressDeadlineExceeded"
# The runbook's `kubectl logs --previous` needs a restarted container.
for _ in $(seq 1 60); do
  restarts="$(kubectl -n search get pods -l embedroll.dev/rollout=minilm \
    -o jsonpath='{range .items[*]}{.status.containerStatuses[0].restartCount}{"\n"}{end}' | sort -n | tail -n1)"
  ((${restarts:-0} > 0)) && break
  sleep 1
done
say "minilm rolled back ($reason); running the runbook against it"
export NS=search NAME=minilm
run_doc docs/runbook.md
unset NS NAME
# The fix: the good spec again, and the default deadline.
kubectl -n search patch er minilm --type json -p "[
  {\"op\": \"replace\", \"path\": \"/spec/strategy/progressDeadlineSeconds\", \"value\": 600},
  {\"op\": \"replace\", \"path\": \"/spec/template/spec/containers/0/args\", \"value\": $good_args}]" >/dev/null
kubectl -n search wait er/minilm --for=jsonpath='{.status.phase}'=Healthy --timeout=2m >/dev/null ||
  fail "minilm did not return to Healthy after the fix"

run_doc docs/upgrade.md
if kubectl get crd embeddingrollouts.embedroll.dev >/dev/null 2>&1; then fail "the CRD is still there after uninstall"; fi
left="$(kubectl -n search get deployments,services,ingresses -o name)"
[[ -z $left ]] || fail "objects remain after the complete uninstall: $left"
say "passed"
