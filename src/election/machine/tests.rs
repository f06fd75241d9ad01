//! Synchronous tests of the role machine: events in at chosen instants, commands and views out.

use super::*;

fn timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    }
}

const DRAIN: Duration = Duration::from_secs(5);

/// A release with no successor named.
const RELEASE: Option<Command> = Some(Command::Release { successor: None });

fn leader_at(now: Instant, term: u64) -> Machine {
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    let holding = Holding {
        term,
        valid_until: now + timing().lease_duration,
    };
    assert_eq!(m.handle(now, Event::Acquired(holding)), None);
    m
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The store shows `holder` (or nobody) in `term`.
fn observed(holder: Option<&str>, term: u64) -> Event {
    Event::Observed(Observation {
        holder: holder.map(str::to_owned),
        term,
    })
}

#[test]
fn starts_unknown_and_campaigns() {
    let m = Machine::new(timing(), DRAIN, Gate::Open);
    let v = m.view("me");
    assert_eq!(v.role, Role::Unknown);
    assert_eq!(v.leader, None);
    assert_eq!(v.reason, Reason::Starting);
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn observation_makes_a_follower_naming_the_leader() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    m.handle(now, observed(Some("other"), 7));
    let v = m.view("me");
    assert_eq!(v.role, Role::Follower);
    assert_eq!(v.leader.as_deref(), Some("other"));
    assert_eq!(v.term, 7);
    assert_eq!(v.valid_until, None);
}

#[test]
fn a_release_seen_clears_the_leader_name() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    m.handle(now, observed(Some("other"), 7));
    m.handle(now, observed(None, 7));
    let v = m.view("me");
    assert_eq!(v.leader, None);
    assert_eq!(v.reason, Reason::NobodyLeads);
}

#[test]
fn acquiring_leads_with_validity_cut_by_the_renew_deadline() {
    let now = Instant::now();
    let m = leader_at(now, 3);
    let v = m.view("me");
    assert_eq!(v.role, Role::Leader);
    assert_eq!(v.leader.as_deref(), Some("me"));
    assert_eq!(v.term, 3);
    assert_eq!(v.valid_until, Some(now + timing().renew_deadline));
    assert_eq!(m.activity(), Activity::Renew);
}

#[test]
fn failed_renewals_keep_leading_until_the_renew_deadline_then_step_down() {
    let now = Instant::now();
    let mut m = leader_at(now, 3);
    let failed = Event::StoreFailed {
        kind: ErrorKind::Unavailable,
        reason: "connection refused".into(),
    };
    assert_eq!(m.handle(now + secs(2), failed.clone()), None);
    assert_eq!(m.view("me").role, Role::Leader);
    assert_eq!(m.handle(now + secs(9), failed), None);
    assert_eq!(m.view("me").role, Role::Leader);
    assert_eq!(m.next_deadline(), Some(now + secs(10)));
    assert_eq!(m.tick(now + secs(10)), Some(Command::Abandon));
    let v = m.view("me");
    assert_eq!(v.role, Role::Unknown);
    assert_eq!(v.reason, Reason::RenewDeadlinePassed);
    assert_eq!(v.valid_until, None);
}

#[test]
fn the_step_down_comes_before_the_lease_could_expire() {
    let now = Instant::now();
    let mut m = leader_at(now, 1);
    // Whatever the store says, validity never exceeds last renewal + renew deadline.
    m.handle(
        now + secs(1),
        Event::Renewed {
            sent_at: now + secs(1),
            valid_until: now + secs(100),
        },
    );
    let until = m.view("me").valid_until.unwrap();
    assert_eq!(until, now + secs(11));
    assert!(until < now + secs(1) + timing().lease_duration);
    // And a store that grants less than the deadline wins.
    m.handle(
        now + secs(2),
        Event::Renewed {
            sent_at: now + secs(2),
            valid_until: now + secs(5),
        },
    );
    assert_eq!(m.view("me").valid_until, Some(now + secs(5)));
}

#[test]
fn renewals_extend_validity() {
    let now = Instant::now();
    let mut m = leader_at(now, 1);
    for i in 1..20 {
        let t = now + secs(2 * i);
        m.handle(
            t,
            Event::Renewed {
                sent_at: t,
                valid_until: t + timing().lease_duration,
            },
        );
        assert_eq!(m.tick(t), None);
        assert_eq!(m.view("me").role, Role::Leader);
    }
}

