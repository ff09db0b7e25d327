#!/usr/bin/env bash
# Run docker-compose.multi.yml for real (unmodified) on podman with podman-compose, on a
# Debian bookworm machine with no Docker engine and no access to an image registry:
#   - the dispatcher image is the one scripts/verify/image.sh built ($VERIFY_IMAGE_TAG,
#     default message-dispatcher:verify), tagged message-dispatcher:local as the compose
#     file names it; podman-compose runs with --no-build;
#   - postgres, redis, nginx and prom/prometheus are pulled if a registry answers, else
#     stand-ins are built from Debian packages (scripts/verify/compose-standins/, FROM the
#     debootstrap debian:bookworm-slim of scripts/verify/podman.sh) and tagged with the
#     compose file's names; they are kept and rebuilt only when their files change;
#   - grafana is NOT started: Debian has no Grafana package, so no stand-in can be built.
# podman-compose ignores `condition: service_healthy` on podman < 4.6 (this is 4.3), and
# without systemd podman runs no health checks by itself. So this script starts the
# services in the compose file's dependency order and runs each health check by hand
# (`podman healthcheck run`) before starting the services that depend on it:
#   postgres, redis (healthy) -> migrate (exited 0) -> mock-provider (healthy)
#   -> dispatcher x3 (healthy) -> lb, prometheus (healthy).
# Then it checks:
#   1. through the nginx port: one leader and three live replicas (status and /health);
#   2. seeded messages delivered once each (mock provider /stats);
#   3. Prometheus has the three dispatcher targets up and sum(dispatcher_is_leader) = 1;
#   4. failover: `podman stop` of the leader's container while two clients poll the
#      status through nginx: a new leader named within 1 s of the stop being issued, and
#      no request failing or taking over 1 s (figures printed); more messages are seeded
#      just before, so the stop lands mid-drain, and all are delivered once each;
#      afterwards two live replicas, one leader, and Prometheus sees one leader again;
#   5. after `podman-compose down -v`: no container, network or volume of the project
#      left, and the host ports are free again.
# Everything is removed on exit, also on failure (container logs are kept then), and the
# tag message-dispatcher:local goes back to the image that had it before (or is removed).
#
# Usage: scripts/verify/compose.sh          (as root; after scripts/verify/image.sh)
# Environment:
#   VERIFY_IMAGE_TAG        the dispatcher image to use (default message-dispatcher:verify)
#   VERIFY_VENV             virtualenv for podman-compose (default /var/tmp/message-dispatcher-verify-venv)
#   PODMAN_COMPOSE_VERSION  podman-compose from PyPI (default 1.6.0; Debian's 1.0.3
#                           cannot read this compose file)
#   REBUILD_STANDINS=1      rebuild the stand-in images even if they are current
#   KEEP_LOGS=1             keep the work directory (logs) after a passing run too
# shellcheck disable=SC2015  # pass/fail return 0: `cond && pass || fail` is an if/else
set -euo pipefail

# shellcheck source=scripts/lib/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/harness.sh"
# After harness.sh: PODMAN, pass/fail/info/die (which record for the summary), print_summary.
# shellcheck source=scripts/verify/podman.sh
source "$ROOT/scripts/verify/podman.sh"

COMPOSE_FILE="$ROOT/docker-compose.multi.yml"
STANDINS="$ROOT/scripts/verify/compose-standins"
IMAGE="${VERIFY_IMAGE_TAG:-message-dispatcher:verify}"
VENV="${VERIFY_VENV:-/var/tmp/message-dispatcher-verify-venv}"
PC_VERSION="${PODMAN_COMPOSE_VERSION:-1.6.0}"
PROJECT="mdverify$$"
STEP_T0=0

step() { printf '\n==> %s\n' "$*"; STEP_T0=$(date +%s); }
took() { echo "$(( $(date +%s) - STEP_T0 ))s"; }

[[ $(id -u) -eq 0 ]] || { echo "run as root (podman with runc, apt-get)" >&2; exit 2; }

WORK="$(mktemp -d /tmp/md-verify-compose.XXXXXX)"
mkdir -p "$WORK/logs"
DOWN_DONE=0
LOCAL_TAG_BEFORE=""
LOCAL_TAG_SET=0

