#!/usr/bin/env bash
# Rolling upgrade from the previous release (docs/design.md#upgrading-to-lanes): three
# replicas of the previous release (built from git, commit PREVIOUS_RELEASE) run the
# single `default` lane against a mock provider while messages are created through
# their API all along; then they are replaced one at a time by replicas of this
# release (SIGTERM, wait for the exit, start the new one, wait until it is ready, let
# it run). The first new replica applies migration 0014 (AUTO_MIGRATE) while the old
# ones keep running. scripts/verify/upgrade.py drives and checks it:
#
#   - every 200 ms every live replica is asked whether it leads (/health `leader`):
#     samples with two leaders are printed; two such samples in a row fail the run;
#   - once the stream stops and the queue drains: every message was delivered exactly
#     once (mock /deliveries and /stats), nothing is left pending or sending, and no
#     window of PROCESSING_INTERVAL - RATE_JITTER_MS at the provider holds more than
#     BATCH_SIZE requests (as scripts/chaos/checks.py counts);
#   - migration 14 is applied, and GET /api/lanes on a new replica shows `default`
#     with a leader;
#   - every replica exited 0 on SIGTERM, none died by itself or panicked, the API
#     never answered 5xx but 503.
#
# It prints a summary (leaders per phase, handovers, counts) and exits 1 on any
# failure (2 if the harness itself failed). Everything runs on 127.0.0.1 in a temporary
# directory, removed at the end (kept on failure or with KEEP_WORK=1).
#
# The previous release is built once, from a temporary git worktree, with its own
# CARGO_TARGET_DIR (<target>/previous-release); its binary is kept there as
# message-dispatcher-<commit>-<profile>, so later runs reuse it. The clone needs that
# commit: a shallow clone fails with a message (git fetch --unshallow).
#
# Settings (environment, all optional):
#   PROFILE (debug|release; debug by default, the tests' build)  BIN (this release's
#   binary, prebuilt)  PREVIOUS_RELEASE (0d77a23)  PREVIOUS_BIN (the previous
#   release's binary, prebuilt)  CREATE_RATE (20 messages/s)  WARMUP (6 s before the
#   first replacement)  STEP_WAIT (8 s after each new replica is ready)  TAIL (4 s of
#   stream after the last)  DRAIN_TIMEOUT (90 s)  RATE_JITTER_MS (50)  KEEP_WORK (0)
#
# The replicas: BATCH_SIZE 5, PROCESSING_INTERVAL 200ms, DISTRIBUTED_LOCK_TTL 3s,
# LOCK_RETRY_INTERVAL 500ms, SHUTDOWN_TIMEOUT 5s, no DISPATCH_CONFIG.
set -euo pipefail
# shellcheck source=scripts/lib/harness.sh
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown argument $1 (see --help)" ;;
esac

export PROFILE="${PROFILE:-debug}"
PREVIOUS_RELEASE="${PREVIOUS_RELEASE:-0d77a23}"

ensure_packages git:git pg:postgresql psql:postgresql-client redis-server:redis-server redis-cli:redis-tools \
  curl:curl python3:python3

# build_previous: sets PREVIOUS_BIN to the previous release's binary, building it from
# a temporary worktree unless a binary of that commit and profile is kept already. No
# build lock is taken here: the caller runs the whole script under it.
build_previous() {
  if [ -n "${PREVIOUS_BIN:-}" ]; then
    [ -x "$PREVIOUS_BIN" ] || die "PREVIOUS_BIN=$PREVIOUS_BIN is not an executable"
    return
  fi
  local commit target flags=() tree rc
  commit="$(git -C "$ROOT" rev-parse --verify --quiet "$PREVIOUS_RELEASE^{commit}")" ||
    die "the previous release's commit $PREVIOUS_RELEASE is not in this clone (a shallow clone?); fetch the history (git fetch --unshallow) or set PREVIOUS_BIN"
  [ "$PROFILE" = release ] && flags=(--release)
  target="$(target_dir)/previous-release"
  PREVIOUS_BIN="$target/message-dispatcher-${commit:0:12}-$PROFILE"
  if [ -x "$PREVIOUS_BIN" ]; then
    log "previous release ${commit:0:12} ($PROFILE): reusing $PREVIOUS_BIN"
    return
  fi
  tree="$(mktemp -d "/tmp/md-previous-release.XXXXXX")"
  log "building the previous release ${commit:0:12} ($PROFILE) in a worktree at $tree (once; a few minutes)"
  git -C "$ROOT" worktree add --quiet --detach "$tree" "$commit" || { rm -rf "$tree"; die "git worktree add failed"; }
  set +e
  (cd "$tree" && CARGO_TARGET_DIR="$target" cargo build "${flags[@]}" --locked --quiet)
  rc=$?
  set -e
  git -C "$ROOT" worktree remove --force "$tree" || rm -rf "$tree"
  git -C "$ROOT" worktree prune
  [ "$rc" = 0 ] || die "building the previous release ${commit:0:12} failed"
  cp "$target/$PROFILE/message-dispatcher" "$PREVIOUS_BIN.tmp"
  mv "$PREVIOUS_BIN.tmp" "$PREVIOUS_BIN"
}

build_previous
export PREVIOUS_BIN
ensure_binary

work_init upgrade

# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  stop_work
  if [ "$rc" = 0 ] && [ "${KEEP_WORK:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    echo "logs kept in $WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

pick_port() { stable_port "$WORK/ports"; }
export PG_PORT REDIS_PORT MOCK_PORT API_PORTS
PG_PORT="$(pick_port)"
REDIS_PORT="$(pick_port)"
MOCK_PORT="$(pick_port)"
API_PORTS=""
for _ in 1 2 3 4 5 6; do API_PORTS="$API_PORTS $(pick_port)"; done
API_PORTS="${API_PORTS# }"

log "work directory $WORK"
log "PostgreSQL :$PG_PORT  Redis :$REDIS_PORT  mock provider :$MOCK_PORT"
start_postgres "$WORK/postgres" "$PG_PORT"
start_redis "$WORK/redis" "$REDIS_PORT"

export DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/messages_db"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export SMS_API_URL="http://127.0.0.1:$MOCK_PORT/send"

# This release's mock provider: no failures, a little latency.
"$BIN" mock-provider --port "$MOCK_PORT" --latency-ms "${LATENCY_MS:-20}" >"$WORK/logs/mock-provider.log" 2>&1 &
track "$!"
wait_http "http://127.0.0.1:$MOCK_PORT/health" 20 || die "mock provider did not start (see $WORK/logs/mock-provider.log)"

# No migrate here: the previous release's replicas migrate at start (AUTO_MIGRATE), the
# first new one applies 0014 beside them.
set +e
python3 "$ROOT/scripts/verify/upgrade.py"
rc=$?
set -e
exit "$rc"
