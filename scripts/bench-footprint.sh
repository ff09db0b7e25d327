#!/usr/bin/env bash
# Footprint (issue 5): three replicas with the default schedule (BATCH_SIZE 2 every
# 2m) and an empty queue sit idle for IDLE_SECONDS (60); for the leader and the
# followers it reports RSS (VmRSS of /proc/PID/status at the start and end of the
# window, its maximum sampled every 5 s, the anon/file split, and the replica's own
# process_resident_memory_bytes) and CPU (utime + stime of /proc/PID/stat over the
# window, as % of one core). Target: idle RSS <= 20 MiB.
# Then N (100000) messages are queued and the leader drains them at BATCH_SIZE 500,
# PROCESSING_INTERVAL 0s (set at run time through PUT /api/messaging/config, so the
# same processes are measured) and SEND_CONCURRENCY (default 1); RSS right after the
# drain, 10 s later, and the peak (VmHWM). bench-throughput.sh also prints the RSS
# after each of its drains (including SEND_CONCURRENCY 32).
# Last, start-up: STARTS (10) fresh replicas, one at a time, each timed from spawn to
# its first /health/ready 200 (polled every 2 ms), PostgreSQL and Redis already up.
#
#   ./scripts/bench-footprint.sh                    # about 2.5 minutes
#   IDLE_SECONDS=10 N=10000 ./scripts/bench-footprint.sh
#
# Settings (environment): IDLE_SECONDS (60), N (100000), SEND_CONCURRENCY (1), STARTS (10),
# WARMUP (5 s after the election before the window opens), AFTER_DRAIN_WAIT (10),
# RSS_TARGET_MIB (20), BIN, KEEP_BENCH_DIR=1 keeps the logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench_lib.sh"
cd "$ROOT"

bench_init footprint
bench_services
bench_py footprint
log "bench-footprint took $(bench_elapsed) s"
