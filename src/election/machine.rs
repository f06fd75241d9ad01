//! The role logic of one election as a pure state machine: events in, commands out, no I/O and
//! no clock of its own (every call takes `now`), so that it is tested with plain `#[test]`s. The
//! runtime (`super::runtime`) does the store calls it asks for and feeds their outcomes back.
//!
//! ```text
//!              Observed                    Acquired
//!   Unknown ─────────────► Follower ──────────────────► Leader ──┐ Renewed (stay)
//!     ▲  ▲  StoreFailed      │  ▲                          │  ▲   │
//!     │  └───────────────────┘  │ Released                 │  └───┘
//!     │                         │ (after drain)            │ Resign / Shutdown / not ready
//!     │ renew deadline passed   │                          ▼
//!     └─────────────────────────┼──────────────────── SteppingDown ── Drained or drain
//!                               └───────────────────────  (workers told,     timeout: Release
//!                                                          still renewing)
//! ```
//!
//! The safety rules live here and nowhere else: a leader's validity is `min(store valid_until,
//! last proof + renew deadline)`, so it steps down before the lease could expire; renewals are
//! due a retry period after the last proof; the loss is announced before the release, which
//! waits for the workers' acknowledgements, bounded by the drain timeout.

use std::{fmt, time::Duration};

use tokio::time::Instant;

use crate::{
    store::{ErrorKind, Holding, Observation},
    timing::Timing,
};

/// This replica's role in one election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The store cannot tell (starting, unreachable, refusing).
    Unknown,
    /// Another replica leads, or nobody does.
    Follower,
    /// This replica leads.
    Leader,
}

/// Why the replica is in its role, for people and for `baton status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// This replica holds the election.
    Leading,
    /// The daemon has not heard from the store yet.
    Starting,
    /// Another replica holds the election.
    OtherLeads,
    /// The store names this replica's identity, from a holding this process cannot prove (an
    /// earlier process, or a holding given up after a stall): it must expire first.
    OwnHoldingExpiring,
    /// Nobody holds the election.
    NobodyLeads,
    /// The store failed or refused; the daemon retries with back-off.
    StoreUnavailable(String),
    /// A leader could not renew within the renew deadline and stepped down.
    RenewDeadlinePassed,
    /// The store showed the holding gone.
    Lost(String),
    /// Workers were told to stop; the release waits for their acknowledgement.
    SteppingDown,
    /// With `--campaign when-ready`: no subscribed worker has declared itself ready.
    WaitingForReadyWorker,
    /// With `--balance`: another member of the group should lead this election.
    StandingBy,
    /// After a resign, this replica lets another take over before campaigning again.
    HoldingOff,
    /// The daemon is shutting down.
    ShuttingDown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Leading => Ok(()),
            Reason::Starting => f.write_str("starting: waiting for the store"),
            Reason::OtherLeads => f.write_str("another replica leads"),
            Reason::OwnHoldingExpiring => f.write_str(
                "the store still names this replica from an earlier holding; waiting for it to expire",
            ),
            Reason::NobodyLeads => f.write_str("nobody leads"),
            Reason::StoreUnavailable(e) => write!(f, "store unavailable: {e}"),
            Reason::RenewDeadlinePassed => {
                f.write_str("could not renew within the renew deadline; stepped down")
            }
            Reason::Lost(e) => write!(f, "{e}"),
            Reason::SteppingDown => f.write_str("stepping down: waiting for workers to stop"),
            Reason::WaitingForReadyWorker => {
                f.write_str("not campaigning: no subscribed worker is ready")
            }
            Reason::StandingBy => f.write_str("standing by: balancing gives it to another member"),
            Reason::HoldingOff => f.write_str("resigned: letting another replica take over"),
            Reason::ShuttingDown => f.write_str("shutting down"),
        }
    }
}

/// What the machine publishes: the state of the election as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// This replica's role.
    pub role: Role,
    /// The leader's identity, `None` when nobody leads or it is unknown.
    pub leader: Option<String>,
    /// The term of the current holding; while nobody leads, the store is unknown or the
    /// election stopped, the last term known (0 only before any is known).
    pub term: u64,
    /// Leader: until when this replica certainly leads. Stepping down: until when it keeps the
    /// holding for its workers to finish. Otherwise none.
    pub valid_until: Option<Instant>,
    /// Why the replica is in this role.
    pub reason: Reason,
    /// Whether this replica campaigns.
    pub campaigning: bool,
}

