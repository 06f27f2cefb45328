#!/usr/bin/env bash
# Redis stream ingestion rate of one herald node (issue 3): events per second read from Redis,
# decoded, encoded once and handed to the shards, against a plain XREAD loop reading the same
# entries (the baseline, same run, same Redis).
#
# Starts its own redis-server and herald (2 shards, 1,000 idle subscribers connected with
# herald-bench so fan-out is not empty), bulk-loads COUNT entries with pipelined XADD while herald
# reads them live, and times until herald's herald_events_published_total reaches COUNT. Then does
# the same with a plain XREAD loop (stream_tool read --live) tailing a second stream under the
# same load. Stops everything it started by PID.
# Settings: COUNT (200000), PAYLOAD_BYTES (200), SUBSCRIBERS (1000).
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
COUNT=${COUNT:-200000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-200}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --example stream_tool >&2
BIN=${CARGO_TARGET_DIR:-target}/release
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
tmp=$(mktemp -d)
trap cleanup EXIT

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
url="redis://127.0.0.1:$rport"

HERALD_LOG=warn "$BIN/herald" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 2 \
  --redis "$url" --stream-maxlen $((COUNT * 2)) >"$tmp/herald.out" &
hpid=$!; pids+=($hpid)
for _ in $(seq 100); do grep -q "admin on" "$tmp/herald.out" 2>/dev/null && break; sleep 0.05; done
ws=$(grep -o 'ws://[^ ]*realtime' "$tmp/herald.out")
admin=$(grep -o 'admin on http://[^ ]*' "$tmp/herald.out" | sed 's#admin on http://##')
for _ in $(seq 100); do curl -sf "http://$admin/readyz" >/dev/null && break; sleep 0.05; done

"$BIN/herald-bench" idle --target "$ws?project=p&channels[]=idle" --connections "$SUBSCRIBERS" \
  --rate 5000 --hold 600s >/dev/null 2>"$tmp/bench.err" &
pids+=($!)
for _ in $(seq 200); do grep -q settled "$tmp/bench.err" 2>/dev/null && break; sleep 0.05; done

published() { curl -s "http://$admin/metrics" | awk '/^herald_events_published_total /{print $2}'; }
start=$(date +%s.%N)
"$BIN/examples/stream_tool" load --url "$url" --count "$COUNT" --payload-bytes "$PAYLOAD_BYTES" >"$tmp/load.out"
loaded=$(date +%s.%N)
until [ "$(published)" -ge "$COUNT" ] 2>/dev/null; do sleep 0.01; done
done_at=$(date +%s.%N)
herald_rate=$(python3 -c "print(round($COUNT/($done_at-$start)))")
load_rate=$(python3 -c "print(round($COUNT/($loaded-$start)))")
# Baseline under the same conditions: a plain XREAD loop tailing a second stream while the same
# loader fills it.
"$BIN/examples/stream_tool" read --live --url "$url" --stream baseline --count "$COUNT" >"$tmp/read.out" &
rpid=$!; pids+=($rpid)
sleep 0.3
bstart=$(date +%s.%N)
"$BIN/examples/stream_tool" load --url "$url" --stream baseline --count "$COUNT" --payload-bytes "$PAYLOAD_BYTES" >/dev/null
wait "$rpid"
bdone=$(date +%s.%N)
base_rate=$(python3 -c "print(round($COUNT/($bdone-$bstart)))")
ratio=$(python3 -c "print(round($herald_rate/$base_rate, 2))")
echo "ingest: $COUNT entries of ~${PAYLOAD_BYTES} B payload, $SUBSCRIBERS idle subscribers on another channel (ingestion, not fan-out)"
echo "  XADD load rate (pipelined):        $load_rate/s"
echo "  herald ingestion (read+encode+fan-out, end to end): $herald_rate/s"
echo "  baseline plain XREAD loop tailing the same load: $base_rate/s"
echo "RESULT {\"count\":$COUNT,\"herald_per_s\":$herald_rate,\"xread_baseline_per_s\":$base_rate,\"ratio\":$ratio,\"xadd_load_per_s\":$load_rate}"
