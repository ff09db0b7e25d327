#!/usr/bin/env bash
# Build the real Dockerfile (unmodified) with podman and run the image end to end.
#
# Works on a Debian bookworm machine with no Docker engine and no access to an
# image registry: the base images the Dockerfile names are created locally
# (debootstrap for debian:bookworm-slim; the same rootfs plus gcc and this
# machine's Rust toolchain for the Rust builder image). Then:
#   - podman build of the Dockerfile (network allowed so cargo can fetch crates)
#   - PostgreSQL 15 and Redis started by this script on free loopback ports
#   - `migrate`, `seed --count 10`, `mock-provider` and one `serve` replica,
#     all from the built image, with host networking and a read-only root fs
#   - checks: 10 unique deliveries at the mock provider, 10 rows `sent`,
#     /health/ready 200, non-root user, the image HEALTHCHECK passes,
#     graceful stop on SIGTERM; prints the image size.
# Everything it starts is stopped again on exit.
#
# Usage: scripts/verify/image.sh [--base-only] [--no-cache]
#   --base-only   only create the local base images, then exit
#   --no-cache    rebuild the image without podman's layer cache
# Environment:
#   VERIFY_IMAGE_WORKDIR  scratch dir (default /var/tmp/message-dispatcher-verify)
#   VERIFY_IMAGE_TAG      tag for the built image (default message-dispatcher:verify)
#   REBUILD_BASE=1        recreate the local base images even if they exist
# pass/fail always return 0, so `cond && pass ... || fail ...` is an if/else here.
# shellcheck disable=SC2015
set -euo pipefail

# ROOT, free_port, wait_http.
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/harness.sh"
# After harness.sh: PODMAN, pass/fail/info/die (which record for the summary),
# print_summary, podman_setup, the debootstrap base image.
# shellcheck source=scripts/verify/podman.sh
source "$ROOT/scripts/verify/podman.sh"
WORK="$VERIFY_WORK"
IMAGE="${VERIFY_IMAGE_TAG:-message-dispatcher:verify}"
BASE_ONLY=0
NO_CACHE=()
for arg in "$@"; do
  case "$arg" in
    --base-only) BASE_ONLY=1 ;;
    --no-cache) NO_CACHE=(--no-cache) ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

SUFFIX="verify-$$"
STEP_START=$T_START

log() { printf '\n==> %s\n' "$*"; }
elapsed() { echo $(( $(date +%s) - STEP_START ))s; }

if [[ $(id -u) -ne 0 ]]; then
  echo "run as root (podman with runc, debootstrap, chroot)" >&2
  exit 2
fi

# ---------------------------------------------------------------- cleanup ---
PG_DATA=""
PG_DIR=""
PG_BIN=/usr/lib/postgresql/15/bin
REDIS_PIDFILE=""
CONTAINERS=()
MOUNTED=()
cleanup() {
  local rc=$?
  set +e
  local c m
  for c in "${CONTAINERS[@]}"; do
    "${PODMAN[@]}" rm -f -t 5 "$c" >/dev/null 2>&1
  done
  if [[ -n "$REDIS_PIDFILE" && -s "$REDIS_PIDFILE" ]]; then
    kill "$(cat "$REDIS_PIDFILE")" 2>/dev/null
  fi
  if [[ -n "$PG_DATA" && -f "$PG_DATA/postmaster.pid" ]]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1
  fi
  [[ -n "$PG_DIR" ]] && rm -rf "$PG_DIR"
  [[ -n "$REDIS_PIDFILE" ]] && rm -f "$REDIS_PIDFILE" "$WORK/redis-$$.log"
  for m in "${MOUNTED[@]}"; do umount -l "$m" 2>/dev/null; done
  [[ $rc -ne 0 && $FAILED -eq 0 ]] && RESULTS+=("FAIL  aborted (exit $rc)") && FAILED=1
  print_summary verify-image
  [[ $FAILED -ne 0 ]] && exit 1
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------ tool set-up ---
log "installing tools (podman, runc, debootstrap, redis, postgresql-15)"
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
[[ -x $PG_BIN/initdb ]] || need+=(postgresql-15)
if [[ ${#need[@]} -gt 0 ]]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
podman_setup
mkdir -p "$WORK"

# ------------------------------------------------------------ base images ---
# The names exactly as the Dockerfile's FROM lines spell them (stage aliases skipped).
mapfile -t FROMS < <(awk 'toupper($1)=="FROM" { for (i=2;i<=NF;i++) if ($i !~ /^--/) { print $i; break } }' "$ROOT/Dockerfile" | sort -u)
DEBIAN_IMAGE=""
RUST_IMAGE=""
for f in "${FROMS[@]}"; do
  case "$f" in
    *debian:*) DEBIAN_IMAGE=$(qualify_image "$f") ;;
    *rust:*) RUST_IMAGE=$(qualify_image "$f") ;;
    builder|runtime) ;;
    *) grep -qiE "^FROM .* AS $f\$" "$ROOT/Dockerfile" || die "Dockerfile names an unexpected base image: $f" ;;
  esac
