#!/usr/bin/env bash
# Idle memory benchmark (issue 2): herald's memory per idle subscribed connection.
#
# Starts one herald (2 shards, loopback, ephemeral ports), opens SMALL idle guest connections
# subscribed to one URL channel with herald-bench, measures, grows to LARGE connections with
# more herald-bench processes (one process holds at most ~19,900 sockets), measures again, and
# reports:
#   - herald user-space bytes per connection = (RssAnon@LARGE - RssAnon@SMALL) / (LARGE - SMALL),
#     and the same from VmRSS (which also counts code pages first run while growing)
#   - kernel bytes per connection from the /proc/meminfo Slab delta (system-wide, and on
#     loopback it covers both ends of every connection: herald's socket and the client's)
#   - herald-bench's own RSS per connection
# Every process it starts is stopped by PID; it finishes by itself in about a minute after the
# build.
#
# herald switches transparent huge pages off for itself by default (with them mimalloc's heap
# would grow in 2 MiB steps), so its default build and settings are measured as they are.
# HERALD_THP=1 runs it with MIMALLOC_ALLOW_THP=1 (huge pages allowed) for comparison;
# HERALD_THP=0 sets MIMALLOC_ALLOW_THP=0, which is what herald does anyway.
#
# Settings (environment): SMALL (1000), LARGE (19000), BENCH_PROCS (2), SETTLE_SECS (3),
# HERALD_THP (unset: herald's default), AS_USER (0; 1: signed-in connections, all with one JWT
# of a user with 5 roles; 2: each connection a user of its own, 5 roles each), BIN_DIR (use prebuilt herald and herald-bench from there instead of building;
# otherwise it builds with cargo, honouring CARGO_TARGET_DIR).
set -euo pipefail
# Load generators open thousands of connections from a few loopback addresses: herald's per-IP
# limits (on by default) are switched off here, explicitly.
export HERALD_MAX_CONNECTIONS_PER_IP=0 HERALD_HANDSHAKES_PER_IP=0

SMALL=${SMALL:-1000}
LARGE=${LARGE:-19000}
BENCH_PROCS=${BENCH_PROCS:-2}
SETTLE_SECS=${SETTLE_SECS:-3}
HERALD_THP=${HERALD_THP:-}
# AS_USER=1: every connection carries the same JWT (a signed-in user with 5 roles) instead of a
# guest; AS_USER=2: every connection a different user (herald-bench idle --jwt-secret).
AS_USER=${AS_USER:-0}
JWT_SECRET=bench-jwt-secret
# Upper bound on the hold; the script stops the benches itself once it has measured.
HOLD=${HOLD:-300s}

cd "$(dirname "$0")/.."
(( LARGE > SMALL )) || { echo "LARGE must exceed SMALL" >&2; exit 2; }

# WORK, PIDS and the cleanup at exit; BIN.
. benches/lib.sh
release_binaries
[[ -x $BIN/herald && -x $BIN/herald-bench ]] || { echo "no herald or herald-bench in $BIN" >&2; exit 2; }


rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
# Anonymous resident memory: what connections allocate. VmRSS also counts the binary's code and
# constants as they are first run, a fixed cost that a test growing from SMALL to LARGE would
# otherwise spread over the connections (about 15 B each from 1,000 to 19,000).
anon_kb() { awk '/^RssAnon:/ { print $2 }' "/proc/$1/status"; }
meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
# Bytes held by each kernel slab cache (num_slabs x pages per slab), when /proc/slabinfo is readable.
slab_caches() {
    [[ -r /proc/slabinfo ]] || return 0
    awk -v page="$(getconf PAGESIZE)" 'NR > 2 { print $1, $15 * $6 * page, $3, $4 }' /proc/slabinfo
}
tcp_mem_pages() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat; }

