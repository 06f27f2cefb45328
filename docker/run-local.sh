#!/usr/bin/env bash
# Run docker/compose.yml's configuration without a Docker engine, to prove it works: the Redis
# service's command line, every herald service's environment and the haproxy service (its
# haproxy.cfg, environment, certificate service and health check), taken from
# `docker compose config --format json`, applied to a local redis-server, to the herald binary this
# repository builds and to Debian's haproxy. Only the addresses change: everything binds 127.0.0.1
# on free ports, HERALD_REDIS points at the local Redis instead of the `redis` service name,
# haproxy.cfg's HAPROXY_* / HERALDn_* variables point at the local listeners and nodes, and the
# nodes trust 127.0.0.1 (HERALD_TRUSTED_PROXIES) instead of HAProxy's compose address.
#
# Checks, in order: Redis answers its health check and runs with the AOF on; each herald node prints
# its "listening ... bus: redis" line; the image's health check script (docker/healthcheck.sh)
# passes on /healthz and /readyz of every node; the certs service's command (make-cert.sh) writes a
# certificate; `haproxy -c` accepts haproxy.cfg with the local variables; HAProxy runs, its stats
# (CSV) show every node UP within 15 s, and the haproxy service's compose health check passes; one
# event published on the first node's admin API (with the bearer token) reaches a WebSocket
# subscriber on every node, one through HAProxy's plain listener and one through its TLS listener
# (verifying the generated certificate), all with the same id. Exits non-zero on any failure.
# Every wait is bounded. Everything it starts is stopped again by PID; all traffic stays on
# 127.0.0.1.
#
#   docker/run-local.sh [path/to/compose.yml]
# env: HERALD_BIN (default target/release/herald, built with cargo if missing),
#      HERALD_ADMIN_TOKEN (the compose file requires one; a random one when unset),
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
command -v haproxy >/dev/null || {
  say "installing haproxy (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends haproxy >/dev/null
}
command -v openssl >/dev/null || {
  say "installing openssl (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssl >/dev/null
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
# compose.yml refuses to resolve without an admin token; a throwaway one does for this run.
export HERALD_ADMIN_TOKEN=${HERALD_ADMIN_TOKEN:-run-local-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
# Grafana is not run here, but compose config requires its password too.
export GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-run-local-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')}
$COMPOSE_CMD -f "$COMPOSE_FILE" config --format json > "$TMP/compose.json" \
  || die "docker compose config failed"
# Writes redis.args (one argument per line, NUL-free) and one <service>.env per herald service
# (a service is a herald node when its environment has HERALD_REDIS), and for the haproxy service
# (the one whose image is haproxy): haproxy.cfgpath (the host file mounted as its haproxy.cfg),
# haproxy.env, haproxy.nofile, haproxy.vars (every ${NAME-default} haproxy.cfg reads),
# haproxy.maxconn (its global maxconn), haproxy.health (its health check, one argument a line),
# certs.argv / certs.env (the one-shot service it waits for, with container paths mapped to this
# machine: bind mounts to their sources, named volumes to $TMP/volumes/NAME) and haproxy.cert (the
# certificate haproxy.cfg loads by default, mapped the same way).
python3 - "$TMP" <<'PY' || die "the compose configuration is not what this script can run"
import json, os, re, sys
tmp = sys.argv[1]
cfg = json.load(open(os.path.join(tmp, "compose.json")))
svcs = cfg["services"]

def unescape(v):
    # `config` prints a file compose could read again, so a literal $ comes out as $$.
    return None if v is None else str(v).replace("$$", "$")

def write(name, text):
    with open(os.path.join(tmp, name), "w") as f:
        f.write(text)

redis = svcs.get("redis") or sys.exit("compose file has no 'redis' service")
cmd = redis.get("command") or ["redis-server"]
if cmd[0] != "redis-server":
    sys.exit("redis command does not start with redis-server: %r" % cmd)
write("redis.args", "".join(unescape(a) + "\n" for a in cmd[1:]))

nodes = []
for name, s in sorted(svcs.items()):
    env = s.get("environment") or {}
    if "HERALD_REDIS" not in env:
        continue
    deps = s.get("depends_on", {})
    if deps.get("redis", {}).get("condition") != "service_healthy":
        sys.exit(f"{name}: depends_on redis is not 'service_healthy'")
    nofile = s.get("ulimits", {}).get("nofile", {})
    lines = []
    for k, v in sorted(env.items()):
        v = unescape(v)
        if v is not None and "\n" in v:
            sys.exit(f"{name}: multi-line value for {k}")
        lines.append(f"{k}={'' if v is None else v}\n")
    write(name + ".env", "".join(lines))
    write(name + ".nofile", str(nofile.get("soft", "")))
    nodes.append(name)
if len(nodes) < 2:
    sys.exit("expected at least two herald services on the Redis bus, found %r" % nodes)
write("nodes", "\n".join(nodes) + "\n")

# --- the haproxy service ---
hp = [n for n, s in svcs.items() if str(s.get("image", "")).split(":")[0] == "haproxy"]
if len(hp) != 1:
    sys.exit(f"expected one haproxy service, found {hp}")
hname, h = hp[0], svcs[hp[0]]
deps = h.get("depends_on", {})
for n in nodes:
    if deps.get(n, {}).get("condition") != "service_healthy":
        sys.exit(f"{hname}: depends_on {n} is not 'service_healthy'")
# Its fixed address on the compose network, which every node must trust (here: 127.0.0.1 instead).
address = next((n.get("ipv4_address") for n in (h.get("networks") or {}).values() if n), None)
for n in nodes:
    trusted = (svcs[n].get("environment") or {}).get("HERALD_TRUSTED_PROXIES")
    if trusted != address:
        sys.exit(f"{n}: HERALD_TRUSTED_PROXIES={trusted!r}, but {hname}'s address is {address!r}")

def host_path(service, path):
    """A path inside the container, as this machine sees it (longest mount wins)."""
    best = None
    for m in service.get("volumes", []):
        t = m["target"].rstrip("/")
        if path == t or path.startswith(t + "/"):
            if best is None or len(t) > len(best[0]):
                if m["type"] == "bind":
                    src = m["source"]
                elif m["type"] == "volume":
                    src = os.path.join(tmp, "volumes", m["source"])
                else:
                    sys.exit(f"unsupported mount type {m['type']} at {t}")
                best = (t, src)
    return path if best is None else best[1] + path[len(best[0]):]

cfg_mounts = [m for m in h.get("volumes", []) if m["target"] == "/usr/local/etc/haproxy/haproxy.cfg"]
if len(cfg_mounts) != 1 or cfg_mounts[0]["type"] != "bind" or not cfg_mounts[0].get("read_only"):
    sys.exit(f"{hname}: haproxy.cfg is not bind-mounted read-only at /usr/local/etc/haproxy/haproxy.cfg")
cfg_path = cfg_mounts[0]["source"]
write("haproxy.cfgpath", cfg_path + "\n")
write("haproxy.env", "".join(f"{k}={unescape(v) or ''}\n" for k, v in sorted((h.get("environment") or {}).items())))
write("haproxy.nofile", str(h.get("ulimits", {}).get("nofile", {}).get("soft", "")))
text = open(cfg_path).read()
vars_ = {}
for m in re.finditer(r"\$\{(\w+)(?:-([^}]*))?\}", text):
    vars_.setdefault(m.group(1), m.group(2) or "")
write("haproxy.vars", "".join(f"{k} {v}\n" for k, v in sorted(vars_.items())))
glob_max = re.search(r"^global\b.*?^\s*maxconn\s+(\d+)", text, re.S | re.M)
write("haproxy.maxconn", glob_max.group(1) if glob_max else "")
# The certificate haproxy.cfg loads (its default unless the service sets HAPROXY_CERT).
cert = (h.get("environment") or {}).get("HAPROXY_CERT") or vars_.get("HAPROXY_CERT") \
    or sys.exit("haproxy.cfg reads no HAPROXY_CERT")
write("haproxy.cert", host_path(h, cert) + "\n")
test = (h.get("healthcheck") or {}).get("test") or sys.exit(f"{hname}: no healthcheck")
if test[0] != "CMD":
    sys.exit(f"{hname}: healthcheck is not a CMD list: {test}")
write("haproxy.health", "".join(unescape(a) + "\n" for a in test[1:]))
# The one-shot service that makes the certificate: run its entrypoint and command with the paths
# mapped. CERT_OWNER is left out: it names the haproxy image's user, which this machine may not
# have (and a non-root run could not chown to).
once = [n for n, d in deps.items() if d.get("condition") == "service_completed_successfully"]
if len(once) != 1:
    sys.exit(f"{hname}: expected one service_completed_successfully dependency (the certificate), found {once}")
c = svcs[once[0]]
argv = (c.get("entrypoint") or []) + (c.get("command") or [])
if not argv:
    sys.exit(f"{once[0]}: no entrypoint or command")
write("certs.argv", "".join(host_path(c, unescape(a)) + "\n" for a in argv))
write("certs.env", "".join(f"{k}={unescape(v) or ''}\n" for k, v in sorted((c.get("environment") or {}).items())
                           if k != "CERT_OWNER"))
write("certs.name", once[0])
write("haproxy.name", hname)
PY
mapfile -t NODES < "$TMP/nodes"
HAPROXY_SVC=$(cat "$TMP/haproxy.name") CERTS_SVC=$(cat "$TMP/certs.name")
say "compose: redis + ${#NODES[@]} herald nodes (${NODES[*]}) + $HAPROXY_SVC (after $CERTS_SVC) via $COMPOSE_CMD"

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
    # HAProxy reaches the nodes from 127.0.0.1 here, not from its compose address.
    export HERALD_TRUSTED_PROXIES=127.0.0.1
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

# --- the certificate, made by the certs service's own command ------------------------------------
mapfile -t CERT_ARGV < "$TMP/certs.argv"
(
  while IFS= read -r kv; do export "${kv?}"; done < "$TMP/certs.env"
  exec "${CERT_ARGV[@]}"
) > "$TMP/certs.log" 2>&1 || { cat "$TMP/certs.log" >&2; die "$CERTS_SVC: ${CERT_ARGV[*]} failed"; }
CERT=$(cat "$TMP/haproxy.cert")
openssl x509 -in "$CERT" -noout 2>/dev/null || die "$CERTS_SVC: no certificate in $CERT"
grep -q 'PRIVATE KEY' "$CERT" || die "$CERTS_SVC: no private key in $CERT"
say "$CERTS_SVC: $(tail -1 "$TMP/certs.log" | sed 's/^make-cert: //'); $(openssl x509 -in "$CERT" -noout -subject -ext subjectAltName 2>/dev/null | tr -s ' \n' ' ')"
# Run again, as compose does at every `up`: the certificate must be kept.
sum=$(sha256sum < "$CERT")
( while IFS= read -r kv; do export "${kv?}"; done < "$TMP/certs.env"; exec "${CERT_ARGV[@]}" ) > "$TMP/certs2.log" 2>&1 \
  || { cat "$TMP/certs2.log" >&2; die "$CERTS_SVC: second run failed"; }
[[ $(sha256sum < "$CERT") == "$sum" ]] || die "$CERTS_SVC: a second run replaced the certificate"
say "$CERTS_SVC: a second run keeps it"

# --- HAProxy, with haproxy.cfg's variables pointing at the local listeners and nodes --------------
HCFG=$(cat "$TMP/haproxy.cfgpath")
declare -A HBIND
henv=() hlocal=()
while IFS= read -r kv; do henv+=("$kv"); done < "$TMP/haproxy.env"
while read -r var default; do
  case $var in
    HAPROXY_*_BIND)
      HBIND[$var]=$(free_port); hlocal+=("$var=127.0.0.1:${HBIND[$var]}") ;;
    HAPROXY_CERT)
      hlocal+=("$var=$CERT") ;;
    HERALD[0-9]*_WS|HERALD[0-9]*_CHECK_PORT)
      i=${var#HERALD}; i=${i%%_*}
      node=herald-$i
      [[ -n ${WS[$node]:-} ]] || die "haproxy.cfg reads $var, but compose has no service $node"
      if [[ $var == *_WS ]]; then hlocal+=("$var=127.0.0.1:${WS[$node]}"); else hlocal+=("$var=${ADM[$node]}"); fi ;;
    *) die "haproxy.cfg reads \${$var}, which this script does not know how to point at a local address" ;;
  esac
