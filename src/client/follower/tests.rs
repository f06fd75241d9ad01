//! Every transition of the follower machine, as plain synchronous tests: no runtime, no
//! network; time is whatever instant each event is handed with.

use std::time::Duration;

use tokio::time::Instant;

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn state(role: Role, term: u64, valid_until: Option<Instant>) -> LeaderState {
    LeaderState {
        election: "e".into(),
        role,
        identity: "me".into(),
        leader: None,
        term,
        valid_until,
        observed_at: None,
        reason: "why".into(),
        campaigning: true,
    }
}

/// A LEADER event of `term`, valid until `valid_until`.
fn leader(term: u64, valid_until: Instant) -> Event {
    Event::State(state(Role::Leader, term, Some(valid_until)))
}

/// A FOLLOWER event (a step-down) of `term`, with the hold `valid_until`.
fn follower(term: u64, valid_until: Option<Instant>) -> Event {
    Event::State(state(Role::Follower, term, valid_until))
}

fn not_leading() -> Why {
    Why::NotLeading {
        role: Role::Follower,
        reason: "why".into(),
    }
}

fn cancel(ending: Ending, why: Why) -> Action {
    Action::Cancel { ending, why }
}

/// A follower working on `term` until `now + 10s`.
fn working(term: u64, now: Instant) -> Follower {
    let mut f = Follower::new(false);
    assert_eq!(
        f.handle(leader(term, now + 10 * SEC), now),
        [Action::Start { term }]
    );
    f
}

/// A follower whose work of `term` is being stopped abruptly (its validity ran out at 10s).
fn stopping_abruptly(term: u64, now: Instant) -> Follower {
    let mut f = working(term, now);
    f.handle(Event::DeadlineReached, now + 10 * SEC);
    assert!(f.is_stopping());
    f
}

/// A follower handing the work of `term` over, the daemon holding it until `now + 5s`.
fn handing_over(term: u64, now: Instant) -> Follower {
    let mut f = working(term, now);
    let actions = f.handle(follower(term, Some(now + 5 * SEC)), now);
    assert_eq!(actions, [cancel(Ending::HandOver, not_leading())]);
    f
}

#[test]
fn idle_starts_work_on_a_leader_event() {
    let now = Instant::now();
    let mut f = Follower::new(false);
    assert_eq!(
        f.handle(leader(3, now + 10 * SEC), now),
        [Action::Start { term: 3 }]
    );
    let valid_until = now + 10 * SEC;
    assert_eq!(
        f.state(),
        &State::Working {
            term: 3,
            valid_until
        }
    );
    assert_eq!(f.deadline(), Some(valid_until));
}

#[test]
fn idle_stays_idle_on_a_follower_or_an_expired_leader_event() {
    let now = Instant::now();
    let mut f = Follower::new(false);
    assert_eq!(f.handle(follower(3, None), now), []);
    assert_eq!(
        f.handle(leader(3, now), now),
        [],
        "valid_for already ran out"
    );
    let without_validity = Event::State(state(Role::Leader, 3, None));
    assert_eq!(f.handle(without_validity, now), []);
    assert_eq!(f.state(), &State::Idle);
    assert_eq!(f.deadline(), None);
}

#[test]
fn idle_ignores_deadlines_and_work_ends() {
    let now = Instant::now();
    let mut f = Follower::new(false);
    assert_eq!(f.handle(Event::DeadlineReached, now), []);
    assert_eq!(f.handle(Event::WorkEnded, now), []);
    assert_eq!(f.state(), &State::Idle);
}

#[test]
fn idle_follows_on_after_a_broken_stream() {
    let now = Instant::now();
    let mut f = Follower::new(false);
    assert_eq!(f.handle(Event::StreamLost(Loss::Broken), now), []);
    assert_eq!(f.state(), &State::Idle);
}

#[test]
fn idle_exits_on_an_unknown_election_or_the_end_of_the_stream() {
    let now = Instant::now();
    for (loss, exit) in [
        (Loss::ElectionUnknown, Exit::ElectionUnknown),
        (Loss::Ended, Exit::StreamEnded),
    ] {
        let mut f = Follower::new(true);
        assert_eq!(f.handle(Event::StreamLost(loss), now), [Action::Exit(exit)]);
        assert_eq!(f.state(), &State::Exited);
    }
}