# Waits for a line matching $2 in file $1, for at most $3 seconds.
wait_for_line() {
    local file=$1 pattern=$2 secs=$3
    for _ in $(seq $((secs * 10))); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "timed out after ${secs}s waiting for '$pattern' in $file:" >&2
    tail -5 "$file" >&2 || true
    return 1
}

# Samples herald's RSS once a second until two samples in a row differ by < 64 KiB (max 15 s).
settled_rss_kb() {
    local prev cur
    prev=$(rss_kb "$1")
    for _ in $(seq 15); do
        sleep 1
        cur=$(rss_kb "$1")
        (( cur - prev < 64 && prev - cur < 64 )) && break
        prev=$cur
    done
    echo "$cur"
}

herald_connections() {
    curl -s --max-time 5 "http://$ADMIN/metrics" |
        awk '/^herald_connections\{/ { s += $2 } END { print s + 0 }'
}

# Starts one herald-bench process: name, connections, source range.
start_bench() {
    local name=$1 n=$2 sources=$3
    local users=()
    [[ $AS_USER == 2 ]] && users=(--jwt-secret "$JWT_SECRET" --jwt-user-prefix "$name-")
    "$BIN/herald-bench" idle --target "$URL" --connections "$n" --rate 5000 \
        --hold "$HOLD" --source-ips "$sources" "${users[@]}" >"$WORK/$name.json" 2>"$WORK/$name.err" &
    PIDS+=("$!")
    eval "${name}_PID=$!"
}

# An HS256 token like Appwrite's plus a roles claim, for 5 roles in all: user:u1, users, and
# one team membership's team:t1, team:t1/owner, member:m1.
user_jwt() {
    python3 - "$JWT_SECRET" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d, separators=(",", ":")).encode()).rstrip(b"=")
head = b64({"alg": "HS256", "typ": "JWT"}) + b"." + b64({
    "userId": "u1", "sessionId": "s1", "exp": int(time.time()) + 3600,
    "roles": ["team:t1", "team:t1/owner", "member:m1"]})
sig = base64.urlsafe_b64encode(hmac.new(sys.argv[1].encode(), head, hashlib.sha256).digest()).rstrip(b"=")
print((head + b"." + sig).decode())
PY
}

echo "== starting herald" >&2
THP_ENV=()
[[ -n $HERALD_THP ]] && THP_ENV=(MIMALLOC_ALLOW_THP="$HERALD_THP")
env "${THP_ENV[@]}" HERALD_JWT_SECRET=$JWT_SECRET "$BIN/herald" serve --shards 2 --listen 127.0.0.1:0 --admin 127.0.0.1:0 --drain-timeout 2s \
    >"$WORK/herald.out" 2>"$WORK/herald.err" &
HERALD_PID=$!
PIDS+=("$HERALD_PID")
wait_for_line "$WORK/herald.out" "herald listening" 20
STARTUP=$(head -1 "$WORK/herald.out")
PORT=$(grep -o 'ws://[0-9.]*:[0-9]*' <<<"$STARTUP" | head -1 | cut -d: -f3)
ADMIN=$(grep -o 'admin on http://[0-9.]*:[0-9]*' <<<"$STARTUP" | sed 's|admin on http://||')
URL="ws://127.0.0.1:$PORT/v1/realtime?project=p&channels[]=files"
if [[ $AS_USER == 1 ]]; then
    URL="$URL&jwt=$(user_jwt)"
    echo "connections are signed-in: one JWT of a user with 5 roles" >&2
elif [[ $AS_USER == 2 ]]; then
    echo "connections are signed-in, each as a user of its own (5 roles each)" >&2
fi
echo "$STARTUP" >&2
echo "herald runs with MIMALLOC_ALLOW_THP=${HERALD_THP:-unset (its default: huge pages off)}" >&2
sleep 1
RSS0=$(rss_kb "$HERALD_PID")