/// The phase of the election. Variant docs name their transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Nothing known: starting, or the store failed. `term` is the last one known.
    /// -> Follower on `Observed`, -> Leader on `Acquired`.
    Unknown { reason: Reason, term: u64 },
    /// Another replica or nobody holds the election.
    /// -> Leader on `Acquired`, -> Unknown on `StoreFailed`.
    Follower { leader: Option<String>, term: u64 },
    /// This replica holds the election, proven at `renewed_at`.
    /// -> SteppingDown on `Resign`, `Shutdown` or readiness lost; -> Unknown when the renew
    /// deadline passes; -> Follower on a lost holding.
    Leader { tenure: Tenure },
    /// Workers were told the leadership ended; the holding is kept alive until they confirm.
    /// -> Follower (or Stopped when exiting) on `Drained` or at `drain_until`, with a release.
    SteppingDown {
        tenure: Tenure,
        drain_until: Instant,
        successor: Option<String>,
        exit: bool,
    },
    /// The daemon stopped this election; `term` is the last one known. Final.
    Stopped { term: u64 },
}

/// A holding and its proof: the term, when it was last renewed, until when the store grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tenure {
    term: u64,
    /// When the last successful renewal was sent.
    renewed_at: Instant,
    /// Until when the store said we hold it.
    store_valid_until: Instant,
}

impl Tenure {
    /// Until when this replica certainly leads: the store's word, cut short by the renew
    /// deadline so that we step down before the lease could expire.
    fn valid_until(&self, timing: &Timing) -> Instant {
        self.store_valid_until
            .min(self.renewed_at + timing.renew_deadline)
    }

    /// When the next renewal is due: a retry period after the last proof of the holding.
    fn renew_at(&self, timing: &Timing) -> Instant {
        self.renewed_at + timing.retry_period
    }
}

/// An input to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The store showed who holds the election.
    Observed(Observation),
    /// This replica won the election.
    Acquired(Holding),
    /// A renewal sent at `sent_at` succeeded; the store holds it until `valid_until`.
    Renewed {
        /// When the renewal request was sent (the conservative start of the new lease).
        sent_at: Instant,
        /// The store's word.
        valid_until: Instant,
    },
    /// A store call failed.
    StoreFailed {
        /// How to react.
        kind: ErrorKind,
        /// The error, for the published reason.
        reason: String,
    },
    /// Step down now, optionally for a named successor.
    Resign {
        /// Who should take over.
        successor: Option<String>,
    },
    /// The daemon is stopping.
    Shutdown,
    /// Whether campaigning is allowed, and if not, why.
    Gate(Gate),
    /// Every worker told about the current term has confirmed it stopped.
    Drained,
}

/// Whether the replica may campaign ([`Event::Gate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// It may.
    Open,
    /// With `--campaign when-ready`: not until a worker is ready.
    NoReadyWorker,
    /// With `--balance`: another member of the group should lead this election.
    StandingBy,
}

/// What the machine asks the runtime to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Release the holding in the store, optionally for a successor.
    Release {
        /// Who should take over.
        successor: Option<String>,
    },
    /// The holding ended without a release (lost, or not provable): drop the seat without
    /// releasing (the holding ends the store's own way, as after a crash) and join again, so the
    /// next holding gets a fresh term.
    Abandon,
}

/// What the runtime should be doing with the store right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Campaign: call `acquire`.
    Campaign,
    /// Only watch the holder: call `observe`.
    Observe,
    /// Keep the holding alive: call `keep` every retry period.
    Renew,
    /// Nothing: the election is stopped.
    Stop,
}

/// The role state machine of one election.
#[derive(Debug, Clone)]
pub struct Machine {
    timing: Timing,
    drain_timeout: Duration,
    phase: Phase,
    gate: Gate,
    /// After a resign: do not campaign before this, unless another replica takes over.
    hold_off_until: Option<Instant>,
}

impl Machine {
    /// A machine that knows nothing yet.
    pub fn new(timing: Timing, drain_timeout: Duration, gate: Gate) -> Self {
        Machine {
            timing,
            drain_timeout,
            phase: Phase::Unknown {
                reason: Reason::Starting,
                term: 0,
            },
            gate,
            hold_off_until: None,
        }
    }

