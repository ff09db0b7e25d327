#!/usr/bin/env bash
# API fuzzing: schemathesis against GET /openapi.json of one running replica
# on a local stack (PostgreSQL, Redis, the mock provider), every operation, a few
# hundred generated cases in total, bounded in time. Exits non-zero on any failure:
# a 5xx, a response that does not match the document (status code, content type,
# body schema), schema-invalid input that is accepted, or an /api operation that
# answers without the API token.
#
#   scripts/dev/fuzz-api.sh                  # default: up to 100 cases per operation and phase
#                                        # (~2000 cases, under a minute plus the build)
#   MAX_EXAMPLES=30 scripts/dev/fuzz-api.sh  # a CI-sized run (~700 cases)
#
# Settings (environment):
#   MAX_EXAMPLES  cases per operation and phase (default 100)
#   MAX_TIME      hard wall-clock cap of the schemathesis run in seconds (default 300);
#                 reaching it is a failure (the run is sized to finish well before)
#   SEED          schemathesis seed (default: random; printed, so a run can be repeated)
#   CHECKS        comma-separated schemathesis checks (default: see CHECKS below)
#   MODE          positive | negative | all (default all)
#   PROFILE       release (default) or debug: which cargo build to use
#   BIN           use this message-dispatcher binary instead of building
#   KEEP=1        keep the stack running at the end (prints how to reach and stop it)
#   KEEP_LOGS=1   keep the work directory (logs, reports) after a passing run too
#   ST_VENV       where schemathesis is installed (default /var/tmp/message-dispatcher-fuzz-venv)
#   ST_VERSION    schemathesis version to install (default 4.32.5)
#   WORKERS       schemathesis workers (default 1)
#   EXTRA_ST_ARGS extra arguments for `st run`
#
# Runs as root on a fresh Debian machine: installs PostgreSQL, Redis and curl with
# apt-get and schemathesis with pip in a virtualenv. Reports land in $WORK/report
# (JUnit XML, and a pytest file that reproduces each failure).
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

MAX_EXAMPLES="${MAX_EXAMPLES:-100}"
MAX_TIME="${MAX_TIME:-300}"
SEED="${SEED:-$(( (RANDOM << 15) | RANDOM ))}"
MODE="${MODE:-all}"
PROFILE="${PROFILE:-release}"
ST_VERSION="${ST_VERSION:-4.32.5}"
ST_VENV="${ST_VENV:-/var/tmp/message-dispatcher-fuzz-venv}"
API_TOKEN_VALUE="fuzz-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# Contract checks (each answers "does the API do what /openapi.json says"):
#   not_a_server_error           no 5xx, ever
#   status_code_conformance      every status is one the operation documents
#   content_type_conformance     the Content-Type is the documented one
#   response_headers_conformance documented headers are present and valid
#   response_schema_conformance  the JSON body validates against the documented schema
#   negative_data_rejection      schema-invalid input is refused with a 4xx
#   positive_data_acceptance     schema-valid input is not refused with 400/422: where
#                                it is, the document promises more than the API accepts
#   ignored_auth                 /api/* operations (security: bearer) refuse a request
#                                without the token (the replica runs with API_TOKEN set)
# Not in the default set (add it with CHECKS=...): unsupported_method, which wants a 405
# *with an Allow header* (RFC 9110) for methods a path lacks; 405s are not part of the
# document, so it is an HTTP-conformance check rather than a contract check.
CHECKS="${CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,positive_data_acceptance,ignored_auth}"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools curl:curl python3:python3

# --- schemathesis in a virtualenv -------------------------------------------------
if ! "$ST_VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
  log "installing schemathesis $ST_VERSION into $ST_VENV"
  python3 -m venv "$ST_VENV" 2>/dev/null || {
    ensure_packages _python3_venv_:python3-venv
    rm -rf "$ST_VENV"
    python3 -m venv "$ST_VENV"
  }
  "$ST_VENV/bin/pip" install -q --disable-pip-version-check "schemathesis==$ST_VERSION"
fi
ST="$ST_VENV/bin/st"
log "$("$ST" --version)"

# --- the binary -------------------------------------------------------------------
ensure_binary

