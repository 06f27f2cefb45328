#!/usr/bin/env bash
# Run a Tsung scenario against a herald that this script starts and stops itself.
#
#   tsung/run.sh [options] seed|connect_hold|push|FILE.xml
#
#   seed          Appwrite's realtime benchmark scenario (tsung/seed.xml): connect, then rounds of
#                 think time, from many client addresses on loopback; every user must connect and
#                 herald must hold all of them at once
#   connect_hold  connect, hold, ping (tsung/connect_hold.xml)
#   push          subscribers hold while events are published; every event must reach every
#                 subscriber (tsung/push.xml)
#
#   -u USERS    WebSocket users (default 200; seed is meant for 1,000 to 19,000, see Limits)
#   -r RATE     arrivals per second (default 50); the arrival phase lasts long enough for
#               USERS at that rate (Poisson arrivals come in bursts and gaps)
#   -H SECONDS  how long each user holds its connection (default 20; seed: raised to outlast
#               the arrivals, so that herald holds every user at once)
#   -t SECONDS  think time between two realtime pings, 2 to 89 (default 30 for seed, as in
#               Appwrite's scenario; otherwise 5, or 20 for holds over 60 s); the hold is
#               rounded up to whole rounds
#   -i IPS      client addresses on loopback for scenarios with ip lines (seed), 127.0.0.2
#               upwards, 1 to 250 (default one per 2,000 users, at least 2)
#   -e EVENTS   push: events published (default 10)
#   -g SECONDS  push: gap between two events (default 0.5)
#   -R          also write Tsung's HTML report (report.html, graph.html) into the log dir
#   -h          this help
#
# What it does: installs Tsung with apt if missing; builds target/release/herald if missing
# (HERALD_BIN overrides the binary); starts herald on free 127.0.0.1 ports; copies the scenario
# into the log dir with its knobs (the <!ENTITY> values at the top: port, users, timings; the ip
# lines of a client element) set from the options; runs Tsung bounded by `timeout`; polls
# herald's /metrics every second for the peak connection count (and, with ss, the client
# addresses connected at the peak); stops herald by PID; prints Tsung's figures next to herald's
# (tsung/summary.py) and exits non-zero when a check fails. Extra herald settings can be passed as
# HERALD_* variables (HERALD_LISTEN and HERALD_ADMIN are always set here).
#
# Logs: $TSUNG_LOGS (default target/tsung)/<scenario>-<time>-<pid>/ holds config.xml,
# herald.out/err, metrics.json and Tsung's own dir (tsung.log, tsung_controller@*.log, match.log).
#
# Limits: all traffic stays on loopback. One Tsung VM and one herald process each hold about as
# many sockets as the open-file hard limit allows (20,000 here): USERS must stay 300 below it.
#
# With more than 1,000 users active Tsung checks for the end of its sessions once a minute, so
# such a run lasts up to a minute longer than its last session. The test command's smoke of the
# seed scenario stays at 1,000 (about 17 s here):
#   tsung/run.sh -u 1000 -r 500 -t 4 -H 8 seed
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
# The admin API of this herald stays on loopback and takes no token: the /metrics poller and
# push.xml's publisher send none (an inherited one, e.g. scripts/check-deploy's placeholder,
# would make every scrape fail).
unset HERALD_ADMIN_TOKEN
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/tsung

USERS=200 RATE=50 HOLD=20 THINK= IPS= EVENTS=10 GAP=0.5 REPORT=0
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
while getopts "u:r:H:t:i:e:g:Rh" o; do
  case $o in
    u) USERS=$OPTARG ;; r) RATE=$OPTARG ;; H) HOLD=$OPTARG ;; t) THINK=$OPTARG ;; i) IPS=$OPTARG ;;
    e) EVENTS=$OPTARG ;; g) GAP=$OPTARG ;; R) REPORT=1 ;;
    h) usage; exit 0 ;; *) usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 1 ]] || { usage >&2; exit 2; }
case $1 in
  seed|connect_hold|push) SCENARIO=$1; SRC=$HERE/$1.xml ;;
  *) SRC=$1; SCENARIO=$(basename "$SRC" .xml) ;;
