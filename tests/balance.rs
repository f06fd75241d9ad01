//! `baton run --balance` with real daemons and timer workers on every store (file, etcd with
//! the `etcd` feature, Kubernetes through the Lease API double): 30 elections spread evenly over
//! the group through joins, deaths (`kill -9`) and graceful stops, and churn. Asserted exactly:
//! the counts once settled, which elections move and how many, that every move without a death
//! is a hand-over, and that no election's workers ever overlap and terms grow. Settle times are
//! printed (bounded by `testkit::balance::SETTLE_BOUND` only); `benches/balance.rs` measures them.

use std::{collections::BTreeMap, time::Duration};

use rand::{Rng, SeedableRng, rngs::StdRng};
use testkit::{
    balance::{Group, Holders},
    field, mono_now,
    scenario::Backend,
};
use tokio::time::Instant;

/// One test at a time: a group is 3 or 4 daemons of 25-30 elections on 2 cores, and on the file
/// store each election of a daemon holds an inotify instance, of the 128 a user has by default
/// (`fs.inotify.max_user_instances`): two file groups at once run out.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One `#[tokio::test]` per store for `scenario`: `NAME::file`, `NAME::etcd`, `NAME::kubernetes`.
macro_rules! every_store {
    ($name:ident, $scenario:path) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn file() {
                let _alone = ONE_AT_A_TIME.lock().await;
                $scenario(&Backend::file()).await;
            }

            #[cfg(feature = "etcd")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                let _alone = ONE_AT_A_TIME.lock().await;
                $scenario(&Backend::etcd()).await;
            }

            #[cfg(feature = "kubernetes")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubernetes() {
                let _alone = ONE_AT_A_TIME.lock().await;
                $scenario(&Backend::kubernetes()).await;
            }
        }
    };
}

every_store!(spread_death_rejoin_and_stop, spread_death_rejoin_and_stop);
every_store!(churn_keeps_shares_even_and_workers_apart, churn);
every_store!(
    when_ready_never_moves_an_election_to_an_unready_member,
    when_ready
);

/// The elections each live member leads, sorted: `[10, 10, 10]`.
fn spread(group: &Group, holders: &Holders) -> Vec<usize> {
    let mut counts: Vec<usize> = group.counts(holders).into_values().collect();
    counts.sort();
    counts
}

/// The elections whose holder differs between `before` and `after`.
fn moved(before: &Holders, after: &Holders) -> Vec<String> {
    after
        .iter()
        .filter(|(election, holder)| before.get(*election) != Some(holder))
        .map(|(election, _)| election.clone())
        .collect()
}

/// Each log line's `election=`, for the `balance: handing over` lines of `ids` after the first
/// `seen` of each.
fn hand_overs(group: &Group, ids: &[&str], seen: &BTreeMap<String, usize>) -> Vec<String> {
    let mut lines = Vec::new();
    for id in ids {
        let all = group.log_lines(id, "balance: handing over");
        lines.extend(all.into_iter().skip(seen.get(*id).copied().unwrap_or(0)));
    }
    lines
}

/// How many `balance: handing over` lines each of `ids` has logged so far.
fn hand_over_counts(group: &Group, ids: &[&str]) -> BTreeMap<String, usize> {
    ids.iter()
        .map(|id| {
            (
                id.to_string(),
                group.log_lines(id, "balance: handing over").len(),
            )
        })
        .collect()
}

/// Assert that every worker stop after CLOCK_MONOTONIC `t0` was a hand-over: no move is abrupt
/// when no member died.
fn assert_no_abrupt_ending(group: &Group, t0: i128, during: &str) {
    for (id, line) in group.stops_after(t0) {
        assert_eq!(
            field(&line, "ending"),
            Some("hand-over"),
            "{during}: {id}'s worker: {line}"
        );
    }
}

/// Assert that every worker stop after `t0` was a hand-over by `from` (one of them), `n` in
/// all, and that exactly `n` works started after `t0`, all on `to` (some of them).
fn assert_moves_by_hand_over(group: &Group, t0: i128, n: usize, from: &[&str], to: &[&str]) {
    let stops = group.stops_after(t0);
    assert_eq!(stops.len(), n, "workers stopped: {stops:#?}");
    for (id, line) in &stops {
        assert!(from.contains(&id.as_str()), "{id} stopped: {line}");
        assert_eq!(field(line, "ending"), Some("hand-over"), "{id}: {line}");
    }
    let starts = group.starts_after(t0);
    assert_eq!(starts.len(), n, "workers started: {starts:#?}");
    for (id, line) in &starts {
        assert!(to.contains(&id.as_str()), "{id} started: {line}");
    }
}

