#!/usr/bin/env bash
# A PostgreSQL failover under Patroni with etcd (docs/operations.md#postgresql-high-availability):
# two Patroni nodes in synchronous mode, two replicas whose DATABASE_URL names both with
# target_session_attrs=read-write, messages created while the primary's Patroni and
# postmaster are SIGKILLed. Checks that every acknowledged message is sent exactly once
# and prints the failover's timings (scripts/verify/patroni.py). A trial, not part of
# .ci/run: it takes about two minutes.
#
# Runs as root on a fresh Debian machine: installs PostgreSQL, Redis, Patroni and etcd
# with apt-get if they are missing; builds the binary with cargo unless BIN is set.
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools \
  patroni:patroni etcd:etcd-server python3:python3
ensure_binary
work_init patroni

# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  kill_tracked
  pkill -KILL -f "patroni $WORK/" 2>/dev/null
  for data in "$WORK"/pg1 "$WORK"/pg2; do
    [ -f "$data/postmaster.pid" ] && kill -KILL "$(head -1 "$data/postmaster.pid")" 2>/dev/null
  done
  stop_redis "$WORK/redis"
  if [ "$rc" = 0 ] && [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; else echo "logs kept in $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export BIN
python3 "$ROOT/scripts/verify/patroni.py"
