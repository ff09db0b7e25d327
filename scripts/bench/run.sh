#!/usr/bin/env bash
# Runs every benchmark of issue 5 one after the other (failover, throughput,
# footprint, API; about 15 minutes with the defaults), each printing its own tables,
# then one combined table with the date, the machine (CPUs, CPU model, memory) and the
# binary's version. Each benchmark starts and cleans up its own PostgreSQL, Redis and
# mock provider; their settings (KILLS, N, IDLE_SECONDS, DURATION, ...) pass through.
#
#   ./scripts/bench-all.sh
#   ONLY="api footprint" ./scripts/bench-all.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server \
  redis-cli:redis-tools curl:curl python3:python3 wrk:wrk
PROFILE=release ensure_binary # figures from a debug build would mislead

RESULTS="$(mktemp -d /tmp/md-bench-all.XXXXXX)"
trap 'rm -rf "$RESULTS"' EXIT
files=()
timings=()
failed=0
for bench in ${ONLY:-failover throughput footprint api}; do
  [ -x "$ROOT/scripts/bench-$bench.sh" ] || die "no such benchmark: $bench"
  log "bench-$bench"
  started=$SECONDS
  rc=0
  BENCH_RESULT="$RESULTS/$bench.json" "$ROOT/scripts/bench-$bench.sh" || rc=$?
  # 130/143: the benchmark was interrupted (Ctrl-C, SIGTERM); stop here rather than
  # start the next one.
  case "$rc" in
    0) ;;
    130 | 143) log "bench-$bench interrupted"; exit "$rc" ;;
    *) log "bench-$bench failed (exit $rc)"; failed=1 ;;
  esac
  files+=("$RESULTS/$bench.json")
  timings+=("bench-$bench: $((SECONDS - started)) s")
done
echo
BIN="$BIN" python3 "$ROOT/scripts/bench.py" combine "${files[@]}"
printf '%s\n' "${timings[@]}"
exit "$failed"