# --------------------------------------------------------------- helpers ---
compose() {
  "$VENV/bin/podman-compose" --podman-args="--runtime runc" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"
}
# compose_quiet ARGS...: compose, output to $WORK/compose.log (shown on failure). In a
# subshell, so that a signal's trap never runs with this shell's output redirected.
compose_quiet() {
  echo "+ podman-compose $*" >>"$WORK/compose.log"
  if ! (compose "$@") >>"$WORK/compose.log" 2>&1 </dev/null; then
    tail -25 "$WORK/compose.log" >&2
    return 1
  fi
}
project_filter=(--filter "label=io.podman.compose.project=$PROJECT")
containers_of() { # SERVICE: the project's containers of that service, by name
  "${PODMAN[@]}" ps -a "${project_filter[@]}" --filter "label=io.podman.compose.service=$1" \
    --format '{{.Names}}' | sort
}
# wait_healthy SECONDS SERVICE...: the compose health check passes in every container
# of each service (`podman healthcheck run`: nothing schedules checks without systemd).
wait_healthy() {
  local deadline=$(( SECONDS + $1 )) c s
  shift
  for c in $(for s in "$@"; do containers_of "$s"; done); do
    until "${PODMAN[@]}" healthcheck run "$c" >/dev/null 2>&1; do
      if [[ $("${PODMAN[@]}" inspect --format '{{.State.Running}}' "$c") != true ]]; then
        echo "$c is not running" >&2
        return 1
      fi
      [[ $SECONDS -lt $deadline ]] || { echo "$c: health check still failing" >&2; return 1; }
      sleep 1
    done
  done
}
save_logs() {
  local c
  for c in $("${PODMAN[@]}" ps -a "${project_filter[@]}" --format '{{.Names}}'); do
    "${PODMAN[@]}" logs "$c" >"$WORK/logs/$c.log" 2>&1 || true
  done
}
leftovers() { # what of the project still exists, one line each
  "${PODMAN[@]}" ps -a "${project_filter[@]}" --format 'container {{.Names}} {{.State}}'
  "${PODMAN[@]}" volume ls --filter "label=io.podman.compose.project=$PROJECT" --format 'volume {{.Name}}'
  "${PODMAN[@]}" network exists "${PROJECT}_default" && echo "network ${PROJECT}_default"
  [[ -e /run/containers/cni/dnsname/${PROJECT}_default ]] && echo "dnsmasq of ${PROJECT}_default"
  return 0
}

