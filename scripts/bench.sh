#!/usr/bin/env bash
# `make bench`: start a local three-region cluster on fresh data, run the
# fixed benchmark suite (`chatctl bench-suite`) against its routers, write
# the results into BENCHMARKS.md, and always stop the cluster and remove its
# data, whatever happens.
#
#   BENCH_SECS   measured seconds per case (default 15; 3 for a quick try)
#   CONFIG       cluster config (default cluster-configs/local-3region.toml)
#   CARGO        cargo command (default cargo)
set -euo pipefail

cd "$(dirname "$0")/.."

BENCH_SECS="${BENCH_SECS:-15}"
CONFIG="${CONFIG:-cluster-configs/local-3region.toml}"
CARGO="${CARGO:-cargo}"
BIN="${CARGO_TARGET_DIR:-target}/release"
# The routers and node API addresses of the config above.
ROUTERS="127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203"
ENDPOINTS="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
# Seconds to wait for the nodes to answer after the cluster starts.
START_TIMEOUT_SECS=60
# Seconds the cluster may take to stop before it is killed.
STOP_TIMEOUT_SECS=20

"$CARGO" build --release --bins

# Recorded before the run writes BENCHMARKS.md, which does not make it dirty.
commit="$(git rev-parse --short HEAD)"
if [ -n "$(git status --porcelain -- . ':!BENCHMARKS.md')" ]; then
    commit="$commit-dirty"
fi
date="$(date -u '+%Y-%m-%d %H:%M UTC')"

data="$(mktemp -d "${TMPDIR:-/tmp}/chatstore-bench.XXXXXX")"
log="$data/cluster.log"
cluster=""
suite=""

stop_cluster() {
    local status=$?
    # A second Ctrl-C must not leave the cluster or its data behind.
    trap '' INT TERM
    if [ -n "$suite" ] && kill -0 "$suite" 2>/dev/null; then
        kill -TERM "$suite" 2>/dev/null || true
        wait "$suite" 2>/dev/null || true
    fi
    if [ -n "$cluster" ] && kill -0 "$cluster" 2>/dev/null; then
        kill -TERM "$cluster" 2>/dev/null || true
        for _ in $(seq 1 "$STOP_TIMEOUT_SECS"); do
            kill -0 "$cluster" 2>/dev/null || break
            sleep 1
        done
        if kill -0 "$cluster" 2>/dev/null; then
            echo "bench: the cluster did not stop in ${STOP_TIMEOUT_SECS} s; killing it" >&2
            kill -KILL "$cluster" 2>/dev/null || true
        fi
        wait "$cluster" 2>/dev/null || true
    fi
    if [ "$status" -ne 0 ] && [ -f "$log" ]; then
        echo "bench: failed; the cluster's last log lines:" >&2
        tail -n 30 "$log" >&2
    fi
    rm -rf "$data"
    exit "$status"
}
trap stop_cluster EXIT
trap 'exit 130' INT TERM

echo "bench: starting the cluster ($CONFIG), data in $data" >&2
"$BIN/chatstore" dev --config "$CONFIG" --data-root "$data" >"$log" 2>&1 &
cluster=$!

for attempt in $(seq 1 "$START_TIMEOUT_SECS"); do
    if ! kill -0 "$cluster" 2>/dev/null; then
        echo "bench: the cluster exited at start (are its ports taken by another cluster?)" >&2
        exit 2
    fi
    if "$BIN/chatctl" --endpoints "$ENDPOINTS" status >/dev/null 2>&1; then
        break
    fi
    if [ "$attempt" -eq "$START_TIMEOUT_SECS" ]; then
        echo "bench: the nodes did not answer within ${START_TIMEOUT_SECS} s" >&2
        exit 2
    fi
    sleep 1
done

command="BENCH_SECS=$BENCH_SECS make bench"
if [ "$CONFIG" != "cluster-configs/local-3region.toml" ]; then
    command="CONFIG=$CONFIG $command"
fi

# bench-suite waits for the routers and every shard's leader itself, and
# refuses to run if the cluster started above is no longer running (another
# cluster on the same ports would answer in its place). It runs in the
# background so that a TERM or Ctrl-C reaches the trap at once.
"$BIN/chatctl" --endpoints "$ENDPOINTS" bench-suite \
    --routers "$ROUTERS" \
    --secs "$BENCH_SECS" \
    --server-pid "$cluster" \
    --write BENCHMARKS.md \
    --command "$command" \
    --commit "$commit" \
    --date "$date" &
suite=$!
wait "$suite"