echo "== $SMALL connections" >&2
start_bench small "$SMALL" 127.0.0.2-127.0.0.10
wait_for_line "$WORK/small.err" "settled:" 60
sleep "$SETTLE_SECS"
RSS_SMALL=$(settled_rss_kb "$HERALD_PID")
ANON_SMALL=$(anon_kb "$HERALD_PID")
cp "/proc/$HERALD_PID/smaps" "$WORK/smaps_small"
SLAB_SMALL=$(meminfo_kb Slab)
slab_caches >"$WORK/slab_small"
SUNRECL_SMALL=$(meminfo_kb SUnreclaim)
TCPMEM_SMALL=$(tcp_mem_pages)
CONN_SMALL=$(herald_connections)

GROW=$((LARGE - SMALL))
echo "== growing to $LARGE connections ($BENCH_PROCS more herald-bench processes)" >&2
GROW_NAMES=()
first=11
span=$(( (60 - first + 1) / BENCH_PROCS ))
for i in $(seq "$BENCH_PROCS"); do
    n=$(( GROW / BENCH_PROCS + (i <= GROW % BENCH_PROCS ? 1 : 0) ))
    lo=$(( first + (i - 1) * span ))
    hi=$(( lo + span - 1 ))
    start_bench "grow$i" "$n" "127.0.0.$lo-127.0.0.$hi"
    GROW_NAMES+=("grow$i")
done
for name in "${GROW_NAMES[@]}"; do
    wait_for_line "$WORK/$name.err" "settled:" 90
done
sleep "$SETTLE_SECS"
RSS_LARGE=$(settled_rss_kb "$HERALD_PID")
ANON_LARGE=$(anon_kb "$HERALD_PID")
cp "/proc/$HERALD_PID/smaps" "$WORK/smaps_large"
SLAB_LARGE=$(meminfo_kb Slab)
slab_caches >"$WORK/slab_large"
SUNRECL_LARGE=$(meminfo_kb SUnreclaim)
TCPMEM_LARGE=$(tcp_mem_pages)
CONN_LARGE=$(herald_connections)
BENCH_RSS_KB=0
for name in small "${GROW_NAMES[@]}"; do
    pid_var="${name}_PID"
    BENCH_RSS_KB=$((BENCH_RSS_KB + $(rss_kb "${!pid_var}")))
done

echo "== stopping" >&2
for name in small "${GROW_NAMES[@]}"; do
    pid_var="${name}_PID"
    kill -TERM "${!pid_var}"
done
for name in small "${GROW_NAMES[@]}"; do
    pid_var="${name}_PID"
    wait "${!pid_var}" || true
done

# Per-process bench figures from their JSON summaries (flat numeric fields; no jq needed).
field() { grep -o "\"$1\":[0-9.]*" <<<"$2" | head -1 | cut -d: -f2 || true; }
BENCH_SUMMARY=""
CONNECTED_TOTAL=0
FAILED_TOTAL=0
for name in small "${GROW_NAMES[@]}"; do
    json=$(cat "$WORK/$name.json")
    connected=$(field connected "$json")
    failed=$(field total "$json") # the only "total" of the summary: failed.total
    per=$(field per_connection "$json")
    p50=$(field p50 "$json")
    p99=$(field p99 "$json")
    CONNECTED_TOTAL=$((CONNECTED_TOTAL + ${connected:-0}))
    FAILED_TOTAL=$((FAILED_TOTAL + ${failed:-0}))
    BENCH_SUMMARY+=$(printf '  %-6s connected %6s failed %s  handshake p50 %s ms p99 %s ms  own RSS %.0f B/conn\n' \
        "$name" "$connected" "${failed:-?}" "$p50" "$p99" "${per:-0}")
    BENCH_SUMMARY+=$'\n'
    if [[ ${failed:-0} != 0 ]]; then
        echo "$name failures: $json" >&2
    fi
done

