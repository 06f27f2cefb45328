#!/usr/bin/env bash
# Per-process base memory of herald binaries, measured side by side in one run.
#
#   benches/base_memory.sh [-n RUNS] BINARY [BINARY...]
#
# For each run and each binary in turn (interleaved, so a noisy machine affects all alike):
# starts `BINARY serve --shards 1 --redis URL` against a redis-server this script starts on a free
# loopback port, and reads /proc/PID/status and smaps_rollup
#   - base:   5 s after start, before any client (VmRSS, RssAnon, Pss);
#   - after:  once 500 subscribers connected, 20 events reached them, /metrics was scraped and
#             the clients left, 3 s later (VmRSS): what serving maps back in.
# Prints one line per measurement and a min-max summary per binary. Needs redis-server and node
# with tests/sdk's `ws` package (npm install in tests/sdk). Stops everything it started by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3
if [[ ${1:-} == -n ]]; then RUNS=$2; shift 2; fi
(( $# >= 1 )) || { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ -d $ROOT/tests/sdk/node_modules/ws ]] || (cd "$ROOT/tests/sdk" && npm install --no-audit --no-fund --loglevel=error)

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
TMP=$(mktemp -d)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
  > "$TMP/redis.log" 2>&1 &
REDIS_PID=$!
HP=
cleanup() {
  [[ -n $HP ]] && kill "$HP" 2>/dev/null || true
  kill "$REDIS_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

cat > "$TMP/load.mjs" <<EOF
import WebSocket from '$ROOT/tests/sdk/node_modules/ws/index.js';
const [ws, admin, n] = [process.argv[2], process.argv[3], +process.argv[4]];
const url = \`ws://\${ws}/v1/realtime?project=p&channels[]=c\`;
let got = 0;
const socks = await Promise.all(Array.from({ length: n }, () => new Promise((ok, bad) => {
  const s = new WebSocket(url);
  s.on('message', (m) => { if (JSON.parse(m).type === 'event') got += 1; });
  s.on('open', () => ok(s));
  s.on('error', bad);
})));
await new Promise((r) => setTimeout(r, 300));
for (let i = 0; i < 20; i++) {
  await fetch(\`http://\${admin}/v1/events\`, { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ project: 'p', channels: ['c'], payload: { i } }) });
}
const end = Date.now() + 10000;
while (got < 20 * n && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
await (await fetch(\`http://\${admin}/metrics\`)).text();
socks.forEach((s) => s.close());
await new Promise((r) => setTimeout(r, 300));
if (got !== 20 * n) { console.error(\`delivered \${got} of \${20 * n}\`); process.exit(1); }
EOF

field() { awk -v k="$1:" '$1 == k { print $2 }' "$2"; }
declare -A base after
for run in $(seq "$RUNS"); do
  for bin in "$@"; do
    HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0 HERALD_LOG=warn \
      "$bin" serve --shards 1 --redis "redis://127.0.0.1:$REDIS_PORT" --listen 127.0.0.1:0 \
      --admin 127.0.0.1:0 > "$TMP/out" 2> "$TMP/err" &
    HP=$!
    for _ in $(seq 100); do [[ -s $TMP/out ]] && break; sleep 0.05; done
    line=$(head -1 "$TMP/out")
    ws=$(grep -oP 'ws://\K[^/ ]+' <<<"$line"); admin=$(grep -oP 'admin on http://\K\S+' <<<"$line")
    sleep 5
    rss=$(field VmRSS /proc/$HP/status); anon=$(field RssAnon /proc/$HP/status)
    pss=$(field Pss /proc/$HP/smaps_rollup)
    node "$TMP/load.mjs" "$ws" "$admin" 500
    sleep 3
    served=$(field VmRSS /proc/$HP/status)
    kill "$HP"; wait "$HP" 2>/dev/null || true; HP=
    printf 'run %d  %-40s base RSS %6d kB (anon %5d kB, PSS %5d kB)  after serving %6d kB\n' \
      "$run" "$bin" "$rss" "$anon" "$pss" "$served"
    base[$bin]+="$rss "; after[$bin]+="$served "
  done
done
echo
for bin in "$@"; do
  read -r -a b <<<"${base[$bin]}"; read -r -a a <<<"${after[$bin]}"
  range() { printf '%s\n' "$@" | sort -n | sed -n '1p;$p' | paste -sd- ; }
  printf '%-40s base %s kB, after serving %s kB\n' "$bin" "$(range "${b[@]}")" "$(range "${a[@]}")"
done
