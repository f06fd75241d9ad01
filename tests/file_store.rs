//! End-to-end on the file store: real `baton run` processes on one lock directory, real timer
//! workers, real signals (SIGKILL, SIGTERM, SIGSTOP/SIGCONT).

mod common;

use std::time::Duration;

use baton::client::{Ending, Role};
use common::{Daemon, SHORT_TIMING, assert_stopped_before, field, lock_dir, stamps, timer_worker};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

fn term_of(line: &str) -> u64 {
    field(line, "term")
        .expect("term=")
        .parse()
        .expect("term is a number")
}

#[tokio::test]
async fn kill_9_of_the_leader_hands_over_with_a_greater_term() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let a = Daemon::start("a", &["--lock-dir", lock]);
    let first = a.wait_role("default", Role::Leader).await;
    let b = Daemon::start("b", &["--lock-dir", lock]);
    let seen = b.wait_role("default", Role::Follower).await;
    assert_eq!(seen.leader.as_deref(), Some("a"));
    // Exactly one leader.
    assert_eq!(
        b.client().await.get("default").await.unwrap().role,
        Role::Follower
    );
    assert_eq!(
        a.client().await.get("default").await.unwrap().role,
        Role::Leader
    );

    let mut a = a;
    a.proc.signal(Signal::SIGKILL);
    a.proc.wait();
    let now = b.wait_role("default", Role::Leader).await;
    assert!(
        now.term > first.term,
        "term {} after {}",
        now.term,
        first.term
    );
    assert_eq!(now.leader.as_deref(), Some("b"));
}

#[tokio::test]
async fn sigterm_hands_over_after_the_old_worker_stopped() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let mut a = Daemon::start("a", &["--lock-dir", lock]);
    a.wait_role("default", Role::Leader).await;
    let b = Daemon::start("b", &["--lock-dir", lock]);
    b.wait_role("default", Role::Follower).await;
    let wa = timer_worker(&a, "default", "50ms");
    let wb = timer_worker(&b, "default", "50ms");
    wa.stdout.wait_count("of a's ticks", 3, |l| {
        l.starts_with("Clustered route (timer)")
    });
    assert!(
        stamps(&wb, "started").is_empty(),
        "the follower's worker must not start"
    );

    a.proc.signal(Signal::SIGTERM);
    let started = wb
        .stdout
        .wait_for("'started' from b's worker", |l| l.starts_with("started"));
    let status = a.proc.wait();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");

    assert_stopped_before(&wa, stamps(&wb, "started")[0]);
    let old_term = term_of(
        &wa.stdout
            .wait_for("a's start", |l| l.starts_with("started")),
    );
    assert!(term_of(&started) > old_term);
    // The daemon logged the drain: the worker confirmed before the release.
    a.proc.stderr.wait_for("'workers stopped; releasing'", |l| {
        l.contains("workers stopped; releasing")
    });
}

#[tokio::test]
async fn a_paused_daemon_never_leaves_its_worker_running() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let a = Daemon::start("a", &[&["--lock-dir", lock][..], &SHORT_TIMING].concat());
    a.wait_role("default", Role::Leader).await;
    let w = timer_worker(&a, "default", "50ms");
    w.stdout
        .wait_count("ticks", 2, |l| l.starts_with("Clustered route (timer)"));
    a.proc.signal(Signal::SIGSTOP);
    let paused_at = common::mono_now();
    let stopped = w
        .stdout
        .wait_for("'stopped' while the daemon is paused", |l| {
            l.starts_with("stopped")
        });
    let stopped_at: i128 = field(&stopped, "mono").unwrap().parse().unwrap();
    let after = std::time::Duration::from_nanos((stopped_at - paused_at).max(0) as u64);
    eprintln!("worker stopped {after:?} after SIGSTOP of its daemon (renew deadline 2s)");
    // valid_for is at most the renew deadline (2 s) from the last event; allow for the
    // heartbeat period and a loaded machine, but the point is: it stops while the daemon sleeps.
    assert!(
        after <= std::time::Duration::from_secs(4),
        "stopped only {after:?} after the pause"
    );
    a.proc.signal(Signal::SIGCONT);
    // Resumed, the daemon still holds the lock and leads again; the worker restarts.
    w.stdout
        .wait_count("a restart after SIGCONT", 2, |l| l.starts_with("started"));
}

/// A worker that takes long to finish a hand-over (a slow flush, looking again between its
/// steps) while its daemon, stepping down after SIGTERM, suffers `fault`: the hand-over must
/// turn abrupt, because the leadership may pass on before the worker returns.
async fn hand_over_interrupted_by(fault: Signal) {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    // Short timings: a paused daemon's hold on the term runs out within the renew deadline.
    let a = Daemon::start(
        "a",
        &[
            &["--lock-dir", lock, "--drain-timeout", "10s"][..],
            &SHORT_TIMING,
        ]
        .concat(),
    );
    a.wait_role("default", Role::Leader).await;
    let client = a.client().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let worker = tokio::spawn(async move {
        client
            .run_while_leader("default", move |lease| {
                let seen = seen_tx.clone();
                async move {
                    let _ = seen.send(("started", None));
                    lease.cancelled().await;
                    let _ = seen.send(("cancelled", lease.ending()));
                    // At most 8 s: less than the client's HTTP/2 keep-alive takes to notice a
                    // paused daemon (10 s + 5 s), so only the hold can end it in time.
                    for _ in 0..1600 {
                        if lease.ending() == Some(Ending::Abrupt) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let _ = seen.send(("finished", lease.ending()));
                }
            })
            .await
    });
    let mut next = async || {
        tokio::time::timeout(common::SOON, seen.recv())
            .await
            .expect("the worker's next step in time")
            .expect("the worker runs")
    };
    assert_eq!(next().await, ("started", None));
    a.proc.signal(Signal::SIGTERM);
    assert_eq!(next().await, ("cancelled", Some(Ending::HandOver)));
    a.proc.signal(fault);
    assert_eq!(
        next().await,
        ("finished", Some(Ending::Abrupt)),
        "after {fault} of the stepping-down daemon"
    );
    worker.abort();
    a.proc.signal(Signal::SIGCONT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_turns_abrupt_when_the_daemon_dies_meanwhile() {
    hand_over_interrupted_by(Signal::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_turns_abrupt_when_the_paused_daemons_hold_runs_out() {
    hand_over_interrupted_by(Signal::SIGSTOP).await;
}
