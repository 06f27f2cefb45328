#!/usr/bin/env bash
# What idle liveness traffic costs each I/O driver (issue 17):
#
#   benches/ping_cost.sh
#
# For each driver in turn (epoll, then uring), starts one `herald serve --shards 1` with a short
# --ping-interval and the idle timeout off, opens CONNECTIONS idle subscribed connections with
# `herald-bench idle` (which answers every ping), waits until they are open, and measures the CPU
# herald and herald-bench use over WINDOW seconds: with every connection pinged each
# PING_INTERVAL, that is the cost of a ping and its pong, per driver, in one run. One summary
# line per driver on stdout. Every process it starts is stopped by PID; it finishes by itself
# in about two minutes after the build.
#
# Settings (environment): CONNECTIONS (18000), PING_INTERVAL (2s), WINDOW (20), DRIVERS
# ("epoll uring"), LISTEN_PORT (9700; the admin port is the next one), BIN_DIR (prebuilt herald
# and herald-bench; otherwise built with cargo).
set -euo pipefail
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-18000}
PING_INTERVAL=${PING_INTERVAL:-2s}
WINDOW=${WINDOW:-20}
DRIVERS=${DRIVERS:-epoll uring}
PORT=${LISTEN_PORT:-9700}
if [[ -z ${BIN_DIR:-} ]]; then
    cargo build --release --quiet --workspace --bins
    BIN_DIR=${CARGO_TARGET_DIR:-target}/release
fi
TICK=$(getconf CLK_TCK)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# opened ADMIN: connections herald holds now.
opened() {
    curl -sf "http://127.0.0.1:$1/metrics" | awk '/^herald_connections\{/ {n += $2} END {print n + 0}'
}

measure() {
    local io=$1 admin=$((PORT + 1)) herald bench waited=0
    "$BIN_DIR/herald" serve --shards 1 --io "$io" --listen "127.0.0.1:$PORT" \
        --admin "127.0.0.1:$admin" --ping-interval "$PING_INTERVAL" --idle-timeout 0s \
        >/dev/null 2>&1 &
    herald=$!
    PIDS+=("$herald")
    sleep 1
    "$BIN_DIR/herald-bench" idle \
        --target "ws://127.0.0.1:$PORT/v1/realtime?project=p&channels[]=files" \
        --connections "$CONNECTIONS" --rate 6000 --hold "$((WINDOW + 30))s" \
        --source-ips 127.0.0.2-127.0.0.40 >/dev/null 2>&1 &
    bench=$!
    PIDS+=("$bench")
    until [[ $(opened "$admin") -ge $CONNECTIONS ]]; do
        ((waited++ < 60)) || { echo "$io: only $(opened "$admin") connections after 60 s" >&2; return 1; }
        sleep 1
    done
    sleep 3 # the connect phase's own work is over
    local h0 b0 t0 h1 b1 t1
    h0=$(cpu_ticks "$herald") b0=$(cpu_ticks "$bench") t0=$(date +%s.%N)
    sleep "$WINDOW"
    h1=$(cpu_ticks "$herald") b1=$(cpu_ticks "$bench") t1=$(date +%s.%N)
    python3 - "$io" "$h0" "$h1" "$b0" "$b1" "$t0" "$t1" "$TICK" "$CONNECTIONS" "$PING_INTERVAL" <<'EOF'
import sys
io, h0, h1, b0, b1, t0, t1, tick, n, interval = sys.argv[1:]
secs = float(t1) - float(t0)
herald = (float(h1) - float(h0)) / float(tick) / secs
bench = (float(b1) - float(b0)) / float(tick) / secs
pings = int(n) / float(interval.rstrip("s"))
print(f"io={io} connections={n} ping_interval={interval} pings_per_s={pings:.0f} "
      f"herald_cpu={herald * 100:.1f}% bench_cpu={bench * 100:.1f}% "
      f"herald_us_per_ping={herald / pings * 1e6:.1f}")
EOF
    kill "$bench" "$herald" 2>/dev/null || true
    wait "$bench" "$herald" 2>/dev/null || true
}

for io in $DRIVERS; do
    measure "$io"
done
