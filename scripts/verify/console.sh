#!/usr/bin/env bash
# The operator console in a real browser: Debian's chromium and
# chromium-driver, driven by selenium, against a real local cluster (PostgreSQL,
# Redis, the mock provider failing 20 % of sends, two replicas, all with API_TOKEN, and
# a DISPATCH_CONFIG of two lanes, default and otp, both sending to the mock): the
# token, leader and replicas, live updates, the schedule and its overrides, the lanes
# with a leader each and per-lane stop and start, stop and start, retry and cancel one
# message or all those a filter selects (by status, lane and number), search and
# paging, the notice of a dispatch pause, and the layout at 800 px.
# The checks are in scripts/verify/console.py; screenshots go to
# $CONSOLE_SCREENSHOTS (default target/console-screenshots/), which the run prints.
#
#   PROFILE=debug scripts/verify/console.sh   # reuse the tests' debug build (CI)
#   KEEP=1 scripts/verify/console.sh          # keep the work directory (logs)
#
# Installs what is missing with apt-get (postgresql, redis, chromium, chromium-driver)
# and selenium with pip into a virtualenv ($CONSOLE_VENV). Takes about a minute once
# the binary is built.
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

SELENIUM_VERSION="${SELENIUM_VERSION:-4.27.1}"
CONSOLE_VENV="${CONSOLE_VENV:-/var/tmp/message-dispatcher-console-venv}"
SHOTS="${CONSOLE_SCREENSHOTS:-$ROOT/target/console-screenshots}"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools \
  curl:curl python3:python3 chromium:chromium chromedriver:chromium-driver
if ! "$CONSOLE_VENV/bin/python" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
  log "installing selenium $SELENIUM_VERSION into $CONSOLE_VENV"
  venv_install "$CONSOLE_VENV" "selenium==$SELENIUM_VERSION"
fi
ensure_binary

WORK="$(mktemp -d /tmp/md-console.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  stop_redis "$WORK/redis"
  stop_postgres "$WORK/postgres"
  if [ "$rc" = 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$WORK"; else echo "logs kept in $WORK/logs"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pick_port() { stable_port "$WORK/ports"; }
PG_PORT="$(pick_port)"
REDIS_PORT="$(pick_port)"
MOCK_PORT="$(pick_port)"
API_PORTS=("$(pick_port)" "$(pick_port)")
mkdir -p "$WORK/logs"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"

TOKEN="console-$(head -c 9 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"
export LOG_FORMAT=json API_TOKEN="$TOKEN"
# Fast enough to see the queue move, the countdown tick and Stop answer in seconds.
export BATCH_SIZE=3 PROCESSING_INTERVAL=1s DISTRIBUTED_LOCK_TTL=3s LOCK_RETRY_INTERVAL=500ms \
  SMS_API_TIMEOUT=2s RETRY_BACKOFF_BASE=1s RETRY_BACKOFF_MAX=4s MAX_ATTEMPTS=3
# Two lanes (docs/design.md#lanes). default keeps the schedule above (the page's
# Cluster panel and its overrides are default's); otp counts segments, so the lanes
# table shows its unit. The spread gives default to replica-1 and otp to replica-2.
# The mock accepts any token; the file names the variable that holds it.
export SMS_API_TOKEN="mock-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
cat >"$WORK/dispatch.toml" <<TOML
[[provider]]
name = "mock"
kind = "http-json"
url = "$SMS_API_URL"
token_env = "SMS_API_TOKEN"
timeout = "2s"
price_per_segment = 0.01

[[lane]]
name = "default"
batch_size = 3
interval = "1s"
providers = ["mock"]

[[lane]]
name = "otp"
unit = "segments"
batch_size = 4
interval = "1s"
providers = ["mock"]
send_concurrency = 2
daily_spend_cap = 100
TOML
export DISPATCH_CONFIG="$WORK/dispatch.toml"

# Delivery receipts go to the follower a second after each send, so statuses appear.
"$BIN" mock-provider --port "$MOCK_PORT" --fail-rate 0.2 \
  --dlr-url "http://127.0.0.1:${API_PORTS[1]}/api/delivery-receipts" --dlr-delay-ms 1000 \
  --dlr-token "$TOKEN" >"$WORK/logs/mock.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start"
"$BIN" migrate >"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"
"$BIN" seed --count 30 >>"$WORK/logs/migrate.log" 2>&1
# Failed messages to retry from the page (a provider's 400 is final): four to one
# number for the bulk retry and cancel (older, so a single retry picks another), then
# three to three numbers.
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres messages_db <<'SQL'
INSERT INTO messages (phone_number, content, status, attempts, last_error)
SELECT '+905551110000', 'bulk fixture ' || s, 'failed', 3, 'HTTP 500: {"error": "try again"}'
FROM generate_series(1, 4) AS s;
INSERT INTO messages (phone_number, content, status, attempts, last_error)
SELECT '+9055577700' || lpad(s::text, 2, '0'), 'rejected fixture ' || s, 'failed', 1,
       'HTTP 400: {"error": "invalid destination"}'
FROM generate_series(1, 3) AS s;
SQL

# replica-1 first, so it leads; the page is loaded from replica-2, a follower.
for i in 1 2; do
  port="${API_PORTS[$((i - 1))]}"
  SERVER_PORT="$port" REPLICA_ID="replica-$i" "$BIN" serve >"$WORK/logs/replica-$i.log" 2>&1 &
  PIDS+=("$!")
  wait_http "http://127.0.0.1:$port/health/ready" 60 || die "replica-$i is not ready (see $WORK/logs)"
  if [ "$i" = 1 ]; then
    deadline=$((SECONDS + 30))
    until curl -fsS "http://127.0.0.1:$port/health" | grep -q '"leader":true'; do
      [ "$SECONDS" -lt "$deadline" ] || die "replica-1 did not take the lead"
      sleep 0.2
    done
  fi
done
log "cluster up: leader replica-1 on :${API_PORTS[0]}, follower replica-2 on :${API_PORTS[1]}"

rm -rf "$SHOTS"
mkdir -p "$SHOTS"
started=$SECONDS
SE_OFFLINE=true "$CONSOLE_VENV/bin/python" "$ROOT/scripts/verify/console.py" \
  --leader "http://127.0.0.1:${API_PORTS[0]}" \
  --follower "http://127.0.0.1:${API_PORTS[1]}" \
  --token "$TOKEN" \
  --database-url "$DATABASE_URL" \
  --screenshots "$SHOTS"
log "browser checks took $((SECONDS - started))s; screenshots in $SHOTS:"
ls -1 "$SHOTS" >&2
