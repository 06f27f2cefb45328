#!/usr/bin/env bash
# A million connections on this machine, as one command (issue 16):
#
#   benches/million.sh [--connections N]          # 1,000,000 by default; 100000, 300000 ...
#
# Starts a Redis (redis-server, no persistence) and ceil(N / PER_PROCESS) herald processes
# (`herald serve --shards 1 --redis ...`, herald's defaults otherwise), each on its own port,
# because this machine caps open files at 20,000 per process. herald-bench opens N subscribers
# spread evenly over them (one --target per process) from many loopback source addresses,
# publishes into the shared stream, and measures: the connect rate and failures, single events
# (time to the last of N subscribers), and a fixed-rate phase (loss and latency). Then the same
# again against kernel_fanout processes reading the same stream: the kernel's ceiling (one
# pre-encoded frame written to every socket) at the same scale, so herald's figures are ratios.
# Machine memory, kernel Slab, the servers' RSS and the CPU time of the servers, the load
# generator and the machine are sampled every 2 s throughout.
#
# Writes $OUT/million-<server>.json and .html (herald-bench's report: connections, memory and
# delivery over time), $OUT/memory-<server>.csv, herald-bench's log $OUT/bench-<server>.log,
# and one summary line on stdout, also appended as JSON to $OUT/results.jsonl.
#
# Needs about 8.5 GB of memory at 1M (both ends of every socket are on this machine) and ~100
# processes: run nothing else heavy beside it. The sysctls it needs (sysctl/herald.conf: port
# range, backlogs, conntrack, tcp_mem, file-max) are printed, set, and restored at exit.
#
# The run lives in a network namespace of its own (NETNS=1, the default; NETNS=0 runs in the
# machine's). Measured in benches/RESULTS.md, "Idle pings at a million": the kernel's hash of established connections is sized at boot from
# memory (262,144 buckets on this 24 GiB machine, so two million sockets make chains of 8 that
# every packet walks), and a new namespace gets one sized for the run
# (net.ipv4.tcp_child_ehash_entries, set for the moment the namespace is created, then
# restored). (This sandbox's agent, PID 1, takes a quarter of both cores once two million
# sockets are open, in any namespace: nothing here can change that.)
#
# On a machine without a hard cap on open files, one herald holds all of them: raise its limit
# (systemd `LimitNOFILE=1100000`, or `ulimit -n 1100000` as root), start one
# `herald serve` and run herald-bench fanout with its one --target; PER_PROCESS=N here does that.
#
# Settings (environment): PER_PROCESS (19500), CONNECT_RATE (15000/s), SOURCES
# (127.0.0.2-127.0.0.120), SINGLE (5 single events), RATE (0.05 events/s: each event is a
# million deliveries, and the load generator on this 2-core machine receives about 100-175k
# messages a second, for herald and the ceiling alike) for RATE_TIME (60s), CEILING (1: also
# measure kernel_fanout), NETNS (1: its own network namespace), HERALD_ARGS (extra
# `herald serve` arguments: a tuned variant, which
# then carries LABEL in its file names and summary, e.g. LABEL=herald-no-pings HERALD_ARGS="--ping-interval 0
# --idle-timeout 0"), OUT (reports/million), RUN_LIMIT (1800 s per herald-bench run), BIN_DIR
# (prebuilt herald, herald-bench, kernel_fanout; otherwise built).
set -euo pipefail
# The load comes from a few loopback addresses: herald's per-IP limits are switched off here.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
SELF=$(realpath "$0")
cd "$(dirname "$0")/.."

CONNECTIONS=1000000
while [[ $# -gt 0 ]]; do
    case $1 in
        --connections) CONNECTIONS=$2; shift 2 ;;
        --connections=*) CONNECTIONS=${1#*=}; shift ;;
        *) echo "usage: benches/million.sh [--connections N]" >&2; exit 2 ;;
    esac
done
PER_PROCESS=${PER_PROCESS:-19500}
CONNECT_RATE=${CONNECT_RATE:-15000}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.120}
SINGLE=${SINGLE:-5}
RATE=${RATE:-0.05}
HERALD_ARGS=${HERALD_ARGS:-}
LABEL=${LABEL:-herald}
RATE_TIME=${RATE_TIME:-60s}
CEILING=${CEILING:-1}
OUT=${OUT:-reports/million}
RUN_LIMIT=${RUN_LIMIT:-1800}
STREAM=herald:million
PROCS=$(((CONNECTIONS + PER_PROCESS - 1) / PER_PROCESS))
NETNS=${NETNS:-1}