#[test]
fn lost_holding_steps_down_at_once() {
    let now = Instant::now();
    let mut m = leader_at(now, 4);
    let cmd = m.handle(
        now + secs(1),
        Event::StoreFailed {
            kind: ErrorKind::Lost,
            reason: "key deleted".into(),
        },
    );
    assert_eq!(cmd, Some(Command::Abandon));
    assert_ne!(m.view("me").role, Role::Leader);
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn shutdown_announces_then_releases_after_drain() {
    let now = Instant::now();
    let mut m = leader_at(now, 2);
    assert_eq!(m.handle(now, Event::Shutdown), None);
    let v = m.view("me");
    assert_eq!(v.role, Role::Follower, "the loss is announced first");
    assert_eq!(v.reason, Reason::SteppingDown);
    assert_eq!(
        v.valid_until,
        Some(now + secs(5)),
        "the holding is kept for the workers until the drain timeout"
    );
    assert_eq!(
        m.activity(),
        Activity::Renew,
        "still holding while draining"
    );
    assert!(m.draining());
    assert_eq!(m.handle(now + secs(1), Event::Drained), RELEASE);
    assert_eq!(m.activity(), Activity::Stop);
}

#[test]
fn drain_is_bounded_by_the_drain_timeout() {
    let now = Instant::now();
    let mut m = leader_at(now, 2);
    m.handle(now, Event::Shutdown);
    assert_eq!(m.next_deadline(), Some(now + DRAIN));
    assert_eq!(m.tick(now + DRAIN - secs(1)), None);
    assert_eq!(m.tick(now + DRAIN), RELEASE);
    assert_eq!(m.activity(), Activity::Stop);
}

#[test]
fn shutdown_of_a_follower_leaves_at_once() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    assert_eq!(m.handle(now, Event::Shutdown), RELEASE);
    assert_eq!(m.activity(), Activity::Stop);
}

#[test]
fn resign_hands_over_and_holds_off() {
    let now = Instant::now();
    let mut m = leader_at(now, 5);
    m.handle(
        now,
        Event::Resign {
            successor: Some("b".into()),
        },
    );
    assert_eq!(
        m.handle(now, Event::Drained),
        Some(Command::Release {
            successor: Some("b".into())
        })
    );
    assert_eq!(m.view("me").role, Role::Follower);
    assert_eq!(
        m.activity(),
        Activity::Observe,
        "no campaign right after resigning"
    );
    // Another replica takes over: campaigning resumes (as a waiter).
    m.handle(now + secs(1), observed(Some("b"), 6));
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn hold_off_ends_after_a_lease_duration_if_nobody_takes_over() {
    let now = Instant::now();
    let mut m = leader_at(now, 5);
    m.handle(now, Event::Resign { successor: None });
    m.handle(now, Event::Drained);
    assert_eq!(m.activity(), Activity::Observe);
    assert_eq!(m.next_deadline(), Some(now + timing().lease_duration));
    m.tick(now + timing().lease_duration);
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn losing_readiness_steps_down_and_stops_campaigning() {
    let now = Instant::now();
    let mut m = leader_at(now, 1);
    m.handle(now, Event::Gate(Gate::NoReadyWorker));
    assert!(m.draining());
    m.handle(now, Event::Drained);
    assert_eq!(m.activity(), Activity::Observe);
    assert_eq!(m.view("me").reason, Reason::WaitingForReadyWorker);
    assert!(!m.view("me").campaigning);
    m.handle(now, Event::Gate(Gate::Open));
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn standing_by_keeps_a_holding_and_no_campaign_follows_its_end() {
    let now = Instant::now();
    let mut m = leader_at(now, 1);
    assert_eq!(m.handle(now, Event::Gate(Gate::StandingBy)), None);
    assert_eq!(m.view("me").role, Role::Leader);
    // The holding ends otherwise (here: no renewal within the renew deadline).
    let failed = Event::StoreFailed {
        kind: ErrorKind::Unavailable,
        reason: "connection refused".into(),
    };
    m.handle(now + secs(2), failed);
    assert_eq!(m.tick(now + secs(10)), Some(Command::Abandon));
    assert_eq!(
        m.activity(),
        Activity::Observe,
        "no campaign while standing by"
    );
    m.handle(now + secs(11), observed(None, 1));
    assert_eq!(m.activity(), Activity::Observe);
    assert_eq!(m.view("me").reason, Reason::StandingBy);
    m.handle(now + secs(11), Event::Gate(Gate::Open));
    assert_eq!(m.activity(), Activity::Campaign);
}

#[test]
fn a_holding_won_while_not_ready_is_given_back() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::NoReadyWorker);
    m.handle(
        now,
        Event::Acquired(Holding {
            term: 1,
            valid_until: now + secs(15),
        }),
    );
    assert_ne!(m.view("me").role, Role::Leader);
    assert!(m.draining());
}

#[test]
fn store_failure_of_a_follower_is_unknown_with_the_reason() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    m.handle(
        now,
        Event::StoreFailed {
            kind: ErrorKind::Unavailable,
            reason: "etcd at 127.0.0.1:1: connection refused".into(),
        },
    );
    let v = m.view("me");
    assert_eq!(v.role, Role::Unknown);
    assert_eq!(v.leader, None);
    assert!(v.reason.to_string().contains("connection refused"));
}