    /// Feed one event; returns what the runtime must do before anything else.
    pub fn handle(&mut self, now: Instant, event: Event) -> Option<Command> {
        let command = match event {
            Event::Observed(seen) => self.observed(seen),
            Event::Acquired(holding) => self.acquired(now, holding),
            Event::Renewed {
                sent_at,
                valid_until,
            } => {
                if let Phase::Leader { tenure } | Phase::SteppingDown { tenure, .. } =
                    &mut self.phase
                {
                    tenure.renewed_at = tenure.renewed_at.max(sent_at);
                    tenure.store_valid_until = valid_until;
                }
                None
            }
            Event::StoreFailed { kind, reason } => self.store_failed(kind, reason),
            Event::Resign { successor } => {
                self.hold_off_until = Some(now + self.timing.lease_duration);
                self.step_down(now, successor, false)
            }
            Event::Shutdown => self.step_down(now, None, true),
            Event::Gate(gate) => {
                self.gate = gate;
                // A worker no longer ready ends the holding; standing by only stops campaigns
                // (balancing ends a holding by a resign to a named successor).
                if gate == Gate::NoReadyWorker {
                    self.step_down(now, None, false)
                } else {
                    None
                }
            }
            Event::Drained => self.finish_stepping_down(),
        };
        command.or_else(|| self.tick(now))
    }

    /// Act on deadlines that passed by `now`.
    pub fn tick(&mut self, now: Instant) -> Option<Command> {
        if self.hold_off_until.is_some_and(|t| t <= now) {
            self.hold_off_until = None;
        }
        match &self.phase {
            Phase::Leader { tenure } if tenure.valid_until(&self.timing) <= now => {
                self.phase = Phase::Unknown {
                    reason: Reason::RenewDeadlinePassed,
                    term: tenure.term,
                };
                Some(Command::Abandon)
            }
            Phase::SteppingDown {
                tenure,
                drain_until,
                ..
            } if *drain_until <= now || tenure.valid_until(&self.timing) <= now => {
                self.finish_stepping_down()
            }
            _ => None,
        }
    }