# run_in_netns ARGS: this script again, in a new network namespace whose connection hash has
# a bucket for every socket of the run; exits with its status. sysctl/herald.conf is applied
# out here first, since a namespace cannot see the machine-wide keys (fs.*, vm.*,
# net.core.netdev_max_backlog ...); the inner run applies it again in its own namespace.
run_in_netns() {
    local key=net.ipv4.tcp_child_ehash_entries old buckets=65536 inner rc=0 ours
    command -v unshare >/dev/null || { echo "needs unshare (util-linux), or NETNS=0" >&2; exit 2; }
    command -v ip >/dev/null || { echo "needs ip (iproute2), or NETNS=0" >&2; exit 2; }
    old=$(sysctl -n "$key" 2>/dev/null) || { echo "this kernel has no $key (it came in 5.19): NETNS=0 runs in the machine's namespace" >&2; exit 2; }
    # Both ends of every connection are sockets here; the kernel's limit is 2^24.
    while ((buckets < 2 * CONNECTIONS && buckets < 1 << 24)); do buckets=$((buckets * 2)); done
    # Restored by the exit cleanup too, should a signal come before it is put back below.
    SYSCTL_SAVED+=("$key=$old")
    inner=""
    trap '[[ -n $inner ]] && kill -TERM "$inner" 2>/dev/null' INT TERM HUP
    sysctl -q -w "$key=$buckets"
    HERALD_MILLION_NETNS=$buckets BIN_DIR=$BIN unshare --net -- bash -c 'ip link set lo up && exec "$@"' bash "$SELF" "$@" &
    inner=$!
    # Restored as soon as the namespace exists: only its creation reads the setting.
    ours=$(readlink /proc/self/ns/net)
    for _ in $(seq 200); do
        [[ $(readlink "/proc/$inner/ns/net" 2>/dev/null) == "$ours" ]] || break
        sleep 0.05
    done
    sysctl -q -w "$key=$old"
    echo "== own network namespace: $buckets connection hash buckets ($key $old -> $buckets -> $old)" >&2
    while true; do
        wait "$inner" && rc=0 || rc=$?
        kill -0 "$inner" 2>/dev/null || break
    done
    exit "$rc"
}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# WORK, PIDS and the cleanup at exit; BIN.
. benches/lib.sh
release_binaries
for f in herald herald-bench kernel_fanout; do
    [[ -x $BIN/$f ]] || { echo "missing $BIN/$f" >&2; exit 2; }
done
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }

