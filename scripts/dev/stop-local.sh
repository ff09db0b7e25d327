#!/usr/bin/env bash
# Stops what scripts/dev/run-local.sh started (replicas get SIGTERM and hand over cleanly;
# Prometheus, Redis and PostgreSQL follow).
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
STATE="$ROOT/.local"
# The binary run-local.sh started (wherever cargo built it).
BIN="$(sed -n 's/^BIN=//p' "$STATE/env" 2>/dev/null)"
BIN="${BIN:-message-dispatcher}"
# Only processes that still run our binary: a stale pid file (after a reboot) must not
# kill whatever reused those pids. Quiet about those gone already.
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF "$BIN"; }
if [ -f "$STATE/pids" ]; then
  while read -r pid; do ours "$pid" && kill "$pid" 2>/dev/null || true; done <"$STATE/pids"
  for _ in $(seq 1 100); do
    alive=0
    while read -r pid; do ours "$pid" && alive=1; done <"$STATE/pids"
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  rm -f "$STATE/pids"
fi
stop_prometheus "$STATE/prometheus"
stop_redis "$STATE/redis"
stop_postgres "$(local_pg_dir)"
log "stopped (data kept in $STATE; delete it for a fresh start)"