# --- the stack --------------------------------------------------------------------
WORK="$(mktemp -d /tmp/md-fuzz.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  set +e
  if [ "${KEEP:-0}" = 1 ]; then
    echo "KEEP=1: stack left running in $WORK (replica http://127.0.0.1:${API_PORT:-?})"
    echo "stop it with: kill ${PIDS[*]:-}; $(pg_bin_dir)/pg_ctl -D $WORK/postgres/data stop (as postgres); kill \$(cat $WORK/redis/redis.pid)"
    exit "$rc"
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
  done
  stop_redis "$WORK/redis"
  stop_postgres "$WORK/postgres"
  if [ "$rc" = 0 ] && [ "${KEEP_LOGS:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    echo "logs and reports kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pick_port() { stable_port "$WORK/ports"; }
PG_PORT="$(pick_port)"
REDIS_PORT="$(pick_port)"
MOCK_PORT="$(pick_port)"
API_PORT="$(pick_port)"
mkdir -p "$WORK/logs" "$WORK/report"

log "PostgreSQL on :$PG_PORT, Redis on :$REDIS_PORT, mock provider on :$MOCK_PORT (in $WORK)"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"
export LOG_FORMAT=json

"$BIN" mock-provider --port "$MOCK_PORT" --fail-rate 0.1 >"$WORK/logs/mock.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start"

"$BIN" migrate >"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"
"$BIN" seed --count 30 >>"$WORK/logs/migrate.log" 2>&1
# A few failed rows, so that POST /api/messages/{id}/retry has something to retry,
# and rows in every status for the listings.
psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres messages_db <<'SQL'
INSERT INTO messages (phone_number, content, status, attempts, last_error)
SELECT '+9055500000' || lpad(s::text, 2, '0'), 'failed fixture ' || s, 'failed', 3, 'HTTP 400: fixture'
FROM generate_series(1, 20) AS s;
SQL

SERVER_PORT="$API_PORT" REPLICA_ID="fuzz-replica" API_TOKEN="$API_TOKEN_VALUE" \
  BATCH_SIZE=2 PROCESSING_INTERVAL=1s RETRY_BACKOFF_BASE=1s RETRY_BACKOFF_MAX=5s \
  DISTRIBUTED_LOCK_TTL=3s LOCK_RETRY_INTERVAL=500ms SMS_API_TIMEOUT=2s \
  "$BIN" serve >"$WORK/logs/replica.log" 2>&1 &
PIDS+=("$!")
REPLICA_PID="$!"
wait_http "http://127.0.0.1:$API_PORT/health/ready" 60 || die "replica did not become ready (see $WORK/logs/replica.log)"

BASE="http://127.0.0.1:$API_PORT"
curl -fsS "$BASE/openapi.json" >"$WORK/openapi.json"
OPS="$(python3 -c '
import json, sys
doc = json.load(open(sys.argv[1]))
print(sum(1 for p in doc["paths"].values() for m in p if m in ("get","put","post","delete","patch")))' "$WORK/openapi.json")"
log "fuzzing $OPS operations of $BASE/openapi.json: max $MAX_EXAMPLES cases per operation and phase, mode $MODE, seed $SEED, cap ${MAX_TIME}s"
log "checks: $CHECKS"

# negative_data_rejection: schemathesis' default list of "rejections" lacks 413, which
# is how this API (documented per operation) refuses a body over 1 MiB, e.g. an array
# far over maxItems. 5xx is left out on purpose: a 5xx is never a valid rejection.
# positive_data_acceptance, createMessages: `expires_at` must be after `send_at`, a
# rule between two fields that JSON Schema cannot state, and a phone number must exist
# in its country's numbering plan (libphonenumber), which a pattern cannot state
# either; schemathesis generates schema-valid values the API rightly refuses with a
# 422 naming the field. updateConfig and updateLaneConfig (the same ConfigChange): an
# interval must be a whole number of milliseconds, which the duration pattern does not
# state readably. providerReceipts: a receipt must be in the named provider's own format
# (the document lists every format, the provider takes one: a form sent to a JSON
# provider is a 400), and a form body is a Twilio callback that needs a valid
# signature (403 without).
cat >"$WORK/schemathesis.toml" <<'TOML'
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]

