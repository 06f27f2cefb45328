#!/usr/bin/env bash
# Run docker/compose.yml's configuration without a Docker engine, to prove it works: the Redis
# service's command line and every herald service's environment, taken from
# `docker compose config --format json`, applied to a local redis-server and to the herald binary
# this repository builds. Only the addresses change (everything binds 127.0.0.1 on free ports, and
# HERALD_REDIS points at the local Redis instead of the `redis` service name).
#
# Checks, in order: Redis answers its health check and runs with the AOF on; each herald node prints
# its "listening ... bus: redis" line; the image's health check script (docker/healthcheck.sh)
# passes on /healthz and /readyz of every node; one event published on the first node's admin API
# reaches a WebSocket subscriber on every node, with the same id. Exits non-zero on any failure.
# Everything it starts is stopped again by PID; all traffic stays on 127.0.0.1.
#
#   docker/run-local.sh [path/to/compose.yml]
# env: HERALD_BIN (default target/release/herald, built with cargo if missing),
#      COMPOSE (a `docker compose`-compatible command; found automatically),
#      KEEP_TMP=1 keeps the temporary directory with the logs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
COMPOSE_FILE=${1:-docker/compose.yml}
BIN=${HERALD_BIN:-$ROOT/target/release/herald}

say() { printf 'run-local: %s\n' "$*"; }
die() { printf 'run-local: FAIL: %s\n' "$*" >&2; exit 1; }

# --- tools -----------------------------------------------------------------------------------------
find_compose() {
  if [[ -n ${COMPOSE:-} ]]; then echo "$COMPOSE"; return; fi
  if docker compose version >/dev/null 2>&1; then echo "docker compose"; return; fi
  if command -v docker-compose >/dev/null && docker-compose version 2>/dev/null | grep -q 'v2\.'; then
    echo docker-compose; return
  fi
  local vendored=$ROOT/target/deploy-tools/venv/lib/python3*/site-packages/compose/docker-compose
  for f in $vendored; do [[ -x $f ]] && { echo "$f"; return; }; done
  return 1
}
COMPOSE_CMD=$(find_compose) || die "no docker compose v2 found (scripts/check-deploy installs one)"
command -v redis-server >/dev/null || {
  say "installing redis-server (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools >/dev/null
}
if [[ ! -x $BIN ]]; then
  say "building $BIN"
  cargo build --release --locked --bin herald
fi

TMP=$(mktemp -d /tmp/herald-run-local.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  # Stop what this script started, newest first, by PID: SIGTERM, then SIGKILL after 15 s.
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    local p=${PIDS[i]}
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  if [[ ${KEEP_TMP:-0} == 1 || $rc != 0 ]]; then say "logs kept in $TMP"; else rm -rf "$TMP"; fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}

# --- the configuration, as compose resolves it ---------------------------------------------------
$COMPOSE_CMD -f "$COMPOSE_FILE" config --format json > "$TMP/compose.json" \
  || die "docker compose config failed"
# Writes redis.args (one argument per line, NUL-free) and one <service>.env per herald service
# (a service is a herald node when its environment has HERALD_REDIS).
python3 - "$TMP" <<'PY'
import json, sys, os
tmp = sys.argv[1]
cfg = json.load(open(os.path.join(tmp, "compose.json")))
svcs = cfg["services"]
redis = svcs.get("redis") or sys.exit("compose file has no 'redis' service")
cmd = redis.get("command") or ["redis-server"]
if cmd[0] != "redis-server":
    sys.exit("redis command does not start with redis-server: %r" % cmd)
with open(os.path.join(tmp, "redis.args"), "w") as f:
    for a in cmd[1:]:
        f.write(a + "\n")
nodes = []
for name, s in sorted(svcs.items()):
    env = s.get("environment") or {}
    if "HERALD_REDIS" not in env:
        continue
    deps = s.get("depends_on", {})
    if deps.get("redis", {}).get("condition") != "service_healthy":
        sys.exit(f"{name}: depends_on redis is not 'service_healthy'")
    nofile = s.get("ulimits", {}).get("nofile", {})
    with open(os.path.join(tmp, name + ".env"), "w") as f:
        for k, v in sorted(env.items()):
            if "\n" in str(v):
                sys.exit(f"{name}: multi-line value for {k}")
            f.write(f"{k}={'' if v is None else v}\n")
    with open(os.path.join(tmp, name + ".nofile"), "w") as f:
        f.write(str(nofile.get("soft", "")))
    nodes.append(name)
if len(nodes) < 2:
    sys.exit("expected at least two herald services on the Redis bus, found %r" % nodes)
open(os.path.join(tmp, "nodes"), "w").write("\n".join(nodes) + "\n")
PY
mapfile -t NODES < "$TMP/nodes"
say "compose: redis + ${#NODES[@]} herald nodes (${NODES[*]}) via $COMPOSE_CMD"

# --- Redis, with the compose command's arguments -------------------------------------------------
RPORT=$(free_port)
mapfile -t RARGS < "$TMP/redis.args"
mkdir -p "$TMP/redis"
redis-server "${RARGS[@]}" --bind 127.0.0.1 --port "$RPORT" --dir "$TMP/redis" \
  --daemonize no --logfile "$TMP/redis.log" &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$RPORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
