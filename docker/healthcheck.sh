#!/bin/bash
# Container health check for herald: GET <path> (default /healthz) on the admin listener and exit 0
# only for an HTTP 200. Uses bash's /dev/tcp, so the runtime image needs no curl.
#   herald-healthcheck [/healthz|/readyz]
# The admin port comes from HERALD_ADMIN (host:port, default 0.0.0.0:9506); the check always
# connects to 127.0.0.1, which reaches a 0.0.0.0 (or 127.0.0.1) bind from inside the container.
set -u
path=${1:-/healthz}
admin=${HERALD_ADMIN:-0.0.0.0:9506}
port=${admin##*:}
case $port in ''|*[!0-9]*) echo "herald-healthcheck: cannot read a port from HERALD_ADMIN=$admin" >&2; exit 1 ;; esac
# The whole exchange is bounded by `timeout`, so a wedged listener fails the check instead of
# hanging it.
status=$(timeout 2 bash -c '
  exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
  printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$2" >&3
  IFS= read -r line <&3 && printf "%s" "$line"
' healthcheck "$port" "$path") || { echo "herald-healthcheck: no answer on 127.0.0.1:$port$path" >&2; exit 1; }
case $status in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "herald-healthcheck: $path answered: ${status%$'\r'}" >&2; exit 1 ;;
esac
