# Shared set-up for the scripts/bench-*.sh benchmarks. Source it after lib.sh; do not
# run it. Every benchmark gets its own temporary directory, PostgreSQL, Redis and mock
# provider on free 127.0.0.1 ports, and a trap that stops exactly what it started.
# shellcheck shell=bash

# Processes this benchmark started are listed (one pid a line) in $BENCH_DIR/pids and
# carry MD_BENCH_DIR=$BENCH_DIR in their environment; the cleanup kills a pid only if
# /proc/PID/environ still shows that marker, so a recycled pid is never touched.

BENCH_PY="$ROOT/scripts/bench.py"

# bench_init NAME: packages, binary, temp dir, trap. Sets BENCH_DIR and BIN.
bench_init() {
  local name="$1"
  ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server \
    redis-cli:redis-tools curl:curl python3:python3 wrk:wrk
  PG_BIN="$(pg_bin_dir)" || die "PostgreSQL server binaries not found"
  export PG_BIN
  [ -x "$PG_BIN/pgbench" ] || die "pgbench not found in $PG_BIN"
  PROFILE=release ensure_binary # figures from a debug build would mislead
  BENCH_DIR="$(mktemp -d "/tmp/md-bench-$name.XXXXXX")"
  chmod 755 "$BENCH_DIR" # the postgres user must reach its data dir below it
  mkdir -p "$BENCH_DIR/logs"
  : >"$BENCH_DIR/pids"
  export BENCH_DIR MD_BENCH_DIR="$BENCH_DIR"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  BENCH_STARTED=$SECONDS
  log "working directory $BENCH_DIR"
}

# bench_owned PID: true if PID is alive and was started by this benchmark.
bench_owned() {
  local pid="$1"
  [ -r "/proc/$pid/environ" ] || return 1
  { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "MD_BENCH_DIR=$BENCH_DIR"
}

# bench_alive: prints the recorded pids that are still ours and alive.
bench_alive() {
  local pid
  sort -u "$BENCH_DIR/pids" | while read -r pid; do
    if [ -n "$pid" ] && bench_owned "$pid"; then echo "$pid"; fi
  done
}

bench_kill_all() {
  local pid sig waited
  [ -f "$BENCH_DIR/pids" ] || return 0
  for sig in TERM KILL; do
    for pid in $(bench_alive); do kill -"$sig" "$pid" 2>/dev/null || true; done
    waited=0
    while [ "$waited" -lt 50 ] && [ -n "$(bench_alive)" ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
  done
}

bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  [ -n "${BENCH_DIR:-}" ] || exit "$rc"
  bench_kill_all
  stop_redis "$BENCH_DIR/redis"
  # Not lib.sh's stop_postgres: inside a trap, its pg_bin_dir's bare `return` (with
  # PG_BIN set) returns the status the script was exiting with, and it would give up.
  if [ -f "$BENCH_DIR/postgres/data/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$BENCH_DIR/postgres/data" -m fast -w stop >/dev/null
  fi
  if [ "$rc" != 0 ] || [ -n "${KEEP_BENCH_DIR:-}" ]; then
    log "kept $BENCH_DIR (logs under logs/)"
  else
    rm -rf "$BENCH_DIR"
  fi
  exit "$rc"
}

# bench_services: PostgreSQL and Redis on free ports; exports DATABASE_URL, REDIS_URL,
# PG_PORT, REDIS_PORT.
bench_services() {
  PG_PORT="$(free_port)"
  REDIS_PORT="$(free_port)"
  log "PostgreSQL on 127.0.0.1:$PG_PORT, Redis on 127.0.0.1:$REDIS_PORT"
  start_postgres "$BENCH_DIR/postgres" "$PG_PORT"
  start_redis "$BENCH_DIR/redis" "$REDIS_PORT"
  export PG_PORT REDIS_PORT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  export LOG_FORMAT=json
  "$BIN" migrate >>"$BENCH_DIR/logs/migrate.log" 2>&1 || die "migrate failed (see $BENCH_DIR/logs/migrate.log)"
}

bench_elapsed() { echo "$((SECONDS - BENCH_STARTED))"; }

# bench_py SUBCOMMAND: runs scripts/bench.py SUBCOMMAND in the background and
# waits for it, so that a SIGINT/SIGTERM sent to this script runs the cleanup at once
# instead of after the measurement.
bench_py() {
  MD_BENCH_DIR="$BENCH_DIR" python3 "$BENCH_PY" "$@" &
  local pid=$!
  echo "$pid" >>"$BENCH_DIR/pids"
  wait "$pid"
}
