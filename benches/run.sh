#!/usr/bin/env bash
# Benchmark suite (issue 4): herald against its baselines, measured in the same run.
#
#   benches/run.sh idle|fanout|channels|churn|connect|queries|all
#
# Scenarios (each prints one summary line on stdout and appends one JSON line to
# $OUT/results.jsonl; raw results and HTML reports go to $OUT, reports/bench by default):
#   idle      19,000 idle subscribed connections on one herald: user-space and kernel bytes per
#             connection (benches/idle_memory.sh).
#   fanout    one channel, 19,000 subscribers, on herald, kernel_fanout (the kernel's
#             ceiling: one pre-encoded frame written to every socket) and naive_server
#             (tokio + tokio-tungstenite, a task per connection, tokio broadcast), one after the
#             other: the highest publish rate every subscriber keeps up with (delivered msg/s),
#             a burst, and single events (time from publish to the last subscriber). Ratios:
#             herald/kernel delivered (target >= 0.7), herald/naive (>= 5), last-subscriber p99
#             herald/kernel (<= 1.5).
#   channels  19,000 connections over 1,000 channels with Zipf(1) popularity, events on Zipf
#             channels with payloads of 0, 256 or 1,024 bytes: kernel_fanout --by-channel
#             (the ceiling: each connection's pre-encoded frames of a wake in one writev), herald
#             and naive_server.
#   churn     19,000 connections, 10% closing and reopening every second for 20 s while 10
#             events/s flow: every live subscriber must get every event; herald's RSS before churn
#             (after a 10 s warm-up at the same event rate) and after it, at the same connection
#             count; and after closing everything.
#   connect   handshake rate (connect, upgrade, `connected`, reset) of herald, naive_server and
#             kernel_fanout against a plain TCP accept loop (`herald-bench accept-loop`).
#   queries   one channel, 19,000 Gen C subscribers, at fixed event rates: herald with no
#             subscription queries, then with half of the subscribers carrying an `equal` query
#             that every event matches (so both deliver the same): herald's CPU per delivered
#             message, filtered/unfiltered at equal rates (issue 15's target <= 1.5, read from the
#             summary: compare judges goals only for fanout), and with BEFORE, the
#             unfiltered run of that build too (herald/before: unchanged within noise).
#
# Loopback only; clients bind source addresses 127.0.0.2-127.0.0.60. Every server and client
# process is started here and stopped by PID; every load loop is bounded in count and time.
# The machine may be shared: trust the ratios of one run, not the absolute figures.
#
# Settings (environment): N (19000 connections), OUT (reports/bench), SHARDS (2), SOURCES,
# CONNECT_RATE (5000/s), PHASE_TIME (6s), SINGLE (100 single events, so that their p99 is not
# simply the slowest one), BURST (200 events), CHURN_TIME (20s), CONNECT_TIME (5s), QUICK=1
# (fixed low rates instead of the search: a smoke test), STRICT=1 (exit non-zero when any run
# loses events or connections), BEFORE (another herald binary, e.g. a build of an earlier commit:
# the idle and fanout scenarios then also measure it, labelled "before", in the same run, and
# compare reports herald/before), URING=1 (the idle, fanout, channels and connect scenarios also
# measure herald on its io_uring driver, labelled "uring", in the same run), BIN_DIR (prebuilt herald, herald-bench and the baselines
# kernel_fanout and naive_server, there or under BIN_DIR/examples/; otherwise built with cargo).
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0
cd "$(dirname "$0")/.."

SCENARIO=${1:-}
case $SCENARIO in
    idle | fanout | channels | churn | connect | queries | all) ;;
    *)
        echo "usage: benches/run.sh idle|fanout|channels|churn|connect|queries|all" >&2
        exit 2
        ;;
esac

N=${N:-19000}
OUT=${OUT:-reports/bench}
SHARDS=${SHARDS:-2}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.60}
CONNECT_RATE=${CONNECT_RATE:-5000}
PHASE_TIME=${PHASE_TIME:-6s}
SINGLE=${SINGLE:-100}
BURST=${BURST:-200}
CHURN_TIME=${CHURN_TIME:-20s}
CONNECT_TIME=${CONNECT_TIME:-5s}
QUICK=${QUICK:-0}
STRICT=${STRICT:-0}
# Upper bound on any one herald-bench run (it stops by itself well before).
RUN_LIMIT=${RUN_LIMIT:-1200}

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/results.jsonl

