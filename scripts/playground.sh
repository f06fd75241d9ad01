#!/usr/bin/env bash
# The local playground of Apache Camel's `master` example, with Baton on the file store: two
# replicas, each a `baton run` daemon with a timer worker beside it. Only the leader's worker logs
# `Clustered route (timer) ...`. After a while the leader's daemon gets SIGTERM (graceful
# hand-off), later the new leader gets kill -9 (crash fail-over); watch the other take over.
#
#   scripts/playground.sh            # builds in release mode, runs about 20 seconds
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin baton --example timer_worker
bin=target/release
locks=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$locks"; }
trap cleanup EXIT

daemon() { # NAME PORT: start a daemon; its pid in $last
  "$bin/baton" run --identity "$1" --listen "127.0.0.1:$2" --lock-dir "$locks" \
    2> >(sed -u "s/^/[$1 daemon] /" >&2) &
  last=$!
  pids+=("$last")
}
worker() { # NAME PORT: a timer worker that follows (and reconnects to) that daemon
  "$bin/examples/timer_worker" --daemon "http://127.0.0.1:$2" \
    > >(sed -u "s/^/[$1 worker] /") 2>&1 &
  pids+=("$!")
}

daemon node-1 50061; node1=$last; worker node-1 50061
sleep 1
daemon node-2 50062; node2=$last; worker node-2 50062
sleep 5
echo "=== $(date +%T) SIGTERM to node-1's daemon: graceful hand-off to node-2"
kill -TERM "$node1"
sleep 6
echo "=== $(date +%T) node-1's daemon restarts; its worker reconnects; it is the standby now"
daemon node-1 50061
sleep 3
echo "=== $(date +%T) kill -9 of node-2's daemon: node-1 takes over"
kill -KILL "$node2"
sleep 5
"$bin/baton" status --addr http://127.0.0.1:50061
