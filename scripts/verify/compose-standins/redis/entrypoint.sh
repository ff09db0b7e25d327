#!/bin/sh
# As the official redis entrypoint: `redis-server` without a config file runs with
# protected mode off (it listens on every interface, no password), as user redis.
set -eu
case "${1:-}" in -*) set -- redis-server "$@" ;; esac
if [ "${1:-}" = redis-server ]; then
  shift
  case "${1:-}" in
    *.conf) conf="$1"; shift; set -- redis-server "$conf" "$@" ;;
    *) set -- redis-server --protected-mode no "$@" ;;
  esac
  if [ "$(id -u)" = 0 ]; then
    chown redis:redis . 2>/dev/null || true
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
exec "$@"
