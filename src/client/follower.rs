//! The worker's follower: a pure state machine deciding when a term's work starts and how it
//! stops. It carries safety invariant 3: the work stops when the daemon says so, when the stream
//! breaks, and when `valid_for` runs out with no new event. Events go in with the time they were
//! seen; actions come out. No I/O and no clock here: `driver.rs` performs the actions.

use std::fmt;

use tokio::time::Instant;

use super::{LeaderState, Role, lease::Ending};

/// What happened, as the driver saw it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Event {
    /// A state from the daemon: the current one on each new stream, then every change and
    /// heartbeat.
    State(LeaderState),
    /// The stream to the daemon is lost.
    StreamLost(Loss),
    /// The time [`Follower::deadline`] named was reached.
    DeadlineReached,
    /// The work of the current term returned, cancelled or by itself.
    WorkEnded,
    /// The worker stops for good (e.g. SIGTERM).
    Shutdown,
    /// The worker's readiness changed (`Some`), or its source closed (`None`).
    Readiness(Option<bool>),
}

/// How the stream was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loss {
    /// The stream broke; the watch reconnects.
    Broken,
    /// The daemon does not run the election (NOT_FOUND): nothing to follow.
    ElectionUnknown,
    /// The stream of events ended for good.
    Ended,
}

/// What the driver must do, in this order.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Action {
    /// Start the work of `term`.
    Start { term: u64 },
    /// Cancel the running work with `ending`, for reason `why`. An abrupt ending overrides a
    /// hand-over, never the reverse.
    Cancel { ending: Ending, why: Why },
    /// Confirm to the daemon that the work of `term` stopped.
    Acknowledge { term: u64 },
    /// Ask the daemon to step down from `term`, so that a new term begins.
    Resign { term: u64 },
    /// Declare this worker's readiness: `ready`, or when `None` what its readiness source says
    /// now. The call must not wait past `by`, the running term's validity.
    DeclareReady {
        ready: Option<bool>,
        by: Option<Instant>,
    },
    /// The run is over.
    Exit(Exit),
}

/// Why a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exit {
    /// The worker was shut down: `Ok`.
    Shutdown,
    /// The daemon does not run the election: the NOT_FOUND error.
    ElectionUnknown,
    /// The stream of events ended.
    StreamEnded,
}

/// Why work is cancelled (for the logs).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Why {
    /// The daemon no longer reports LEADER.
    NotLeading { role: Role, reason: String },
    /// A LEADER event of another term arrived.
    NewTerm,
    /// The term's validity ran out with no new event.
    ValidityRanOut,
    /// The stream broke.
    StreamLost,
    /// The daemon does not run the election.
    ElectionUnknown,
    /// The stream of events ended.
    StreamEnded,
    /// The worker is shutting down.
    ShuttingDown,
    /// A hand-over turned abrupt: the daemon's hold for it ran out.
    HoldRanOut,
    /// A hand-over turned abrupt: the daemon no longer holds the term (or was lost).
    NoLongerHeld,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Why::NotLeading { role, reason } => write!(f, "daemon reports {role:?}: {reason}"),
            Why::NewTerm => f.write_str("a new term began"),
            Why::ValidityRanOut => f.write_str("valid_for ran out with no new event"),
            Why::StreamLost => f.write_str("stream to the daemon lost"),
            Why::ElectionUnknown => f.write_str("election unknown to the daemon"),
            Why::StreamEnded => f.write_str("stream ended"),
            Why::ShuttingDown => f.write_str("the worker is shutting down"),
            Why::HoldRanOut => f.write_str("the daemon's hold for the hand-over ran out"),
            Why::NoLongerHeld => f.write_str("the daemon no longer holds the term"),
        }
    }
}

/// Where the follower is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum State {
    /// No work runs.
    /// -> `Working` on a LEADER event of a term not yet stopped (a stopped term: resign instead);
    /// -> `Exited` on shutdown, an unknown election or the end of the stream.
    Idle,
    /// The work of `term` runs; the daemon certainly leads until `valid_until`.
    /// -> `Working` with a later `valid_until` on a LEADER event of the same term;
    /// -> `Stopping` (hand-over) on a step-down event of this term that still holds, or shutdown;
    /// -> `Stopping` (abrupt) on any other non-LEADER event, a LEADER event of a new term, the
    ///    stream lost, or `valid_until` reached;
    /// -> `Idle` when the work returns by itself (acknowledge, then resign).
    Working { term: u64, valid_until: Instant },
    /// The work of `term` was cancelled and has not returned. `hold`: in a hand-over, until when
    /// the daemon keeps the holding for it; `None` once abrupt.
    /// -> `Stopping` with a later `hold` on an event of this term with a validity;
    /// -> `Stopping` (abrupt) when `hold` is reached or on any other event, or the stream lost;
    /// -> `then` when the work returns (acknowledged first).
    Stopping {
        term: u64,
        hold: Option<Instant>,
        then: Then,
    },
    /// The run is over; nothing more happens.
    Exited,
}

