//! Figures for the file store, printed (never asserted: a loaded 2-core machine must not fail a
//! build on timing). Safety is still checked on every run: the old worker stopped before the new
//! one started.
//!
//! ```text
//! cargo bench --bench file_handoff            # 20 runs each
//! BATON_BENCH_RUNS=100 cargo bench --bench file_handoff
//! ```
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it makes 3 runs of each, as a smoke
//! test of the benchmark itself.
//!
//! - take-over after kill -9 of the leading daemon: kill -> the standby's daemon reports LEADER
//!   (to a watching client) and -> the standby's worker started;
//! - hand-off after SIGTERM: signal -> the standby's worker started (after the old one stopped):
//!   the scenario `tests/scenarios.rs` runs on every store (`testkit::scenario`);
//! - exec to serving: spawn -> the first answered gRPC call;
//! - idle RSS of a daemon with one election and no subscriber.

use std::time::Duration;

use baton::client::{Client, Role, WatchEvent};
use futures::StreamExt;
use nix::sys::signal::Signal;
use testkit::{
    Proc, bench_runs, field, mono_now,
    scenario::{Backend, leader_and_follower, sigterm_hand_off},
    status_kib, summary, timer_worker,
};

fn mono_of(worker: &Proc, prefix: &str) -> i128 {
    let line = worker.stdout.wait_for(prefix, |l| l.starts_with(prefix));
    field(&line, "mono").unwrap().parse().unwrap()
}

fn since(start: i128, end: i128) -> Duration {
    Duration::from_nanos((end - start).max(0) as u64)
}

/// kill -9 of the leader; returns (to the standby daemon's LEADER event, to its worker's start).
async fn kill_9_round() -> (Duration, Duration) {
    let backend = Backend::file();
    let (mut a, b, _) = leader_and_follower(&backend, "default").await;
    let wb = timer_worker(&b, "default", "1s");
    let client = b.client().await;
    let mut events = Box::pin(client.watch("default"));
    // The first event is the current state: following a.
    while let Some(WatchEvent::State(s)) = events.next().await {
        if s.role == Role::Follower {
            break;
        }
    }
    let killed = mono_now();
    a.proc.signal(Signal::SIGKILL);
    let mut daemon = None;
    while let Some(event) = events.next().await {
        if let WatchEvent::State(s) = event
            && s.role == Role::Leader
        {
            daemon = Some(since(killed, mono_now()));
            break;
        }
    }
    let started = mono_of(&wb, "started");
    a.proc.wait();
    (daemon.expect("b leads"), since(killed, started))
}

/// SIGTERM of the leader with workers on both (the hand-off scenario every store's test runs,
/// asserting no overlap); returns signal -> new worker started.
async fn sigterm_round() -> Duration {
    let hand_off = sigterm_hand_off(&Backend::file(), "default").await;
    since(hand_off.signalled, hand_off.new_started)
}

/// Spawn -> first answered GetLeadership; returns it and the idle RSS in KiB a moment later.
async fn start_round() -> (Duration, u64) {
    let backend = Backend::file();
    let spawned = mono_now();
    // On 127.0.0.1:0: the daemon's `baton serving` line gives the bound address.
    let d = backend.daemon("a", "default", &[]);
    let serving = loop {
        if let Ok(client) = Client::connect(d.addr.clone()).await
            && client.get("default").await.is_ok()
        {
            break since(spawned, mono_now());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    d.wait_role("default", Role::Leader).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    (serving, status_kib(d.proc.pid(), "VmRSS"))
}

#[tokio::main]
async fn main() {
    let n = bench_runs(3, 20);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "file store benchmark: {n} runs each, {profile} build, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let (mut daemon, mut worker) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (d, w) = kill_9_round().await;
        daemon.push(d);
        worker.push(w);
    }
    println!(
        "file take-over after kill -9, to standby LEADER event: {}",
        summary(daemon)
    );
    println!(
        "file take-over after kill -9, to standby worker started: {}",
        summary(worker)
    );

    let handoff = {
        let mut samples = Vec::new();
        for _ in 0..n {
            samples.push(sigterm_round().await);
        }
        samples
    };
    println!(
        "file hand-off SIGTERM -> new worker started (old stopped first): {}",
        summary(handoff)
    );

    let (mut serving, mut rss) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (s, r) = start_round().await;
        serving.push(s);
        rss.push(r);
    }
    rss.sort();
    println!(
        "exec to serving (first answered gRPC call): {}",
        summary(serving)
    );
    println!(
        "daemon idle RSS: median={} KiB max={} KiB n={}",
        rss[rss.len() / 2],
        rss[rss.len() - 1],
        rss.len()
    );
}