done < "$TMP/haproxy.vars"
for v in HAPROXY_WS_BIND HAPROXY_WSS_BIND HAPROXY_STATS_BIND; do
  [[ -n ${HBIND[$v]:-} ]] || die "haproxy.cfg does not read $v"
done
WS_PORT=${HBIND[HAPROXY_WS_BIND]} WSS_PORT=${HBIND[HAPROXY_WSS_BIND]} STATS_PORT=${HBIND[HAPROXY_STATS_BIND]}
for n in "${NODES[@]}"; do
  grep -q "^HERALD${n#herald-}_WS " "$TMP/haproxy.vars" || die "haproxy.cfg has no server for $n (HERALD${n#herald-}_WS)"
done
# The service's environment from compose, then the local addresses (later entries win); nothing
# else from this shell.
henv+=("${hlocal[@]}")
printf '%s\n' "${henv[@]}" > "$TMP/haproxy.localenv"
if out=$(env -i PATH="$PATH" "${henv[@]}" haproxy -c -f "$HCFG" 2>&1); then
  say "haproxy -c -f $HCFG: ${out##*$'\n'} (with ${hlocal[*]})"
else
  printf '%s\n' "$out" >&2; die "haproxy -c -f $HCFG rejects the configuration"
fi
# compose's ulimits.nofile, as far as this machine's hard limit allows. HAProxy refuses to start
# when it cannot get two descriptors per connection of its maxconn (strict-limits); with a lower
# hard limit than the container gets, -n lowers maxconn to what fits instead (the only change).
want=$(cat "$TMP/haproxy.nofile") hard=$(ulimit -Hn) maxconn=$(cat "$TMP/haproxy.maxconn")
if [[ -n $want && $hard != unlimited && $want -gt $hard ]]; then want=$hard; fi
HARGS=(-db -f "$HCFG")
if [[ -n $want && -n $maxconn ]] && ((2 * maxconn + 1000 > want)); then
  HARGS+=(-n $(((want - 1000) / 2)))
  say "haproxy: this machine's nofile limit is $want (compose: $(cat "$TMP/haproxy.nofile")); maxconn $maxconn lowered with ${HARGS[*]: -2}"
