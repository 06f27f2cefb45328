#!/usr/bin/env bash
# Hostile-client benchmark: what each attack costs herald, running with its DEFAULT settings
# (per-IP limits, message rate, timeouts, outbound bound all on), and what it costs the victims.
#
#   benches/hostile.sh                  # the baseline, then every attack
#   ATTACKS="garbage non-reader" benches/hostile.sh
#
# Per run (first the baseline "none", without an attacker, then each attack in ATTACKS):
#   1. a fresh herald (2 shards, ephemeral loopback ports, default limits; --drain-timeout 2s only
#      so that stopping it is quick), its VmRSS read after a second (rss_before);
#   2. `herald-bench attack --kind KIND` with HOSTILE connections from HOSTILE_SOURCES (100 per
#      address by default, so that only handshake-flood, which uses one address, meets the
#      per-IP limits of 1,000 connections and 100 handshakes/s); once its ready file appears
#      (every connection in place), VmRSS again (rss_with_attack);
#   3. `herald-bench fanout`: N subscribers on the victims' channel from SOURCES (under the
#      per-IP limits), one phase of RATE events/s for PHASE_TIME; herald's VmRSS is sampled every
#      200 ms from the attacker's start until it is stopped (rss_peak);
#   4. once the fanout ended and the attack ran for at least ATTACK_MIN seconds (herald's
#      handshake and message timeouts are 10 s), the attacker is stopped (SIGTERM; it also stops
#      by itself after ATTACK_DURATION) and prints its summary; SETTLE seconds later VmRSS once
#      more (rss_after: the victims and the attacker are gone), and a few herald counters from
#      /metrics; herald is stopped.
# Output: one summary line per run on stdout and one JSON line in $OUT/hostile.jsonl with herald's
# RSS before / with the attack / peak / after, the growth per hostile connection ((peak -
# baseline peak) / HOSTILE and (rss_with_attack - rss_before) / HOSTILE), the victims' event
# delay p99 and max (ms, from publish to receipt) and p99 over the baseline's, events missing,
# duplicated, lost victim connections, publish latency p99, the attacker's summary (HTTP statuses,
# close codes, closes by the server, reconnects, ...) and herald's counters. Raw files (fanout and
# attacker JSON) go to $OUT too.
#
# Attacks (herald-bench attack --help): big-subscribe, partial-frame, slow-handshake,
# resume-flood, ping-flood, non-reader, handshake-flood, garbage.
#
# Settings (environment): N (10000 victims), HOSTILE (1000 hostile connections), RATE (100
# events/s), PHASE_TIME (20s; whole seconds, "20s" or "20"), ATTACKS ("all" or a list), OUT
# (reports/hostile), SOURCES (127.0.0.2-127.0.0.60: the victims), HOSTILE_SOURCES
# (127.0.1.1-127.0.1.10), SHARDS (2), READY_TIMEOUT (60 s for the attacker's connections to be
# in place), SETTLE (3 s), ATTACK_MIN (12 s), ATTACK_DURATION (PHASE_TIME + 120 s: only an upper
# bound, the attacker is stopped as soon as the fanout ended and ATTACK_MIN passed), RUN_LIMIT
# (600 s: upper bound on any one herald-bench run), BASELINE_EACH (0; 1: an attack-free run
# before every attack, which is then compared with it), ATTACK_ARGS (extra arguments of every
# `herald-bench attack`, e.g. "--without-channel"), BIN_DIR (prebuilt herald and herald-bench;
# otherwise built with cargo, honouring CARGO_TARGET_DIR). Needs jq and curl.
#
# herald's allocator moves RSS in 2 MiB steps (transparent huge pages) and a fresh herald grows by
# a few MiB with its first connections: with a few dozen hostile connections the per-connection
# figures are fixed costs and noise; they mean something from a few hundred on.
#
# Loopback only. Every process started here is stopped by PID (bounded waits); every loop is
# bounded in count and time. Victims and attacker share the machine's cores with herald: compare
# a run with its baseline of the same invocation, not figures of different machines.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_KINDS=(big-subscribe partial-frame slow-handshake resume-flood ping-flood non-reader handshake-flood garbage)
N=${N:-10000}
HOSTILE=${HOSTILE:-1000}
RATE=${RATE:-100}
PHASE_TIME=${PHASE_TIME:-20s}
ATTACKS=${ATTACKS:-all}
OUT=${OUT:-reports/hostile}
SOURCES=${SOURCES:-127.0.0.2-127.0.0.60}
HOSTILE_SOURCES=${HOSTILE_SOURCES:-127.0.1.1-127.0.1.10}
SHARDS=${SHARDS:-2}
READY_TIMEOUT=${READY_TIMEOUT:-60}
SETTLE=${SETTLE:-3}
ATTACK_MIN=${ATTACK_MIN:-12}
# Extra arguments for every `herald-bench attack` (e.g. "--without-channel" or "--rate 50").
read -r -a ATTACK_EXTRA <<<"${ATTACK_ARGS:-}"
RUN_LIMIT=${RUN_LIMIT:-600}
CHANNEL=bench

