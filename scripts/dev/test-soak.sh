#!/usr/bin/env bash
# Runs the whole test suite (scripts/dev/test.sh) N times in a row and reports every
# failure, for people changing timing-sensitive code. A test that fails once in N
# runs is a failing test.
#
#   ./scripts/dev/test-soak.sh            5 runs
#   RUNS=10 ./scripts/dev/test-soak.sh    10 runs
#   STRESS=1 ./scripts/dev/test-soak.sh   the same with both cores kept busy by
#                                     stress-ng --cpu <cores> (installed if missing)
#   ./scripts/dev/test-soak.sh -E 'test(/failover/)'   extra arguments go to nextest
#
# Prints one line per run and a summary: runs x tests, failures per test. Logs are
# kept in a temporary directory (printed). Exits 1 if any run failed.
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

RUNS="${RUNS:-5}"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"
LOGS="$(mktemp -d /tmp/md-test-soak.XXXXXX)"
STRESS_PID=""
cleanup() { [ -n "$STRESS_PID" ] && kill "$STRESS_PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

# Build once, outside the timed runs.
cargo nextest run --locked --no-run >/dev/null 2>&1 || cargo build --locked --tests
if [ "${STRESS:-0}" = 1 ]; then
  ensure_packages stress-ng:stress-ng
  stress-ng --cpu "$(nproc)" --quiet &
  STRESS_PID=$!
  log "stress-ng --cpu $(nproc) running"
fi

failed_runs=0
total_tests=0
for run in $(seq 1 "$RUNS"); do
  log_file="$LOGS/run-$run.log"
  start=$SECONDS
  if ./scripts/dev/test.sh "$@" >"$log_file" 2>&1; then result=ok; else result=FAILED; failed_runs=$((failed_runs + 1)); fi
  summary="$(grep -E '^\s+Summary' "$log_file" | tail -1 | sed 's/^ *//')"
  tests="$(grep -oE '[0-9]+ tests run' <<<"$summary" | grep -oE '[0-9]+' || echo 0)"
  total_tests=$((total_tests + tests))
  printf 'run %d/%d: %s in %ds (%s)\n' "$run" "$RUNS" "$result" "$((SECONDS - start))" "${summary:-no summary}"
  # nextest names a failure twice (as it happens and in the summary): once per run here.
  grep -E '^\s+(FAIL|TIMEOUT|SIGSEGV|SIGABRT) \[' "$log_file" | sed -E 's/.*\] +//' | sort -u | sed 's/^/    /' || true
done

echo
echo "soak: $RUNS runs, $total_tests tests run, $failed_runs run(s) with failures${STRESS_PID:+ (under stress-ng)}"
if [ "$failed_runs" -gt 0 ]; then
  echo "failures per test:"
  for f in "$LOGS"/run-*.log; do
    grep -E '^\s+(FAIL|TIMEOUT|SIGSEGV|SIGABRT) \[' "$f" | sed -E 's/.*\] +//' | sort -u
  done | sort | uniq -c | sort -rn
fi
echo "logs: $LOGS"
[ "$failed_runs" -eq 0 ]
