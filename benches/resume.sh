#!/usr/bin/env bash
# Resume cost (issue 3): CONNECTIONS clients reconnect at once, each resuming with the same
# lastEventId and replaying EXPECT events, against one herald node on the Redis bus. Reports the
# time until all are live again, and the latency of live events seen by an already-connected
# client before and during the storm (replays must not stall live delivery).
# Starts its own redis-server and herald and stops them by PID.
# Settings: CONNECTIONS (19000), EXPECT (100).
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
CONNECTIONS=${CONNECTIONS:-19000}
EXPECT=${EXPECT:-100}
cd "$(dirname "$0")/.."
cargo build --release --bin herald --example stream_tool --example resume_storm >&2
BIN=${CARGO_TARGET_DIR:-target}/release
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

pids=()
tmp=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
url="redis://127.0.0.1:$rport"

HERALD_LOG=warn "$BIN/herald" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 2 --redis "$url" >"$tmp/herald.out" &
pids+=($!)
for _ in $(seq 100); do grep -q "admin on" "$tmp/herald.out" 2>/dev/null && break; sleep 0.05; done
ws=$(grep -o 'ws://[^ ]*realtime' "$tmp/herald.out")
admin=$(grep -o 'admin on http://[^ ]*' "$tmp/herald.out" | sed 's#admin on http://##')
for _ in $(seq 100); do curl -sf "http://$admin/readyz" >/dev/null && break; sleep 0.05; done

# The history the clients missed: EXPECT events on their channel, after `before`.
before=$(curl -s -XPOST "http://$admin/v1/events" -H 'content-type: application/json' \
  -d '{"project":"p","channels":["warmup"],"payload":{}}' | sed 's/.*"id":"\([^"]*\)".*/\1/')
"$BIN/examples/stream_tool" load --url "$url" --count "$EXPECT" --payload-bytes 200 >/dev/null
sleep 0.5

# The probe runs in its own process so the storm's client work does not distort it.
"$BIN/examples/resume_storm" probe --probe "$ws?project=p&channels[]=probe" --admin "$admin" \
  --seconds "${PROBE_SECONDS:-40}" --out "$tmp/probe.txt" &
probe=$!; pids+=($probe)
sleep 3
"$BIN/examples/resume_storm" storm --target "$ws?project=p&channels[]=files&lastEventId=$before" \
  --connections "$CONNECTIONS" --expect "$EXPECT" >"$tmp/storm.json"
wait "$probe"
python3 - "$tmp/storm.json" "$tmp/probe.txt" <<'PY'
import json, sys
storm = json.load(open(sys.argv[1]))
samples = [tuple(map(int, l.split())) for l in open(sys.argv[2]) if l.strip()]
def stats(xs):
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    pick = lambda p: xs[min(len(xs) - 1, round((len(xs) - 1) * p))]
    return {"n": len(xs), "p50_ms": pick(0.5) / 1000, "p99_ms": pick(0.99) / 1000, "max_ms": xs[-1] / 1000}
before = [lat for t, lat in samples if t < storm["started_us"]]
during = [lat for t, lat in samples if storm["started_us"] <= t <= storm["ended_us"]]
storm["live_probe_before"] = stats(before)
storm["live_probe_during"] = stats(during)
print(f"resume: {storm['completed']}/{storm['connections']} clients replayed {storm['expected_events_each']} events each; "
      f"all live after {storm['all_live_ms']} ms (p50 {storm['live_at_ms']['p50']} ms); "
      f"live-event latency p50/p99 before {stats(before).get('p50_ms')}/{stats(before).get('p99_ms')} ms, "
      f"during {stats(during).get('p50_ms')}/{stats(during).get('p99_ms')} ms; failures {storm['failures']}")
print("RESULT " + json.dumps(storm))
PY