# WORK, PIDS and the cleanup at exit; BIN.
. benches/lib.sh
release_binaries
# The baselines are binaries of the load generator's package, next to herald-bench; a tree built
# before they moved there has them under examples/.
EX=$BIN
if [[ ! -x $EX/kernel_fanout && -x $BIN/examples/kernel_fanout ]]; then
    EX=$BIN/examples
fi
BENCH=$BIN/herald-bench
for f in "$BIN/herald" "$BENCH" "$EX/naive_server" "$EX/kernel_fanout"; do
    [[ -x $f ]] || { echo "missing $f (cargo build --release --workspace --bins)" >&2; exit 2; }
done


FAILURES=0
fail() {
    echo "FAILED: $*" >&2
    FAILURES=$((FAILURES + 1))
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# start_server NAME [extra env...]: starts herald | naive | kernel | tcp on ephemeral loopback
# ports; sets SERVER_PID, WS_URL (without channels), ADMIN (http://...), TCP_URL (tcp only).
start_server() {
    local name=$1 out=$WORK/$1.out err=$WORK/$1.err
    shift
    # Emptied here, not only by the server's own redirection: that happens in the child after
    # the fork, and the wait below could read the previous server's line (and port) first.
    : >"$out"
    case $name in
        # An earlier build did not switch huge pages off itself: as herald does now, so that
        # herald/before compares the code, not the allocator setting.
        before) env MIMALLOC_ALLOW_THP=0 "$@" "$BEFORE" serve --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 2s >"$out" 2>"$err" & ;;
        uring) env HERALD_IO=uring "$@" "$BIN/herald" serve --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 2s >"$out" 2>"$err" & ;;
        herald) env "$@" "$BIN/herald" serve --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 2s >"$out" 2>"$err" & ;;
        naive) env "$@" "$EX/naive_server" --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 2s >"$out" 2>"$err" & ;;
        # shellcheck disable=SC2086 # KERNEL_ARGS is a list of flags
        kernel) env "$@" "$EX/kernel_fanout" --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 ${KERNEL_ARGS:-} >"$out" 2>"$err" & ;;
        tcp) env "$@" "$BENCH" accept-loop --listen 127.0.0.1:0 --threads "$SHARDS" --max-time 1h >"$out" 2>"$err" & ;;
        *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    local line=""
    for _ in $(seq 200); do
        line=$(head -1 "$out" 2>/dev/null || true)
        [[ $line == *"listening on"* ]] && break
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
        sleep 0.05
    done
    if [[ $line != *"listening on"* ]]; then
        echo "$name did not start:" >&2
        tail -5 "$err" >&2 || true
        exit 2
    fi
    echo "   $line" >&2
    if [[ $name == tcp ]]; then
        TCP_URL=$(grep -o 'tcp://[0-9.]*:[0-9]*' <<<"$line" | head -1)
        return
    fi
    local ws
    ws=$(grep -o 'ws://[0-9.]*:[0-9]*' <<<"$line" | head -1)
    WS_URL="$ws/v1/realtime?project=p"
    ADMIN=$(grep -o 'admin on http://[0-9.]*:[0-9]*' <<<"$line" | sed 's|admin on ||')
}

