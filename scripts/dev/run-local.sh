#!/usr/bin/env bash
# Runs the whole thing on this machine: PostgreSQL, Redis, the mock SMS provider,
# three dispatcher replicas and a Prometheus that scrapes them with the alert rules
# (deploy/prometheus/alerts.yml), each a local process with its data under .local/.
# Installs what is missing (postgresql, redis-server, prometheus) with apt-get.
#
#   ./scripts/dev/run-local.sh            start everything, print where it is
#   ./scripts/dev/stop-local.sh           stop everything
#
# Settings (environment): SEED (demo messages, default 20), BATCH_SIZE (2),
# PROCESSING_INTERVAL (10s, faster than the 2m default so the demo moves), API_TOKEN
# (unset: the API is open), PG_PORT (55432), REDIS_PORT (56379), MOCK_PORT (3001),
# API_PORTS ("8081 8082 8083"), PROMETHEUS_PORT (9090).
# A busy port is replaced by a free one; a restart within a minute keeps its ports.
# Builds where cargo builds (CARGO_TARGET_DIR is honoured).
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

STATE="$ROOT/.local"
if [ -f "$STATE/pids" ]; then
  log "an earlier run is still registered; stopping it first"
  "$ROOT/scripts/dev/stop-local.sh"
fi
mkdir -p "$STATE/logs"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server curl:curl python3:python3 \
  prometheus:prometheus promtool:prometheus
command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"

# Wherever cargo builds (CARGO_TARGET_DIR, a cargo config): see ensure_binary.
# PROFILE=debug reuses the tests' build (scripts/verify/local-run.sh does).
PROFILE="${PROFILE:-release}" ensure_binary

PG_PORT="$(free_port "${PG_PORT:-55432}")"
REDIS_PORT="$(free_port "${REDIS_PORT:-56379}")"
MOCK_PORT="$(free_port "${MOCK_PORT:-3001}")"

log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
start_postgres "$(local_pg_dir)" "$PG_PORT"
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
BIN=$BIN
DATABASE_URL=$DATABASE_URL
REDIS_URL=$REDIS_URL
SMS_API_URL=$SMS_API_URL
PG_PORT=$PG_PORT
REDIS_PORT=$REDIS_PORT
MOCK_PORT=$MOCK_PORT
PROMETHEUS_PORT=$PROMETHEUS_PORT
API_PORTS="${PORTS[*]}"
ENV

# With API_TOKEN set, /api/* wants it; the summary's commands carry it too.
AUTH=()
AUTH_SHOWN=""
if [ -n "${API_TOKEN:-}" ]; then
  AUTH=(-H "Authorization: Bearer $API_TOKEN")
  AUTH_SHOWN=' -H "Authorization: Bearer $API_TOKEN"'
fi
# The schedule actually in force: the environment, or a runtime override stored in
# PostgreSQL by an earlier run, which wins over it.
status_json="$(curl -fsS "${AUTH[@]}" "http://127.0.0.1:${PORTS[0]}/api/messaging/status" || echo '{}')"
read -r leader schedule < <(python3 -c '
import json, sys
s = json.loads(sys.argv[1] or "{}")
leader = (s.get("leader") or {}).get("replica_id") or "electing..."
c = s.get("config") or {}
o = c.get("overrides") or {}
marks = []
for name, key in (("batch size", "batch_size"), ("interval", "processing_interval")):
    if o.get(key) is not None:
        who = (o.get(key + "_set") or {}).get("by") or "?"
        marks.append("%s overridden in PostgreSQL by %s" % (name, who))
text = "%s messages every %s" % (c.get("batch_size", "?"), c.get("processing_interval", "?"))
if marks:
    text += " (" + "; ".join(marks) + ")"
print(leader, text)
' "$status_json")
cat <<SUMMARY

message-dispatcher is running: $schedule; leader: $leader

  console         http://127.0.0.1:${PORTS[0]}/   (every replica serves it)
  replicas        $(for p in "${PORTS[@]}"; do printf 'http://127.0.0.1:%s  ' "$p"; done)
  OpenAPI         http://127.0.0.1:${PORTS[0]}/openapi.json
  status          curl -s$AUTH_SHOWN http://127.0.0.1:${PORTS[0]}/api/messaging/status
  send one        curl -s$AUTH_SHOWN -H 'Content-Type: application/json' -d '{"phone_number": "+905551234567", "content": "hello"}' http://127.0.0.1:${PORTS[0]}/api/messages
  sent messages   curl -s$AUTH_SHOWN http://127.0.0.1:${PORTS[0]}/api/messages/sent
  metrics         curl -s http://127.0.0.1:${PORTS[0]}/metrics
  mock provider   http://127.0.0.1:$MOCK_PORT/deliveries   /stats
  Prometheus      http://127.0.0.1:$PROMETHEUS_PORT   (alerts: /alerts)
  PostgreSQL      psql $DATABASE_URL
  Redis           redis-cli -p $REDIS_PORT
  logs            $STATE/logs/

  stop            ./scripts/dev/stop-local.sh
SUMMARY
