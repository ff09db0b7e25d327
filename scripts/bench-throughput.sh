#!/usr/bin/env bash
# Throughput ceiling (issue 5): how fast one leader drains the queue end to end, next
# to what PostgreSQL alone can do with the same statements, measured in the same run.
#
#   ./scripts/bench-throughput.sh                      # the full run (about 8 minutes)
#   N=20000 SLOW_N=2000 ./scripts/bench-throughput.sh  # a quick one
#
# Set-up: local PostgreSQL 15 (fsync=off, as the test suite), Redis and the mock
# provider on free 127.0.0.1 ports under a temporary directory; ONE replica
# (REPLICAS=3 adds two idle followers; only the leader dispatches), Redis lease on,
# BATCH_SIZE=500, PROCESSING_INTERVAL=0s, everything else default (DB_POOL_SIZE 8).
# Four drains: provider latency 0 and 20 ms x SEND_CONCURRENCY 1 and 32. Each drain
# starts from an empty queue: N rows seeded, VACUUM ANALYZE, CHECKPOINT, then the
# replica starts. Latency 20 ms at concurrency 1 is bound to 1000/20 = 50 messages/s
# by construction, so that drain uses SLOW_N messages (default 10,000: 200 s) instead
# of N; set SLOW_N=100000 for the full 33 minutes.
#
# End to end = from the first claim (min(claimed_at) in the table: the start of the
# first claim transaction) to the last "batch finished" log line (after the last
# result was recorded). Then it checks exactly once: every row `sent`, the mock
# provider counted N requests, N unique Idempotency-Keys, no duplicate, and its key
# set is exactly 1..N; at concurrency 1 also that the first deliveries came in FIFO
# order.
#
# PostgreSQL reference, per send concurrency C, in a second database of the same
# schema (`migrate`) holding the same N rows (`seed`, VACUUM ANALYZE, CHECKPOINT):
#   1. claim: pgbench -M prepared -c 1 -t N/500 -f scripts/bench/claim.sql, the exact
#      claim transaction of src/store/queue.rs (lock the fence row, read the schedule,
#      rescue, claim 500 ... FOR UPDATE SKIP LOCKED, set last_batch_at; the same SQL
#      text, each $n bound from a pgbench variable). One client: the leader claims
#      serially, one batch at a time.
#   2. marks: pgbench -M prepared -c C -t N/C -f scripts/bench/mark.sql, the per-message
#      MARK_SENT UPDATE (one statement each, autocommit), on the N rows the claims left
#      in `sending`, from C connections at once (pgbench -j = number of CPUs). The
#      service itself never has more than DB_POOL_SIZE = 8 statements in flight; that
#      is a limit of the service, not of PostgreSQL, so the reference does not apply it.
#   DB msg/s(C) = 500 / (t_claim + 500 / marks_per_s(C)): a batch is one serial claim
#   followed by 500 marks at concurrency C, as in the dispatcher. The reference is
#   measured right before and right after the drains of the same concurrency; the
#   higher of the two is the PostgreSQL limit, and the ratio printed is the service's
#   end-to-end rate over it.
#
# -M prepared parses and plans each statement once per connection: the database's own
# limit, and what the service does too (tokio-postgres prepare_cached, once per pooled
# connection). PGBENCH_MODE=extended re-plans every statement, for comparison.
#
# Settings (environment): N (100000), SLOW_N (10000), BATCH (500), REPLICAS (1),
# LATENCIES ("0 20"), CONCURRENCIES ("1 32"), PGBENCH_MODE (prepared), BIN (a built
# binary; default: cargo build --release), KEEP_BENCH_DIR=1 keeps logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench_lib.sh"
cd "$ROOT"

bench_init throughput
bench_services
bench_py throughput
log "bench-throughput took $(bench_elapsed) s"