done
[[ -n $DEBIAN_IMAGE && -n $RUST_IMAGE ]] || die "could not find the debian and rust base images in the Dockerfile FROM lines"
echo "base images: $DEBIAN_IMAGE, $RUST_IMAGE"

ROOTFS="$WORK/rootfs-bookworm"
make_rootfs() { make_bookworm_rootfs "$ROOTFS" || die "debootstrap failed"; }

STEP_START=$(date +%s)
case "$(ensure_debian_base "$DEBIAN_IMAGE")" in
  created) pass "base image $DEBIAN_IMAGE created from debootstrap ($(elapsed))" ;;
  present) pass "base image $DEBIAN_IMAGE already present" ;;
  *) die "could not create $DEBIAN_IMAGE" ;;
esac

if [[ ${REBUILD_BASE:-0} == 1 ]] || ! "${PODMAN[@]}" image exists "$RUST_IMAGE"; then
  STEP_START=$(date +%s)
  make_rootfs
  RUSTFS="$WORK/rootfs-rust"
  rm -rf "$RUSTFS"
  cp -a "$ROOTFS" "$RUSTFS"
  log "installing gcc, libc6-dev, pkg-config into the Rust builder rootfs"
  cp /etc/resolv.conf "$RUSTFS/etc/resolv.conf"
  mount -t proc proc "$RUSTFS/proc" && MOUNTED+=("$RUSTFS/proc")
  chroot "$RUSTFS" apt-get update >"$WORK/rust-apt.log" 2>&1
  chroot "$RUSTFS" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    gcc libc6-dev pkg-config ca-certificates make >>"$WORK/rust-apt.log" 2>&1 \
    || { tail -20 "$WORK/rust-apt.log"; die "apt-get in the Rust rootfs failed"; }
  # Trust the same extra CAs as this machine: its egress to the crate registry
  # may pass through a TLS-inspecting proxy. (Only this local stand-in for the
  # official image gets them; the Dockerfile is unchanged.)
  if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$RUSTFS/usr/local/share/ca-certificates/"
    chroot "$RUSTFS" update-ca-certificates >>"$WORK/rust-apt.log" 2>&1
  fi
  chroot "$RUSTFS" apt-get clean
  umount "$RUSTFS/proc"
  rm -rf "$RUSTFS"/var/lib/apt/lists/*
  # This machine's Rust toolchain (no toolchain can be downloaded here).
  SYSROOT=$(rustc --print sysroot)
  log "copying the Rust toolchain $(rustc --version) from $SYSROOT"
  mkdir -p "$RUSTFS/usr/local/rust" "$RUSTFS/usr/local/cargo/bin"
  tar -C "$SYSROOT" --exclude=./share/doc -c . | tar -C "$RUSTFS/usr/local/rust" -x
  log "importing $RUST_IMAGE"
  import_rootfs "$RUSTFS" "$RUST_IMAGE" \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    --change 'ENV RUSTUP_HOME=/usr/local/rustup' \
    --change 'CMD ["bash"]' \
    || die "podman import of $RUST_IMAGE failed"
  rm -rf "$RUSTFS"
  "${PODMAN[@]}" run --rm --network host --pull=never "$RUST_IMAGE" cargo --version
  pass "base image $RUST_IMAGE created (debootstrap + gcc + host toolchain $(rustc --version | awk '{print $2}')) ($(elapsed))"
else
  pass "base image $RUST_IMAGE already present"
fi

if [[ $BASE_ONLY -eq 1 ]]; then
  echo "base images ready"
  exit 0
fi

# ------------------------------------------------------------------ build ---
log "podman build of $ROOT/Dockerfile -> $IMAGE"
STEP_START=$(date +%s)
BUILD_ARGS=()
# Give the build the commit the binary should report (.git is not in the context).
if commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null); then
  BUILD_ARGS+=(--build-arg "GIT_COMMIT=$commit")
fi
# --format docker keeps HEALTHCHECK (the OCI format has no such field).
if ! "${PODMAN[@]}" build --format docker --network host --pull=never "${NO_CACHE[@]}" \
     "${BUILD_ARGS[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" 2>&1 | tee "$WORK/build.log"; then
  die "podman build failed (log: $WORK/build.log)"
fi
pass "podman build ($(elapsed))"
# The dependency layer (step 4 of the builder) should come from the cache on
# rebuilds that changed only the source.
if grep -A1 -E '^\[1/2\] STEP 4/' "$WORK/build.log" | grep -q 'Using cache'; then
  RESULTS+=("INFO  dependency layer reused from the cache")
else
  RESULTS+=("INFO  dependency layer built (first build or Cargo.toml/Cargo.lock changed)")
fi
SIZE_BYTES=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
SIZE_MB=$(( SIZE_BYTES / 1000 / 1000 ))
"${PODMAN[@]}" images "$IMAGE"
RESULTS+=("INFO  image $IMAGE size: ${SIZE_MB} MB ($SIZE_BYTES bytes)")

# ------------------------------------------------------------ image config ---
USER_CFG=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
HC_CFG=$("${PODMAN[@]}" image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
EP_CFG=$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}} {{json .Config.Cmd}}' "$IMAGE")
echo "User=$USER_CFG Healthcheck=$HC_CFG Entrypoint/Cmd=$EP_CFG"
if [[ -n $USER_CFG && $USER_CFG != 0* && $USER_CFG != root* ]]; then
  pass "image User is non-root ($USER_CFG)"
else
  fail "image User is root or unset ($USER_CFG)"
fi
[[ $HC_CFG == *healthcheck* ]] && pass "image has a HEALTHCHECK ($HC_CFG)" || fail "image has no HEALTHCHECK"
VERSION_OUT=$("${PODMAN[@]}" run --rm --network host --pull=never --no-healthcheck "$IMAGE" --version) \
  && pass "message-dispatcher --version: $VERSION_OUT" || fail "--version failed"

# --------------------------------------------------- PostgreSQL and Redis ---
PG_PORT=$(free_port)
REDIS_PORT=$(free_port)
MOCK_PORT=$(free_port)
APP_PORT=$(free_port)
DB_PASSWORD="verify-$RANDOM-pw"
REDIS_PASSWORD="verify-$RANDOM-redis"
SMS_TOKEN="verify-$RANDOM-sms"

log "starting PostgreSQL 15 on 127.0.0.1:$PG_PORT"
# The server refuses to run as root: everything lives in a dir owned by postgres.
PG_DIR="$WORK/pg-$$"
PG_DATA="$PG_DIR/data"
rm -rf "$PG_DIR"
mkdir -p "$PG_DATA" "$PG_DIR/sock"
printf '%s\n' "$DB_PASSWORD" >"$PG_DIR/pwfile"
chown -R postgres: "$PG_DIR"
chmod 700 "$PG_DIR" "$PG_DATA"
runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --pwfile="$PG_DIR/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 >"$WORK/initdb.log" 2>&1 \
  || { cat "$WORK/initdb.log"; die "initdb failed"; }
rm -f "$PG_DIR/pwfile"
runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -l "$PG_DIR/postgres.log" \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_DIR/sock -c fsync=off" start >/dev/null \
  || { cat "$PG_DIR/postgres.log"; die "PostgreSQL did not start"; }
runuser -u postgres -- psql -h "$PG_DIR/sock" -p "$PG_PORT" -qc 'CREATE DATABASE messages_db' postgres
psql_q() { runuser -u postgres -- psql -h "$PG_DIR/sock" -p "$PG_PORT" -d messages_db -tAc "$1"; }

log "starting Redis on 127.0.0.1:$REDIS_PORT"
REDIS_PIDFILE="$WORK/redis-$$.pid"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --requirepass "$REDIS_PASSWORD" --daemonize yes --pidfile "$REDIS_PIDFILE" \
  --logfile "$WORK/redis-$$.log" --dir "$WORK"
for _ in $(seq 50); do [[ -s $REDIS_PIDFILE ]] && break; sleep 0.1; done
REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -p "$REDIS_PORT" ping | grep -q PONG || die "redis did not start"

# Configuration exactly as an operator would pass it, in the parts form (DB_* and
# REDIS_* instead of URLs).
ENV_ARGS=(
  -e DB_HOST=127.0.0.1 -e "DB_PORT=$PG_PORT" -e DB_NAME=messages_db -e DB_USER=postgres
  -e "DB_PASSWORD=$DB_PASSWORD" -e DB_SSLMODE=disable
  -e REDIS_HOST=127.0.0.1 -e "REDIS_PORT=$REDIS_PORT" -e "REDIS_PASSWORD=$REDIS_PASSWORD" -e REDIS_DB=0
  -e LOG_FORMAT=json -e LOG_LEVEL=info
)
# Hardened run options, the same as the Helm chart sets.
RUN_ARGS=(--network host --pull=never --read-only --cap-drop ALL --security-opt no-new-privileges)
# One-shot jobs and the mock provider don't serve /health/ready: no HEALTHCHECK for them.
# (For the dispatcher, podman logs "unable to get systemd connection" because it
# cannot schedule periodic checks without systemd; `podman healthcheck run` works.)
ONESHOT_ARGS=("${RUN_ARGS[@]}" --no-healthcheck)

# --------------------------------------------------------- migrate + seed ---
STEP_START=$(date +%s)
log "migrate"
"${PODMAN[@]}" run --rm "${ONESHOT_ARGS[@]}" "${ENV_ARGS[@]}" "$IMAGE" migrate \
  && pass "migrate ($(elapsed))" || die "migrate failed"
log "seed --count 10"
"${PODMAN[@]}" run --rm "${ONESHOT_ARGS[@]}" "${ENV_ARGS[@]}" "$IMAGE" seed --count 10 \
  && pass "seed --count 10" || die "seed failed"
PENDING=$(psql_q "SELECT count(*) FROM messages WHERE status = 'pending'")
[[ $PENDING == 10 ]] && pass "10 pending messages in PostgreSQL" || fail "expected 10 pending messages, found $PENDING"

# ---------------------------------------------------------- mock provider ---
log "mock-provider on 127.0.0.1:$MOCK_PORT"
MOCK="md-mock-$SUFFIX"
CONTAINERS+=("$MOCK")
"${PODMAN[@]}" run -d --name "$MOCK" "${ONESHOT_ARGS[@]}" "$IMAGE" mock-provider --port "$MOCK_PORT" --token "$SMS_TOKEN" >/dev/null
wait_http "http://127.0.0.1:$MOCK_PORT/health" 30 && pass "mock provider /health 200" \
  || { "${PODMAN[@]}" logs "$MOCK" | tail -20; die "mock provider did not come up"; }

# ------------------------------------------------------------- dispatcher ---
log "dispatcher (serve) on 127.0.0.1:$APP_PORT, BATCH_SIZE=5 PROCESSING_INTERVAL=1s"
APP="md-dispatcher-$SUFFIX"
CONTAINERS+=("$APP")
STEP_START=$(date +%s)
"${PODMAN[@]}" run -d --name "$APP" "${RUN_ARGS[@]}" "${ENV_ARGS[@]}" \
  -e "SERVER_PORT=$APP_PORT" -e BATCH_SIZE=5 -e PROCESSING_INTERVAL=1s -e AUTO_MIGRATE=true \
  -e "SMS_API_URL=http://127.0.0.1:$MOCK_PORT/send" -e "SMS_API_TOKEN=$SMS_TOKEN" \
  -e "REPLICA_ID=verify-image-$$" \
  "$IMAGE" serve >/dev/null
if wait_http "http://127.0.0.1:$APP_PORT/health/ready" 60; then
  pass "/health/ready 200 ($(elapsed))"
else
  "${PODMAN[@]}" logs "$APP" | tail -30
  die "/health/ready did not answer 200 within 60s"
fi
curl -fsS -o /dev/null "http://127.0.0.1:$APP_PORT/health/live" && pass "/health/live 200" || fail "/health/live"
# Read the whole body first: `curl | grep -q` fails under pipefail once the body is
# larger than a pipe buffer (grep stops at its first match, curl gets SIGPIPE).
metrics_body="$(curl -fsS "http://127.0.0.1:$APP_PORT/metrics" || true)"
grep -q '^dispatcher_' <<<"$metrics_body" \
  && pass "/metrics serves dispatcher_* series" || fail "/metrics has no dispatcher_* series"

log "waiting for the 10 messages to reach the mock provider"
STATS_PY="$ROOT/scripts/verify/mock_stats.py"
delivered=0
for _ in $(seq 120); do
  delivered=$(curl -fsS --max-time 2 "http://127.0.0.1:$MOCK_PORT/deliveries" 2>/dev/null \
              | python3 "$STATS_PY" unique 2>/dev/null || echo 0)
  [[ $delivered -ge 10 ]] && break
  sleep 0.5
done
if [[ $delivered -eq 10 ]]; then
  pass "mock provider received 10 unique messages ($(elapsed) after start)"
else
  "${PODMAN[@]}" logs "$APP" | tail -30
  fail "mock provider received $delivered unique messages, expected 10"
fi
psql_q "SELECT coalesce(delivery_key::text, id::text) || ' ' || id FROM messages" >"$WORK/keys.txt" || true
FIFO=$(curl -fsS "http://127.0.0.1:$MOCK_PORT/deliveries" | python3 "$STATS_PY" fifo "$WORK/keys.txt" || echo "?")
[[ $FIFO == 1 ]] && pass "deliveries arrived in FIFO (id) order" || fail "deliveries not in FIFO order"
STATS_JSON=$(curl -fsS "http://127.0.0.1:$MOCK_PORT/stats" || echo '{}')
echo "mock /stats: $STATS_JSON"
DUPS=$(python3 "$STATS_PY" duplicates <<<"$STATS_JSON" || echo "?")
[[ $DUPS == 0 ]] && pass "mock provider saw no duplicates" || fail "mock provider duplicates: $DUPS"
SENT=""
for _ in $(seq 20); do
  SENT=$(psql_q "SELECT count(*) FROM messages WHERE status = 'sent'")
  [[ $SENT == 10 ]] && break
  sleep 0.5
done
[[ $SENT == 10 ]] && pass "10 messages marked sent in PostgreSQL" || fail "messages sent in PostgreSQL: $SENT, expected 10"

# ----------------------------------------------------- user + healthcheck ---
UID_IN=$("${PODMAN[@]}" exec "$APP" id -u)
[[ $UID_IN != 0 ]] && pass "container process runs as uid $UID_IN (non-root)" || fail "container runs as root"
if "${PODMAN[@]}" exec -e "SERVER_PORT=$APP_PORT" "$APP" message-dispatcher healthcheck; then
  pass "podman exec ... message-dispatcher healthcheck exits 0"
else
  fail "message-dispatcher healthcheck inside the container failed"
fi
if hc_out=$("${PODMAN[@]}" healthcheck run "$APP" 2>&1); then
  pass "podman healthcheck run (image HEALTHCHECK) ${hc_out:-healthy}"
else
  fail "podman healthcheck run: $hc_out"
fi
if "${PODMAN[@]}" exec "$APP" message-dispatcher healthcheck --url "http://127.0.0.1:$MOCK_PORT/nope" >/dev/null 2>&1; then
  fail "healthcheck exits 0 for a URL that answers 404"
else
  pass "healthcheck exits non-zero for a non-200 URL"
fi

# --------------------------------------------------------- graceful stop ---
log "SIGTERM (podman stop -t 50)"
t0=$(date +%s)
"${PODMAN[@]}" stop -t 50 "$APP" >/dev/null
t1=$(date +%s)
EXIT_CODE=$("${PODMAN[@]}" inspect --format '{{.State.ExitCode}}' "$APP")
if [[ $(( t1 - t0 )) -lt 50 ]]; then
  pass "dispatcher stopped on SIGTERM in $(( t1 - t0 ))s, exit code $EXIT_CODE"
else
  fail "dispatcher needed SIGKILL after 50s"
fi
echo "image size: ${SIZE_MB} MB"