/// 3 daemons × 30 elections settle at 10/10/10; `kill -9` of one: 15/15, only its elections
/// moved; it restarts: 10/10/10 again by exactly 10 hand-overs; SIGTERM of another: its 10
/// elections move by hand-over, 15/15.
async fn spread_death_rejoin_and_stop(backend: &Backend) {
    let store = backend.name();
    let mut group = Group::new(backend, 30, &[]);

    let t = Instant::now();
    for id in ["a", "b", "c"] {
        group.join(id);
    }
    let settled = group.settle(t, "spread").await;
    let spread_out = settled.holders.clone();
    assert_eq!(spread(&group, &spread_out), [10, 10, 10], "{spread_out:?}");
    // Nobody died: whatever moved while the members joined moved by hand-over.
    assert_no_abrupt_ending(&group, 0, "the spread");
    println!("{store}: spread: 3 daemons x 30 elections from the first start: {settled}");

    // Death: only the dead member's elections move.
    let t = Instant::now();
    group.kill_9("c");
    let settled = group.settle(t, "death").await;
    let survived = settled.holders.clone();
    assert_eq!(spread(&group, &survived), [15, 15], "{survived:?}");
    let moved_on_death = moved(&spread_out, &survived);
    assert!(
        moved_on_death.iter().all(|e| spread_out[e] == "c"),
        "a death moved a survivor's election: {moved_on_death:?}"
    );
    assert_eq!(moved_on_death.len(), 10);
    println!("{store}: death: kill -9 of c, a and b at 15/15: {settled}");

    // Rejoin: exactly 10 elections move to c, each by hand-over.
    let logged = hand_over_counts(&group, &["a", "b"]);
    let (t, mono) = (Instant::now(), mono_now());
    group.join("c");
    let settled = group.settle(t, "rejoin").await;
    let rejoined = settled.holders.clone();
    assert_eq!(spread(&group, &rejoined), [10, 10, 10], "{rejoined:?}");
    let moved_on_join = moved(&survived, &rejoined);
    assert_eq!(
        moved_on_join.len(),
        10,
        "moves on rejoin: {moved_on_join:?}"
    );
    assert!(moved_on_join.iter().all(|e| rejoined[e] == "c"));
    assert_moves_by_hand_over(&group, mono, 10, &["a", "b"], &["c"]);
    let logged = hand_overs(&group, &["a", "b"], &logged);
    assert_eq!(logged.len(), 10, "hand-over log lines: {logged:#?}");
    for line in &logged {
        assert_eq!(field(line, "to"), Some("c"), "{line}");
    }
    // One log line per move: each was logged by the member that gave it, so c, given all ten,
    // should log no campaign of its own (checked last, so that the rest runs first).
    let campaigns = group.log_lines_of_current("c", "balance: campaigning");
    println!(
        "{store}: rejoin: c back, 10/10/10 by {} hand-overs: {settled}",
        moved_on_join.len()
    );

    // Graceful stop: a's elections move by hand-over, evenly.
    let (t, mono) = (Instant::now(), mono_now());
    group.sigterm("a");
    let settled = group.settle(t, "graceful stop").await;
    let stopped = settled.holders.clone();
    assert_eq!(spread(&group, &stopped), [15, 15], "{stopped:?}");
    let moved_on_stop = moved(&rejoined, &stopped);
    assert_eq!(moved_on_stop.len(), 10, "moves on stop: {moved_on_stop:?}");
    assert!(moved_on_stop.iter().all(|e| rejoined[e] == "a"));
    assert_moves_by_hand_over(&group, mono, 10, &["a"], &["b", "c"]);
    println!("{store}: graceful stop: SIGTERM of a, b and c at 15/15: {settled}");

    group.check_safety();
    assert!(
        campaigns.is_empty(),
        "rejoin: c logged moves handed to it: {campaigns:#?}"
    );
}

