//! End-to-end on the file store: real `baton run` processes on one lock directory, real timer
//! workers, real signals (SIGSTOP/SIGCONT, and SIGKILL or SIGSTOP during a hand-over). The
//! hand-off and take-over every store shares are in `tests/scenarios.rs`.

use std::time::Duration;

use baton::client::{Ending, Role};
use nix::sys::signal::Signal;
use testkit::{Daemon, SHORT_TIMING, field, lock_dir, timer_worker};
use tokio::sync::mpsc;

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
    let paused_at = testkit::mono_now();
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
        tokio::time::timeout(testkit::SOON, seen.recv())
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

/// Poll `daemon` until every one of `elections` is led by `leader`, as `daemon` sees it;
/// panics after `within`.
async fn wait_until_all_led_by(
    daemon: &Daemon,
    elections: usize,
    leader: &str,
    within: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    let client = daemon.client().await;
    let mut last = String::new();
    while started.elapsed() < within {
        let states = client.list().await.expect("list");
        let led = states
            .iter()
            .filter(|s| s.leader.as_deref() == Some(leader))
            .count();
        if states.len() == elections && led == elections {
            return started.elapsed();
        }
        last = format!("{led} of {} elections led by {leader}", states.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{}: after {within:?}, {last}", daemon.identity);
}

/// Past the default `fs.inotify.max_user_instances` (128 for all of the user's processes):
/// both daemons start, and the standby takes every election when the leader is killed, woken
/// by the kernel: its re-check (every 30 s here) would come too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_leads_300_elections_and_a_standby_takes_them_all() {
    const ELECTIONS: usize = 300;
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let names: Vec<String> = (0..ELECTIONS).map(|i| format!("e{i}")).collect();
    let elections = names.join(",");
    let args = [
        "--lock-dir",
        lock,
        "--election",
        &elections,
        "--lease-duration",
        "60s",
        "--renew-deadline",
        "40s",
        "--retry-period",
        "30s",
    ];
    let within = Duration::from_secs(20);
    let a = Daemon::start("a", &args);
    let took = wait_until_all_led_by(&a, ELECTIONS, "a", within).await;
    eprintln!("a led all {ELECTIONS} elections {took:?} after it served");
    let b = Daemon::start("b", &args);
    wait_until_all_led_by(&b, ELECTIONS, "a", within).await;
    a.proc.signal(Signal::SIGKILL);
    let took = wait_until_all_led_by(&b, ELECTIONS, "b", within).await;
    eprintln!("b led all {ELECTIONS} elections {took:?} after a was killed");
    // Each election was taken once: b's log says so once per election.
    let taken = b
        .proc
        .stderr
        .all()
        .iter()
        .filter(|l| l.contains("leadership changed") && l.contains("role=Leader"))
        .count();
    assert_eq!(taken, ELECTIONS, "b's 'role=Leader' lines");
}
