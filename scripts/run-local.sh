#!/usr/bin/env bash
# Runs the whole thing on this machine: PostgreSQL, Redis, the mock SMS provider,
# three dispatcher replicas and a Prometheus that scrapes them with the alert rules
# (deploy/prometheus/alerts.yml), each a local process with its data under .local/.
# Installs what is missing (postgresql, redis-server, prometheus) with apt-get.
#
#   ./scripts/run-local.sh            start everything, print where it is
#   ./scripts/stop-local.sh           stop everything
#
# Settings (environment): SEED (demo messages, default 20), BATCH_SIZE (2),
# PROCESSING_INTERVAL (10s, faster than the 2m default so the demo moves),
# PG_PORT (55432), REDIS_PORT (56379), MOCK_PORT (3001), API_PORTS ("8081 8082 8083"),
# PROMETHEUS_PORT (9090).
# A busy port is replaced by a free one.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

STATE="$ROOT/.local"
if [ -f "$STATE/pids" ]; then
  log "an earlier run is still registered; stopping it first"
  "$ROOT/scripts/stop-local.sh"
fi
mkdir -p "$STATE/logs"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server curl:curl python3:python3 \
  prometheus:prometheus promtool:prometheus
command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"

log "building message-dispatcher (release)"
cargo build --release --locked --quiet
BIN="$ROOT/target/release/message-dispatcher"

PG_PORT="$(free_port "${PG_PORT:-55432}")"
REDIS_PORT="$(free_port "${REDIS_PORT:-56379}")"
MOCK_PORT="$(free_port "${MOCK_PORT:-3001}")"

log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
start_postgres "$STATE/postgres" "$PG_PORT"
log "starting Redis on 127.0.0.1:$REDIS_PORT"
start_redis "$STATE/redis" "$REDIS_PORT"

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"
export BATCH_SIZE="${BATCH_SIZE:-2}"
export PROCESSING_INTERVAL="${PROCESSING_INTERVAL:-10s}"
export LOG_FORMAT="${LOG_FORMAT:-json}"

PORTS=()
for wanted in ${API_PORTS:-8081 8082 8083}; do
  PORTS+=("$(free_port "$wanted")")
done

# The mock posts a delivery receipt for every accepted message a second later, to the
# first replica, as a real provider's status callback would.
log "starting the mock SMS provider on :$MOCK_PORT (delivery receipts to :${PORTS[0]})"
nohup "$BIN" mock-provider --port "$MOCK_PORT" \
  --dlr-url "http://127.0.0.1:${PORTS[0]}/api/delivery-receipts" --dlr-delay-ms 1000 \
  ${API_TOKEN:+--dlr-token "$API_TOKEN"} >"$STATE/logs/mock-provider.log" 2>&1 &
echo "$!" >>"$STATE/pids"
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start (see $STATE/logs/mock-provider.log)"

log "migrating and seeding ${SEED:-20} demo messages"
"$BIN" migrate >>"$STATE/logs/migrate.log" 2>&1 || die "migrate failed (see $STATE/logs/migrate.log)"
"$BIN" seed --count "${SEED:-20}" >>"$STATE/logs/migrate.log" 2>&1

i=1
for port in "${PORTS[@]}"; do
  SERVER_PORT="$port" REPLICA_ID="replica-$i" nohup "$BIN" serve >"$STATE/logs/replica-$i.log" 2>&1 &
  echo "$!" >>"$STATE/pids"
  i=$((i + 1))
done
for port in "${PORTS[@]}"; do
  wait_http "http://127.0.0.1:$port/health/ready" 60 || die "replica on :$port is not ready (see $STATE/logs/)"
done

PROMETHEUS_PORT="$(free_port "${PROMETHEUS_PORT:-9090}")"
log "starting Prometheus on 127.0.0.1:$PROMETHEUS_PORT (scrapes the replicas, evaluates the alerts)"
start_prometheus "$STATE/prometheus" "$PROMETHEUS_PORT" 5s $(printf '127.0.0.1:%s ' "${PORTS[@]}")

cat >"$STATE/env" <<ENV
DATABASE_URL=$DATABASE_URL
REDIS_URL=$REDIS_URL
SMS_API_URL=$SMS_API_URL
PG_PORT=$PG_PORT
REDIS_PORT=$REDIS_PORT
MOCK_PORT=$MOCK_PORT
PROMETHEUS_PORT=$PROMETHEUS_PORT
API_PORTS="${PORTS[*]}"
ENV

leader="$(curl -fsS "http://127.0.0.1:${PORTS[0]}/api/messaging/status" | python3 -c 'import json,sys; l=json.load(sys.stdin)["leader"]; print(l["replica_id"] if l else "electing…")')"
cat <<SUMMARY

message-dispatcher is running (BATCH_SIZE=$BATCH_SIZE every $PROCESSING_INTERVAL; leader: $leader)

  replicas        $(for p in "${PORTS[@]}"; do printf 'http://127.0.0.1:%s  ' "$p"; done)
  status          curl -s http://127.0.0.1:${PORTS[0]}/api/messaging/status
  sent messages   curl -s http://127.0.0.1:${PORTS[0]}/api/messages/sent
  stats           curl -s http://127.0.0.1:${PORTS[0]}/api/messages/stats
  metrics         curl -s http://127.0.0.1:${PORTS[0]}/metrics
  mock provider   http://127.0.0.1:$MOCK_PORT/deliveries   /stats
  Prometheus      http://127.0.0.1:$PROMETHEUS_PORT   (alerts: /alerts)
  PostgreSQL      psql $DATABASE_URL
  Redis           redis-cli -p $REDIS_PORT
  logs            $STATE/logs/

  stop            ./scripts/stop-local.sh
SUMMARY