/// 20 random joins and leaves (SIGTERM or `kill -9`) among 4 identities, with 25 elections so
/// that shares are uneven (8/8/9, 6/6/6/7, 12/13), seeded (`BATON_BALANCE_SEED` to replay):
/// after each settles, max − min ≤ 1, and after each join or SIGTERM every work that stopped
/// ended by hand-over; over the whole run no election's workers overlap and terms grow.
async fn churn(backend: &Backend) {
    let store = backend.name();
    let seed: u64 = std::env::var("BATON_BALANCE_SEED")
        .ok()
        .map(|s| s.parse().expect("BATON_BALANCE_SEED is a number"))
        .unwrap_or_else(|| rand::rng().random());
    println!("{store}: churn seed {seed} (BATON_BALANCE_SEED={seed} replays it)");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = ["a", "b", "c", "d"];
    let mut group = Group::new(backend, 25, &[]);
    let t = Instant::now();
    for id in ["a", "b", "c"] {
        group.join(id);
    }
    group.settle(t, "the start").await;
    let mut kills = 0;
    for step in 1..=20 {
        let live = group.live();
        let down: Vec<&str> = pool
            .iter()
            .copied()
            .filter(|id| !live.iter().any(|l| l == id))
            .collect();
        let join = live.len() <= 1 || (!down.is_empty() && rng.random_bool(0.5));
        let (t, mono) = (Instant::now(), mono_now());
        let mut died = false;
        let change = if join {
            let id = down[rng.random_range(0..down.len())];
            group.join(id);
            format!("{id} joins")
        } else {
            let id = live[rng.random_range(0..live.len())].clone();
            // At least one kill -9 in the run, whatever the seed.
            if rng.random_bool(0.5) || (kills == 0 && step >= 10) {
                kills += 1;
                died = true;
                group.kill_9(&id);
                format!("kill -9 of {id}")
            } else {
                group.sigterm(&id);
                format!("SIGTERM of {id}")
            }
        };
        let what = format!("step {step} (seed {seed}): {change}");
        let settled = group.settle(t, &what).await;
        let holders = settled.holders.clone();
        let counts = group.counts(&holders);
        let (min, max) = (
            counts.values().min().unwrap(),
            counts.values().max().unwrap(),
        );
        assert!(max - min <= 1, "{what}: {counts:?}");
        if !died {
            assert_no_abrupt_ending(&group, mono, &what);
        }
        println!("{store}: {what}: {counts:?}, {settled}");
    }
    group.check_safety();
}

/// With `--campaign when-ready`, c's worker is not ready for e26..e30 (which sort last, so a plan
/// blind to readiness would give them to c): they never move to c, not on the spread, nor when a
/// and then b die (then they stay vacant rather than go to c). c may still lead 10 of its 25, so
/// the shares stay fair: 10/10/10, then 15/15.
async fn when_ready(backend: &Backend) {
    let store = backend.name();
    let unready = ["e26", "e27", "e28", "e29", "e30"];
    let mut group = Group::new(backend, 30, &["--campaign", "when-ready"]);
    group.unready("c", &unready);
    let t = Instant::now();
    for id in ["a", "b", "c"] {
        group.join(id);
    }
    let settled = group.settle(t, "spread").await;
    let holders = settled.holders.clone();
    assert_not_on_c(&holders, &unready);
    // Fair shares are checked last, so that the rest runs whatever they are.
    let mut unfair = Vec::new();
    if spread(&group, &holders) != [10, 10, 10] {
        unfair.push(format!("spread: {holders:?}"));
    }
    let c_sees = group.status("c").await.unwrap().balance.unwrap();
    let eligible: BTreeMap<&str, u32> = c_sees
        .members
        .iter()
        .map(|m| (m.identity.as_str(), m.eligible))
        .collect();
    assert_eq!(eligible, BTreeMap::from([("a", 30), ("b", 30), ("c", 25)]));
    println!(
        "{store}: when-ready: {:?}, c eligible for 25: {settled}",
        group.counts(&holders)
    );

    let t = Instant::now();
    group.kill_9("a");
    let settled = group.settle(t, "death of a").await;
    let holders = settled.holders.clone();
    assert_not_on_c(&holders, &unready);
    if spread(&group, &holders) != [15, 15] {
        unfair.push(format!("death of a: {holders:?}"));
    }
    println!(
        "{store}: when-ready: kill -9 of a, {:?}: {settled}",
        group.counts(&holders)
    );

    // Only c is left, ready for 25: it takes those and never the other 5.
    group.kill_9("b");
    let bound = Instant::now() + testkit::balance::SETTLE_BOUND;
    // Until c leads 25, then two more leases (3 s each) in which the other 5 stay vacant.
    let mut watch_until: Option<Instant> = None;
    let lead = loop {
        let status = group.status("c").await.unwrap();
        let lead: Vec<String> = status
            .elections
            .iter()
            .filter(|s| s.leader.as_deref() == Some("c"))
            .map(|s| s.election.clone())
            .collect();
        assert!(
            lead.iter().all(|e| !unready.contains(&e.as_str())),
            "c leads an election it is not ready for: {lead:?}"
        );
        if lead.len() == 25 {
            let until = *watch_until.get_or_insert(Instant::now() + Duration::from_secs(6));
            if Instant::now() > until {
                break lead;
            }
        } else if Instant::now() > bound {
            break lead;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(lead.len(), 25, "c alone leads {lead:?}");
    // Nor did c's worker ever run them.
    for election in unready {
        let on_c = group
            .intervals(election)
            .iter()
            .filter(|i| group.identities()[i.replica] == "c")
            .count();
        assert_eq!(on_c, 0, "{election} ran on c");
    }
    group.check_safety();
    assert!(
        unfair.is_empty(),
        "not floor/ceil of E/M where c could take its share: {unfair:#?}"
    );
}

fn assert_not_on_c(holders: &Holders, unready: &[&str]) {
    for election in unready {
        assert_ne!(
            holders[*election], "c",
            "{election} moved to c: {holders:?}"
        );
    }
}
