//! Figures of the Kubernetes store, against the Lease API test double (`testkit::k8s_api`):
//!
//! - **hand-off on release**: SIGTERM to the leading `baton run` until the standby's
//!   leadership stream reports LEADER (its worker would start then), p50/p99 over the runs,
//!   next to client-go's behaviour (a standby notices a released Lease only at its next
//!   RetryPeriod poll);
//! - **crash fail-over**: kill -9 of the leading daemon until the standby's stream reports
//!   LEADER, minus the lease (2 s here; 1 s renew deadline, 500 ms retry period): the standby
//!   waits until the Lease record has not changed for one lease on its own clock, counted from
//!   when it saw the last renewal;
//! - **API requests per minute at steady state**, counted at the server per bearer token, for
//!   the leader and for a follower (which must make no writes).
//!
//! Client-go's defaults throughout (15 s lease, 10 s renew deadline, 2 s retry period).
//! `cargo bench --features kubernetes --bench kubernetes_handoff` runs 25 hand-offs and a 60 s
//! steady state; without `--bench` in argv (as under `cargo test --all-targets`) a short run of
//! 3 hand-offs and 6 s.

use std::{collections::BTreeMap, path::Path, time::Duration};

use baton::client::{Role, WatchEvent};
use futures::StreamExt;
use nix::sys::signal::Signal;
use testkit::k8s_api::ApiServer;
use testkit::{Daemon, SOON, percentile};
use tokio::time::{Instant, timeout};

const NS: &str = "bench";
const ELECTION: &str = "bench";

struct Replica {
    identity: &'static str,
    kubeconfig: std::path::PathBuf,
    token: String,
}

fn start(replica: &Replica) -> Daemon {
    start_with(replica, &["--election", ELECTION])
}

fn start_with(replica: &Replica, args: &[&str]) -> Daemon {
    let mut command = testkit::baton();
    command.env("KUBECONFIG", &replica.kubeconfig);
    let mut all = vec!["--store", "kubernetes"];
    all.extend_from_slice(args);
    Daemon::start_command(replica.identity, command, &all)
}

/// Lease of the crash fail-over runs, in seconds.
const CRASH_LEASE_SECS: u64 = 2;

/// kill -9 of the leader -> the standby's stream says LEADER, minus the lease (signed, ms).
async fn crash_failover(replicas: &[Replica; 2], runs: usize) -> Vec<f64> {
    let lease = format!("{CRASH_LEASE_SECS}s");
    let args = [
        "--election",
        "bench-crash",
        "--lease-duration",
        &lease,
        "--renew-deadline",
        "1s",
        "--retry-period",
        "500ms",
    ];
    let mut leader = start_with(&replicas[0], &args);
    leader.wait_role("bench-crash", Role::Leader).await;
    let mut which = 0;
    let mut samples = Vec::new();
    for _ in 0..runs {
        let standby = start_with(&replicas[1 - which], &args);
        standby
            .wait_for("bench-crash", "following", |s| {
                s.role == Role::Follower && s.leader.is_some()
            })
            .await;
        // Mid-way between renewals, on average, as a crash would fall.
        let pause = Duration::from_millis(rand::random_range(0..500));
        let took =
            until_standby_leads(&leader, &standby, "bench-crash", Signal::SIGKILL, pause).await;
        leader.proc.wait();
        samples.push(took.as_secs_f64() * 1e3 - (CRASH_LEASE_SECS * 1000) as f64);
        leader = standby;
        which = 1 - which;
    }
    samples
}

fn replica(api: &ApiServer, dir: &Path, identity: &'static str) -> Replica {
    let token = api.service_account(NS, identity, &[NS]);
    let kubeconfig = api.write_kubeconfig(dir, &format!("{identity}.kubeconfig"), &token, NS);
    Replica {
        identity,
        kubeconfig,
        token,
    }
}