fi
(
  [[ -n $want ]] && ulimit -Sn "$want"
  exec env -i PATH="$PATH" "${henv[@]}" haproxy "${HARGS[@]}"
) > "$TMP/haproxy.log" 2>&1 &
HPID=$!
PIDS+=($HPID)
say "haproxy ${HARGS[*]} (pid $HPID): ws 127.0.0.1:$WS_PORT, wss 127.0.0.1:$WSS_PORT, stats http://127.0.0.1:$STATS_PORT/stats"

# Its stats, as CSV: every node UP after a passing check (/readyz on its admin port) within 15 s.
python3 - "$STATS_PORT" "$HPID" "${NODES[@]}" <<'PY' || { tail -20 "$TMP/haproxy.log" >&2; die "HAProxy does not see every node UP"; }
import csv, io, os, sys, time, urllib.request
port, pid, nodes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
deadline, status = time.time() + 15, {}
while time.time() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("haproxy exited")
    try:
        raw = urllib.request.urlopen(f"http://127.0.0.1:{port}/stats;csv", timeout=2).read().decode()
        rows = list(csv.DictReader(io.StringIO(raw.lstrip("# "))))
        # UP, and from a health check that passed (a server starts out UP before any check).
        status = {r["svname"]: f'{r["status"]} ({r["check_status"]})'
                  for r in rows if r["pxname"] == "herald" and r["svname"] in nodes}
        if all(status.get(n) == "UP (L7OK)" for n in nodes):
            break
    except OSError:
        pass
    time.sleep(0.2)
