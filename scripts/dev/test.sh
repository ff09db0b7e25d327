#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start real
# PostgreSQL and Redis servers, the mock provider and replica processes.
# Installs what is missing (postgresql, redis-server, pgbouncer, promtool, openssl) with apt-get.
set -euo pipefail
source "$(dirname "$0")/../lib/harness.sh"
cd "$ROOT"

ensure_packages pg:postgresql redis-server:redis-server redis-cli:redis-tools redis-sentinel:redis-sentinel pgbouncer:pgbouncer promtool:prometheus openssl:openssl
command -v cargo >/dev/null || die "cargo is required (https://rustup.rs)"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast "$@"
else
  log "cargo-nextest not found; using cargo test"
  cargo test --locked --no-fail-fast "$@"
fi
