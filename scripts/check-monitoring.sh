#!/usr/bin/env bash
# The monitoring files (deploy/monitoring/, k8s/monitoring/):
#
#   1. promtool check rules on deploy/monitoring/rules/datagate.rules.yml;
#   2. promtool test rules: datagate.rules.test.yml, a firing and a
#      non-firing case for every alert;
#   3. every alert has a test, a runbook_url and a section in docs/runbook.md;
#   4. k8s/monitoring/prometheusrule.yaml is the rule file wrapped in a
#      PrometheusRule (`--write` regenerates it), its spec passes promtool,
#      and k8s/monitoring renders;
#   5. the Grafana dashboard is valid JSON and every metric it queries is
#      one the service exports (a name in service/).
#
# promtool comes from Debian's `prometheus` package, installed when missing
# (as root, with apt-get). Exits non-zero on any failure.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
RULES=deploy/monitoring/rules/datagate.rules.yml
TESTS=deploy/monitoring/rules/datagate.rules.test.yml
OPERATOR_RULE=k8s/monitoring/prometheusrule.yaml
DASHBOARD=deploy/monitoring/grafana/datagate.json
RUNBOOK=docs/runbook.md

say() { echo "check-monitoring: $*"; }
FAILED=()
fail() { say "FAILED: $1"; FAILED+=("$1"); }

# The PrometheusRule: the rule file, verbatim (comments too), as its spec.
operator_rule() {
  cat <<'YAML'
# Generated from deploy/monitoring/rules/datagate.rules.yml by
# `scripts/check-monitoring.sh --write`; edit that file, not this one.
# For clusters with the Prometheus Operator:
#   kubectl apply -k k8s/monitoring
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: datagate
  labels:
    app.kubernetes.io/name: datagate
    app.kubernetes.io/component: monitoring
spec:
YAML
  sed -e 's/^\(.\)/  \1/' "$RULES"
}

if [ "${1:-}" = "--write" ]; then
  operator_rule >"$OPERATOR_RULE"
  say "wrote $OPERATOR_RULE"
  exit 0
fi

if ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
    say "installing promtool (Debian's prometheus package)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    # The package's server is not wanted here, only its promtool.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
  command -v promtool >/dev/null || { say "promtool not found (apt-get install prometheus)"; exit 1; }
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1, 2. promtool ----------------------------------------------------------

if promtool check rules "$RULES"; then say "ok: promtool check rules"; else fail "promtool check rules"; fi
if promtool test rules "$TESTS"; then say "ok: promtool test rules"; else fail "promtool test rules"; fi

# --- 3. every alert tested and documented -------------------------------------

alerts=$(grep -oP '^\s+- alert: \K\S+' "$RULES")
for alert in $alerts; do
  anchor=$(echo "$alert" | tr '[:upper:]' '[:lower:]')
  grep -q "alertname: $alert\$" "$TESTS" || fail "$alert has no test in $TESTS"
  grep -q "^## $alert\$" "$RUNBOOK" || fail "$alert has no section in $RUNBOOK"
  grep -q "runbook_url: \"$RUNBOOK#$anchor\"" "$RULES" || fail "$alert has no runbook_url to $RUNBOOK#$anchor"
done
say "checked $(echo "$alerts" | wc -w) alerts for tests and runbook sections"

# --- 4. the PrometheusRule -----------------------------------------------------

if diff -u "$OPERATOR_RULE" <(operator_rule) >&2; then
  say "ok: $OPERATOR_RULE agrees with $RULES"
else
  fail "$OPERATOR_RULE differs from $RULES (run scripts/check-monitoring.sh --write)"
fi
# And its spec is a rule file promtool accepts (PyYAML: check-deploy.sh's
# venv, or the system's).
PY=python3
[ -x "$STATE/venv/bin/python" ] && PY=$STATE/venv/bin/python
if "$PY" -c 'import sys, yaml; yaml.safe_dump(yaml.safe_load(open(sys.argv[1]))["spec"], open(sys.argv[2], "w"))' \
    "$OPERATOR_RULE" "$TMP/spec.yml" && promtool check rules "$TMP/spec.yml" >/dev/null; then
  say "ok: the PrometheusRule's spec passes promtool check rules"
else
  fail "the PrometheusRule's spec does not pass promtool check rules"
fi

if kubectl kustomize k8s/monitoring >/dev/null; then
  say "ok: kustomize k8s/monitoring"
else
  fail "kustomize k8s/monitoring"
fi

# --- 5. the dashboard ----------------------------------------------------------

if ! python3 -m json.tool "$DASHBOARD" >/dev/null; then
  fail "$DASHBOARD is not valid JSON"
else
  # Metric names in the panels' queries: identifiers followed by `{`, `[`
  # or `)`, less PromQL's functions, `by (...)` label lists and the
  # recording rules' `datagate:` names.
  names=$(python3 - "$DASHBOARD" <<'PY'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
exprs = []
def walk(node):
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            exprs.append(node["expr"])
        for value in node.values():
            walk(value)
    elif isinstance(node, list):
        for value in node:
            walk(value)
walk(dashboard)
functions = {"sum", "rate", "increase", "max", "min", "avg", "histogram_quantile"}
names = set()
for expr in exprs:
    expr = re.sub(r'\{[^}]*\}', '{}', expr)
    expr = re.sub(r'\b(by|without)\s*\([^)]*\)', '', expr)
    expr = re.sub(r'\b[a-z_]+:[a-z0-9_:]+', '', expr)
    for name in re.findall(r'\b([a-z_][a-z0-9_]*)\s*[\{\[)]', expr):
        if name not in functions:
            names.add(name)
print("\n".join(sorted(names)))
PY
)
  missing=()
  for name in $names; do
    # A histogram's series are its name with _bucket, _count or _sum.
    base=$(echo "$name" | sed -E 's/_(bucket|count|sum)$//')
    grep -rqF -e "\"$name\"" -e "\"$base\"" service/ || missing+=("$name")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    fail "$DASHBOARD queries metrics the service does not export: ${missing[*]}"
  else
    say "ok: $DASHBOARD ($(echo "$names" | wc -w) metrics, all exported)"
  fi
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  say "${#FAILED[@]} check(s) failed"
  exit 1
fi
say "all checks passed"