SAMPLER=""
SYSCTL_SAVED=()
restore_sysctls() {
    local kv
    for kv in "${SYSCTL_SAVED[@]}"; do
        sysctl -q -w "$kv" >/dev/null 2>&1 || true
    done
    [[ ${#SYSCTL_SAVED[@]} -eq 0 ]] ||
        echo "== sysctls restored${HERALD_MILLION_NETNS:+ (in the namespace of the run)}: ${SYSCTL_SAVED[*]}" >&2
}
finish() {
    [[ -n $SAMPLER ]] && kill "$SAMPLER" 2>/dev/null || true
    cleanup
    restore_sysctls
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# The machine's settings for this many sockets (sysctl/herald.conf), remembered and restored.
apply_sysctls() {
    local line key value old
    while IFS= read -r line; do
        line=${line%%#*}
        [[ $line == *=* ]] || continue
        key=$(echo "${line%%=*}" | sed 's/^ *-\?//; s/ *$//')
        value=$(echo "${line#*=}" | sed 's/^ *//; s/ *$//')
        old=$(sysctl -n "$key" 2>/dev/null | tr '\t' ' ') || continue
        [[ $old == "$value" ]] && continue
        if sysctl -q -w "$key=$value" >/dev/null 2>&1; then
            SYSCTL_SAVED+=("$key=$old")
            echo "   sysctl $key: $old -> $value" >&2
        fi
    done <sysctl/herald.conf
}

meminfo() { awk -v k="$1" '$1 == k":" { print $2 }' /proc/meminfo; }
used_kb() { echo $(($(meminfo MemTotal) - $(meminfo MemAvailable))); }
rss_sum_kb() {
    local files=() pid
    for pid in "$@"; do files+=("/proc/$pid/status"); done
    # One awk for all; cat skips a process gone meanwhile.
    cat "${files[@]}" /dev/null 2>/dev/null | awk '/^VmRSS:/ { t += $2 } END { print t + 0 }' || true
}

# start_fleet KIND: KIND (herald | kernel) processes reading the stream; sets FLEET (PIDs) and
# TARGETS (--target arguments).
start_fleet() {
    local kind=$1 i out line ws
    FLEET=()
    TARGETS=()
    for ((i = 0; i < PROCS; i++)); do
        out=$WORK/$kind-$i.out
        case $kind in
            # shellcheck disable=SC2086 # HERALD_ARGS is a list of arguments
            herald) "$BIN/herald" serve --shards 1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
                --redis "$REDIS_URL" --stream "$STREAM" --drain-timeout 5s $HERALD_ARGS \
                >"$out" 2>"$WORK/$kind-$i.err" & ;;
            kernel) "$BIN/kernel_fanout" --shards 1 --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
                --redis "$REDIS_URL" --stream "$STREAM" >"$out" 2>"$WORK/$kind-$i.err" & ;;
        esac
        FLEET+=($!)
        PIDS+=($!)
    done
    for ((i = 0; i < PROCS; i++)); do
        out=$WORK/$kind-$i.out
        for _ in $(seq 300); do
            line=$(head -1 "$out" 2>/dev/null || true)
            [[ $line == *"listening on"* ]] && break
            sleep 0.05
        done
        [[ $line == *"listening on"* ]] || { echo "$kind $i did not start:" >&2; tail -5 "$WORK/$kind-$i.err" >&2; exit 2; }
        ws=$(grep -o 'ws://[0-9.]*:[0-9]*' <<<"$line" | head -1)
        TARGETS+=(--target "$ws/v1/realtime?project=p")
    done
    echo "   $PROCS $kind processes listening; e.g. $line" >&2
}

stop_fleet() {
    local pid keep=() p
    for pid in "${FLEET[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${FLEET[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    # Reaped: the exit cleanup must not signal these PIDs again (they may be reused).
    for p in "${PIDS[@]}"; do
        [[ " ${FLEET[*]} " == *" $p "* ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
    FLEET=()
}

# cpu_ticks PID...: the processes' CPU time so far (user + system), in clock ticks.
cpu_ticks() {
    local files=() pid
    for pid in "$@"; do files+=("/proc/$pid/stat"); done
    # Fields 14 and 15, counted after the command's closing parenthesis.
    cat "${files[@]}" /dev/null 2>/dev/null | awk '{ sub(/.*\) /, ""); t += $12 + $13 } END { print t + 0 }' || true
}

# machine_ticks: the machine's busy CPU time so far, and the part of it in softirq, in ticks.
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 "," $8 }' /proc/stat; }

# tree PID: PID and all its descendants (herald-bench runs its workers as child processes).
tree() {
    local pid=$1 child
    echo "$pid"
    for child in $(cat "/proc/$pid/task/"*/children 2>/dev/null); do tree "$child"; done
}

# sample KIND BENCH: machine memory, Slab, the fleet's RSS, and the CPU time of the fleet, of
# the load generator (BENCH and its children) and of the whole machine every 2 s, into
# memory-KIND.csv (CPU in clock ticks, `getconf CLK_TCK` a second; the difference between two
# rows is the CPU used between them).
sample() {
    local csv=$OUT/memory-$1.csv start bench=$2
    start=$(date +%s)
    echo "t_s,unix_s,machine_used_kb,slab_kb,servers_rss_kb,servers_cpu_ticks,bench_cpu_ticks,machine_busy_ticks,softirq_ticks" >"$csv"
    while true; do
        echo "$(($(date +%s) - start)),$(date +%s),$(used_kb),$(meminfo Slab),$(rss_sum_kb "${FLEET[@]}"),$(cpu_ticks "${FLEET[@]}"),$(cpu_ticks $(tree "$bench")),$(machine_ticks)" >>"$csv"
        sleep 2
    done
}

# run KIND: the fleet, herald-bench against it, and the memory figures; sets RESULT_<KIND>.
run() {
    local kind=$1 name=$1
    [[ $kind == herald ]] && name=$LABEL
    echo "== $kind: $CONNECTIONS connections over $PROCS processes at $CONNECT_RATE/s" >&2
    local used0 slab0
    used0=$(used_kb)
    slab0=$(meminfo Slab)
    start_fleet "$kind"
    sleep 2
    local base
    base=$(rss_sum_kb "${FLEET[@]}")
    local pid_args=() pid rc=0
    for pid in "${FLEET[@]}"; do pid_args+=(--server-pid "$pid"); done
    # In the background and waited for, so that a signal to this script stops it at once:
    # timeout runs it in a process group of its own, and the exit cleanup's TERM to timeout
    # is passed on to it.
    timeout -s TERM -k 30 "$RUN_LIMIT" "$BIN/herald-bench" fanout --label "$name" \
        "${TARGETS[@]}" --redis "$REDIS_URL" --stream "$STREAM" --project p \
        --connections "$CONNECTIONS" --connect-rate "$CONNECT_RATE" --source-ips "$SOURCES" \
        --single "$SINGLE" --single-gap 1s --rates "$RATE" --phase-time "$RATE_TIME" \
        --drain-timeout 120s --max-lag 60s --settle 5s "${pid_args[@]}" \
        --max-time "$((RUN_LIMIT - 30))s" --html "$OUT/million-$name.html" \
        >"$OUT/million-$name.json" 2>"$WORK/bench-$kind.err" &
    local bench=$!
    PIDS+=("$bench")
    sample "$name" "$bench" &
    SAMPLER=$!
    wait "$bench" || rc=$?
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$bench" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    grep -E '^herald-bench.*(phase|connect)|failures|no answer' "$WORK/bench-$kind.err" | grep -v '^herald-bench \[.*\] *[0-9.]*s ' | sed 's/^/   /' >&2 || true
    [[ $rc -le 1 ]] || { tail -20 "$WORK/bench-$kind.err" >&2; echo "herald-bench exited with $rc" >&2; }
    # Its progress lines carry the time since it started: with the CSV's unix_s, where each
    # phase's CPU went.
    cp "$WORK/bench-$kind.err" "$OUT/bench-$name.log"
    local peak_used peak_slab connected_rss
    peak_used=$(tail -n +2 "$OUT/memory-$name.csv" | cut -d, -f3 | sort -n | tail -1)
    peak_slab=$(tail -n +2 "$OUT/memory-$name.csv" | cut -d, -f4 | sort -n | tail -1)
    peak_used=${peak_used:-$used0}
    peak_slab=${peak_slab:-$slab0}
    connected_rss=$(rss_sum_kb "${FLEET[@]}")
    kill "$SAMPLER" 2>/dev/null || true
    wait "$SAMPLER" 2>/dev/null || true
    SAMPLER=""
    stop_fleet
    python3 - "$OUT/million-$name.json" "$name" "$CONNECTIONS" "$PROCS" "$base" "$connected_rss" \
        "$used0" "$peak_used" "$slab0" "$peak_slab" >"$WORK/summary-$kind.json" <<'PY'
import json, sys
path, kind, n, procs, base, rss, used0, used, slab0, slab = sys.argv[1:]
n, procs = int(n), int(procs)
base, rss, used0, used, slab0, slab = (int(x) * 1024 for x in (base, rss, used0, used, slab0, slab))
try:
    r = json.load(open(path))
except Exception as e:
    r = {"error": str(e)}
single = r.get("single") or {}
conn = r.get("connect") or {}
rate = [p for p in r.get("phases", []) if p.get("kind") == "rate"]
def q(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d
# Per connection: the servers' RSS with every connection open, before any event, minus before
# any client (herald-bench's own samples), over the connections that opened.
mem = r.get("memory") or {}
at_start = (mem.get("server_at_start") or {}).get("rss")
connected_rss = (mem.get("server_connected") or {}).get("rss")
settled_rss = (mem.get("server_settled") or {}).get("rss")
opened = conn.get("connected") or 0
out = {
    "server": kind, "connections": n, "processes": procs,
    "connected": conn.get("connected"), "failed": conn.get("failed"),
    "connect_rate_per_s": conn.get("rate_per_s"),
    "single": single,
    "rate_phase": [{k: p.get(k) for k in ("rate", "expected", "delivered", "missing", "duplicates",
                                            "latency_ms", "time_to_last_subscriber_ms", "sustained")}
                   for p in rate],
    "servers_rss_before_clients_bytes": at_start or base,
    "servers_rss_connected_bytes": connected_rss,
    "servers_rss_after_events_bytes": settled_rss,
    "servers_rss_base_per_process_bytes": (at_start or base) // max(procs, 1),
    "servers_user_bytes_per_connection": ((connected_rss - at_start) / opened
                                          if connected_rss and at_start and opened else None),
    "machine_used_peak_bytes": used, "machine_used_growth_bytes": used - used0,
    "kernel_slab_growth_bytes": slab - slab0,
    "checks_failed": r.get("checks_failed"),
}
print(json.dumps(out))
PY
    echo "   $(cat "$WORK/summary-$kind.json")" >&2
}

apply_sysctls
if [[ $NETNS == 1 && -z ${HERALD_MILLION_NETNS:-} ]]; then
    run_in_netns --connections "$CONNECTIONS"
fi
REDIS_PORT=$((20000 + RANDOM % 20000))
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --logfile "$WORK/redis.log" --daemonize no >/dev/null 2>&1 &
PIDS+=($!)
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
redis_up=0
for _ in $(seq 100); do
    if [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; then redis_up=1; break; fi
    sleep 0.05
done
[[ $redis_up == 1 ]] || { echo "redis-server did not start on port $REDIS_PORT" >&2; tail -5 "$WORK/redis.log" >&2; exit 2; }

run herald
[[ $CEILING == 1 ]] && run kernel

python3 - "$WORK/summary-herald.json" "$WORK/summary-kernel.json" "$(date -u +%FT%TZ)" \
    "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "${HERALD_MILLION_NETNS:-}" \
    "$(sysctl -n net.ipv4.tcp_ehash_entries 2>/dev/null)" >>"$OUT/results.jsonl" <<'PY'
import json, os, sys
h = json.load(open(sys.argv[1]))
k = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
def ttl(s, key):
    return (((s or {}).get("single") or {}).get("time_to_last_subscriber_ms") or {}).get(key)
line = {"scenario": "million", "date": sys.argv[3], "commit": sys.argv[4], "herald": h, "kernel": k,
        # Negative: the namespace shares the machine's table, so it did not get its own.
        "own_network_namespace": bool(sys.argv[5]) and int(sys.argv[6] or 0) > 0,
        "tcp_ehash_entries": abs(int(sys.argv[6] or 0))}
summary = (f"million: {h.get('server')} {h.get('connected')}/{h.get('connections')} connected "
           f"({h.get('failed')} failed) at {h.get('connect_rate_per_s') or 0:.0f}/s over "
           f"{h.get('processes')} processes; last subscriber p50 {ttl(h, 'p50')} ms max "
           f"{ttl(h, 'max')} ms")
if k:
    summary += f"; kernel ceiling p50 {ttl(k, 'p50')} ms max {ttl(k, 'max')} ms"
    for key in ("p50", "max"):
        a, b = ttl(h, key), ttl(k, key)
        if a and b:
            line[f"time_to_last_subscriber_{key}_herald_over_kernel"] = a / b
            summary += f"; herald/kernel {key} {a / b:.2f}x"
per = h.get("servers_user_bytes_per_connection")
summary += (f"; user space {per:.0f} B per idle connection net of "
            f"{h.get('servers_rss_base_per_process_bytes', 0) / 2**20:.1f} MiB per process"
            if per is not None else "")
summary += f"; machine memory peak {h.get('machine_used_peak_bytes', 0) / 2**30:.2f} GiB"
summary += (f"; own network namespace, {line['tcp_ehash_entries']:,} connection hash buckets"
            if line["own_network_namespace"] else "; the machine's network namespace")
line["summary"] = summary
print(json.dumps(line))
print(summary, file=sys.stderr)
PY
tail -1 "$OUT/results.jsonl"
echo "reports in $OUT" >&2
