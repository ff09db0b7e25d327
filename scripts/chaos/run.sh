#!/usr/bin/env bash
# Chaos soak: three replicas, short lease and interval, a mock provider
# that fails 10 % of requests and adds latency (3 % of sends take 1.2 s, so some batches
# run long), messages created all along through the API of random replicas, while a
# driver SIGKILLs, SIGSTOPs/SIGCONTs and SIGTERMs-and-restarts replicas, restarts Redis
# and PostgreSQL, deletes the lock key while the leader's path to Redis is stalled, and
# pauses or cuts one replica's path to Redis or PostgreSQL (each replica reaches them
# through a proxy of its own). Then the faults stop, the queue settles, and the run is
# checked from the provider's and the database's side:
#
#   (a) every message created (seeded, or answered 201 by the API, or found in the table)
#       was accepted by the provider, with its own phone number and text;
#   (b) no Idempotency-Key reached the provider twice except through the documented
#       crash/freeze window (or a send whose answer did not arrive in time); each such
#       key is printed with its claim history and the fault that explains it;
#   (c) the rate: every batch claimed at most BATCH_SIZE rows and consecutive batch
#       starts (PostgreSQL's clock) are at least PROCESSING_INTERVAL apart; and at the
#       provider, no window of PROCESSING_INTERVAL minus RATE_JITTER_MS (50) holds more
#       than BATCH_SIZE requests, accepted or not (see scripts/chaos/soak.py); with
#       lanes, all of it per lane against the lane's own batch size and interval, the
#       provider's requests grouped by their message's lane;
#   (d) nothing is left pending or sending, every message is sent (MAX_ATTEMPTS=0);
#   (e) no replica panicked, died by itself, or failed to stop on SIGTERM, and the API
#       never answered 500.
#
# It also measures how fast each lane of a SIGSTOPped leader got a new term (a stalled
# leader is replaced within about 1.6 s, docs/design.md#a-stalled-leader) and that a
# freeze shorter than the stall detection moved nothing; a miss there is a warning.
#
# LANES=n (n > 1) runs the same soak with lanes (docs/design.md#lanes): it writes a
# DISPATCH_CONFIG with the lanes default, l1 .. l(n-1), spreads the seeded and created
# messages over them, aims the replica faults at the leader of a lane picked at random
# (the fence rows), deletes the lease keys of the target's lanes for a key loss, and
# prints a line per lane (delivered, duplicates, batches, terms, max per window against
# the lane's limit). LANES=1, the default and the CI run, is the soak without lanes.
#
# It prints a summary table and exits 1 on any violation (2 if the harness itself
# failed). Everything runs on 127.0.0.1, in a temporary directory removed at the end
# (kept on failure, on warnings, or with KEEP_WORK=1).
#
# Usage: [LANES=3] scripts/chaos/run.sh [--short] [--duration SECONDS]
#   --short              the CI run: 60 s of faults (same as DURATION=60)
#   --duration N         N seconds of faults (default 300, or $DURATION)
#
# Settings (environment, all optional):
#   DURATION (300)  SEED (random; printed)  PROFILE (release|debug)  BIN (a prebuilt binary)
#   REPLICAS (3) BATCH_SIZE (5) PROCESSING_INTERVAL_MS (300) LOCK_TTL_MS (2000)
#   LOCK_RETRY_MS (250) SMS_API_TIMEOUT_MS (2000) SHUTDOWN_TIMEOUT_MS (5000)
#   FAIL_RATE (0.1) LATENCY_MS (20) SLOW_RATE (0.03) SLOW_MS (1200) SEED_MESSAGES (150)
#   CREATE_RATE (5 messages/s) FAULT_GAP_MIN / FAULT_GAP_MAX (2 / 5 s between faults)
#   SETTLE_TIMEOUT (180 s) RATE_JITTER_MS (50) STRICT_RATE=0 (report provider-side
#   bursts as warnings instead of violations)
#   FAULTS ("kill:3,stop:2,term:2,redis:1,postgres:1,keyloss:1,redispath:1,pgpath:1": the
#   mix, relative weights)
#   LONG_STOP_SHARE (0.2: SIGSTOPs that outlast the rescue delay) AIM_AT_LEADER (0.6)
#   STALL_SLACK_MS (500: added to the expected replacement time of a stalled leader)
#   LANES (1: no DISPATCH_CONFIG, one lane; n: the lanes default, l1 .. l(n-1))
#   LANE_BATCH_SIZES (BATCH_SIZE, BATCH_SIZE-2, BATCH_SIZE+3: per lane, comma list,
#   cycled) LANE_INTERVALS_MS (PROCESSING_INTERVAL_MS for all) SHORT_STOP_SHARE (0.2 with
#   lanes: SIGSTOPs shorter than the stall detection, which must move nothing)
#
# Runs as root on a fresh Debian machine: installs PostgreSQL, Redis, curl and Python 3
# with apt-get if they are missing; builds the binary with cargo unless BIN is set.
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

