#!/usr/bin/env bash
# Failover (issue 5): three replicas; the leader is killed with SIGKILL KILLS times and
# stopped with SIGTERM TERMS times (alternating); each time the benchmark measures
#   kill -> new leader elected   the "became leader" log line of another replica
#                                (written right after it bumped the fence epoch)
#   kill -> first claim          that replica's first "batch claimed" line in its new
#                                epoch (the claim committed)
# and restarts the stopped replica (same REPLICA_ID, new process), so there are always
# three. Messages keep flowing throughout: FAILOVER_SEED messages are queued and the
# replicas run BATCH_SIZE=2, PROCESSING_INTERVAL=200ms, so a leader claims every 200 ms
# and a new one claims as soon as it leads (a new leader keeps the cluster's rhythm:
# last_batch_at + interval, which has long passed after a crash and is at most 200 ms
# away after a handover).
#
# Before each kill: the restarted replica has been ready for SETTLE seconds, the
# leader has claimed in its term, and then a random 0..TTL/3 s wait puts the kill at a
# random point of the lease's extension cycle (the lease is extended every TTL/3, so a
# SIGKILL leaves between 2/3 TTL and TTL of lease). The theoretical bound for a crash
# is TTL + retry interval (lease expiry plus one follower retry; followers retry every
# retry x 0.8..1.2, so the worst case is TTL + 1.2 x retry); target: every SIGKILL
# round <= TTL + retry + 1 s, and graceful handover (SIGTERM: the leader finishes its
# batch, deletes the lock and announces it on Redis pub/sub) <= 0.5 s median.
#
#   ./scripts/bench-failover.sh                        # default: about 5 minutes
#   KILLS=3 TERMS=3 TTL=4s RETRY=1s ./scripts/bench-failover.sh   # quick
#
# Settings (environment): KILLS (10), TERMS (10), TTL (15s = DISTRIBUTED_LOCK_TTL),
# RETRY (2s = LOCK_RETRY_INTERVAL), INTERVAL (200ms), FAILOVER_BATCH_SIZE (2),
# FAILOVER_SEED (50000), SETTLE (2 s), BIN, KEEP_BENCH_DIR=1 keeps the logs.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench_lib.sh"
cd "$ROOT"

bench_init failover
bench_services
bench_py failover
log "bench-failover took $(bench_elapsed) s"
