#!/usr/bin/env bash
# API (issue 5): wrk against one replica (the leader, idle, with SENT = 1000 sent
# messages in the table and their delivery-cache entries in Redis): /health/live,
# /health, /metrics and /api/messages/sent?limit=100, each after a 2 s warm-up, for
# DURATION (10s) with THREADS (2) threads and CONNECTIONS (32) connections. Reports
# requests/second and the p50/p90/p99 of wrk's --latency distribution, non-2xx
# answers, socket errors and the replica's CPU time. wrk, the replica, PostgreSQL and
# Redis share this machine's cores, so the rates are what the whole box does.
# Target: /health/live p99 <= 5 ms at the rate wrk reaches.
#
#   ./scripts/bench-api.sh                      # about 1 minute
#   DURATION=3s ./scripts/bench-api.sh
#
# Settings (environment): SENT (1000), DURATION (10s), THREADS (2), CONNECTIONS (32),
# BIN, KEEP_BENCH_DIR=1 keeps the logs (logs/wrk.log has wrk's full output).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench_lib.sh"
cd "$ROOT"

bench_init api
bench_services
bench_py api
log "bench-api took $(bench_elapsed) s"
