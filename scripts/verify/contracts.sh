#!/usr/bin/env bash
# The provider adapters against something we did not write: each provider's published
# OpenAPI description (tests/contracts/, see its README) served by Stoplight Prism as a
# validating mock (`prism mock --errors`: a request that breaks the description gets a
# 4xx instead of a 2xx). For each of twilio, vonage and infobip:
#   - a control: a request that breaks the description (curl, without a required
#     field) must be refused, so the mock really validates;
#   - a real replica (PostgreSQL, Redis, DISPATCH_CONFIG with one provider of that kind
#     whose base_url is the mock) sends a GSM message and a Unicode one with a sender:
#     both must end `sent` with the provider's message id from the answer. A request
#     the description refuses would end `failed` with Prism's violation in last_error,
#     which is printed.
# Installs prism (scripts/verify/contracts-prism.sh) and what else is missing. About a
# minute once the binary is built (PROFILE=debug reuses the tests' build).
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

ensure_packages pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools \
  curl:curl python3:python3
ensure_binary
PRISM="$("$ROOT/scripts/verify/contracts-prism.sh")"

WORK="$(mktemp -d /tmp/md-contracts.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  stop_redis "$WORK/redis"
  stop_postgres "$WORK/postgres"
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PG_PORT="$(free_port)"
REDIS_PORT="$(free_port)"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"
mkdir -p "$WORK/logs"
export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export LOG_FORMAT=json PROVIDER_SECRET="0123456789abcdef"
"$BIN" migrate >"$WORK/logs/migrate.log" 2>&1 || die "migrate failed (see $WORK/logs/migrate.log)"

TWILIO_SID="AC0123456789abcdef0123456789abcdef"

# Starts prism on the description $2 for provider $1; sets PRISM_URL.
start_prism() {
  local port
  port="$(free_port)"
  "$PRISM" mock --errors -h 127.0.0.1 -p "$port" "$2" >"$WORK/logs/prism-$1.log" 2>&1 &
  PIDS+=("$!")
  PRISM_URL="http://127.0.0.1:$port"
  # Prism answers 404 to an unknown path once it listens.
  for _ in $(seq 1 120); do
    if curl -s -o /dev/null "$PRISM_URL/" 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  die "prism for $1 did not start (see $WORK/logs/prism-$1.log)"
}

# The control: a request without a required field must not get a 2xx.
control() {
  local status
  case "$1" in
    twilio) status="$(curl -s -o /dev/null -w '%{http_code}' -u "$TWILIO_SID:secret" \
      --data-urlencode From=+15017122661 --data-urlencode Body=Hello \
      "$PRISM_URL/2010-04-01/Accounts/$TWILIO_SID/Messages.json")" ;;
    vonage) status="$(curl -s -o /dev/null -w '%{http_code}' \
      --data-urlencode api_secret=x --data-urlencode to=447700900000 --data-urlencode text=Hello \
      "$PRISM_URL/sms/json")" ;;
    infobip) status="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: App x" \
      -H 'Content-Type: application/json' -d '{"messages":[{"text":"Hello"}]}' \
      "$PRISM_URL/sms/2/text/advanced")" ;;
  esac
  case "$status" in
    4??) log "$1: the mock refuses a request that breaks the description ($status)" ;;
    *) die "$1: a request without a required field got $status: the mock does not validate" ;;
  esac
}

# Runs one replica sending through provider kind $1 (extra keys $2) at the mock, and
# checks that both messages end sent.
check_kind() {
  local kind="$1" keys="$2" port config
  config="$WORK/$kind.toml"
  port="$(free_port)"
  cat >"$config" <<EOF
[[provider]]
name = "$kind"
kind = "$kind"
base_url = "$PRISM_URL"
token_env = "PROVIDER_SECRET"
public_url = "http://127.0.0.1:$port"
$keys

[[lane]]
name = "default"
batch_size = 10
interval = "200ms"
providers = ["$kind"]
from = "ACME"
EOF
  DISPATCH_CONFIG="$config" SERVER_PORT="$port" REPLICA_ID="contracts-$kind" \
    "$BIN" serve >"$WORK/logs/replica-$kind.log" 2>&1 &
  local pid="$!"
  PIDS+=("$pid")
  wait_http "http://127.0.0.1:$port/health/ready" 60 || die "$kind: the replica did not get ready"
  local status
  status="$(curl -s -o "$WORK/$kind-created.json" -w '%{http_code}' -H 'Content-Type: application/json' \
    -d '[{"phone_number":"+447911123456","content":"Your code is 123456"},
         {"phone_number":"+905551234567","content":"Günaydın ✓ kodunuz 123456","from":"+15017122661"}]' \
    "http://127.0.0.1:$port/api/messages")"
  [ "$status" = 201 ] || die "$kind: creating the messages got $status: $(cat "$WORK/$kind-created.json")"
  python3 - "$kind" "$port" "$WORK/$kind-created.json" <<'EOF'
import json, sys, time, urllib.request
kind, port, created = sys.argv[1], sys.argv[2], sys.argv[3]
ids = [m["id"] for m in json.load(open(created))]
deadline = time.time() + 60
while True:
    messages = [json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/messages/{i}")) for i in ids]
    if all(m["status"] in ("sent", "failed") for m in messages) or time.time() > deadline:
        break
    time.sleep(0.3)
ok = True
for m in messages:
    line = f"{kind}: message {m['id']} {m['status']} via {m['provider']}, id {m['message_id']!r}"
    if m["status"] != "sent" or not m["message_id"]:
        ok = False
        line += f"; last_error: {m['last_error']}"
    print(line, file=sys.stderr)
sys.exit(0 if ok else 1)
EOF
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

start_prism twilio tests/contracts/twilio/messages.json
control twilio
check_kind twilio "account_sid = \"$TWILIO_SID\"" || die "twilio: the adapter broke the contract"

start_prism vonage tests/contracts/vonage/sms.yaml
control vonage
check_kind vonage 'api_key = "abcd1234"' || die "vonage: the adapter broke the contract"

start_prism infobip tests/contracts/infobip/sms.json
control infobip
check_kind infobip '' || die "infobip: the adapter broke the contract"

log "contracts: twilio, vonage and infobip adapters send what their published descriptions accept"