/// Start a standby and wait until it follows the leader with its watch open at the server
/// (a standby in its steady state, not one still starting).
async fn start_standby(api: &ApiServer, replica: &Replica) -> Daemon {
    let watches = |api: &ApiServer| {
        api.stats(&replica.token)
            .requests
            .get("watch")
            .copied()
            .unwrap_or(0)
    };
    let before = watches(api);
    let daemon = start(replica);
    daemon
        .wait_for(ELECTION, "following", |s| {
            s.role == Role::Follower && s.leader.is_some()
        })
        .await;
    let deadline = Instant::now() + SOON;
    while watches(api) == before {
        assert!(Instant::now() < deadline, "the standby opened no watch");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon
}

/// SIGTERM the leader; the time until the follower's stream says LEADER.
async fn hand_off(leader: &mut Daemon, follower: &Daemon) -> Duration {
    let took =
        until_standby_leads(leader, follower, ELECTION, Signal::SIGTERM, Duration::ZERO).await;
    assert!(leader.proc.wait().success(), "the old leader exits cleanly");
    took
}

/// Once the standby's stream says it follows, wait `pause`, send `signal` to the leader; the
/// time from the signal until the standby's stream says LEADER.
async fn until_standby_leads(
    leader: &Daemon,
    standby: &Daemon,
    election: &str,
    signal: Signal,
    pause: Duration,
) -> Duration {
    let client = standby.client().await;
    let mut events = Box::pin(client.watch(election));
    // The current state first: following.
    let first = timeout(SOON, events.next()).await;
    assert!(
        matches!(first, Ok(Some(WatchEvent::State(ref s))) if s.role == Role::Follower),
        "the standby follows before the {signal}"
    );
    tokio::time::sleep(pause).await;
    let sent = Instant::now();
    leader.proc.signal(signal);
    let led = timeout(SOON, async {
        while let Some(event) = events.next().await {
            if let WatchEvent::State(state) = event
                && state.role == Role::Leader
            {
                return Instant::now();
            }
        }
        panic!("the standby's stream ended");
    })
    .await
    .expect("the standby leads within SOON");
    led - sent
}

fn per_minute(
    before: &testkit::k8s_api::Stats,
    after: &testkit::k8s_api::Stats,
    window: Duration,
) -> String {
    let mut verbs = BTreeMap::new();
    for (verb, n) in &after.requests {
        let d = n - before.requests.get(verb).copied().unwrap_or(0);
        if d > 0 {
            verbs.insert(*verb, d as f64 * 60.0 / window.as_secs_f64());
        }
    }
    let total = verbs.values().fold(0.0, |sum, n| sum + n);
    let detail: Vec<String> = verbs.iter().map(|(v, n)| format!("{v} {n:.1}")).collect();
    if detail.is_empty() {
        return format!("{total:.1}/min");
    }
    format!("{total:.1}/min ({})", detail.join(", "))
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (runs, window) = if full {
        (25, Duration::from_secs(60))
    } else {
        (3, Duration::from_secs(6))
    };
    let api = ApiServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let replicas = [
        replica(&api, dir.path(), "a"),
        replica(&api, dir.path(), "b"),
    ];

    // Hand-off on release.
    let mut leader = start(&replicas[0]);
    leader.wait_role(ELECTION, Role::Leader).await;
    let mut follower = start_standby(&api, &replicas[1]).await;
    let mut which = 0;
    let mut times = Vec::new();
    for _ in 0..runs {
        times.push(hand_off(&mut leader, &follower).await);
        // The old leader comes back as the standby.
        leader = start_standby(&api, &replicas[which]).await;
        std::mem::swap(&mut leader, &mut follower);
        which = 1 - which;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "kubernetes hand-off on release (SIGTERM -> standby LEADER), n={runs}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 99.0)),
        ms(times[times.len() - 1]),
    );
    println!(
        "  reference, client-go leaderelection: a standby polls the Lease every RetryPeriod \
         (2 s by default, jittered), so it notices a release 0-2 s later (~1 s on average)"
    );

    // Crash fail-over, on an election of its own.
    let mut crash = crash_failover(&replicas, if full { 10 } else { 2 }).await;
    crash.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        crash[(((p / 100.0) * crash.len() as f64).ceil() as usize).clamp(1, crash.len()) - 1]
    };
    println!(
        "kubernetes crash fail-over minus lease={CRASH_LEASE_SECS}s (kill -9 -> standby LEADER), \
         n={}: p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        crash.len(),
        rank(50.0),
        rank(99.0),
        crash[0],
        crash[crash.len() - 1],
    );

    // Steady state: who leads now stays; count a window.
    let leader_token = &replicas[which].token;
    let follower_token = &replicas[1 - which].token;
    let (leader_before, follower_before) = (api.stats(leader_token), api.stats(follower_token));
    tokio::time::sleep(window).await;
    let (leader_after, follower_after) = (api.stats(leader_token), api.stats(follower_token));
    println!(
        "API requests at steady state over {} s (retry period 2 s): leader {}, follower {}",
        window.as_secs(),
        per_minute(&leader_before, &leader_after, window),
        per_minute(&follower_before, &follower_after, window),
    );
    let follower_writes = follower_after.writes() - follower_before.writes();
    println!(
        "  follower writes: {follower_writes}; a follower keeps one watch open, renewed every \
         290 s (server-side timeout), so its steady cost is ~0.2 requests/min"
    );
    println!(
        "  reference, client-go: leader GET + UPDATE every 2 s = 60/min, follower GET every 2 s = 30/min"
    );
    assert_eq!(follower_writes, 0, "a follower made writes");
    drop(leader);
    drop(follower);
}
