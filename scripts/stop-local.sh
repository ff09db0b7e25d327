#!/usr/bin/env bash
# Stops what scripts/run-local.sh started (replicas get SIGTERM and hand over cleanly).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
STATE="$ROOT/.local"
if [ -f "$STATE/pids" ]; then
  while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$STATE/pids"
  for _ in $(seq 1 100); do
    alive=0
    while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done <"$STATE/pids"
    [ "$alive" = 0 ] && break
    sleep 0.2
  done
  rm -f "$STATE/pids"
fi
stop_redis "$STATE/redis"
stop_postgres "$STATE/postgres"
log "stopped (data kept in $STATE; delete it for a fresh start)"