#[test]
fn a_known_term_is_kept_through_stepping_down_stopping_and_store_failures() {
    let now = Instant::now();
    let mut m = leader_at(now, 6);
    m.handle(now, Event::Shutdown);
    let stepping = m.view("me");
    assert_eq!((stepping.reason, stepping.term), (Reason::SteppingDown, 6));
    m.handle(now, Event::Drained);
    let stopped = m.view("me");
    assert_eq!(stopped.reason, Reason::ShuttingDown);
    assert_eq!(
        (stopped.leader, stopped.term),
        (None, 6),
        "released, term kept"
    );

    let mut m = leader_at(now, 4);
    assert_eq!(
        m.tick(now + timing().renew_deadline),
        Some(Command::Abandon)
    );
    let v = m.view("me");
    assert_eq!(
        (v.role, v.term),
        (Role::Unknown, 4),
        "renew deadline passed"
    );
    m.handle(now, observed(Some("other"), 5));
    let failed = Event::StoreFailed {
        kind: ErrorKind::Unavailable,
        reason: "connection refused".into(),
    };
    m.handle(now, failed.clone());
    assert_eq!((m.view("me").role, m.view("me").term), (Role::Unknown, 5));
    // A record with no holder and no term (deleted, or not written yet) forgets nothing.
    m.handle(now, Event::Observed(Observation::default()));
    assert_eq!(m.view("me").term, 5);
    m.handle(now, Event::Shutdown);
    assert_eq!(m.view("me").term, 5, "a follower's stop");
}

#[test]
fn its_own_name_in_the_store_is_not_another_replica() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    m.handle(now, observed(Some("me"), 3));
    let v = m.view("me");
    assert_eq!(v.role, Role::Follower);
    assert_eq!(v.reason, Reason::OwnHoldingExpiring);
    assert!(v.reason.to_string().contains("earlier holding"));
    assert_eq!(m.view("other").reason, Reason::OtherLeads);
}

#[test]
fn stale_answers_do_not_change_a_leader() {
    let now = Instant::now();
    let mut m = leader_at(now, 3);
    m.handle(now, observed(Some("other"), 2));
    m.handle(
        now,
        Event::Acquired(Holding {
            term: 9,
            valid_until: now + secs(15),
        }),
    );
    let v = m.view("me");
    assert_eq!((v.role, v.term), (Role::Leader, 3));
}

#[test]
fn renewals_are_due_a_retry_period_after_the_last_proof() {
    let now = Instant::now();
    let mut m = Machine::new(timing(), DRAIN, Gate::Open);
    assert_eq!(m.next_renewal(), None, "nothing held");
    // The store proved the holding 3 s before its answer was read.
    m.handle(
        now,
        Event::Acquired(Holding {
            term: 1,
            valid_until: now + timing().lease_duration - secs(3),
        }),
    );
    assert_eq!(
        m.next_renewal(),
        Some(now - secs(3) + timing().retry_period)
    );
    m.handle(
        now + secs(1),
        Event::Renewed {
            sent_at: now + secs(1),
            valid_until: now + secs(16),
        },
    );
    assert_eq!(
        m.next_renewal(),
        Some(now + secs(1) + timing().retry_period)
    );
    m.handle(now + secs(1), Event::Shutdown);
    assert!(m.draining());
    assert_eq!(
        m.next_renewal(),
        Some(now + secs(1) + timing().retry_period),
        "still renewed while the workers drain"
    );
    m.handle(now + secs(1), Event::Drained);
    assert_eq!(m.next_renewal(), None);
}