#[test]
fn idle_shutdown_declares_not_ready_then_exits() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    let not_ready = Action::DeclareReady {
        ready: Some(false),
        by: None,
    };
    let actions = f.handle(Event::Shutdown, now);
    assert_eq!(actions, [not_ready, Action::Exit(Exit::Shutdown)]);
    // Without a readiness source there is nothing to declare.
    let mut f = Follower::new(false);
    assert_eq!(
        f.handle(Event::Shutdown, now),
        [Action::Exit(Exit::Shutdown)]
    );
}

#[test]
fn readiness_is_declared_with_the_first_state_of_each_stream() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    let current = || Action::DeclareReady {
        ready: None,
        by: None,
    };
    assert_eq!(f.handle(follower(1, None), now), [current()]);
    assert_eq!(f.handle(follower(1, None), now), [], "once per stream");
    f.handle(Event::StreamLost(Loss::Broken), now);
    assert_eq!(f.handle(follower(1, None), now), [current()]);
    // A worker with no readiness source declares nothing.
    let mut f = Follower::new(false);
    assert_eq!(f.handle(follower(1, None), now), []);
}

#[test]
fn a_readiness_change_is_declared_within_the_running_validity() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    let declare = |ready, by| Action::DeclareReady {
        ready: Some(ready),
        by,
    };
    assert_eq!(
        f.handle(Event::Readiness(Some(true)), now),
        [declare(true, None)]
    );
    f.handle(leader(2, now + 10 * SEC), now);
    let actions = f.handle(Event::Readiness(Some(false)), now);
    assert_eq!(actions, [declare(false, Some(now + 10 * SEC))]);
}

#[test]
fn a_closed_readiness_source_ends_all_declarations() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    assert_eq!(f.handle(Event::Readiness(None), now), []);
    assert_eq!(
        f.handle(follower(1, None), now),
        [],
        "no declaration on a new stream"
    );
    assert_eq!(
        f.handle(Event::Shutdown, now),
        [Action::Exit(Exit::Shutdown)]
    );
}

#[test]
fn working_a_leader_event_of_the_term_moves_the_validity_on() {
    let now = Instant::now();
    let mut f = working(3, now);
    assert_eq!(f.handle(leader(3, now + 20 * SEC), now + 5 * SEC), []);
    let valid_until = now + 20 * SEC;
    assert_eq!(
        f.state(),
        &State::Working {
            term: 3,
            valid_until
        }
    );
    // Not before the new validity runs out.
    assert_eq!(f.handle(Event::DeadlineReached, now + 10 * SEC), []);
    assert_eq!(
        f.state(),
        &State::Working {
            term: 3,
            valid_until
        }
    );
}

#[test]
fn working_stops_abruptly_when_the_validity_runs_out() {
    let now = Instant::now();
    let mut f = working(3, now);
    assert_eq!(
        f.handle(Event::DeadlineReached, now + 9 * SEC),
        [],
        "too early"
    );
    let actions = f.handle(Event::DeadlineReached, now + 10 * SEC);
    assert_eq!(actions, [cancel(Ending::Abrupt, Why::ValidityRanOut)]);
    let stopping = State::Stopping {
        term: 3,
        hold: None,
        then: Then::Follow,
    };
    assert_eq!(f.state(), &stopping);
    assert_eq!(f.deadline(), None, "an abrupt stop reads no stream");
}

#[test]
fn working_a_step_down_of_the_term_that_still_holds_is_a_hand_over() {
    let now = Instant::now();
    let f = handing_over(3, now);
    let stopping = State::Stopping {
        term: 3,
        hold: Some(now + 5 * SEC),
        then: Then::Follow,
    };
    assert_eq!(f.state(), &stopping);
    assert_eq!(f.deadline(), Some(now + 5 * SEC));
}

#[test]
fn working_any_other_step_down_is_abrupt() {
    let now = Instant::now();
    for event in [
        follower(4, Some(now + 5 * SEC)), // another term
        follower(3, None),                // no hold
        follower(3, Some(now)),           // a hold already over
    ] {
        let mut f = working(3, now);
        let actions = f.handle(event.clone(), now);
        assert_eq!(
            actions,
            [cancel(Ending::Abrupt, not_leading())],
            "{event:?}"
        );
        assert_eq!(f.deadline(), None);
    }
}