esac
[[ -r $SRC ]] || { echo "run.sh: no scenario file $SRC" >&2; exit 2; }
for v in USERS RATE HOLD EVENTS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: $v must be a positive integer" >&2; exit 2; }
done
[[ $GAP =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "run.sh: -g must be a number of seconds" >&2; exit 2; }
# herald closes a connection after 90 s without a client message and allows 32 messages a minute.
if [[ -n $THINK ]] && ! { [[ $THINK =~ ^[0-9]+$ ]] && (( THINK >= 2 && THINK <= 89 )); }; then
  echo "run.sh: -t must be 2 to 89 seconds (herald closes a connection after 90 s of client silence)" >&2
  exit 2
fi
[[ -n $IPS ]] || IPS=$(( USERS > 4000 ? (USERS + 1999) / 2000 : 2 ))
if ! [[ $IPS =~ ^[1-9][0-9]*$ ]] || (( IPS > 250 )); then
  echo "run.sh: -i must be 1 to 250 client addresses" >&2; exit 2
fi

log() { printf 'run.sh: %s\n' "$*"; }

# --- sizes ----------------------------------------------------------------------------------------
HARD=$(ulimit -Hn)
if [[ $HARD != unlimited ]] && (( USERS > HARD - 300 )); then
  echo "run.sh: $USERS users do not fit in one Tsung VM and one herald process with an open-file" \
       "hard limit of $HARD; use several client VMs and herald nodes (see tsung/connect_hold.xml)" >&2
  exit 2
fi
# Arrival phase: 25% more than USERS/RATE, plus a second, so the Poisson process reaches USERS.
RAMP=$(( (USERS * 5 + RATE * 4 - 1) / (RATE * 4) + 1 ))
# Client pings keep herald's idle timeout (90 s of client silence) away; 5 s apart for short
# holds so a short run still exchanges a few, 20 s apart for long ones (rate limit: 32 a minute);
# the seed's own think time is 30 s. -t sets it.
if [[ -n $THINK ]]; then PING_EVERY=$THINK
elif [[ $SCENARIO == seed ]]; then PING_EVERY=30
elif (( HOLD <= 60 )); then PING_EVERY=5; else PING_EVERY=20; fi
PUBLISH_AT=$(( RAMP + 2 ))
PUBLISH_SPAN=$(python3 -c "import math;print(math.ceil($EVENTS*$GAP))")
if [[ $SCENARIO == push ]]; then
  # The first subscribers must still be there when the last event goes out.
  need=$(( PUBLISH_AT + PUBLISH_SPAN + 3 ))
  if (( HOLD < need )); then log "push: hold raised from $HOLD s to $need s to cover the publishing"; HOLD=$need; fi
fi
if [[ $SCENARIO == seed ]] && (( HOLD < RAMP + 3 )); then
  # The first user must still be connected when the last one arrives.
  log "seed: hold raised from $HOLD s to $(( RAMP + 3 )) s to outlast the ${RAMP} s of arrivals"
  HOLD=$(( RAMP + 3 ))
fi
PINGS=$(( (HOLD + PING_EVERY - 1) / PING_EVERY ))
HOLD=$(( PINGS * PING_EVERY ))
DURATION=$(( RAMP + HOLD + 30 ))
# While more than 1,000 of its users are active, Tsung looks for the end of the sessions only once
# a minute after the last arrival: such a run ends up to a minute after its last session, and
# the hard stop must leave room for that (hitting it counts as error_abort).
if (( USERS > 1000 )); then
  DURATION=$(( RAMP + (HOLD + 5 + 59) / 60 * 60 + 30 ))
fi
if [[ $SCENARIO == push ]] && (( PUBLISH_AT + PUBLISH_SPAN + 30 > DURATION )); then
  DURATION=$(( PUBLISH_AT + PUBLISH_SPAN + 30 ))
fi
TIMEOUT=$(( DURATION + 60 ))
MAXUSERS=$(( USERS + 100 ))

# --- tools ----------------------------------------------------------------------------------------
if ! command -v tsung >/dev/null; then
  log "installing tsung (apt-get install tsung)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends tsung >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends tsung >/dev/null; }
fi
TSUNG_STATS=$(ls /usr/lib/*/tsung/bin/tsung_stats.pl 2>/dev/null | head -1 || true)
BIN=${HERALD_BIN:-$ROOT/target/release/herald}
if [[ ! -x $BIN ]]; then
  log "building $BIN"
  (cd "$ROOT" && cargo build --release --locked --bin herald)
fi

RUN=${TSUNG_LOGS:-$ROOT/target/tsung}/$SCENARIO-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN"
free_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}
WS_PORT=$(free_port); ADMIN_PORT=$(free_port)

# --- the scenario, with its knobs set ---------------------------------------------------------------
python3 - "$SRC" "$RUN/config.xml" host=127.0.0.1 port="$WS_PORT" admin_port="$ADMIN_PORT" \
  users="$USERS" rate="$RATE" ramp="$RAMP" ping_every="$PING_EVERY" pings="$PINGS" \
  think="$PING_EVERY" rounds="$PINGS" publish_at="$PUBLISH_AT" events="$EVENTS" \
  publish_gap="$GAP" duration="$DURATION" maxusers="$MAXUSERS" ips="$IPS" <<'PY'
import re, sys
src, dst, pairs = sys.argv[1], sys.argv[2], dict(a.split("=", 1) for a in sys.argv[3:])
text = open(src).read()
found = set()
def sub(m):
    name = m.group(1)
    if name not in pairs:
        return m.group(0)
    found.add(name)
    return f'<!ENTITY {name} "{pairs[name]}">'
text = re.sub(r'<!ENTITY\s+(\w+)\s+"[^"]*"\s*>', sub, text)
for required in ("port", "users"):
    if required not in found:
        sys.exit(f"{src}: no <!ENTITY {required} ...> to set (see tsung/connect_hold.xml)")
# Client addresses: a client element with ip lines gets one line per address, 127.0.0.2 upwards
# (an entity holding elements would escape the DTD check of the file as written).
IP_LINE = re.compile(r"^([ \t]*)<ip\b[^>]*/>[ \t]*\n", re.M)
def client_ips(m):
    lines = IP_LINE.findall(m.group(2))
    if not lines:
        return m.group(0)
    found.add("ips")
    new = "".join(f'{lines[0]}<ip value="127.0.0.{2 + i}"/>\n' for i in range(int(pairs["ips"])))
    return m.group(1) + IP_LINE.sub("", m.group(2)) + new + m.group(3)
text = re.sub(r"(<client\b[^>]*[^/]>)(.*?)([ \t]*</client>)", client_ips, text, flags=re.S)
open(dst, "w").write(text)
print("run.sh: knobs set: " + " ".join(f"{k}={pairs[k]}" for k in sorted(found)))
PY
if command -v xmllint >/dev/null; then xmllint --noout --valid "$RUN/config.xml"; fi

# --- herald -------------------------------------------------------------------------------------------
HERALD_PID= POLL_PID= EPMD_WAS_UP=0
epmd -names >/dev/null 2>&1 && EPMD_WAS_UP=1
stop_pid() {   # SIGTERM, then SIGKILL after $2 tenths of a second
  local pid=$1 tenths=$2
  [[ -n $pid ]] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 "$tenths"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_pid "$POLL_PID" 30
  stop_pid "$HERALD_PID" 200   # herald drains for up to --drain-timeout (10 s)
  # Erlang started epmd as a daemon for Tsung. Stop it only if it was not running before; epmd
  # refuses to die while other Erlang nodes are registered with it.
  if [[ $EPMD_WAS_UP == 0 ]] && command -v epmd >/dev/null; then epmd -kill >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HERALD_LISTEN=127.0.0.1:$WS_PORT HERALD_ADMIN=127.0.0.1:$ADMIN_PORT \
  "$BIN" serve > "$RUN/herald.out" 2> "$RUN/herald.err" &
HERALD_PID=$!
for _ in $(seq 1 150); do
  grep -q 'herald listening' "$RUN/herald.out" 2>/dev/null && break
  kill -0 "$HERALD_PID" 2>/dev/null || break
  sleep 0.1
done
grep -q 'herald listening' "$RUN/herald.out" || { cat "$RUN/herald.err" >&2; echo "run.sh: herald did not start" >&2; exit 1; }
log "$(head -1 "$RUN/herald.out")"

# /metrics poller: peak of herald_connections (summed over shards), when it was first reached, the
# distinct client addresses connected at that moment (ss), and the last snapshot.
python3 - "$ADMIN_PORT" "$RUN/metrics.json" "$TIMEOUT" "$WS_PORT" <<'PY' &
import json, signal, subprocess, sys, time, urllib.request
port, out, limit, ws_port = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
peak, last, first_at, peak_at, addrs = 0, {}, None, None, None
def client_addresses():
    try:
        rows = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{ws_port} )"],
                              capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    counts = {}
    for r in rows:
        cols = r.split()
        if len(cols) >= 2 and cols[-2] == f"127.0.0.1:{ws_port}":   # herald's end of it
            addr = cols[-1].rsplit(":", 1)[0]
            counts[addr] = counts.get(addr, 0) + 1
    return counts
def state():
    return {"peak_connections": peak, "first_connection_s": first_at, "peak_reached_s": peak_at,
            "client_addresses_at_peak": addrs, "last": last}
def scrape():
    vals = {}
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        vals[name] = vals.get(name, 0) + float(value)
    return {k: int(v) if v == int(v) else v for k, v in vals.items()}
def save(*_):
    json.dump(state(), open(out, "w"), indent=1)
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
start = time.time()
end = start + limit
while time.time() < end:
    try:
        last = scrape()
        now, conns = round(time.time() - start, 1), last.get("herald_connections", 0)
        if conns and first_at is None:
            first_at = now
        if conns > peak:
            peak, peak_at = conns, now
            addrs = client_addresses()
        json.dump(state(), open(out, "w"), indent=1)
    except Exception:
        pass
    time.sleep(1)
save()
PY
POLL_PID=$!

# --- Tsung ----------------------------------------------------------------------------------------------
log "tsung: $SCENARIO, $USERS users at $RATE/s over ${RAMP}s, hold ${HOLD}s ($PINGS pings ${PING_EVERY}s apart)$([[ $SCENARIO == push ]] && echo ", $EVENTS events from t=${PUBLISH_AT}s every ${GAP}s")$([[ $SCENARIO == seed ]] && echo ", from $IPS client addresses"), stop after ${DURATION}s"
start=$(date +%s)
# -n: no web dashboard. Tsung exits 0 even when every connection failed, hence the summary checks.
rc=0
timeout "$TIMEOUT" tsung -n -f "$RUN/config.xml" -l "$RUN" start > "$RUN/tsung.out" 2>&1 || rc=$?
log "tsung finished in $(( $(date +%s) - start )) s (exit $rc)"
TLOG=$(ls -d "$RUN"/2*/ 2>/dev/null | tail -1); TLOG=${TLOG%/}
[[ -n $TLOG && -f $TLOG/tsung.log ]] || { cat "$RUN/tsung.out" >&2; echo "run.sh: Tsung wrote no tsung.log" >&2; exit 1; }
(( rc == 0 )) || { echo "run.sh: tsung failed (exit $rc; 124 = hit the ${TIMEOUT}s timeout)" >&2; tail -5 "$RUN/tsung.out" >&2; }

sleep 1.5   # one more /metrics scrape after the last close
stop_pid "$POLL_PID" 30; POLL_PID=
if [[ $REPORT == 1 && -n $TSUNG_STATS ]]; then
  (cd "$TLOG" && "$TSUNG_STATS" > stats.out 2>&1) && log "HTML report: $TLOG/report.html"
fi
log "logs: $RUN"
cover=()
(( HOLD > RAMP + 2 )) && cover=(--hold-covers-ramp)
set +e
python3 "$HERE/summary.py" "$TLOG/tsung.log" "$RUN/metrics.json" --scenario "$SCENARIO" \
  --users "$USERS" --pings "$PINGS" --events "$EVENTS" --ips "$IPS" --rate "$RATE" "${cover[@]}"
status=$?
set -e
(( rc == 0 )) || status=1
exit $status
