//! Paused-time tests of whole elections over the in-memory store: real elector tasks, tokio's
//! clock under test control, network faults by partition and heal.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::store::memory::MemoryStore;

fn timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

fn spawn(
    store: &MemoryStore,
    identity: &str,
    cancel: &CancellationToken,
) -> (Election, JoinHandle<()>) {
    spawn_campaigning(store, identity, CampaignMode::Always, cancel)
}

fn spawn_campaigning(
    store: &MemoryStore,
    identity: &str,
    campaign: CampaignMode,
    cancel: &CancellationToken,
) -> (Election, JoinHandle<()>) {
    Election::spawn(
        Arc::new(store.clone()),
        ElectionConfig {
            name: "e".into(),
            identity: identity.into(),
            timing: timing(),
            drain_timeout: Duration::from_secs(5),
            campaign,
            balanced: false,
        },
        cancel.child_token(),
    )
}

/// Replica "a" leading and "b" following it; with a's first leading state.
async fn leader_and_follower(
    store: &MemoryStore,
    cancel: &CancellationToken,
) -> (Election, Election, Leadership) {
    let (a, _) = spawn(store, "a", cancel);
    let first = until(&a, leads).await;
    let (b, _) = spawn(store, "b", cancel);
    until(&b, follows).await;
    (a, b, first)
}

/// Wait until `pred` holds for the election's state; returns it.
async fn until(election: &Election, pred: impl Fn(&Leadership) -> bool) -> Leadership {
    let mut changes = election.changes();
    let state = changes
        .wait_for(|s| pred(s))
        .await
        .expect("election running");
    state.clone()
}

fn leads(state: &Leadership) -> bool {
    state.view.role == Role::Leader
}

fn follows(state: &Leadership) -> bool {
    state.view.role == Role::Follower
}

#[tokio::test(start_paused = true)]
async fn one_leader_and_a_follower_that_names_it() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, _) = spawn(&store, "a", &cancel);
    until(&a, leads).await;
    let (b, _) = spawn(&store, "b", &cancel);
    let seen = until(&b, follows).await;
    assert_eq!(seen.view.leader.as_deref(), Some("a"));
    assert_eq!(seen.view.term, a.current().view.term);
    // Renewals keep it so for many lease durations.
    tokio::time::sleep(timing().lease_duration * 5).await;
    assert!(leads(&a.current()));
    assert_eq!(b.current().view.role, Role::Follower);
}

#[tokio::test(start_paused = true)]
async fn a_follower_cut_off_briefly_follows_the_same_leader_again() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, b, first) = leader_and_follower(&store, &cancel).await;
    // A store blip seen only by the follower: nothing changes in the store meanwhile.
    store.partition("b");
    until(&b, |s| s.view.role == Role::Unknown).await;
    store.heal("b");
    // Nothing changes in the store, so nothing else would wake b: it must report at once.
    let seen = tokio::time::timeout(timing().lease_duration, until(&b, follows))
        .await
        .expect("b follows a again after the heal, not UNKNOWN until the next change");
    assert_eq!(seen.view.leader.as_deref(), Some("a"));
    assert_eq!(seen.view.term, first.view.term);
    assert!(leads(&a.current()));
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_leader_steps_down_before_its_lease_can_expire() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, b, first) = leader_and_follower(&store, &cancel).await;

    let cut = Instant::now();
    store.partition("a");
    let a_down = {
        until(&a, |s| !leads(s)).await;
        Instant::now()
    };
    let b_up = {
        let state = until(&b, leads).await;
        assert!(
            state.view.term > first.view.term,
            "a new holding has a greater term"
        );
        Instant::now()
    };
    assert!(
        a_down - cut <= timing().renew_deadline,
        "a stepped down {:?} after the cut; renew deadline is {:?}",
        a_down - cut,
        timing().renew_deadline
    );
    assert!(
        a_down < b_up,
        "the old leader stepped down before the new one led"
    );
    // The store gave the election away only after a's lease could have expired.
    assert!(b_up - cut >= timing().lease_duration - timing().retry_period);

    store.heal("a");
    let a_back = until(&a, |s| {
        s.view.role == Role::Follower && s.view.leader.is_some()
    })
    .await;
    assert_eq!(a_back.view.leader.as_deref(), Some("b"));
    assert!(leads(&b.current()));
}

