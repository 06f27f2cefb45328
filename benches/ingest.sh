#!/usr/bin/env bash
# Redis stream ingestion rate of one herald node (issue 3): events per second read from Redis,
# decoded, encoded once and handed to the shards, against a plain XREAD loop reading the same
# entries (the baseline, same run, same Redis).
#
# Starts its own Redis and herald (2 shards, 1,000 idle subscribers connected with herald-bench
# so fan-out is not empty), bulk-loads COUNT entries with pipelined XADD while herald reads them
# live, and times until herald's herald_events_published_total reaches COUNT. Then does the same
# with a plain XREAD loop (stream_tool read --live) tailing a second stream under the same load.
# Stops everything it started by PID.
#
# Two modes, named in the output:
# - single (the default): one redis-server, one stream (herald --redis), every entry for one
#   project;
# - cluster (CLUSTER=1): a local Redis Cluster of three masters (no replicas; the same set-up as
#   the tests' harness, without its AOF), herald with --redis-cluster and --stream-shards SHARDS,
#   and the COUNT entries spread over PROJECTS projects (entry n for project p<n % PROJECTS>),
#   each XADDed to its project's shard's stream (stream_tool load --cluster, pipelined per key).
#   The baseline reads the SHARDS streams of a second sharded stream, one XREAD loop each.
# Settings: COUNT (200000), PAYLOAD_BYTES (200), SUBSCRIBERS (1000); with CLUSTER=1, SHARDS (3)
# and PROJECTS (64). FANOUT=N (0) then also measures end-to-end fan-out on the same bus: N
# subscribers of one channel, 5 single events and 20 and 50 events/s through the publish API.
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
COUNT=${COUNT:-200000}
PAYLOAD_BYTES=${PAYLOAD_BYTES:-200}
SUBSCRIBERS=${SUBSCRIBERS:-1000}
FANOUT=${FANOUT:-0}
CLUSTER=${CLUSTER:-0}
if [[ $CLUSTER == 1 ]]; then
  SHARDS=${SHARDS:-3}
  PROJECTS=${PROJECTS:-64}
elif [[ $CLUSTER != 0 ]]; then
  echo "CLUSTER is 1 (a local Redis Cluster) or 0 (one redis-server), not '$CLUSTER'" >&2; exit 2
elif [[ -n ${SHARDS:-}${PROJECTS:-} ]]; then
  echo "SHARDS and PROJECTS apply to the cluster mode only: set CLUSTER=1" >&2; exit 2
fi
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins --example stream_tool >&2
BIN=${CARGO_TARGET_DIR:-target}/release
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
# N distinct free ports (all bound at once while they are picked).
free_ports() { python3 -c 'import socket,sys;ss=[socket.socket() for _ in range(int(sys.argv[1]))];[s.bind(("127.0.0.1",0)) for s in ss];print(*[s.getsockname()[1] for s in ss])' "$1"; }

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
tmp=$(mktemp -d)
trap cleanup EXIT

if [[ $CLUSTER == 1 ]]; then
  # Three masters, each with its own directory and its own cluster bus port (not port + 10000,
  # which may be past 65535), joined with redis-cli --cluster create.
  read -r -a cports <<<"$(free_ports 6)"
  nodes=()
  for i in 0 1 2; do
    port=${cports[$((2 * i))]} bus=${cports[$((2 * i + 1))]}
    mkdir -p "$tmp/redis-$port"
    redis-server --port "$port" --cluster-port "$bus" --bind 127.0.0.1 --save "" --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --dir "$tmp/redis-$port" >/dev/null &
    pids+=($!)
    nodes+=("127.0.0.1:$port")
  done
  for node in "${nodes[@]}"; do
    for _ in $(seq 100); do redis-cli -p "${node##*:}" ping >/dev/null 2>&1 && break; sleep 0.05; done
  done
  if ! redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes \
    </dev/null >"$tmp/cluster-create.out" 2>&1; then
    cat "$tmp/cluster-create.out" >&2; exit 1
  fi
  cluster_ok() {
    local node info
    for node in "${nodes[@]}"; do
      info=$(redis-cli -p "${node##*:}" cluster info 2>/dev/null || true)
      [[ $info == *cluster_state:ok* ]] || return 1
    done
  }
  for _ in $(seq 300); do cluster_ok && break; sleep 0.1; done
  cluster_ok || { echo "the Redis Cluster ${nodes[*]} did not reach cluster_state:ok in 30 s" >&2; exit 1; }
  addresses=$(IFS=,; echo "${nodes[*]}")
  bus_args=(--redis-cluster "$addresses" --stream-shards "$SHARDS")
  tool_args=(--cluster "$addresses" --stream-shards "$SHARDS" --projects "$PROJECTS")
  mode="cluster: a Redis Cluster of 3 masters, $SHARDS stream shards, $PROJECTS projects"
