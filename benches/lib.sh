# What the benchmark scripts share (sourced from the repository root): a scratch directory and
# the processes they start, stopped by PID when the script exits however it exits.
#
# WORK: a fresh scratch directory, removed at exit. PIDS: add every process started; at exit
# each gets SIGTERM, then SIGKILL after 5 s (herald drains for at most --drain-timeout, the
# load generators exit at once).

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Sets BIN, where herald, herald-bench and the baselines are: BIN_DIR when it is set, otherwise
# a release build of the workspace's binaries made now.
release_binaries() {
    if [[ -n ${BIN_DIR:-} ]]; then
        BIN=$BIN_DIR
    else
        echo "== building (release: the workspace's binaries)" >&2
        cargo build --release --workspace --bins >&2
        BIN="${CARGO_TARGET_DIR:-target}/release"
    fi
}