/// Where a stop leads once the work returned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Then {
    /// Follow on, working again on a new term.
    Follow,
    /// Start the new `term` at once (it leads until `valid_until`).
    Start { term: u64, valid_until: Instant },
    /// End the run.
    Exit(Exit),
}

/// The follower of one worker.
#[derive(Debug)]
pub(super) struct Follower {
    state: State,
    /// The last term whose work stopped (and was confirmed so). A term is never started again
    /// after that: the daemon already counts this worker as stopped for it.
    stopped: u64,
    /// The last term this worker asked to resign from.
    resigned: u64,
    /// No state has arrived on the current stream yet: declare readiness with the first, once
    /// the stream is registered (a declaration made before would be lost).
    fresh_stream: bool,
    /// The worker declares its readiness (it has a readiness source that is still open).
    declares_readiness: bool,
}

impl Follower {
    /// A follower with no work running; `declares_readiness` when the worker has a readiness
    /// source.
    pub(super) fn new(declares_readiness: bool) -> Self {
        Follower {
            state: State::Idle,
            stopped: 0,
            resigned: 0,
            fresh_stream: true,
            declares_readiness,
        }
    }

    /// Where it is.
    #[cfg(test)]
    pub(super) fn state(&self) -> &State {
        &self.state
    }

    /// When to send [`Event::DeadlineReached`]: the running term's validity, or the daemon's
    /// hold for a hand-over under way.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Working { valid_until, .. } => Some(valid_until),
            State::Stopping { hold, .. } => hold,
            State::Idle | State::Exited => None,
        }
    }

    /// Whether a stop is under way: the driver then waits for the work and, during a hand-over
    /// (a [`Follower::deadline`]), reads the stream to learn whether the hold lasts. Events so
    /// read are kept and given again once the stop is over; shutdown and readiness wait.
    pub(super) fn is_stopping(&self) -> bool {
        matches!(self.state, State::Stopping { .. })
    }

    /// Take in `event`, seen at `now`; the actions to perform, in order.
    pub(super) fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.state.clone() {
            State::Exited => {}
            State::Stopping { term, hold, then } => {
                self.stopping(event, now, term, hold, then, &mut actions)
            }
            State::Idle | State::Working { .. } => self.following(event, now, &mut actions),
        }
        actions
    }

    /// Idle or working.
    fn following(&mut self, event: Event, now: Instant, actions: &mut Vec<Action>) {
        match event {
            Event::State(state) => {
                if std::mem::take(&mut self.fresh_stream) && self.declares_readiness {
                    actions.push(self.declare(None));
                }
                self.on_state(state, now, actions);
            }
            Event::StreamLost(loss) => {
                self.fresh_stream = true;
                let (why, then) = match loss {
                    Loss::Broken => (Why::StreamLost, Then::Follow),
                    Loss::ElectionUnknown => {
                        (Why::ElectionUnknown, Then::Exit(Exit::ElectionUnknown))
                    }
                    Loss::Ended => (Why::StreamEnded, Then::Exit(Exit::StreamEnded)),
                };
                self.stop(Ending::Abrupt, why, None, then, actions);
            }
            Event::DeadlineReached => {
                if self.deadline().is_some_and(|deadline| now >= deadline) {
                    self.stop(
                        Ending::Abrupt,
                        Why::ValidityRanOut,
                        None,
                        Then::Follow,
                        actions,
                    );
                }
            }
            Event::WorkEnded => {
                if let State::Working { term, .. } = self.state {
                    // The work returned while leading: give the term up for a new one.
                    self.stopped = self.stopped.max(term);
                    actions.push(Action::Acknowledge { term });
                    self.resign(term, actions);
                    self.state = State::Idle;
                }
            }
            Event::Shutdown => {
                // The daemon still leads: the term's validity bounds the hand-over.
                let hold = self.deadline();
                let then = Then::Exit(Exit::Shutdown);
                self.stop(Ending::HandOver, Why::ShuttingDown, hold, then, actions);
            }
            Event::Readiness(ready) => self.on_readiness(ready, actions),
        }
    }

    /// A state from the daemon, while idle or working.
    fn on_state(&mut self, state: LeaderState, now: Instant, actions: &mut Vec<Action>) {
        let running = match self.state {
            State::Working { term, .. } => Some(term),
            _ => None,
        };
        if !state.leads_at(now) {
            // Stepping down, the daemon keeps this term's holding for a while (the event's
            // validity) for its workers to finish; anything else may be elsewhere already.
            let hold = state
                .valid_until
                .filter(|until| Some(state.term) == running && *until > now);
            let ending = if hold.is_some() {
                Ending::HandOver
            } else {
                Ending::Abrupt
            };
            let why = Why::NotLeading {
                role: state.role,
                reason: state.reason,
            };
            self.stop(ending, why, hold, Then::Follow, actions);
            return;
        }
        let valid_until = state.valid_until.unwrap_or(now);
        if running == Some(state.term) {
            self.state = State::Working {
                term: state.term,
                valid_until,
            };
        } else if state.term <= self.stopped {
            // This worker stopped in this term already (its validity ran out, or its work
            // returned). Starting again would work while the daemon counts it as stopped: ask
            // for a new term instead.
            self.resign(state.term, actions);
        } else if running.is_some() {
            let then = Then::Start {
                term: state.term,
                valid_until,
            };
            self.stop(Ending::Abrupt, Why::NewTerm, None, then, actions);
        } else {
            actions.push(Action::Start { term: state.term });
            self.state = State::Working {
                term: state.term,
                valid_until,
            };
        }
    }

    /// Cancel the running work with `ending`, or, with none running, go straight to `then`.
    fn stop(
        &mut self,
        ending: Ending,
        why: Why,
        hold: Option<Instant>,
        then: Then,
        actions: &mut Vec<Action>,
    ) {
        let State::Working { term, .. } = self.state else {
            self.then(then, actions);
            return;
        };
        let hold = hold.filter(|_| ending == Ending::HandOver);
        actions.push(Action::Cancel { ending, why });
        self.state = State::Stopping { term, hold, then };
    }

    /// While the work of `term` finishes.
    fn stopping(
        &mut self,
        event: Event,
        now: Instant,
        term: u64,
        hold: Option<Instant>,
        then: Then,
        actions: &mut Vec<Action>,
    ) {
        let abrupt = match event {
            Event::WorkEnded => {
                self.stopped = self.stopped.max(term);
                actions.push(Action::Acknowledge { term });
                self.then(then, actions);
                return;
            }
            // Only a hand-over reads the stream, to learn whether the daemon still holds.
            Event::State(_) | Event::StreamLost(_) | Event::DeadlineReached if hold.is_none() => {
                return;
            }
            Event::State(state) => match state.valid_until {
                Some(until) if state.term == term => {
                    self.state = State::Stopping {
                        term,
                        hold: Some(until),
                        then,
                    };
                    return;
                }
                _ => Why::NoLongerHeld,
            },
            Event::StreamLost(_) => Why::NoLongerHeld,
            Event::DeadlineReached if hold.is_some_and(|hold| now >= hold) => Why::HoldRanOut,
            Event::DeadlineReached => return,
            Event::Shutdown => {
                if !matches!(then, Then::Exit(_)) {
                    let then = Then::Exit(Exit::Shutdown);
                    self.state = State::Stopping { term, hold, then };
                }
                return;
            }
            Event::Readiness(ready) => {
                self.on_readiness(ready, actions);
                return;
            }
        };
        actions.push(Action::Cancel {
            ending: Ending::Abrupt,
            why: abrupt,
        });
        self.state = State::Stopping {
            term,
            hold: None,
            then,
        };
    }

    /// Once no work runs: on to `then`.
    fn then(&mut self, then: Then, actions: &mut Vec<Action>) {
        self.state = match then {
            Then::Follow => State::Idle,
            Then::Start { term, valid_until } => {
                actions.push(Action::Start { term });
                State::Working { term, valid_until }
            }
            Then::Exit(exit) => {
                if exit == Exit::Shutdown && self.declares_readiness {
                    // Not ready any more, so a `--campaign when-ready` daemon hands over at once.
                    actions.push(Action::DeclareReady {
                        ready: Some(false),
                        by: None,
                    });
                }
                actions.push(Action::Exit(exit));
                State::Exited
            }
        };
    }

    fn on_readiness(&mut self, ready: Option<bool>, actions: &mut Vec<Action>) {
        match ready {
            Some(ready) => actions.push(self.declare(Some(ready))),
            None => self.declares_readiness = false,
        }
    }

    /// Declare `ready` (or the current readiness), never waiting past the running validity.
    fn declare(&self, ready: Option<bool>) -> Action {
        let by = match self.state {
            State::Working { valid_until, .. } => Some(valid_until),
            _ => None,
        };
        Action::DeclareReady { ready, by }
    }

    /// Resign from `term`, once.
    fn resign(&mut self, term: u64, actions: &mut Vec<Action>) {
        if self.resigned < term {
            self.resigned = term;
            actions.push(Action::Resign { term });
        }
    }
}

#[cfg(test)]
mod tests;