#[test]
fn working_a_new_term_stops_the_old_work_then_starts_the_new() {
    let now = Instant::now();
    let mut f = working(3, now);
    let actions = f.handle(leader(4, now + 15 * SEC), now);
    assert_eq!(actions, [cancel(Ending::Abrupt, Why::NewTerm)]);
    let actions = f.handle(Event::WorkEnded, now + SEC);
    assert_eq!(
        actions,
        [Action::Acknowledge { term: 3 }, Action::Start { term: 4 }]
    );
    let valid_until = now + 15 * SEC;
    assert_eq!(
        f.state(),
        &State::Working {
            term: 4,
            valid_until
        }
    );
}

#[test]
fn working_a_leader_event_of_a_stopped_term_resigns_and_keeps_working() {
    let now = Instant::now();
    let mut f = stopping_abruptly(3, now);
    f.handle(Event::WorkEnded, now + 10 * SEC);
    f.handle(leader(5, now + 30 * SEC), now + 11 * SEC);
    // A late event of the stopped term 3 must not stop the work of term 5.
    let actions = f.handle(leader(3, now + 30 * SEC), now + 12 * SEC);
    assert_eq!(actions, [Action::Resign { term: 3 }]);
    let valid_until = now + 30 * SEC;
    assert_eq!(
        f.state(),
        &State::Working {
            term: 5,
            valid_until
        }
    );
}

#[test]
fn working_a_lost_stream_stops_abruptly() {
    let now = Instant::now();
    for (loss, why, then) in [
        (Loss::Broken, Why::StreamLost, Then::Follow),
        (
            Loss::ElectionUnknown,
            Why::ElectionUnknown,
            Then::Exit(Exit::ElectionUnknown),
        ),
        (Loss::Ended, Why::StreamEnded, Then::Exit(Exit::StreamEnded)),
    ] {
        let mut f = working(3, now);
        let actions = f.handle(Event::StreamLost(loss), now);
        assert_eq!(actions, [cancel(Ending::Abrupt, why)]);
        let hold = None;
        assert_eq!(
            f.state(),
            &State::Stopping {
                term: 3,
                hold,
                then
            }
        );
    }
}

#[test]
fn working_work_that_returns_is_acknowledged_and_its_term_resigned() {
    let now = Instant::now();
    let mut f = working(3, now);
    let actions = f.handle(Event::WorkEnded, now);
    assert_eq!(
        actions,
        [Action::Acknowledge { term: 3 }, Action::Resign { term: 3 }]
    );
    assert_eq!(f.state(), &State::Idle);
    // The daemon still leads term 3: never again this term, and only one resignation.
    assert_eq!(f.handle(leader(3, now + 20 * SEC), now + SEC), []);
    assert_eq!(f.state(), &State::Idle);
    // A new term starts.
    let actions = f.handle(leader(4, now + 20 * SEC), now + 2 * SEC);
    assert_eq!(actions, [Action::Start { term: 4 }]);
}

#[test]
fn working_shutdown_hands_over_within_the_validity_then_exits() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    f.handle(leader(3, now + 10 * SEC), now);
    let actions = f.handle(Event::Shutdown, now + SEC);
    assert_eq!(actions, [cancel(Ending::HandOver, Why::ShuttingDown)]);
    assert_eq!(f.deadline(), Some(now + 10 * SEC));
    let actions = f.handle(Event::WorkEnded, now + 2 * SEC);
    let not_ready = Action::DeclareReady {
        ready: Some(false),
        by: None,
    };
    let exit = Action::Exit(Exit::Shutdown);
    assert_eq!(actions, [Action::Acknowledge { term: 3 }, not_ready, exit]);
    assert_eq!(f.state(), &State::Exited);
}

#[test]
fn a_hand_over_lasts_as_long_as_events_of_the_term_hold_it() {
    let now = Instant::now();
    let mut f = handing_over(3, now);
    assert_eq!(
        f.handle(follower(3, Some(now + 8 * SEC)), now + 4 * SEC),
        []
    );
    assert_eq!(f.deadline(), Some(now + 8 * SEC));
    assert_eq!(
        f.handle(Event::DeadlineReached, now + 5 * SEC),
        [],
        "the old hold"
    );
    assert!(f.is_stopping());
}