stop_server() {
    local pid=$SERVER_PID
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

# bench NAME OUTFILE ARGS...: runs herald-bench with a hard time limit; records failures.
bench() {
    local name=$1 outfile=$2 rc=0
    shift 2
    timeout -s TERM -k 30 "$RUN_LIMIT" "$BENCH" "$@" >"$outfile" 2>"$WORK/$name.bench.err" || rc=$?
    if [[ $rc -ne 0 ]]; then
        grep -E 'error|FAILED|failures' "$WORK/$name.bench.err" | tail -5 >&2 || true
        if [[ $rc -ge 2 || ! -s $outfile ]]; then
            fail "$name: herald-bench exited with $rc"
            tail -20 "$WORK/$name.bench.err" >&2
        elif [[ $STRICT == 1 ]]; then
            fail "$name: events or connections lost (exit $rc): $(grep -o '"checks_failed":\[[^]]*\]' "$outfile" || true)"
        else
            echo "   ($name: some checked phase lost events or connections; see $outfile)" >&2
        fi
    fi
    grep -E '^herald-bench \[.*\] phase|connect \[' "$WORK/$name.bench.err" | sed 's/^/   /' >&2 || true
}

# compare SCENARIO ARGS...: merges results, prints the summary line, appends to results.jsonl.
compare() {
    local scenario=$1 rc=0
    shift
    local goals=()
    # A few hundred connections at low rates say nothing about the targets.
    [[ $QUICK == 1 ]] && goals=(--no-goals)
    "$BENCH" compare --scenario "$scenario" "${goals[@]}" --append "$RESULTS" --html "$OUT/$scenario.html" "$@" || rc=$?
    # 1 = a target was not met or a run lost events: a result, not a failure of the tooling.
    [[ $rc -le 1 ]] || fail "compare $scenario exited with $rc"
}

rate_args() {
    if [[ $QUICK == 1 ]]; then
        echo "--rates $1 --phase-time 1s"
    else
        echo "--find-max --ramp-start $2 --phase-time $PHASE_TIME"
    fi
}

scenario_idle() {
    idle_run herald "$BIN"
    if [[ ${URING:-0} == 1 ]]; then
        HERALD_IO=uring idle_run uring "$BIN"
    fi
    if [[ -n ${BEFORE:-} ]]; then
        # idle_memory.sh runs $BIN_DIR/herald: a folder where that is the earlier build.
        local dir=$WORK/before-bin
        mkdir -p "$dir"
        ln -sf "$BEFORE" "$dir/herald"
        ln -sf "$(cd "$(dirname "$BENCH")" && pwd)/herald-bench" "$dir/herald-bench"
        idle_run before "$dir"
    fi
}

# One idle measurement: LABEL BIN_DIR (holding herald and herald-bench).
idle_run() {
    local label=$1 bin_dir=$2
    echo "== idle ($label): $N idle subscribed connections on one herald" >&2
    local small=$((N / 19)) env_args=()
    ((small >= 50)) || small=50
    local procs=2
    ((N > 2000)) || procs=1
    [[ $QUICK == 1 ]] && env_args=(SETTLE_SECS=1)
    local rc=0
    env "${env_args[@]}" SMALL=$small LARGE="$N" BENCH_PROCS=$procs BIN_DIR="$bin_dir" HOLD=120s \
        benches/idle_memory.sh >"$WORK/idle.txt" 2>"$WORK/idle.err" || rc=$?
    if [[ $rc -ne 0 ]]; then
        tail -20 "$WORK/idle.err" >&2
        fail "idle: benches/idle_memory.sh exited with $rc"
        return
    fi
    sed 's/^/   /' "$WORK/idle.txt" >&2
    local result
    result=$(grep '^RESULT ' "$WORK/idle.txt" | sed 's/^RESULT //')
    local user slab failed connected
    user=$(grep -o '"user_bytes_per_conn":[0-9.-]*' <<<"$result" | cut -d: -f2)
    slab=$(grep -o '"slab_bytes_per_conn":[0-9.-]*' <<<"$result" | cut -d: -f2)
    failed=$(grep -o '"failed":[0-9]*' <<<"$result" | cut -d: -f2)
    connected=$(grep -o '"connected":[0-9]*' <<<"$result" | cut -d: -f2)
    local verdict="met"
    awk -v u="$user" 'BEGIN { exit !(u > 256) }' && verdict="NOT met"
    # A few hundred connections measure fixed costs, not the per-connection cost.
    [[ $QUICK == 1 ]] && verdict="not judged with QUICK=1"
    local line
    line=$(printf 'idle: %s %s connections (%s failed): %.0f B user space per connection (target <= 256 B: %s); kernel Slab %.0f B per connection (both loopback ends)' \
        "$label" "$connected" "$failed" "$user" "$verdict" "$slab")
    echo "$line"
    printf '{"scenario":"idle","label":"%s","date_unix":%s,"summary":"%s","result":%s}\n' "$label" "$(date +%s)" "$line" "$result" >>"$RESULTS"
    if [[ $STRICT == 1 && ${failed:-1} != 0 ]]; then fail "idle: $failed connections failed"; fi
}

# One fanout-style run against one server: NAME SCENARIO EXTRA-ARGS... (LABEL, when set, names
# the run and its files instead of NAME).
fanout_run() {
    local name=$1 scenario=$2
    shift 2
    local label=${LABEL:-$name}
    start_server "$name"
    local pid=$SERVER_PID
    bench "$scenario-$label" "$OUT/$scenario-$label.json" fanout --label "$label" \
        --target "$WS_URL" --admin "$ADMIN" --connections "$N" --connect-rate "$CONNECT_RATE" \
        --source-ips "$SOURCES" --server-pid "$pid" --max-time "${RUN_LIMIT}s" \
        --html "$OUT/$scenario-$label.html" "$@"
    stop_server
}

scenario_fanout() {
    echo "== fanout: one channel, $N subscribers; kernel_fanout, herald, naive_server" >&2
    # shellcheck disable=SC2046 # word splitting of rate_args is intended
    local servers=(kernel herald) runs=()
    [[ -n ${BEFORE:-} ]] && servers+=(before)
    [[ ${URING:-0} == 1 ]] && servers+=(uring)
    servers+=(naive)
    for s in "${servers[@]}"; do
        fanout_run "$s" fanout $(rate_args 20 4) --burst "$BURST" --single "$SINGLE"
        runs+=("$s=$OUT/fanout-$s.json")
    done
    compare fanout --subject herald "${runs[@]}"
}

scenario_channels() {
    local channels=1000
    ((N >= 5000)) || channels=$((N / 10 > 1 ? N / 10 : 2))
    echo "== channels: $N connections over $channels channels (Zipf 1); kernel_fanout --by-channel, herald, naive_server" >&2
    # shellcheck disable=SC2046
    local servers=(kernel herald) runs=()
    [[ ${URING:-0} == 1 ]] && servers+=(uring)
    servers+=(naive)
    for s in "${servers[@]}"; do
        runs+=("$s=$OUT/channels-$s.json")
        local kernel_args=""
        [[ $s == kernel ]] && kernel_args=--by-channel
        KERNEL_ARGS=$kernel_args fanout_run "$s" channels --channels "$channels" --zipf 1 --pad 0,256,1024 --publishers 4 \
            $(rate_args 50 100) --burst "$((BURST * 5))"
    done
    compare channels --subject herald "${runs[@]}"
}

scenario_churn() {
    local secs=${CHURN_TIME%s}
    echo "== churn: $N connections, 10%/s reopening for $CHURN_TIME while 10 events/s flow; herald" >&2
    # A warm-up at the same event rate first: the fan-out buffers reach their high-water mark
    # before the baseline is taken, so before/after compares what churn itself leaves behind.
    fanout_run herald churn --rates 10 --phase-time "$([[ $QUICK == 1 ]] && echo 1s || echo 10s)" \
        --churn 0.1 --churn-time "$CHURN_TIME" --churn-rate 10 \
        --settle "$([[ $QUICK == 1 ]] && echo 1s || echo 5s)" --close-at-end
    : "$secs"
    compare churn herald="$OUT/churn-herald.json"
}

scenario_connect() {
    echo "== connect: handshake rate, $CONNECT_TIME per server; herald, naive_server, kernel_fanout, TCP accept loop" >&2
    local runs=() servers=(tcp herald)
    [[ ${URING:-0} == 1 ]] && servers+=(uring)
    servers+=(naive kernel)
    for s in "${servers[@]}"; do
        start_server "$s"
        local url
        if [[ $s == tcp ]]; then url=$TCP_URL; else url="$WS_URL&channels[]=bench"; fi
        bench "connect-$s" "$OUT/connect-$s.json" connect --label "$s" --target "$url" \
            --duration "$CONNECT_TIME" --max-inflight 128 --source-ips "$SOURCES" \
            --server-pid "$SERVER_PID"
        stop_server
        runs+=("$s=$OUT/connect-$s.json")
    done
    compare connect --subject herald "${runs[@]}"
}

scenario_queries() {
    local rates=${QUERY_RATES:-20,50,100,150}
    [[ $QUICK == 1 ]] && rates=5
    local phase=$PHASE_TIME
    [[ $QUICK == 1 ]] && phase=1s
    echo "== queries: one channel, $N Gen C subscribers at $rates events/s; unfiltered, then half with an equal query" >&2
    local runs=()
    local common=(--subscribe-message --rates "$rates" --phase-time "$phase")
    # Unfiltered and filtered alternate, so that a noisy stretch of the machine hits both.
    for round in 1 2; do
        LABEL=unfiltered-$round fanout_run herald queries "${common[@]}"
        LABEL=filtered-$round fanout_run herald queries "${common[@]}" --query-fraction 0.5
        runs+=("unfiltered-$round=$OUT/queries-unfiltered-$round.json" "filtered-$round=$OUT/queries-filtered-$round.json")
        if [[ -n ${BEFORE:-} ]]; then
            LABEL=before-$round fanout_run before queries "${common[@]}"
            runs+=("before-$round=$OUT/queries-before-$round.json")
        fi
    done
    # One summary: the first filtered run against every other run.
    compare queries --subject filtered-1 "${runs[@]}"
}

case $SCENARIO in
    all)
        for s in idle fanout channels churn connect queries; do "scenario_$s"; done
        ;;
    *) "scenario_$SCENARIO" ;;
esac

echo "results appended to $RESULTS; reports in $OUT" >&2
if ((FAILURES > 0)); then
    echo "$FAILURES failure(s)" >&2
    exit 1
fi