redis-cli -p "$RPORT" ping | grep -q PONG || die "redis did not answer PING (health check)"
aof=$(redis-cli -p "$RPORT" config get appendonly | tail -1)
[[ $aof == yes ]] || die "redis appendonly is '$aof', expected yes"
# Redis 7 keeps the AOF in appendonlydir/ (older versions: appendonly.aof).
for _ in $(seq 1 50); do
  [[ -e $TMP/redis/appendonlydir || -e $TMP/redis/appendonly.aof ]] && break; sleep 0.1
done
[[ -e $TMP/redis/appendonlydir || -e $TMP/redis/appendonly.aof ]] || die "redis wrote no append-only file"
say "redis on 127.0.0.1:$RPORT: PING ok, appendonly=$aof, appendfsync=$(redis-cli -p "$RPORT" config get appendfsync | tail -1)"

# --- herald nodes, with each service's environment ------------------------------------------------
declare -A WS ADM
for n in "${NODES[@]}"; do
  WS[$n]=$(free_port); ADM[$n]=$(free_port)
  want=$(cat "$TMP/$n.nofile")
  (
    # A clean environment for herald's settings: only what compose sets, then the local addresses.
    while IFS= read -r v; do unset "$v"; done < <(compgen -e | grep '^HERALD_' || true)
    while IFS= read -r kv; do export "${kv?}"; done < "$TMP/$n.env"
    export HERALD_LISTEN=127.0.0.1:${WS[$n]} HERALD_ADMIN=127.0.0.1:${ADM[$n]}
    export HERALD_REDIS=redis://127.0.0.1:$RPORT
    # compose's ulimits.nofile, as far as this machine's hard limit allows.
    hard=$(ulimit -Hn)
    if [[ -n $want && $hard != unlimited && $want -gt $hard ]]; then want=$hard; fi
    [[ -n $want ]] && ulimit -Sn "$want"
    exec "$BIN" serve
  ) > "$TMP/$n.out" 2> "$TMP/$n.err" &
  PIDS+=($!)
done
for n in "${NODES[@]}"; do
  for _ in $(seq 1 150); do grep -q 'herald listening' "$TMP/$n.out" && break; sleep 0.1; done
  line=$(grep 'herald listening' "$TMP/$n.out") || { cat "$TMP/$n.err" >&2; die "$n did not start"; }
  say "$n: $line"
  [[ $line == *"bus: redis"* ]] || die "$n is not on the Redis bus"
done

# --- the image's health check, against each node --------------------------------------------------
for n in "${NODES[@]}"; do
  for path in /healthz /readyz; do
    ok=0
    for _ in $(seq 1 50); do
      if HERALD_ADMIN=127.0.0.1:${ADM[$n]} bash docker/healthcheck.sh "$path" 2>"$TMP/hc.err"; then ok=1; break; fi
      sleep 0.1
    done
    [[ $ok == 1 ]] || { cat "$TMP/hc.err" >&2; die "$n: health check $path failed"; }
  done
  say "$n: healthcheck /healthz ok, /readyz ok"
done

# --- one publish on the first node reaches subscribers on every node ------------------------------
args=()
for n in "${NODES[@]}"; do args+=("$n=${WS[$n]}"); done
python3 - "${ADM[${NODES[0]}]}" "${args[@]}" <<'PY'
import base64, json, os, socket, struct, sys, time, urllib.request

admin_port, nodes = sys.argv[1], [a.split("=") for a in sys.argv[2:]]
deadline = time.time() + 10

def ws_connect(port, path):
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"port {port}: closed during the upgrade")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"port {port}: upgrade refused: {head.splitlines()[0]!r}")
    return [s, rest]

def read_text(c):
    """Next text message (server frames are unmasked and, here, never fragmented)."""
    s = c[0]
    while True:
        def need(n):
            while len(c[1]) < n:
                s.settimeout(max(0.1, deadline - time.time()))
                chunk = s.recv(65536)
                if not chunk:
                    raise SystemExit("connection closed")
                c[1] += chunk
        need(2)
        b0, b1 = c[1][0], c[1][1]
        ln, off = b1 & 0x7F, 2
        if ln == 126:
            need(4); ln = struct.unpack(">H", c[1][2:4])[0]; off = 4
        elif ln == 127:
            need(10); ln = struct.unpack(">Q", c[1][2:10])[0]; off = 10
        need(off + ln)
        payload, c[1] = c[1][off:off + ln], c[1][off + ln:]
        if b0 & 0x0F == 1:
            return json.loads(payload)
        if b0 & 0x0F == 8:
            raise SystemExit(f"closed by server: {payload!r}")

conns = {}
for name, port in nodes:
    c = ws_connect(port, "/v1/realtime?project=console&channels[]=files")
    msg = read_text(c)
    if msg.get("type") != "connected":
        raise SystemExit(f"{name}: expected 'connected', got {msg}")
    conns[name] = c
body = json.dumps({"project": "console", "channels": ["files"],
                   "events": ["buckets.b.files.f.create"], "payload": {"$id": "run-local"}}).encode()
req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/events", data=body,
                             headers={"content-type": "application/json"})
pub_id = json.load(urllib.request.urlopen(req, timeout=5))["id"]
print(f"run-local: published {pub_id} on {nodes[0][0]}'s admin API")
for name, c in conns.items():
    while True:
        msg = read_text(c)
        if msg.get("type") == "event":
            break
    d = msg["data"]
    if d.get("id") != pub_id or d.get("payload") != {"$id": "run-local"}:
        raise SystemExit(f"{name}: unexpected event {msg}")
    print(f"run-local: {name}: received event {d['id']} on channels {d['channels']}")
PY
say "OK: the compose configuration works (redis with AOF, ${#NODES[@]} herald nodes sharing events)"