else:
    sys.exit(f"after 15 s: {status or 'no stats'}")
print("run-local: haproxy stats: " + ", ".join(f"{n} {status[n]}" for n in nodes))
PY
# The haproxy service's compose health check, pointed at the local stats port.
mapfile -t HC < "$TMP/haproxy.health"
HC=("${HC[@]//127.0.0.1\/8404/127.0.0.1/$STATS_PORT}")
timeout 5 "${HC[@]}" || die "$HAPROXY_SVC: its compose health check (${HC[*]}) failed"
say "$HAPROXY_SVC: compose health check passes"

# --- one publish on the first node reaches subscribers on every node and through HAProxy ----------
args=()
for n in "${NODES[@]}"; do args+=("$n=${WS[$n]}"); done
python3 - "${NODES[0]}" "${ADM[${NODES[0]}]}" "$TMP/${NODES[0]}.env" "$CERT" "$STATS_PORT" \
  "${args[@]}" "$HAPROXY_SVC-ws=$WS_PORT" "$HAPROXY_SVC-wss=$WSS_PORT" <<'PY'
import base64, csv, io, json, os, re, socket, ssl, struct, sys, time, urllib.request

publisher, admin_port, env_file, cert_file, stats_port = sys.argv[1:6]
nodes = [a.split("=") for a in sys.argv[6:]]
deadline = time.time() + 10
token = dict(l.rstrip("\n").split("=", 1) for l in open(env_file) if "=" in l).get("HERALD_ADMIN_TOKEN")

