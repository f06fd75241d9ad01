#!/usr/bin/env bash
# Balancing many elections on one host, with the file store: three replicas, each a
# `baton run --balance` daemon over the same nine elections (feed-1 ... feed-9) with one timer
# worker beside it that follows all nine. They settle at three leaderships each. Then node-3's
# daemon gets kill -9 (its feeds go to the other two, 5/4), it restarts (back to 3/3/3, each move
# a hand-over), and node-1's daemon gets SIGTERM (its feeds are handed over, 5/4). Printed: the
# daemons' `balance:` log lines, the workers' started/stopped lines, and `baton status`.
#
#   scripts/balance-playground.sh    # builds in release mode, runs about 20 seconds
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin baton --example timer_worker
bin=target/release
feeds=feed-1,feed-2,feed-3,feed-4,feed-5,feed-6,feed-7,feed-8,feed-9
locks=$(mktemp -d)
pids=()
cleanup() {
  echo "=== $(date +%T) the end: SIGTERM to every daemon and worker"
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$locks"
}
trap cleanup EXIT

daemon() { # NAME PORT: start a balanced daemon; its pid in $last
  "$bin/baton" run --identity "$1" --listen "127.0.0.1:$2" --lock-dir "$locks" \
    --election "$feeds" --balance \
    2> >(grep --line-buffered 'balance: ' | sed -u "s/^.*balance: /[$1 daemon] balance: /" >&2) &
  last=$!
  pids+=("$last")
}
worker() { # NAME PORT: one timer worker following every feed of that daemon
  "$bin/examples/timer_worker" --daemon "http://127.0.0.1:$2" --election "$feeds" --period 10s \
    > >(grep --line-buffered -E '^(started|stopped)' | sed -u "s/^/[$1 worker] /") 2>&1 &
  pids+=("$!")
}
status() { # PORT
  echo "=== $(date +%T) baton status --addr http://127.0.0.1:$1"
  "$bin/baton" status --addr "http://127.0.0.1:$1"
}

daemon node-1 50071; node1=$last; worker node-1 50071
daemon node-2 50072; worker node-2 50072
daemon node-3 50073; node3=$last; worker node-3 50073
sleep 3
status 50071
echo "=== $(date +%T) kill -9 of node-3's daemon: its feeds go to node-1 and node-2"
kill -KILL "$node3"; wait "$node3" 2>/dev/null || true
sleep 3
status 50071
echo "=== $(date +%T) node-3's daemon restarts; node-1 and node-2 hand three feeds over to it"
daemon node-3 50073
sleep 4
status 50071
echo "=== $(date +%T) SIGTERM to node-1's daemon: it hands its feeds over and exits"
kill -TERM "$node1"
sleep 3
status 50072