cleanup() {
  local rc=$? c
  set +e
  if [[ $FAILED -ne 0 || $rc -ne 0 ]]; then
    save_logs
    for c in "$WORK"/logs/*.log; do
      [[ -e $c ]] || continue
      echo "---- last lines of $(basename "$c" .log)"
      tail -8 "$c"
    done
  fi
  if [[ $DOWN_DONE -eq 0 && -x $VENV/bin/podman-compose ]]; then
    compose down -v -t 30 >>"$WORK/compose.log" 2>&1 </dev/null
  fi
  # Whatever `down` left behind (an interrupted start, say).
  for c in $("${PODMAN[@]}" ps -aq "${project_filter[@]}"); do "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1; done
  for c in $("${PODMAN[@]}" volume ls -q --filter "label=io.podman.compose.project=$PROJECT"); do
    "${PODMAN[@]}" volume rm -f "$c" >/dev/null 2>&1
  done
  "${PODMAN[@]}" network rm -f "${PROJECT}_default" >/dev/null 2>&1
  # Give message-dispatcher:local back to the image that had it before (or to none).
  if [[ $LOCAL_TAG_SET -eq 1 ]]; then
    if [[ -n $LOCAL_TAG_BEFORE ]]; then
      "${PODMAN[@]}" tag "$LOCAL_TAG_BEFORE" message-dispatcher:local
    else
      "${PODMAN[@]}" untag "$IMAGE_ID" localhost/message-dispatcher:local 2>/dev/null
    fi
  fi
  [[ $rc -ne 0 && $FAILED -eq 0 ]] && RESULTS+=("FAIL  aborted (exit $rc)") && FAILED=1
  if [[ $FAILED -ne 0 || ${KEEP_LOGS:-0} == 1 ]]; then
    echo "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  print_summary verify-compose
  [[ $FAILED -ne 0 ]] && exit 1
  exit 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ----------------------------------------------------------------- tools ---
step "tools: podman, runc, the CNI dnsname plugin; podman-compose $PC_VERSION from PyPI"
ensure_packages podman:podman runc:runc debootstrap:debootstrap curl:curl python3:python3
# Service names resolve on podman's CNI networks only with the dnsname plugin.
if [[ ! -x /usr/lib/cni/dnsname ]]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    golang-github-containernetworking-plugin-dnsname >/dev/null
fi
podman_setup
"$VENV/bin/podman-compose" --version 2>/dev/null | grep -q "podman-compose version $PC_VERSION\$" ||
  venv_install "$VENV" "podman-compose==$PC_VERSION"
echo "$("${PODMAN[@]}" --version); $("$VENV/bin/podman-compose" --version | head -1)"
pass "tools ($(took)): $("${PODMAN[@]}" --version), podman-compose $PC_VERSION, CNI dnsname plugin"

# ---------------------------------------------------------------- images ---
step "images named by $(basename "$COMPOSE_FILE")"
"${PODMAN[@]}" image exists "$IMAGE" ||
  die "no image $IMAGE: run scripts/verify/image.sh first (or set VERIFY_IMAGE_TAG)"
IMAGE_ID=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")
# The stand-ins' base, as the Dockerfile's runtime stage names it.
BASE_IMAGE=$(qualify_image debian:bookworm-slim)
case "$(ensure_debian_base "$BASE_IMAGE")" in
  created | present) ;;
  *) die "could not create the $BASE_IMAGE base image" ;;
esac
BASE_ID=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$BASE_IMAGE")

# "service image" per service, from the file itself.
mapfile -t SERVICE_IMAGES < <("$VENV/bin/python" - "$COMPOSE_FILE" <<'PY'
import sys, yaml
for name, svc in yaml.safe_load(open(sys.argv[1]))["services"].items():
    print(name, svc.get("image", ""))
PY
)
STANDIN_LABEL=org.message-dispatcher.compose-standin
STARTED_SERVICES=()
for line in "${SERVICE_IMAGES[@]}"; do
  service=${line%% *} ref=${line#* }
  case "$ref" in
    message-dispatcher:local)
      STARTED_SERVICES+=("$service")
      continue ;;
    grafana/*)
      info "$service ($ref) not started: no registry image here and no Debian package for a stand-in"
      continue ;;
  esac
  STARTED_SERVICES+=("$service")
  full=$(qualify_image "$ref")
  repo=${ref%%:*}
  dir="$STANDINS/${repo##*/}"
  [[ -f $dir/Containerfile ]] || die "$service: no image $ref and no stand-in in $dir"
  # The stand-in's identity: its files, the shared apt helper and the base image.
  want=$( (cd "$STANDINS" && cat "${repo##*/}"/* apt-install.sh; echo "$BASE_ID") | sha256sum | cut -c1-16)
  have=""
  if "${PODMAN[@]}" image exists "$full"; then
    have=$("${PODMAN[@]}" image inspect --format "{{index .Labels \"$STANDIN_LABEL\"}}" "$full")
    if [[ -z $have || $have == "<no value>" ]]; then
      pass "$service: $full present (not a stand-in), used as is"
      continue
    fi
  elif timeout 120 "${PODMAN[@]}" pull -q "$full" >/dev/null 2>&1; then
    pass "$service: $full pulled from its registry"
    continue
  fi
  if [[ $have == "$want" && ${REBUILD_STANDINS:-0} != 1 ]]; then
    pass "$service: stand-in $full current ($want)"
    continue
  fi
  STEP_T0=$(date +%s)
  superseded=""
  [[ -n $have ]] && superseded=$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$full")
  echo "building the stand-in $full from $dir"
  "${PODMAN[@]}" build -q --network host --pull=never --label "$STANDIN_LABEL=$want" \
    -t "$full" -f "$dir/Containerfile" "$STANDINS" >"$WORK/build-${repo##*/}.log" 2>&1 ||
    { tail -20 "$WORK/build-${repo##*/}.log"; die "building the stand-in $full failed"; }
  # The previous stand-in, now untagged (kept if anything still uses it).
  if [[ -n $superseded && $superseded != $("${PODMAN[@]}" image inspect --format '{{.Id}}' "$full") ]]; then
    "${PODMAN[@]}" rmi "$superseded" >/dev/null 2>&1 || true
  fi
  pass "$service: stand-in $full built from Debian packages ($(took))"
done

LOCAL_TAG_BEFORE=$("${PODMAN[@]}" image inspect --format '{{.Id}}' message-dispatcher:local 2>/dev/null || true)
"${PODMAN[@]}" tag "$IMAGE" message-dispatcher:local
LOCAL_TAG_SET=1
pass "message-dispatcher:local = $IMAGE (${IMAGE_ID:0:12}); podman-compose runs with --no-build"

# ------------------------------------------------------------ environment ---
# The compose file's variables. Host ports below the ephemeral range and free now.
touch "$WORK/ports"
export DISPATCHER_HTTP_PORT MOCK_PROVIDER_PORT PROMETHEUS_PORT GRAFANA_PORT
DISPATCHER_HTTP_PORT=$(stable_port "$WORK/ports")
MOCK_PROVIDER_PORT=$(stable_port "$WORK/ports")
PROMETHEUS_PORT=$(stable_port "$WORK/ports")
GRAFANA_PORT=$(stable_port "$WORK/ports")
# Seeded messages drain in seconds: a batch of 5 every second. Set but empty,
# DISPATCH_CONFIG turns the compose file's lanes (deploy/dispatch.example.toml) off, so
# the one lane "default" takes that pace and sum(dispatcher_is_leader) is 1; the file
# and its lanes are checked statically by scripts/verify/check_compose.py.
export PROCESSING_INTERVAL=1s BATCH_SIZE=5 DISPATCH_CONFIG=
export POSTGRES_PASSWORD="verify-$RANDOM$RANDOM"
unset API_TOKEN SMS_API_TOKEN MOCK_FAIL_RATE LOG_LEVEL
LB="http://127.0.0.1:$DISPATCHER_HTTP_PORT"
MOCK="http://127.0.0.1:$MOCK_PROVIDER_PORT"
PROM="http://127.0.0.1:$PROMETHEUS_PORT"
echo "project $PROJECT; nginx $LB, mock provider $MOCK, Prometheus $PROM"
VC=(python3 "$ROOT/scripts/verify/compose.py")

# ------------------------------------------------- start in dependency order ---
# podman-compose 1.6 skips `condition: service_healthy` on podman < 4.6 (it logs
# "Ignored ... condition check due to podman 4.3.1 doesn't support healthy!"), so each
# stage is started with --no-deps once the previous one is healthy.
# (Docker Compose waits by itself: `docker compose up -d` is all it takes there.)
step "up: postgres, redis"
compose_quiet up -d --no-build --no-deps postgres redis || die "podman-compose up postgres redis"
[[ $("${PODMAN[@]}" network inspect --format '{{.DNSEnabled}}' "${PROJECT}_default") == true ]] ||
  die "network ${PROJECT}_default has no DNS (dnsname plugin): service names would not resolve"
wait_healthy 120 postgres redis &&
  pass "postgres and redis healthy ($(took))" || die "postgres/redis not healthy"

step "up: migrate (one-shot)"
compose_quiet up -d --no-build --no-deps migrate || die "podman-compose up migrate"
MIGRATE=$(containers_of migrate)
# podman-compose maps service_completed_successfully to "stopped", whatever the exit code.
code=$(timeout 120 "${PODMAN[@]}" wait "$MIGRATE" || echo timeout)
[[ $code == 0 ]] && pass "migrate exited 0 ($(took))" || die "migrate: exit $code"

step "up: mock-provider"
compose_quiet up -d --no-build --no-deps mock-provider || die "podman-compose up mock-provider"
wait_healthy 60 mock-provider && pass "mock-provider healthy ($(took))" ||
  die "mock-provider not healthy"

step "up: dispatcher (deploy.replicas: 3)"
compose_quiet up -d --no-build --no-deps dispatcher || die "podman-compose up dispatcher"
mapfile -t REPLICAS < <(containers_of dispatcher)
[[ ${#REPLICAS[@]} -eq 3 ]] || die "expected 3 dispatcher containers, found ${#REPLICAS[@]}: ${REPLICAS[*]}"
wait_healthy 120 dispatcher && pass "3 dispatcher replicas healthy ($(took)): ${REPLICAS[*]}" ||
  die "dispatcher replicas not healthy"
used=$("${PODMAN[@]}" inspect --format '{{.Image}}' "${REPLICAS[0]}")
[[ $used == "$IMAGE_ID" ]] && pass "replicas run $IMAGE (not rebuilt)" || fail "replicas run image $used, not $IMAGE_ID"

step "up: lb, prometheus"
compose_quiet up -d --no-build --no-deps lb prometheus || die "podman-compose up lb prometheus"
wait_healthy 60 lb prometheus &&
  pass "lb and prometheus healthy ($(took))" || die "lb/prometheus not healthy"
running=$("${PODMAN[@]}" ps "${project_filter[@]}" --format '{{.Names}}' | wc -l)
info "started $running containers (${STARTED_SERVICES[*]}; migrate exited)"

# ---------------------------------------------------------------- checks ---
step "1. through nginx: one leader, three live replicas"
"${VC[@]}" cluster --lb "$LB" --replicas 3 && pass "one leader and 3 live replicas through nginx" ||
  fail "cluster through nginx"

step "2. seeded messages delivered once each"
compose_quiet run --rm --no-deps migrate seed --count 30 || die "seed --count 30"
"${VC[@]}" deliveries --mock "$MOCK" --expect 30 --timeout 120 --summary "$WORK/figures" &&
  pass "30 seeded messages delivered once each" || fail "deliveries of the first 30"

step "3. Prometheus: three targets up, sum(dispatcher_is_leader) = 1"
"${VC[@]}" prometheus --prom "$PROM" --targets 3 --timeout 90 &&
  pass "Prometheus: 3 dispatcher targets up, sum(dispatcher_is_leader) = 1" || fail "Prometheus targets"

step "4. failover: podman stop of the leader's container"
# More messages first, so the leader is stopped in the middle of a drain.
compose_quiet run --rm --no-deps migrate seed --count 60 || die "seed --count 60"
"${VC[@]}" failover --lb "$LB" --mock "$MOCK" --podman "${PODMAN[*]}" --stop-timeout 60 --bound 1 \
  --summary "$WORK/figures" "${REPLICAS[@]}" &&
  pass "failover: new leader within 1 s, no request through nginx failed or took over 1 s" ||
  fail "failover"
"${VC[@]}" cluster --lb "$LB" --replicas 2 && pass "after the stop: one leader, 2 live replicas" ||
  fail "cluster after the stop"
"${VC[@]}" deliveries --mock "$MOCK" --expect 90 --timeout 120 --summary "$WORK/figures" &&
  pass "all 90 seeded messages delivered once each across the failover" || fail "deliveries after the failover"
"${VC[@]}" prometheus --prom "$PROM" --targets 2 --timeout 90 &&
  pass "Prometheus after the stop: 2 targets up, sum(dispatcher_is_leader) = 1" ||
  fail "Prometheus after the stop"

# ------------------------------------------------------------------ down ---
step "5. podman-compose down -v"
save_logs
# -t 60: the compose file's stop_grace_period, which podman-compose 1.6 does not apply.
compose_quiet down -v -t 60 && pass "podman-compose down -v ($(took))" || fail "podman-compose down -v"
DOWN_DONE=1
left=$(leftovers)
[[ -z $left ]] && pass "after down: no container, volume or network of the project left" ||
  fail "left after down: $(tr '\n' ';' <<<"$left")"
busy=""
for port in "$DISPATCHER_HTTP_PORT" "$MOCK_PROVIDER_PORT" "$PROMETHEUS_PORT"; do
  [[ $(free_port "$port") == "$port" ]] || busy+=" $port"
done
[[ -z $busy ]] && pass "after down: host ports free again" || fail "host ports still bound:$busy"

while IFS= read -r figure; do info "$figure"; done <"$WORK/figures"