#[tokio::test(start_paused = true)]
async fn a_partitioned_follower_reports_unknown_then_recovers() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, b, _) = leader_and_follower(&store, &cancel).await;
    store.partition("b");
    // A follower waiting on the store notices at its next call; nudge it with a change.
    a.resign(None).await.unwrap();
    let unknown = until(&b, |s| s.view.role == Role::Unknown).await;
    assert!(
        unknown.view.reason.to_string().contains("unreachable"),
        "{}",
        unknown.view.reason
    );
    assert_eq!(
        unknown.view.leader, None,
        "no stale leader name while unknown"
    );
    store.heal("b");
    until(&b, |s| s.view.role != Role::Unknown).await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_the_worker_then_releases() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, a_task) = spawn(&store, "a", &cancel);
    let mut sub = a.subscribe(Some("worker-1"), true);
    let led = until(&a, leads).await;
    // The worker is told it leads.
    assert!(leads(&sub.deliver()));
    let (b, _) = spawn(&store, "b", &CancellationToken::new());
    until(&b, follows).await;

    cancel.cancel();
    let stepping = until(&a, |s| s.view.reason == Reason::SteppingDown).await;
    assert_eq!(
        stepping.view.role,
        Role::Follower,
        "the loss is announced first"
    );
    // Until the worker confirms, nobody else may lead.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(store.holder("e").as_deref(), Some("a"));
    assert!(!leads(&b.current()));
    a.acknowledge_stop("worker-1", led.view.term).unwrap();
    a_task.await.unwrap();
    until(&b, leads).await;
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_after_the_drain_timeout() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, a_task) = spawn(&store, "a", &cancel);
    let mut sub = a.subscribe(Some("silent-worker"), true);
    until(&a, leads).await;
    assert!(leads(&sub.deliver()));
    let started = Instant::now();
    cancel.cancel();
    a_task.await.unwrap();
    let waited = Instant::now() - started;
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    assert_eq!(store.holder("e"), None, "released after the timeout");
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_disconnects_is_waited_for_until_its_validity_ran_out() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, a_task) = spawn(&store, "a", &cancel);
    let mut sub = a.subscribe(Some("w"), true);
    until(&a, leads).await;
    let told = sub.deliver();
    assert!(leads(&told));
    let valid_until = told.view.valid_until.unwrap();
    // Its stream breaks: it may still be working until `valid_until`.
    tokio::time::sleep(Duration::from_secs(7)).await;
    drop(sub);
    cancel.cancel();
    a_task.await.unwrap();
    let released = Instant::now();
    assert!(
        released >= valid_until,
        "released at {released:?} before the vanished worker's validity {valid_until:?}"
    );
    assert_eq!(store.holder("e"), None);
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_never_led_is_not_waited_for() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, a_task) = spawn(&store, "a", &cancel);
    until(&a, leads).await;
    let sub = a.subscribe(Some("w"), true);
    drop(sub);
    let started = Instant::now();
    cancel.cancel();
    a_task.await.unwrap();
    assert!(Instant::now() - started < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn resign_for_a_successor_skips_other_standbys() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, _) = spawn(&store, "a", &cancel);
    until(&a, leads).await;
    let (b, _) = spawn(&store, "b", &cancel);
    let (c, _) = spawn(&store, "c", &cancel);
    until(&b, follows).await;
    until(&c, follows).await;
    let term = a.resign(Some("c".into())).await.unwrap();
    let c_leads = until(&c, leads).await;
    assert!(c_leads.view.term > term);
    assert!(!leads(&b.current()));
    assert!(!leads(&a.current()));
}

#[tokio::test(start_paused = true)]
async fn when_ready_campaigns_only_with_a_ready_worker() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, _) = spawn_campaigning(&store, "a", CampaignMode::WhenReady, &cancel);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(!leads(&a.current()));
    assert!(!a.current().view.campaigning);
    // Not campaigning is no reason to stay UNKNOWN: the store answered, nobody leads.
    assert_eq!(a.current().view.role, Role::Follower);
    assert_eq!(a.current().view.reason, Reason::WaitingForReadyWorker);
    let warming = a.subscribe(Some("w"), false);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        !leads(&a.current()),
        "a warming worker does not make it campaign"
    );
    a.set_ready("w", true).unwrap();
    until(&a, leads).await;
    // The only ready worker leaves: the replica steps down and stops campaigning.
    drop(warming);
    until(&a, |s| !leads(s) && !s.view.campaigning).await;
    assert_eq!(store.holder("e"), None);
}

/// Balancing's stand-by: a holding is kept until handed over; after that the replica does not
/// campaign, even for a free election, until balancing lets it.
#[tokio::test(start_paused = true)]
async fn a_replica_standing_by_keeps_its_holding_then_does_not_campaign() {
    let store = MemoryStore::new();
    let cancel = CancellationToken::new();
    let (a, b, first) = leader_and_follower(&store, &cancel).await;
    a.stand_by(true).await.expect("running");
    tokio::time::sleep(timing().lease_duration * 2).await;
    assert_eq!(a.current().view.term, first.view.term, "a kept its holding");
    assert!(leads(&a.current()));

    a.resign(Some("b".into())).await.expect("a leads");
    let taken = until(&b, leads).await;
    // b too stands by, then leaves the election free.
    b.stand_by(true).await.expect("running");
    b.resign(None).await.expect("b leads");
    until(&b, |s| !leads(s)).await;
    tokio::time::sleep(timing().lease_duration * 2).await;
    assert!(
        !leads(&a.current()),
        "a stood by while the election was free"
    );

    a.stand_by(false).await.expect("running");
    let back = until(&a, leads).await;
    assert!(back.view.term > taken.view.term);
    cancel.cancel();
}