else
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$tmp" >/dev/null &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.05; done
  url="redis://127.0.0.1:$rport"
  bus_args=(--redis "$url")
  tool_args=(--url "$url")
  mode="single: one redis-server, one stream, one project"
fi

HERALD_LOG=warn "$BIN/herald" serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 --shards 2 \
  "${bus_args[@]}" --stream-maxlen $((COUNT * 2)) >"$tmp/herald.out" &
hpid=$!; pids+=($hpid)
for _ in $(seq 100); do grep -q "admin on" "$tmp/herald.out" 2>/dev/null && break; sleep 0.05; done
ws=$(grep -o 'ws://[^ ]*realtime' "$tmp/herald.out")
admin=$(grep -o 'admin on http://[^ ]*' "$tmp/herald.out" | sed 's#admin on http://##')
for _ in $(seq 600); do curl -sf "http://$admin/readyz" >/dev/null && break; sleep 0.05; done
curl -sf "http://$admin/readyz" >/dev/null || { echo "herald did not become ready in 30 s" >&2; exit 1; }

"$BIN/herald-bench" idle --target "$ws?project=p&channels[]=idle" --connections "$SUBSCRIBERS" \
  --rate 5000 --hold 600s >/dev/null 2>"$tmp/bench.err" &
pids+=($!)
for _ in $(seq 200); do grep -q settled "$tmp/bench.err" 2>/dev/null && break; sleep 0.05; done

published() { curl -s "http://$admin/metrics" | awk '/^herald_events_published_total /{print $2}'; }
start=$(date +%s.%N)
"$BIN/examples/stream_tool" load "${tool_args[@]}" --count "$COUNT" --payload-bytes "$PAYLOAD_BYTES" >"$tmp/load.out"
loaded=$(date +%s.%N)
until [ "$(published)" -ge "$COUNT" ] 2>/dev/null; do sleep 0.01; done
done_at=$(date +%s.%N)
herald_rate=$(python3 -c "print(round($COUNT/($done_at-$start)))")
load_rate=$(python3 -c "print(round($COUNT/($loaded-$start)))")
# Baseline under the same conditions: a plain XREAD loop tailing a second stream while the same
# loader fills it.
"$BIN/examples/stream_tool" read --live "${tool_args[@]}" --stream baseline --count "$COUNT" >"$tmp/read.out" &
rpid=$!; pids+=($rpid)
sleep 0.3
bstart=$(date +%s.%N)
"$BIN/examples/stream_tool" load "${tool_args[@]}" --stream baseline --count "$COUNT" --payload-bytes "$PAYLOAD_BYTES" >/dev/null
wait "$rpid"
bdone=$(date +%s.%N)
base_rate=$(python3 -c "print(round($COUNT/($bdone-$bstart)))")
ratio=$(python3 -c "print(round($herald_rate/$base_rate, 2))")
echo "ingest: $COUNT entries of ~${PAYLOAD_BYTES} B payload, $SUBSCRIBERS idle subscribers on another channel (ingestion, not fan-out)"
echo "  mode: $mode"
echo "  XADD load rate (pipelined):        $load_rate/s"
echo "  herald ingestion (read+encode+fan-out, end to end): $herald_rate/s"
echo "  baseline plain XREAD loop tailing the same load: $base_rate/s"
echo "RESULT {\"count\":$COUNT,\"herald_per_s\":$herald_rate,\"xread_baseline_per_s\":$base_rate,\"ratio\":$ratio,\"xadd_load_per_s\":$load_rate,\"mode\":\"${mode%%:*}\",\"stream_shards\":${SHARDS:-1}}"

# End-to-end fan-out on the same bus (FANOUT subscribers, 0 to skip): events published through the
# admin API, read back from the stream, delivered to every subscriber of one channel.
if (( FANOUT > 0 )); then
  "$BIN/herald-bench" fanout --target "$ws?project=fan" --project fan --admin "http://$admin" \
    --connections "$FANOUT" --source-ips 127.0.0.2-127.0.0.40 --single 5 --rates 20,50 \
    --phase-time 5s >"$tmp/fanout.json" 2>"$tmp/fanout.out" || true
  python3 - "$tmp/fanout.json" "$FANOUT" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"  fan-out to {sys.argv[2]} subscribers of one channel (publish API -> stream -> herald):")
for ph in r["phases"]:
    ttl = ph.get("time_to_last_subscriber_ms") or {}
    print(f"    {ph['label']}: delivered {ph['delivered']}/{ph['expected']} ({ph['missing']} missing, "
          f"{ph['duplicates']} dup), {ph['delivered_per_s']:.0f} msg/s, latency p50 "
          f"{ph['latency_ms']['p50']:.1f} p99 {ph['latency_ms']['p99']:.1f} ms, last subscriber "
          f"p50 {ttl.get('p50', 0):.1f} ms")
PY
fi