# The subscriber through the TLS listener trusts exactly the generated certificate and checks that
# it names localhost.
pem = open(cert_file).read()
tls = ssl.create_default_context(cadata="".join(re.findall(
    r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", pem, re.S)))

def ws_connect(name, port, path):
    s = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
    if name.endswith("-wss"):
        s = tls.wrap_socket(s, server_hostname="localhost")
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               f"Sec-WebSocket-Version: 13\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            raise SystemExit(f"{name} (port {port}): closed during the upgrade")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"{name} (port {port}): upgrade refused: {head.splitlines()[0]!r}")
    return [s, rest]

def read_text(c):
    """Next text message (server frames are unmasked and, here, never fragmented)."""
    s = c[0]
    while True:
        def need(n):
            while len(c[1]) < n:
                left = deadline - time.time()
                if left <= 0:
                    raise SystemExit("timed out waiting for a message")
                s.settimeout(left)
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
    c = ws_connect(name, port, "/v1/realtime?project=console&channels[]=files")
    msg = read_text(c)
    if msg.get("type") != "connected":
        raise SystemExit(f"{name}: expected 'connected', got {msg}")
    conns[name] = c
# Where HAProxy sent its two (leastconn: two different nodes); shown, not required.
try:
    raw = urllib.request.urlopen(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=2).read().decode()
    rows = csv.DictReader(io.StringIO(raw.lstrip("# ")))
    print("run-local: haproxy sessions per node: " + ", ".join(
        f"{r['svname']} {r['scur']}" for r in rows if r["pxname"] == "herald" and r["svname"] != "BACKEND"))
except OSError as e:
    print(f"run-local: (haproxy stats unavailable: {e})")
body = json.dumps({"project": "console", "channels": ["files"],
                   "events": ["buckets.b.files.f.create"], "payload": {"$id": "run-local"}}).encode()
headers = {"content-type": "application/json"}
if token:
    headers["authorization"] = f"Bearer {token}"
req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/v1/events", data=body, headers=headers)
pub_id = json.load(urllib.request.urlopen(req, timeout=5))["id"]
print(f"run-local: published {pub_id} on {publisher}'s admin API" + (" (bearer token)" if token else ""))
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
say "OK: the compose configuration works (redis with AOF, ${#NODES[@]} herald nodes sharing events, $HAPROXY_SVC in front over ws and wss)"
