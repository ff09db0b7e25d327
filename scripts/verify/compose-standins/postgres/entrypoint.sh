#!/bin/sh
# The parts of the official postgres entrypoint that docker-compose.multi.yml uses:
# on an empty PGDATA, initdb with POSTGRES_USER/POSTGRES_PASSWORD, create POSTGRES_DB,
# listen on every interface with password auth; then run the server as postgres.
set -eu
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${PGDATA:=/var/lib/postgresql/data}"

if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -n "${POSTGRES_PASSWORD:-}" ] || { echo "entrypoint: POSTGRES_PASSWORD is required" >&2; exit 1; }
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 \
    --auth-local=trust --auth-host=scram-sha-256
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  # A private socket and no TCP while initialising, so pg_isready (the compose
  # health check) only succeeds once the real server is up.
  pg_ctl -D "$PGDATA" -w -o "-c listen_addresses='' -k /tmp" start
  if [ "$POSTGRES_DB" != postgres ]; then
    # (psql interpolates :"db" only in input, not in -c)
    echo 'CREATE DATABASE :"db"' |
      psql -h /tmp -U "$POSTGRES_USER" -d postgres -v ON_ERROR_STOP=1 -v db="$POSTGRES_DB"
  fi
  pg_ctl -D "$PGDATA" -m fast -w stop
  echo "entrypoint: PostgreSQL init process complete; ready for start up."
fi
exec "$@"
