# The bash harness of every script under scripts/: logging, the binary, packages,
# free ports, PostgreSQL, Redis and Prometheus as local processes, and a work
# directory whose processes are tracked so that a cleanup stops exactly what it
# started. Source it; do not run it. Its Python counterpart is scripts/lib/harness.py.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HARNESS_PY="$ROOT/scripts/lib/harness.py"

log() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# ensure_binary: sets and exports BIN. Unless BIN already names a binary, builds
# message-dispatcher with cargo: PROFILE=release (the default) or PROFILE=debug.
ensure_binary() {
  if [ -z "${BIN:-}" ]; then
    command -v cargo >/dev/null || die "cargo is required (or set BIN=/path/to/message-dispatcher)"
    local profile="${PROFILE:-release}" flags=()
    case "$profile" in
      release) flags=(--release) ;;
      debug) ;;
      *) die "PROFILE must be release or debug, not $profile" ;;
    esac
    log "building message-dispatcher ($profile)"
    (cd "$ROOT" && cargo build "${flags[@]}" --locked --quiet)
    BIN="$(target_dir)/$profile/message-dispatcher"
  fi
  [ -x "$BIN" ] || die "no binary at $BIN"
  export BIN
}

# target_dir: where cargo puts its builds (CARGO_TARGET_DIR, a config file, or target/).
target_dir() {
  (cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2>/dev/null) |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null ||
    echo "${CARGO_TARGET_DIR:-$ROOT/target}"
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"
  fi
}

# ensure_packages CMD:PACKAGE ... installs each Debian package whose command is missing.
ensure_packages() {
  local missing=() pair cmd pkg
  for pair in "$@"; do
    cmd="${pair%%:*}" pkg="${pair#*:}"
    if [ "$cmd" = pg ]; then
      pg_bin_dir >/dev/null 2>&1 || missing+=("$pkg")
    elif ! command -v "$cmd" >/dev/null 2>&1; then
      missing+=("$pkg")
    fi
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# venv_install VENV PACKAGE...: pip-installs PACKAGE... into the virtualenv VENV, creating
# it first (Debian's python3 refuses system-wide pip installs, PEP 668).
venv_install() {
  local venv="$1"
  shift
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv" 2>/dev/null || {
    ensure_packages _python3_venv_:python3-venv
    rm -rf "$venv"
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q --disable-pip-version-check "$@"
}

pg_bin_dir() {
  # An explicit status: a bare `return` in a function called from a trap returns the
  # status the script is exiting with, and the caller would give up.
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return 0; fi
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$dir" ] && [ -x "$dir/postgres" ] || return 1
  echo "$dir"
}

# free_port [preferred]: the preferred port if free, else any free port (see free_port
# in harness.py, the one definition).
free_port() {
  python3 "$HARNESS_PY" free-port "${1:-0}"
}

# stable_port FILE: a free port below the kernel's ephemeral range (32768+), so that no
# outgoing connection takes it between choosing it and binding it, also when a
# process is restarted on it. Ports already listed in FILE are skipped; the chosen one
# is added to it.
stable_port() {
  local taken="$1" port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 12000))
    if [ "$(free_port "$port")" = "$port" ] && ! grep -qx "$port" "$taken" 2>/dev/null; then
      echo "$port" >>"$taken"
      echo "$port"
      return
    fi
  done
  die "no free port found below 32000"
}