if [[ $PHASE_TIME =~ ^([0-9]+)s?$ ]]; then
    PHASE_SECS=${BASH_REMATCH[1]}
    # herald-bench wants the unit.
    PHASE_TIME=${PHASE_SECS}s
else
    echo "PHASE_TIME must be whole seconds, e.g. 20s" >&2
    exit 2
fi
ATTACK_DURATION=${ATTACK_DURATION:-$((PHASE_SECS + 120))s}
if [[ $ATTACKS == all ]]; then
    KINDS=("${ALL_KINDS[@]}")
else
    read -r -a KINDS <<<"$ATTACKS"
    for k in "${KINDS[@]}"; do
        [[ " ${ALL_KINDS[*]} " == *" $k "* ]] || { echo "unknown attack $k (one of: ${ALL_KINDS[*]})" >&2; exit 2; }
    done
fi
for tool in jq curl; do
    command -v "$tool" >/dev/null || { echo "$tool is needed (apt-get install $tool)" >&2; exit 2; }
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RESULTS=$OUT/hostile.jsonl

# WORK, PIDS and the cleanup at exit; BIN.
. benches/lib.sh
release_binaries
BENCH=$BIN/herald-bench
for f in "$BIN/herald" "$BENCH"; do
    [[ -x $f ]] || { echo "missing $f (cargo build --release --workspace --bins)" >&2; exit 2; }
done


forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# stop_pid PID SECONDS: SIGTERM, up to SECONDS for it to exit, then SIGKILL.
stop_pid() {
    local pid=$1 secs=$2
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((secs * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}

rss_bytes() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status" 2>/dev/null || true; }

# Starts herald with its default limits; sets HERALD_PID, WS_URL, ADMIN.
start_herald() {
    local out=$WORK/herald.out
    "$BIN/herald" serve --shards "$SHARDS" --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
        --drain-timeout 2s >"$out" 2>"$WORK/herald.err" &
    HERALD_PID=$!
    PIDS+=("$HERALD_PID")
    local line=""
    for _ in $(seq 200); do
        line=$(head -1 "$out" 2>/dev/null || true)
        [[ $line == *"listening on"* ]] && break
        kill -0 "$HERALD_PID" 2>/dev/null || break
        sleep 0.05
    done
    if [[ $line != *"listening on"* ]]; then
        echo "herald did not start:" >&2
        tail -5 "$WORK/herald.err" >&2 || true
        exit 2
    fi
    WS_URL="$(grep -o 'ws://[0-9.]*:[0-9]*' <<<"$line" | head -1)/v1/realtime?project=p"
    ADMIN=$(grep -o 'admin on http://[0-9.]*:[0-9]*' <<<"$line" | sed 's|admin on ||')
}

# herald's counters that tell what it did about an attack, summed over shards, as JSON.
herald_counters() {
    curl -s --max-time 5 "$ADMIN/metrics" 2>/dev/null | awk '
        /^herald_(connections_accepted_total|handshake_rejected_total|protocol_errors_total|rate_limited_messages_total|replays_total|slow_consumers_total|idle_closed_total|accept_errors_total)/ {
            key = $1
            gsub(/shard="[0-9]+",?/, "", key)
            sub(/,?}$/, "}", key)
            sub(/\{\}$/, "", key)
            sum[key] += $2
        }
        END {
            printf "{"
            n = 0
            for (k in sum) { q = k; gsub(/"/, "\\\"", q); printf "%s\"%s\":%s", (n++ ? "," : ""), q, sum[k] }
            printf "}"
        }' || echo '{}'
}

# Samples herald's RSS every 200 ms into $WORK/peak (the highest so far) until $WORK/stop-sampler
# appears; bounded by RUN_LIMIT.
sample_rss() {
    local pid=$1 max=0 cur
    for _ in $(seq $((RUN_LIMIT * 5))); do
        [[ -e $WORK/stop-sampler ]] && break
        cur=$(rss_bytes "$pid") || break
        [[ -n $cur ]] || break
        ((cur > max)) && max=$cur
        echo "$max" >"$WORK/peak"
        sleep 0.2
    done
}

BASE_PEAK=null BASE_P99=null BASE_MAX=null BASE_PUB99=null

run_one() {
    local attack=$1 attacker_pid="" ready=$WORK/ready
    echo "== $attack: herald with default limits, $([[ $attack == none ]] && echo "no attacker" || echo "$HOSTILE hostile connections"), $N victims at $RATE events/s for $PHASE_TIME" >&2
    start_herald
    sleep 1
    local rss_before rss_with rss_peak rss_after
    rss_before=$(rss_bytes "$HERALD_PID")
    rm -f "$WORK/stop-sampler" "$WORK/peak" "$ready"
    sample_rss "$HERALD_PID" &
    local sampler=$!
    PIDS+=("$sampler")
    local attack_json=$OUT/attack-$attack.json
    rm -f "$attack_json"
    local attack_start
    attack_start=$(date +%s)
    if [[ $attack != none ]]; then
        timeout -s TERM -k 30 "$RUN_LIMIT" "$BENCH" attack --kind "$attack" --target "$WS_URL" \
            --connections "$HOSTILE" --duration "$ATTACK_DURATION" --source-ips "$HOSTILE_SOURCES" \
            --channel "$CHANNEL" --ready-file "$ready" --ready-timeout "${READY_TIMEOUT}s" \
            "${ATTACK_EXTRA[@]}" >"$attack_json" 2>"$WORK/attack.err" &
        attacker_pid=$!
        PIDS+=("$attacker_pid")
        local i
        for i in $(seq $(((READY_TIMEOUT + 10) * 10))); do
            [[ -e $ready ]] && break
            kill -0 "$attacker_pid" 2>/dev/null || break
            sleep 0.1
        done
        if [[ ! -e $ready ]]; then
            echo "   the attacker did not get ready:" >&2
            tail -5 "$WORK/attack.err" >&2 || true
        else
            echo "   attacker ready: $(cat "$ready")" >&2
        fi
    fi
    rss_with=$(rss_bytes "$HERALD_PID")
    local fanout_json=$OUT/fanout-$attack.json rc=0
    timeout -s TERM -k 30 "$RUN_LIMIT" "$BENCH" fanout --label "$attack" --target "$WS_URL" \
        --admin "$ADMIN" --connections "$N" --source-ips "$SOURCES" --channel-name "$CHANNEL" \
        --rates "$RATE" --phase-time "$PHASE_TIME" --server-pid "$HERALD_PID" \
        --max-time "${RUN_LIMIT}s" >"$fanout_json" 2>"$WORK/fanout.err" || rc=$?
    if [[ $rc -ge 2 || ! -s $fanout_json ]]; then
        echo "   fanout failed (exit $rc):" >&2
        tail -10 "$WORK/fanout.err" >&2 || true
        echo '{}' >"$fanout_json"
    fi
    grep -E '^herald-bench \[.*\] phase' "$WORK/fanout.err" | sed 's/^/   /' >&2 || true
    if [[ -n $attacker_pid ]]; then
        # herald's timeouts (10 s) must have had their chance, even in a short run.
        local i
        for i in $(seq $((ATTACK_MIN * 10))); do
            (($(date +%s) - attack_start >= ATTACK_MIN)) && break
            kill -0 "$attacker_pid" 2>/dev/null || break
            sleep 0.1
        done
        # It prints its summary when it stops; non-reader drains for up to 5 s first.
        stop_pid "$attacker_pid" 20
        [[ -s $attack_json ]] || { echo "   no summary from the attacker:" >&2; tail -5 "$WORK/attack.err" >&2 || true; }
    fi
    touch "$WORK/stop-sampler"
    wait "$sampler" 2>/dev/null || true
    forget_pid "$sampler"
    rss_peak=$(cat "$WORK/peak" 2>/dev/null || echo "$rss_with")
    sleep "$SETTLE"
    rss_after=$(rss_bytes "$HERALD_PID")
    local counters
    counters=$(herald_counters)
    stop_pid "$HERALD_PID" 10
    local attacker=null
    [[ -s $attack_json ]] && attacker=$(cat "$attack_json")
    local result
    result=$(jq -n -c \
        --arg attack "$attack" --argjson hostile "$([[ $attack == none ]] && echo 0 || echo "$HOSTILE")" \
        --argjson n "$N" --argjson rate "$RATE" --arg phase "$PHASE_TIME" --arg args "${ATTACK_ARGS:-}" \
        --argjson before "${rss_before:-null}" --argjson with "${rss_with:-null}" \
        --argjson peak "${rss_peak:-null}" --argjson after "${rss_after:-null}" --argjson base_peak "$BASE_PEAK" --argjson base_p99 "$BASE_P99" \
        --argjson base_max "$BASE_MAX" --argjson base_pub99 "$BASE_PUB99" \
        --argjson attacker "$attacker" --argjson counters "$counters" \
        --slurpfile fanout "$fanout_json" '
        def per($a; $b): if $hostile > 0 and $a != null and $b != null then (($a - $b) / $hostile | floor) else null end;
        def ratio($a; $b): if $a != null and $b != null and $b > 0 then ($a / $b * 100 | round / 100) else null end;
        ($fanout[0]) as $f
        | (($f.phases // []) | map(select(.kind == "rate")) | .[0]) as $ph
        | {
            attack: $attack, date_unix: now | floor, hostile_connections: $hostile,
            victims: $n, rate: $rate, phase_time: $phase, attack_args: $args,
            rss_bytes: {before: $before, with_attack: $with, peak: $peak, after: $after,
                        baseline_peak: $base_peak},
            rss_growth_per_hostile_connection: {
                peak_vs_baseline_peak: per($peak; $base_peak),
                with_attack_vs_before: per($with; $before)
            },
            victims_latency_ms: {p50: $ph.latency_ms.p50, p99: $ph.latency_ms.p99, max: $ph.latency_ms.max,
                                 p99_vs_baseline: ratio($ph.latency_ms.p99; $base_p99),
                                 max_vs_baseline: ratio($ph.latency_ms.max; $base_max)},
            events: {expected: $ph.expected, delivered: $ph.delivered, missing: $ph.missing,
                     duplicates: $ph.duplicates, lost_connections: $ph.lost_connections,
                     connections_with_loss: $ph.connections_with_loss,
                     victims_connected: $f.connect.connected, victims_failed: $f.connect.failed,
                     victim_failures: $f.connect.failures, checks_failed: $f.checks_failed},
            publish_latency_ms: {p99: $ph.publish_latency_ms.p99, max: $ph.publish_latency_ms.max,
                                 p99_vs_baseline: ratio($ph.publish_latency_ms.p99; $base_pub99),
                                 achieved_rate: $ph.achieved_rate},
            attacker: $attacker,
            herald_counters: $counters
          }')
    echo "$result" >>"$RESULTS"
    jq -r '
        def mib: if . == null then "?" else (. / 1048576 * 10 | round / 10 | tostring) + " MiB" end;
        def kib: if . == null then "?" else (. / 1024 * 10 | round / 10 | tostring) + " KiB" end;
        def n: if . == null then "?" else tostring end;
        def m: if . == null then "{}" else (to_entries | map("\(.key) x\(.value)") | join(", ")) end;
        "\(.attack): herald RSS \(.rss_bytes.before | mib) before, \(.rss_bytes.with_attack | mib) with the attack, \(.rss_bytes.peak | mib) peak, \(.rss_bytes.after | mib) after"
        + (if .hostile_connections > 0 then
            "; per hostile connection \(.rss_growth_per_hostile_connection.peak_vs_baseline_peak | kib) (peak vs baseline peak), \(.rss_growth_per_hostile_connection.with_attack_vs_before | kib) (in place)"
           else "" end)
        + " | victims: delay p99 \(.victims_latency_ms.p99 | n) ms (\(.victims_latency_ms.p99_vs_baseline | n)x baseline), max \(.victims_latency_ms.max | n) ms, missing \(.events.missing | n), duplicates \(.events.duplicates | n), lost connections \(.events.lost_connections | n), failed to connect \(.events.victims_failed | n); publish p99 \(.publish_latency_ms.p99 | n) ms"
        + (if .attacker != null then
            " | attacker: \(.attacker.handshakes_attempted) handshakes, HTTP {\(.attacker.http_statuses | m)}, close codes {\(.attacker.close_codes | m)}, closed by server \(.attacker.closed_by_server), reconnects \(.attacker.reconnects), open at end \(.attacker.open_at_end)"
             + (if .attacker.still_open_after_drain != null then ", still open after drain \(.attacker.still_open_after_drain)" else "" end)
             + (if (.attacker.server_error_codes | length) > 0 then ", error messages {\(.attacker.server_error_codes | m)}" else "" end)
             + (if (.attacker.errors | length) > 0 then ", attacker errors {\(.attacker.errors | m)}" else "" end)
           elif .attack != "none" then " | attacker: no summary" else "" end)
        ' <<<"$result"
    if [[ $attack == none ]]; then
        BASE_PEAK=${rss_peak:-null}
        BASE_P99=$(jq '.victims_latency_ms.p99' <<<"$result")
        BASE_MAX=$(jq '.victims_latency_ms.max' <<<"$result")
        BASE_PUB99=$(jq '.publish_latency_ms.p99' <<<"$result")
    fi
}

# BASELINE_EACH=1: an attack-free run before every attack, each attack compared with the one
# just before it (this machine's speed drifts over a long invocation).
run_one none
for kind in "${KINDS[@]}"; do
    if [[ ${BASELINE_EACH:-0} == 1 && $kind != "${KINDS[0]}" ]]; then
        run_one none
    fi
    run_one "$kind"
done
echo "results appended to $RESULTS; raw files in $OUT" >&2