    /// The next instant at which [`Machine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Leader { tenure } => Some(tenure.valid_until(&self.timing)),
            Phase::SteppingDown {
                tenure,
                drain_until,
                ..
            } => Some((*drain_until).min(tenure.valid_until(&self.timing))),
            _ => None,
        };
        phase.into_iter().chain(self.hold_off_until).min()
    }

    /// What the runtime should do with the store now.
    pub fn activity(&self) -> Activity {
        match &self.phase {
            Phase::Stopped { .. } => Activity::Stop,
            Phase::Leader { .. } | Phase::SteppingDown { .. } => Activity::Renew,
            Phase::Unknown { .. } | Phase::Follower { .. } => {
                if self.gate == Gate::Open && self.hold_off_until.is_none() {
                    Activity::Campaign
                } else {
                    Activity::Observe
                }
            }
        }
    }

    /// When the runtime should next renew the holding (leading or stepping down). Renewals are
    /// timed from the store's proof of the holding, not from our reading of the answer.
    pub fn next_renewal(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Leader { tenure } | Phase::SteppingDown { tenure, .. } => {
                Some(tenure.renew_at(&self.timing))
            }
            _ => None,
        }
    }

    /// The term this replica holds (leading or stepping down).
    pub fn held_term(&self) -> Option<u64> {
        match &self.phase {
            Phase::Leader { tenure } | Phase::SteppingDown { tenure, .. } => Some(tenure.term),
            _ => None,
        }
    }

    /// The term of the current phase: the holding's, the observed one, or the last known.
    fn term(&self) -> u64 {
        match &self.phase {
            Phase::Unknown { term, .. }
            | Phase::Follower { term, .. }
            | Phase::Stopped { term } => *term,
            Phase::Leader { tenure } | Phase::SteppingDown { tenure, .. } => tenure.term,
        }
    }

    /// Whether this replica is stepping down and waiting for its workers.
    pub fn draining(&self) -> bool {
        matches!(self.phase, Phase::SteppingDown { .. })
    }

    /// The state to publish. `identity` is this replica's, used when it holds the election.
    pub fn view(&self, identity: &str) -> View {
        let campaigning =
            self.activity() == Activity::Campaign || matches!(self.phase, Phase::Leader { .. });
        let (role, leader, term, valid_until, reason) = match &self.phase {
            Phase::Unknown { reason, term } => (Role::Unknown, None, *term, None, reason.clone()),
            Phase::Follower { leader, term } => {
                let reason = if leader.as_deref() == Some(identity) {
                    Reason::OwnHoldingExpiring
                } else if leader.is_some() {
                    Reason::OtherLeads
                } else if self.hold_off_until.is_some() {
                    Reason::HoldingOff
                } else if self.gate == Gate::NoReadyWorker {
                    Reason::WaitingForReadyWorker
                } else if self.gate == Gate::StandingBy {
                    Reason::StandingBy
                } else {
                    Reason::NobodyLeads
                };
                (Role::Follower, leader.clone(), *term, None, reason)
            }
            Phase::Leader { tenure } => (
                Role::Leader,
                Some(identity.to_owned()),
                tenure.term,
                Some(tenure.valid_until(&self.timing)),
                Reason::Leading,
            ),
            Phase::SteppingDown {
                tenure,
                drain_until,
                ..
            } => (
                Role::Follower,
                Some(identity.to_owned()),
                tenure.term,
                // How long the holding is kept for the workers to finish: their hand-over ends
                // there at the latest.
                Some(tenure.valid_until(&self.timing).min(*drain_until)),
                Reason::SteppingDown,
            ),
            Phase::Stopped { term } => (Role::Follower, None, *term, None, Reason::ShuttingDown),
        };
        View {
            role,
            leader,
            term,
            valid_until,
            reason,
            campaigning,
        }
    }

    fn observed(&mut self, seen: Observation) -> Option<Command> {
        match &self.phase {
            Phase::Unknown { .. } | Phase::Follower { .. } => {
                if seen.holder.is_some() {
                    // Someone took over: the hold-off after our resign has done its job.
                    self.hold_off_until = None;
                }
                // A record that names no holder may carry no term either (none written yet, or
                // deleted): the last term known still stands.
                let term = match seen.holder {
                    Some(_) => seen.term,
                    None => seen.term.max(self.term()),
                };
                self.phase = Phase::Follower {
                    leader: seen.holder,
                    term,
                };
                None
            }
            // A holder never observes itself away; only `keep` can say it lost.
            _ => None,
        }
    }

    fn acquired(&mut self, now: Instant, holding: Holding) -> Option<Command> {
        match &self.phase {
            Phase::Unknown { .. } | Phase::Follower { .. } => {
                // Every store grants `lease_duration` from the moment of its proof: that moment,
                // not our reading of the answer, starts the renew deadline.
                let proven_at = holding
                    .valid_until
                    .checked_sub(self.timing.lease_duration)
                    .map_or(now, |t| t.min(now));
                self.phase = Phase::Leader {
                    tenure: Tenure {
                        term: holding.term,
                        renewed_at: proven_at,
                        store_valid_until: holding.valid_until,
                    },
                };
                if self.gate == Gate::Open {
                    None
                } else {
                    // Readiness went away while the campaign was in flight.
                    self.step_down(now, None, false)
                }
            }
            // Only a campaigning machine is handed a holding; anything else is a stale answer.
            _ => None,
        }
    }

    fn store_failed(&mut self, kind: ErrorKind, reason: String) -> Option<Command> {
        match (&self.phase, kind) {
            (Phase::Leader { tenure }, ErrorKind::Lost) => {
                self.phase = Phase::Unknown {
                    reason: Reason::Lost(reason),
                    term: tenure.term,
                };
                Some(Command::Abandon)
            }
            // A leader keeps trying until its renew deadline; `tick` steps it down then.
            (Phase::Leader { .. }, _) => None,
            (Phase::SteppingDown { exit, tenure, .. }, ErrorKind::Lost) => {
                let term = tenure.term;
                self.phase = if *exit {
                    Phase::Stopped { term }
                } else {
                    Phase::Unknown {
                        reason: Reason::Lost(reason),
                        term,
                    }
                };
                Some(Command::Abandon)
            }
            (Phase::SteppingDown { .. }, _) => None,
            (Phase::Stopped { .. }, _) => None,
            (Phase::Unknown { .. } | Phase::Follower { .. }, _) => {
                self.phase = Phase::Unknown {
                    reason: Reason::StoreUnavailable(reason),
                    term: self.term(),
                };
                None
            }
        }
    }

    fn step_down(
        &mut self,
        now: Instant,
        successor: Option<String>,
        exit: bool,
    ) -> Option<Command> {
        match &mut self.phase {
            Phase::Leader { tenure } => {
                self.phase = Phase::SteppingDown {
                    tenure: *tenure,
                    drain_until: now + self.drain_timeout,
                    successor,
                    exit,
                };
                None
            }
            Phase::SteppingDown { exit: e, .. } => {
                *e |= exit;
                None
            }
            Phase::Unknown { .. } | Phase::Follower { .. } if exit => {
                self.phase = Phase::Stopped { term: self.term() };
                // Leave the election (an etcd candidate key, for one) on the way out.
                Some(Command::Release { successor: None })
            }
            _ => None,
        }
    }

    fn finish_stepping_down(&mut self) -> Option<Command> {
        let Phase::SteppingDown {
            tenure,
            successor,
            exit,
            ..
        } = &self.phase
        else {
            return None;
        };
        let command = Command::Release {
            successor: successor.clone(),
        };
        self.phase = if *exit {
            Phase::Stopped { term: tenure.term }
        } else {
            Phase::Follower {
                leader: None,
                term: tenure.term,
            }
        };
        Some(command)
    }
}

#[cfg(test)]
mod tests;