PAGE=$(getconf PAGESIZE)
awk -v rss0="$RSS0" -v rs="$RSS_SMALL" -v rl="$RSS_LARGE" -v ss="$SLAB_SMALL" -v sl="$SLAB_LARGE" \
    -v us="$SUNRECL_SMALL" -v ul="$SUNRECL_LARGE" -v ts="$TCPMEM_SMALL" -v tl="$TCPMEM_LARGE" \
    -v page="$PAGE" -v small="$SMALL" -v large="$LARGE" -v grow="$GROW" -v cs="$CONN_SMALL" \
    -v cl="$CONN_LARGE" -v brss="$BENCH_RSS_KB" -v ok="$CONNECTED_TOTAL" -v failed="$FAILED_TOTAL" -v thp="${HERALD_THP:-unset}" \
    -v as="$ANON_SMALL" -v al="$ANON_LARGE" '
BEGIN {
    user = (al - as) * 1024 / grow
    total = (rl - rs) * 1024 / grow
    slab = (sl - ss) * 1024 / grow
    unrecl = (ul - us) * 1024 / grow
    tcpmem = (tl - ts) * page / grow
    printf "herald: MIMALLOC_ALLOW_THP=%s\n", thp
    printf "herald connections (metrics): %d at SMALL, %d at LARGE; bench connected %d, failed %d\n", cs, cl, ok, failed
    printf "herald VmRSS: %.1f MiB idle, %.1f MiB at %d, %.1f MiB at %d connections\n", rss0 / 1024, rs / 1024, small, rl / 1024, large
    printf "herald user space per connection: %.0f B  (anonymous memory; target: <= 96 B)\n", user
    printf "herald VmRSS per connection: %.0f B  (also counting code first run while growing)\n", total
    printf "kernel Slab per connection (both loopback ends): %.0f B  (SUnreclaim %.0f B); TCP buffer pages per connection: %.0f B\n", slab, unrecl, tcpmem
    printf "herald-bench VmRSS total: %.1f MiB for %d connections = %.0f B per connection (incl. fixed cost)\n", brss / 1024, large, brss * 1024 / large
    printf "RESULT {\"thp\":%d,\"small\":%d,\"large\":%d,\"herald_rss_kb\":[%d,%d,%d],\"user_bytes_per_conn\":%.1f,\"vmrss_bytes_per_conn\":%.1f,\"slab_bytes_per_conn\":%.1f,\"sunreclaim_bytes_per_conn\":%.1f,\"tcp_mem_bytes_per_conn\":%.1f,\"bench_rss_bytes_per_conn\":%.1f,\"connected\":%d,\"failed\":%d}\n", thp, small, large, rss0, rs, rl, user, total, slab, unrecl, tcpmem, brss * 1024 / large, ok, failed
}'
printf '%s' "$BENCH_SUMMARY"
# herald's mappings by resident growth: which memory the connections took (the allocator's
# arena, thread stacks, the binary).
smaps_rss() { awk '/^[0-9a-f]+-[0-9a-f]+ / { m = $1 " " ($6 == "" ? "[anon]" : $6) } /^Rss:/ { print m, $2 }' "$1"; }
echo "herald mappings that grew, per connection:"
join <(smaps_rss "$WORK/smaps_small" | awk '{ print $1 "|" $2, $3 }' | sort) \
     <(smaps_rss "$WORK/smaps_large" | awk '{ print $1 "|" $2, $3 }' | sort) |
    awk -v grow="$GROW" '{ d = ($3 - $2) * 1024 / grow; if (d >= 1) printf "  %-60s %6.1f B\n", $1, d }' |
    sort -k2 -n -r | head -8
if [[ -s $WORK/slab_large ]]; then
    echo "kernel slab caches that grew most, per connection (both ends; objects of size, count per connection):"
    join <(sort "$WORK/slab_small") <(sort "$WORK/slab_large") |
        awk -v grow="$GROW" '{ d = ($5 - $2) / grow; n = ($6 - $3) / grow; if (d >= 16) printf "  %-24s %7.0f B  (%d B x %.2f)\n", $1, d, $7, n }' |
        sort -k2 -n -r | head -12
fi
