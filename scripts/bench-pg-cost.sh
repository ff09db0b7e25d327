#!/usr/bin/env bash
# PostgreSQL's cost per dispatched message, in instructions: deterministic, so two
# schemas compare exactly on a busy or drifting machine, where CPU seconds do not.
#
# The leader's claim (CLAIM) and group result write (MARK_SENT_GROUP) are read from
# src/store/queue.rs and replayed as prepared statements by one `postgres --single`
# backend under valgrind's callgrind, on a table of SEED rows seeded and migrated by the
# binary: N messages, claimed BATCH at a time and marked sent GROUP at a time. The count
# includes each statement's triggers, constraints, index inserts and WAL, and the
# formatting of the rows the statements return (single-user mode prints them, where a
# server sends them). A run with no messages is subtracted (start-up and shutdown).
#
# Variants, each on a fresh cluster in the same run:
#   schema         as migrated
#   before-0008    the listing index (status, id DESC) with `sending` rows again, as
#                  before migration 0008
#   before-0009    the format rules as table CHECK constraints again, as before
#                  migration 0009 (PostgreSQL evaluates them on every UPDATE)
# and, with EACH_INDEX=1, the schema without each index in turn (what each costs).
#
#   ./scripts/bench-pg-cost.sh                 # about 2 minutes
#   N=2000 ./scripts/bench-pg-cost.sh          # quicker
#
# With KEYED=1 every seeded message carries an idempotency key ("order-<id>"), as
# messages posted with one do.
#
# Settings: N (10000), SEED (100000), BATCH (500), GROUP (250), EACH_INDEX (0), KEYED (0),
# BIN.
set -euo pipefail
# A failing step inside $(...) must end the run, not print a zero.
shopt -s inherit_errexit
source "$(dirname "$0")/lib.sh"
ensure_packages pg:postgresql valgrind:valgrind
ensure_binary
N=${N:-10000} SEED=${SEED:-100000} BATCH=${BATCH:-500} GROUP=${GROUP:-250}
WORK=$(mktemp -d /tmp/md-bench-pg-cost.XXXXXX)
chmod 755 "$WORK"
trap 'for d in "$WORK"/*/; do stop_postgres "$d"; done; rm -rf "$WORK"' EXIT
log "working directory $WORK"
PG_BIN=$(pg_bin_dir)

# prepare NAME SQL: a stopped cluster WORK/NAME, migrated, SQL applied, SEED rows.
prepare() {
  local dir="$WORK/$1" port
  port=$(free_port)
  start_postgres "$dir" "$port"
  local url="postgres://postgres@127.0.0.1:$port/messages_db"
  DATABASE_URL=$url "$BIN" migrate >/dev/null
  local p=(psql -h 127.0.0.1 -p "$port" -U postgres -d messages_db -qX -v ON_ERROR_STOP=1)
  [ -n "$2" ] && "${p[@]}" -c "$2"
  DATABASE_URL=$url "$BIN" seed --count "$SEED" >/dev/null
  [ "${KEYED:-0}" = 1 ] && "${p[@]}" -c "UPDATE messages SET idempotency_key = 'order-' || id"
  "${p[@]}" -c "UPDATE dispatcher_leader SET epoch = 1, holder = 'bench', acquired_at = now()" \
    -c "VACUUM ANALYZE" -c "CHECKPOINT"
  stop_postgres "$dir"
}

# instructions NAME MESSAGES: callgrind's instruction count for the replay.
instructions() {
  local dir="$WORK/$1" out="$WORK/$1.$2"
  python3 "$ROOT/scripts/bench_pg_cost.py" "$ROOT/src/store/queue.rs" "$2" "$BATCH" "$GROUP" >"$out.sql"
  chmod 644 "$out.sql"; chmod 777 "$WORK"
  as_pg valgrind --tool=callgrind --callgrind-out-file="$out.cg" \
    "$PG_BIN/postgres" --single -D "$dir/data" -c fsync=off -c autovacuum=off messages_db \
    <"$out.sql" >"$out.log" 2>&1 || { tail -20 "$out.log" >&2; die "the replay failed ($1)"; }
  grep -q "ERROR" "$out.log" && { grep -m3 ERROR "$out.log" >&2; die "a statement failed ($1)"; }
  callgrind_annotate "$out.cg" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}

per_message() {
  prepare "$1" "$2"
  local empty full
  # The replay without messages only prepares the statements: it changes nothing.
  empty=$(instructions "$1" 0)
  full=$(instructions "$1" "$N")
  echo $(((full - empty) / N))
}

OLD_INDEX="DROP INDEX messages_status_id_idx; CREATE INDEX messages_status_id_idx ON messages (status, id DESC)"
OLD_CHECKS=$(cat "$ROOT/scripts/bench/before-0009.sql")
variants=("schema|" "before-0008|$OLD_INDEX" "before-0009|$OLD_CHECKS")
if [ "${EACH_INDEX:-0}" = 1 ]; then
  for index in messages_status_id_idx messages_sending_claimed_idx messages_provider_message_id_idx; do
    variants+=("without $index|DROP INDEX $index")
  done
  variants+=("without the count triggers|DROP TRIGGER messages_count_updates ON messages")
fi

declare -A result
for v in "${variants[@]}"; do
  name=${v%%|*} sql=${v#*|}
  log "$name"
  result[$name]=$(per_message "${name// /_}" "$sql")
done

echo
echo "PostgreSQL instructions per dispatched message (N=$N of SEED=$SEED rows, BATCH=$BATCH, GROUP=$GROUP, KEYED=${KEYED:-0})"
printf '| %-45s | %12s | %10s |\n' variant "instr/msg" "vs schema"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..47})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..12})"
base=${result[schema]}
for v in "${variants[@]}"; do
  name=${v%%|*}
  printf '| %-45s | %12s | %10s |\n' "$name" "${result[$name]}" \
    "$(python3 -c "print(f'{${result[$name]} / $base:.3f}')")"
done
echo "postgres $("$PG_BIN/postgres" --version | awk '{print $3}'), $(valgrind --version)"