[[operations]]
include-operation-id = "createMessages"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id = "updateConfig"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id = "updateLaneConfig"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id = "providerReceipts"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id = "providerInbound"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-operation-id = "getOptOut"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "422", "429"]

[[operations]]
include-operation-id = "putOptOut"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "422", "429"]

[[operations]]
include-operation-id = "deleteOptOut"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "422", "429"]
TOML

started=$SECONDS
set +e
# No --max-time: with it, schemathesis repeats fuzzing until the budget is spent; the
# run is bounded by --max-examples per operation and capped by `timeout`.
# shellcheck disable=SC2086
timeout --signal=INT --kill-after=20 "$MAX_TIME" \
  "$ST" --config-file "$WORK/schemathesis.toml" run "$BASE/openapi.json" \
  --checks "$CHECKS" \
  --mode "$MODE" \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers "${WORKERS:-1}" \
  --continue-on-failure \
  --request-timeout 10 \
  --header "Authorization: Bearer $API_TOKEN_VALUE" \
  --suppress-health-check too_slow,filter_too_much \
  --report junit,pytest,ndjson \
  --report-dir "$WORK/report" \
  --warnings off \
  ${EXTRA_ST_ARGS:-} \
  2>&1 | tee "$WORK/schemathesis.log"
st_rc=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - started))

# Independent of schemathesis' own verdict: any 5xx in the replica's log, and the
# replica must still be alive and ready.
internal="$(grep -c '"internal error"' "$WORK/logs/replica.log" || true)"
panics="$(grep -c 'panicked' "$WORK/logs/replica.log" || true)"
alive=1
kill -0 "$REPLICA_PID" 2>/dev/null || alive=0
ready=0
curl -fsS -o /dev/null "$BASE/health/ready" 2>/dev/null && ready=1
# "Test cases:" is followed by e.g. "  812 generated, 3 found 2 unique failures".
cases="$(grep -A1 '^Test cases:' "$WORK/schemathesis.log" | grep -o '[0-9]* generated' | grep -o '[0-9]*' || echo '?')"
if [ "$st_rc" = 124 ] || [ "$st_rc" = 130 ]; then echo "schemathesis hit the ${MAX_TIME}s cap (MAX_TIME)"; fi
# Which documented operations schemathesis tested (from its JUnit report).
coverage="$(python3 - "$WORK/openapi.json" "$WORK/report" <<'PY'
import glob, json, sys
import xml.etree.ElementTree as ET
doc = json.load(open(sys.argv[1]))
documented = {"%s %s" % (m.upper(), p) for p, ops in doc["paths"].items() for m in ops
              if m in ("get", "put", "post", "delete", "patch")}
tested = set()
for path in glob.glob(sys.argv[2] + "/junit*.xml"):
    for case in ET.parse(path).getroot().iter("testcase"):
        tested.add(case.get("name"))
left = sorted(documented - tested)
print("%d of %d%s" % (len(documented & tested), len(documented),
                      (" (not tested: %s)" % ", ".join(left)) if left else ""))
PY
)"
echo
echo "================ fuzz-api summary ================"
printf '%-34s %s\n' "schemathesis" "$("$ST" --version | awk '{print $NF}') (seed $SEED, mode $MODE, max-examples $MAX_EXAMPLES)"
printf '%-34s %s\n' "operations tested" "$coverage"
printf '%-34s %s\n' "generated test cases" "$cases"
printf '%-34s %s\n' "schemathesis exit code" "$st_rc"
printf '%-34s %s\n' "\"internal error\" lines (500s)" "$internal"
printf '%-34s %s\n' "panics in the replica log" "$panics"
printf '%-34s %s\n' "replica alive / ready after" "$alive / $ready"
printf '%-34s %ss\n' "time" "$elapsed"
echo "reports: $WORK/report (JUnit, pytest reproduction); replica log: $WORK/logs/replica.log"
if [ "$st_rc" = 0 ] && [ "$internal" = 0 ] && [ "$panics" = 0 ] && [ "$alive" = 1 ] && [ "$ready" = 1 ]; then
  echo "RESULT: PASS"
  exit 0
fi
echo "RESULT: FAIL"
exit 1
