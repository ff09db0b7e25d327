#!/usr/bin/env bash
# The local run as a user meets it: scripts/dev/run-local.sh with API_TOKEN and
# CARGO_TARGET_DIR set, its summary (the console, /openapi.json, the schedule in
# force), a restart within a minute that keeps every port, and stop-local.sh quiet
# about processes that are gone already. Uses .local/ like run-local.sh (it stops a
# local run that is up) and the tests' debug build (PROFILE=release to build one).
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

export API_TOKEN="verify-$RANDOM$RANDOM"
# An explicit target directory, where the build already is: the scripts must find the
# binary there, not under target/.
CARGO_TARGET_DIR="$(target_dir)"
export CARGO_TARGET_DIR
export PROFILE="${PROFILE:-debug}"
WORK="$(mktemp -d)"
trap './scripts/dev/stop-local.sh >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
FAILED=0
pass() { printf 'PASS  %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; FAILED=1; }

ports() { grep -E '^(PG_PORT|REDIS_PORT|MOCK_PORT|PROMETHEUS_PORT|API_PORTS)=' .local/env; }

log "first run (API_TOKEN and CARGO_TARGET_DIR=$CARGO_TARGET_DIR set)"
./scripts/dev/run-local.sh >"$WORK/first.out" 2>"$WORK/first.err" || { cat "$WORK/first.err"; die "run-local.sh failed"; }
summary="$(cat "$WORK/first.out")"
for wanted in "console " "/openapi.json" "messages every" "leader: "; do
  grep -qF -- "$wanted" <<<"$summary" && pass "the summary names $wanted" || fail "the summary lacks $wanted"
done
port="$(sed -n 's/^API_PORTS="\([0-9]*\).*/\1/p' .local/env)"
curl -fsS -H "Authorization: Bearer $API_TOKEN" -XPUT -H 'Content-Type: application/json' \
  -d '{"processing_interval": "7s"}' "http://127.0.0.1:$port/api/messaging/config" >/dev/null
ports >"$WORK/ports.first"

log "stop, and start again at once"
./scripts/dev/stop-local.sh 2>"$WORK/stop.err"
./scripts/dev/run-local.sh >"$WORK/second.out" 2>"$WORK/second.err" || { cat "$WORK/second.err"; die "the restart failed"; }
ports >"$WORK/ports.second"
if diff -q "$WORK/ports.first" "$WORK/ports.second" >/dev/null; then
  pass "a restart within a minute keeps every port ($(tr '\n' ' ' <"$WORK/ports.second"))"
else
  fail "the restart moved ports: $(diff "$WORK/ports.first" "$WORK/ports.second" | tr '\n' ' ')"
fi
grep "messages every 7s (" "$WORK/second.out" | grep -q "interval overridden in PostgreSQL" &&
  pass "the summary shows the schedule in force (the stored override)" ||
  fail "the summary does not show the override: $(head -3 "$WORK/second.out")"

log "stop with a replica and PostgreSQL gone already, then stop again"
kill -9 "$(sed -n 2p .local/pids)"
as_pg "$(pg_bin_dir)/pg_ctl" -D "$(local_pg_dir)/data" -m immediate -w stop >/dev/null 2>&1 || true
./scripts/dev/stop-local.sh 2>"$WORK/stop2.err"
./scripts/dev/stop-local.sh 2>>"$WORK/stop2.err"
noise="$(grep -v '^.\[1m==>' "$WORK/stop2.err" || true)"
[ -z "$noise" ] && pass "stop-local.sh says nothing of processes gone already" ||
  fail "stop-local.sh printed: $noise"

[ "$FAILED" = 0 ] && log "local run: PASS" || die "local run: FAIL"
