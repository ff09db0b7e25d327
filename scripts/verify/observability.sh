#!/usr/bin/env bash
# Checks the alert rules and the Grafana dashboard against a real Prometheus
# (Debian's package) scraping a real local cluster: PostgreSQL, Redis, the mock
# provider and two replicas. Checks (scripts/verify/observability.py):
#   - both replicas are scraped and sum(dispatcher_is_leader) reads 1;
#   - every dashboard query (and its job variable and annotation) evaluates without
#     error and returns data, with $__rate_interval = 1m and $job = message-dispatcher;
#   - every alert rule is loaded, evaluates without error, carries a runbook_url into
#     docs/operations.md, and none fires or is pending on the healthy cluster;
#   - every dispatcher_* metric the alert rules read is exported by the replicas;
#   - after Redis is stopped, DispatcherDependencyDown{dependency="redis"} goes pending,
#     labelled with the job and the replica.
# Installs what is missing (postgresql, redis-server, prometheus) with apt-get.
# Takes about a minute once the binary is built (PROFILE=debug reuses the tests' build).
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools \
  prometheus:prometheus promtool:prometheus curl:curl python3:python3
ensure_binary

WORK="$(mktemp -d /tmp/md-observability.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
  # Prometheus first: it is a child of this shell too, and a bare `wait` would wait
  # for it forever.
  stop_prometheus "$WORK/prometheus"
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_redis "$WORK/redis"
  stop_postgres "$WORK/postgres"
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PG_PORT="$(free_port)"
REDIS_PORT="$(free_port)"
MOCK_PORT="$(free_port)"
PROM_PORT="$(free_port)"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"
mkdir -p "$WORK/logs"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"
export BATCH_SIZE=5 PROCESSING_INTERVAL=1s LOG_FORMAT=json
"$BIN" mock-provider --port "$MOCK_PORT" >"$WORK/logs/mock.log" 2>&1 &
PIDS+=("$!")
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start"
"$BIN" migrate >"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"
"$BIN" seed --count 40 >>"$WORK/logs/migrate.log" 2>&1
API_PORTS=()
for i in 1 2; do
  port="$(free_port)"
  API_PORTS+=("$port")
  SERVER_PORT="$port" REPLICA_ID="replica-$i" "$BIN" serve >"$WORK/logs/replica-$i.log" 2>&1 &
  PIDS+=("$!")
done
for port in "${API_PORTS[@]}"; do
  wait_http "http://127.0.0.1:$port/health/ready" 60 || die "replica on :$port is not ready"
done
log "cluster up: replicas on ${API_PORTS[*]}; Prometheus on 127.0.0.1:$PROM_PORT"
start_prometheus "$WORK/prometheus" "$PROM_PORT" 1s "127.0.0.1:${API_PORTS[0]}" "127.0.0.1:${API_PORTS[1]}"

python3 "$ROOT/scripts/verify/observability.py" \
  --prometheus "http://127.0.0.1:$PROM_PORT" \
  --dashboard "$ROOT/deploy/grafana/message-dispatcher.json" \
  --alerts "$ROOT/deploy/prometheus/alerts.yml" \
  --redis-pid "$(cat "$WORK/redis/redis.pid")"
