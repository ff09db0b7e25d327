#!/bin/sh
# Entrypoint of the compose load balancer: nginx resolves the service name
# `dispatcher` at request time, so it needs a resolver, and the right one depends
# on the engine (Docker's embedded DNS is 127.0.0.11; Podman's is the network's
# gateway). Take it from the container's /etc/resolv.conf, as the engine wrote it.
set -eu
ns="$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)"
[ -n "$ns" ] || { echo "start.sh: no nameserver in /etc/resolv.conf" >&2; exit 1; }
case "$ns" in *:*) ns="[$ns]" ;; esac
echo "resolver $ns valid=5s ipv6=off;" >/tmp/nginx-resolver.conf
echo "start.sh: resolver $ns (from /etc/resolv.conf)" >&2
exec nginx -g 'daemon off;'