#[test]
fn a_hand_over_turns_abrupt_when_the_hold_runs_out() {
    let now = Instant::now();
    let mut f = handing_over(3, now);
    assert_eq!(
        f.handle(Event::DeadlineReached, now + 4 * SEC),
        [],
        "too early"
    );
    let actions = f.handle(Event::DeadlineReached, now + 5 * SEC);
    assert_eq!(actions, [cancel(Ending::Abrupt, Why::HoldRanOut)]);
    let stopping = State::Stopping {
        term: 3,
        hold: None,
        then: Then::Follow,
    };
    assert_eq!(f.state(), &stopping);
    // Abrupt now: no more hold to read events or wait for.
    assert_eq!(
        f.handle(follower(3, Some(now + 9 * SEC)), now + 6 * SEC),
        []
    );
    assert_eq!(f.deadline(), None);
}

#[test]
fn a_hand_over_turns_abrupt_when_the_daemon_no_longer_holds_the_term() {
    let now = Instant::now();
    for event in [
        follower(4, Some(now + 9 * SEC)),
        follower(3, None),
        leader(4, now + 9 * SEC),
        Event::StreamLost(Loss::Broken),
        Event::StreamLost(Loss::Ended),
    ] {
        let mut f = handing_over(3, now);
        let actions = f.handle(event.clone(), now + SEC);
        assert_eq!(
            actions,
            [cancel(Ending::Abrupt, Why::NoLongerHeld)],
            "{event:?}"
        );
        assert_eq!(f.deadline(), None, "{event:?}");
    }
}

#[test]
fn an_abrupt_stop_waits_for_the_work_whatever_else_happens() {
    let now = Instant::now();
    let mut f = stopping_abruptly(3, now);
    let before = f.state().clone();
    for event in [
        leader(3, now + 30 * SEC),
        Event::StreamLost(Loss::Broken),
        Event::DeadlineReached,
    ] {
        assert_eq!(f.handle(event, now + 11 * SEC), []);
        assert_eq!(f.state(), &before);
    }
}

#[test]
fn a_term_confirmed_stopped_is_never_restarted() {
    let now = Instant::now();
    let mut f = stopping_abruptly(3, now);
    let actions = f.handle(Event::WorkEnded, now + 10 * SEC);
    assert_eq!(actions, [Action::Acknowledge { term: 3 }]);
    assert_eq!(f.state(), &State::Idle);
    // The daemon (paused, then back) still reports term 3: resign once, never start.
    let actions = f.handle(leader(3, now + 40 * SEC), now + 20 * SEC);
    assert_eq!(actions, [Action::Resign { term: 3 }]);
    assert_eq!(f.handle(leader(3, now + 40 * SEC), now + 21 * SEC), []);
    assert_eq!(f.state(), &State::Idle);
}

#[test]
fn a_hand_over_that_ends_is_acknowledged_and_follows_on() {
    let now = Instant::now();
    let mut f = handing_over(3, now);
    let actions = f.handle(Event::WorkEnded, now + SEC);
    assert_eq!(actions, [Action::Acknowledge { term: 3 }]);
    assert_eq!(f.state(), &State::Idle);
    assert_eq!(f.deadline(), None);
}

#[test]
fn shutdown_during_a_stop_ends_the_run_after_it() {
    let now = Instant::now();
    let mut f = working(3, now);
    f.handle(leader(4, now + 10 * SEC), now);
    assert_eq!(f.handle(Event::Shutdown, now), []);
    let actions = f.handle(Event::WorkEnded, now);
    let exit = Action::Exit(Exit::Shutdown);
    assert_eq!(
        actions,
        [Action::Acknowledge { term: 3 }, exit],
        "term 4 never starts"
    );
}

#[test]
fn readiness_during_a_stop_is_declared_with_no_validity() {
    let now = Instant::now();
    let mut f = handing_over(3, now);
    let actions = f.handle(Event::Readiness(Some(true)), now);
    let declare = Action::DeclareReady {
        ready: Some(true),
        by: None,
    };
    assert_eq!(actions, [declare]);
    assert!(f.is_stopping());
}

#[test]
fn after_the_run_nothing_happens() {
    let now = Instant::now();
    let mut f = Follower::new(true);
    f.handle(Event::Shutdown, now);
    for event in [
        leader(3, now + 10 * SEC),
        Event::StreamLost(Loss::Broken),
        Event::DeadlineReached,
        Event::WorkEnded,
        Event::Shutdown,
        Event::Readiness(Some(true)),
    ] {
        assert_eq!(f.handle(event, now), []);
        assert_eq!(f.state(), &State::Exited);
    }
}