while [ $# -gt 0 ]; do
  case "$1" in
    --short) DURATION=60 ;;
    --duration) DURATION="${2:?--duration needs a number of seconds}"; shift ;;
    --duration=*) DURATION="${1#*=}" ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
  shift
done
export DURATION="${DURATION:-300}"
PROFILE="${PROFILE:-release}"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools curl:curl python3:python3

ensure_binary

work_init chaos

# Stops what is still tracked (replicas, the mock provider), then Redis and PostgreSQL.
# The Python driver stops its replicas itself; this is the safety net.
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  stop_work
  if [ "$rc" = 0 ] && [ "${KEEP_WORK:-0}" != 1 ] && [ ! -f "$WORK/keep" ]; then
    rm -rf "$WORK"
  else
    echo "logs, fault log and database dump kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pick_port() { stable_port "$WORK/ports"; }
export PG_PORT REDIS_PORT MOCK_PORT API_PORTS
PG_PORT="$(pick_port)"
REDIS_PORT="$(pick_port)"
MOCK_PORT="$(pick_port)"
API_PORTS=""
for _ in $(seq 1 "${REPLICAS:-3}"); do API_PORTS="$API_PORTS $(pick_port)"; done
API_PORTS="${API_PORTS# }"

log "work directory $WORK"
log "PostgreSQL :$PG_PORT  Redis :$REDIS_PORT  mock provider :$MOCK_PORT  replicas :${API_PORTS// /, :}"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"

export SLOW_RATE="${SLOW_RATE:-0.03}" SLOW_MS="${SLOW_MS:-1200}"
"$BIN" mock-provider --port "$MOCK_PORT" --fail-rate "${FAIL_RATE:-0.1}" --latency-ms "${LATENCY_MS:-20}" \
  --slow-rate "$SLOW_RATE" --slow-ms "$SLOW_MS" \
  >"$WORK/logs/mock-provider.log" 2>&1 &
track "$!"
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start (see $WORK/logs/mock-provider.log)"

"$BIN" migrate >"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"
# Audit triggers: every status change of a message and every batch start / epoch bump
# is recorded with its transaction id and PostgreSQL's clock, for the checks.
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres messages_db -f "$ROOT/scripts/chaos/audit.sql" \
  || die "could not install the audit triggers"
"$BIN" seed --count "${SEED_MESSAGES:-150}" >>"$WORK/logs/migrate.log" 2>&1 || die "seed failed"

# The driver's exit code is the script's: 0 pass, 1 violations, 2 harness failure.
set +e
python3 "$ROOT/scripts/chaos/soak.py"
rc=$?
set -e
# A dump of what the checks read, for a failed run's post-mortem.
if [ "$rc" != 0 ] || [ "${KEEP_WORK:-0}" = 1 ] || [ -f "$WORK/keep" ]; then
  psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres messages_db \
    -c "\\copy (SELECT * FROM messages ORDER BY id) TO '$WORK/messages.csv' CSV HEADER" \
    -c "\\copy (SELECT * FROM chaos_audit_transitions ORDER BY seq) TO '$WORK/transitions.csv' CSV HEADER" \
    -c "\\copy (SELECT * FROM chaos_audit_leader ORDER BY seq) TO '$WORK/leader.csv' CSV HEADER" 2>/dev/null || true
fi
exit "$rc"