# wait_http URL [seconds]: until URL answers 200.
wait_http() {
  local url="$1" deadline=$((SECONDS + ${2:-60}))
  until curl -fsS -o /dev/null "$url" 2>/dev/null; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# Runs a command as the postgres user when we are root (PostgreSQL refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The local run's PostgreSQL directory: .local/postgres, or, when the postgres user
# cannot reach the checkout (as root below a private directory such as /root or one
# made by mktemp -d), a directory under /var/tmp named after the checkout, so that a
# restart and stop-local.sh find the same one.
local_pg_dir() {
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$ROOT" 2>/dev/null; then
    local base
    base="/var/tmp/message-dispatcher-local-$(printf %s "$ROOT" | sha256sum | cut -c1-12)"
    mkdir -p "$base"
    chmod 755 "$base"
    printf '%s/postgres\n' "$base"
  else
    printf '%s/.local/postgres\n' "$ROOT"
  fi
}

# start_postgres DIR PORT: initdb DIR/data once, start the server, create messages_db.
start_postgres() {
  local dir="$1" port="$2" bin
  bin="$(pg_bin_dir)" || die "PostgreSQL server binaries not found"
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$dir"
    runuser -u postgres -- test -w "$dir" ||
      die "user postgres cannot reach $dir (a parent directory is not searchable; chmod o+x it)"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" \
    start >/dev/null
  psql -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'messages_db'" | grep -q 1 ||
    psql -h 127.0.0.1 -p "$port" -U postgres -qc "CREATE DATABASE messages_db"
}

# stop_postgres DIR: stops the server if it runs; quiet when it is gone already.
stop_postgres() {
  local dir="$1" bin
  bin="$(pg_bin_dir)" || return 0
  [ -f "$dir/data/postmaster.pid" ] || return 0
  as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1 || return 0
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# start_redis DIR PORT
start_redis() {
  local dir="$1" port="$2"
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  local deadline=$((SECONDS + 20))
  until redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; do
    [ "$SECONDS" -lt "$deadline" ] || die "redis did not start (see $dir/redis.log)"
    sleep 0.1
  done
}

stop_redis() {
  local dir="$1"
  [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
  rm -f "$dir/redis.pid"
}
# start_prometheus DIR PORT INTERVAL TARGET...: a Prometheus (Debian's package) on
# 127.0.0.1:PORT that scrapes each TARGET (host:port) as job message-dispatcher every
# INTERVAL, evaluates deploy/prometheus/alerts.yml at the same pace, and keeps its
# data in DIR.
start_prometheus() {
  local dir="$1" port="$2" interval="$3"
  shift 3
  local targets
  targets="$(printf '"%s", ' "$@")"
  mkdir -p "$dir/data"
  cp "$ROOT/deploy/prometheus/alerts.yml" "$dir/alerts.yml"
  cat >"$dir/prometheus.yml" <<YML
global:
  scrape_interval: $interval
  scrape_timeout: $interval
  evaluation_interval: $interval
rule_files: [alerts.yml]
scrape_configs:
  - job_name: message-dispatcher
    static_configs:
      - targets: [${targets%, }]
YML
  promtool check config "$dir/prometheus.yml" >/dev/null || die "generated $dir/prometheus.yml is invalid"
  nohup prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$port" >"$dir/prometheus.log" 2>&1 &
  echo "$!" >"$dir/prometheus.pid"
  wait_http "http://127.0.0.1:$port/-/ready" 30 || die "prometheus did not start (see $dir/prometheus.log)"
}
stop_prometheus() {
  local dir="$1" pid
  [ -f "$dir/prometheus.pid" ] || return 0
  pid="$(cat "$dir/prometheus.pid")"
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "^prometheus "; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$dir/prometheus.pid"
}

# ---------------------------------------------------------------- work directory
# A run's processes are listed (one pid a line) in $WORK/pids and carry MD_WORK=$WORK
# in their environment (harness.py's spawn does the same for what Python starts);
# the cleanup signals a pid only while /proc/PID/environ still shows that marker, so a
# recycled pid is never touched.

# work_init NAME: a fresh work directory /tmp/md-NAME.XXXXXX with logs/ and an empty
# pid list; exports WORK and MD_WORK. The caller sets its own trap.
work_init() {
  WORK="$(mktemp -d "/tmp/md-$1.XXXXXX")"
  chmod 755 "$WORK" # the postgres user must reach its data directory below it
  mkdir -p "$WORK/logs"
  : >"$WORK/pids"
  export WORK MD_WORK="$WORK"
}

# track PID: lists PID for the cleanup (it must carry MD_WORK, as children of a script
# that called work_init do).
track() { echo "$1" >>"$WORK/pids"; }

# owned PID: true if PID is alive and was started under this work directory.
owned() {
  [ -r "/proc/$1/environ" ] || return 1
  { tr '\0' '\n' <"/proc/$1/environ"; } 2>/dev/null | grep -qxF "MD_WORK=$WORK"
}

# tracked_alive: the listed pids that are still ours and alive.
tracked_alive() {
  local pid
  sort -u "$WORK/pids" | while read -r pid; do
    if [ -n "$pid" ] && owned "$pid"; then echo "$pid"; fi
  done
}

# kill_tracked: SIGCONT (a stopped process acts on nothing else) and SIGTERM to every
# tracked process, up to 5 s to exit, then SIGKILL to what is left.
kill_tracked() {
  local pid sig waited
  [ -f "${WORK:-}/pids" ] || return 0
  for sig in TERM KILL; do
    for pid in $(tracked_alive); do
      kill -CONT "$pid" 2>/dev/null || true
      kill -"$sig" "$pid" 2>/dev/null || true
    done
    waited=0
    while [ "$waited" -lt 50 ] && [ -n "$(tracked_alive)" ]; do
      sleep 0.1
      waited=$((waited + 1))
    done
  done
}

# stop_work: every tracked process, then the Redis and PostgreSQL under $WORK.
stop_work() {
  kill_tracked
  stop_redis "$WORK/redis"
  stop_postgres "$WORK/postgres"
}

# run_tracked CMD...: runs CMD in the background and waits for it, so that a SIGINT or
# SIGTERM sent to the script runs its trap at once instead of after CMD.
run_tracked() {
  "$@" &
  local pid=$!
  track "$pid"
  wait "$pid"
}
