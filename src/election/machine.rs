//! The role logic of one election as a pure state machine: events in, commands out, no I/O and
//! no clock of its own (every call takes `now`). The runtime in [`super::runtime`] does the store
//! calls the machine asks for and feeds their outcomes back.
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
//! The safety rules live here and nowhere else:
//! - a leader's validity is `min(store valid_until, last renewal + renew deadline)`, and the
//!   renew deadline is shorter than the lease, so it steps down before the store could give the
//!   election to another replica;
//! - stepping down is announced (role no longer LEADER) before the release is asked for, and the
//!   release waits for the workers' acknowledgements, bounded by the drain timeout.

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
    Leader { lease: Lease },
    /// Workers were told the leadership ended; the holding is kept alive until they confirm.
    /// -> Follower (or Stopped when exiting) on `Drained` or at `drain_until`, with a release.
    SteppingDown {
        lease: Lease,
        drain_until: Instant,
        successor: Option<String>,
        exit: bool,
    },
    /// The daemon stopped this election; `term` is the last one known. Final.
    Stopped { term: u64 },
}

/// A holding and its proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    term: u64,
    /// When the last successful renewal was sent.
    renewed_at: Instant,
    /// Until when the store said we hold it.
    store_valid_until: Instant,
}

impl Lease {
    /// Until when this replica certainly leads: the store's word, cut short by the renew
    /// deadline so that we step down before the lease could expire.
    fn valid_until(&self, timing: &Timing) -> Instant {
        self.store_valid_until
            .min(self.renewed_at + timing.renew_deadline)
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
    /// Whether campaigning is allowed (readiness gating).
    CampaignAllowed(bool),
    /// Every worker told about the current term has confirmed it stopped.
    Drained,
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
    campaign_allowed: bool,
    /// After a resign: do not campaign before this, unless another replica takes over.
    hold_off_until: Option<Instant>,
}

impl Machine {
    /// A machine that knows nothing yet.
    pub fn new(timing: Timing, drain_timeout: Duration, campaign_allowed: bool) -> Self {
        Machine {
            timing,
            drain_timeout,
            phase: Phase::Unknown {
                reason: Reason::Starting,
                term: 0,
            },
            campaign_allowed,
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
                if let Phase::Leader { lease } | Phase::SteppingDown { lease, .. } = &mut self.phase
                {
                    lease.renewed_at = lease.renewed_at.max(sent_at);
                    lease.store_valid_until = valid_until;
                }
                None
            }
            Event::StoreFailed { kind, reason } => self.store_failed(kind, reason),
            Event::Resign { successor } => {
                self.hold_off_until = Some(now + self.timing.lease_duration);
                self.step_down(now, successor, false)
            }
            Event::Shutdown => self.step_down(now, None, true),
            Event::CampaignAllowed(allowed) => {
                self.campaign_allowed = allowed;
                if allowed {
                    None
                } else {
                    self.step_down(now, None, false)
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
            Phase::Leader { lease } if lease.valid_until(&self.timing) <= now => {
                self.phase = Phase::Unknown {
                    reason: Reason::RenewDeadlinePassed,
                    term: lease.term,
                };
                Some(Command::Abandon)
            }
            Phase::SteppingDown {
                lease, drain_until, ..
            } if *drain_until <= now || lease.valid_until(&self.timing) <= now => {
                self.finish_stepping_down()
            }
            _ => None,
        }
    }

    /// The next instant at which [`Machine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let phase = match &self.phase {
            Phase::Leader { lease } => Some(lease.valid_until(&self.timing)),
            Phase::SteppingDown {
                lease, drain_until, ..
            } => Some((*drain_until).min(lease.valid_until(&self.timing))),
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
                if self.campaign_allowed && self.hold_off_until.is_none() {
                    Activity::Campaign
                } else {
                    Activity::Observe
                }
            }
        }
    }

    /// The term this replica holds (leading or stepping down).
    pub fn held_term(&self) -> Option<u64> {
        match &self.phase {
            Phase::Leader { lease } | Phase::SteppingDown { lease, .. } => Some(lease.term),
            _ => None,
        }
    }

    /// The term of the current phase: the holding's, the observed one, or the last known.
    fn term(&self) -> u64 {
        match &self.phase {
            Phase::Unknown { term, .. }
            | Phase::Follower { term, .. }
            | Phase::Stopped { term } => *term,
            Phase::Leader { lease } | Phase::SteppingDown { lease, .. } => lease.term,
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
                } else if !self.campaign_allowed {
                    Reason::WaitingForReadyWorker
                } else {
                    Reason::NobodyLeads
                };
                (Role::Follower, leader.clone(), *term, None, reason)
            }
            Phase::Leader { lease } => (
                Role::Leader,
                Some(identity.to_owned()),
                lease.term,
                Some(lease.valid_until(&self.timing)),
                Reason::Leading,
            ),
            Phase::SteppingDown {
                lease, drain_until, ..
            } => (
                Role::Follower,
                Some(identity.to_owned()),
                lease.term,
                // How long the holding is kept for the workers to finish: their hand-over ends
                // there at the latest.
                Some(lease.valid_until(&self.timing).min(*drain_until)),
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
                    lease: Lease {
                        term: holding.term,
                        renewed_at: proven_at,
                        store_valid_until: holding.valid_until,
                    },
                };
                if self.campaign_allowed {
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
            (Phase::Leader { lease }, ErrorKind::Lost) => {
                self.phase = Phase::Unknown {
                    reason: Reason::Lost(reason),
                    term: lease.term,
                };
                Some(Command::Abandon)
            }
            // A leader keeps trying until its renew deadline; `tick` steps it down then.
            (Phase::Leader { .. }, _) => None,
            (Phase::SteppingDown { exit, lease, .. }, ErrorKind::Lost) => {
                let term = lease.term;
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
            Phase::Leader { lease } => {
                self.phase = Phase::SteppingDown {
                    lease: *lease,
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
            lease,
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
            Phase::Stopped { term: lease.term }
        } else {
            Phase::Follower {
                leader: None,
                term: lease.term,
            }
        };
        Some(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    const DRAIN: Duration = Duration::from_secs(5);

    fn leader_at(now: Instant, term: u64) -> Machine {
        let mut m = Machine::new(timing(), DRAIN, true);
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

    #[test]
    fn starts_unknown_and_campaigns() {
        let m = Machine::new(timing(), DRAIN, true);
        let v = m.view("me");
        assert_eq!(v.role, Role::Unknown);
        assert_eq!(v.leader, None);
        assert_eq!(v.reason, Reason::Starting);
        assert_eq!(m.activity(), Activity::Campaign);
    }

    #[test]
    fn observation_makes_a_follower_naming_the_leader() {
        let now = Instant::now();
        let mut m = Machine::new(timing(), DRAIN, true);
        m.handle(
            now,
            Event::Observed(Observation {
                holder: Some("other".into()),
                term: 7,
            }),
        );
        let v = m.view("me");
        assert_eq!(v.role, Role::Follower);
        assert_eq!(v.leader.as_deref(), Some("other"));
        assert_eq!(v.term, 7);
        assert_eq!(v.valid_until, None);
    }

    #[test]
    fn a_release_seen_clears_the_leader_name() {
        let now = Instant::now();
        let mut m = Machine::new(timing(), DRAIN, true);
        m.handle(
            now,
            Event::Observed(Observation {
                holder: Some("other".into()),
                term: 7,
            }),
        );
        m.handle(
            now,
            Event::Observed(Observation {
                holder: None,
                term: 7,
            }),
        );
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
        assert_eq!(
            m.handle(now + secs(1), Event::Drained),
            Some(Command::Release { successor: None })
        );
        assert_eq!(m.activity(), Activity::Stop);
    }

    #[test]
    fn drain_is_bounded_by_the_drain_timeout() {
        let now = Instant::now();
        let mut m = leader_at(now, 2);
        m.handle(now, Event::Shutdown);
        assert_eq!(m.next_deadline(), Some(now + DRAIN));
        assert_eq!(m.tick(now + DRAIN - secs(1)), None);
        assert_eq!(
            m.tick(now + DRAIN),
            Some(Command::Release { successor: None })
        );
        assert_eq!(m.activity(), Activity::Stop);
    }

    #[test]
    fn shutdown_of_a_follower_leaves_at_once() {
        let now = Instant::now();
        let mut m = Machine::new(timing(), DRAIN, true);
        assert_eq!(
            m.handle(now, Event::Shutdown),
            Some(Command::Release { successor: None })
        );
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
        m.handle(
            now + secs(1),
            Event::Observed(Observation {
                holder: Some("b".into()),
                term: 6,
            }),
        );
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
        m.handle(now, Event::CampaignAllowed(false));
        assert!(m.draining());
        m.handle(now, Event::Drained);
        assert_eq!(m.activity(), Activity::Observe);
        assert_eq!(m.view("me").reason, Reason::WaitingForReadyWorker);
        assert!(!m.view("me").campaigning);
        m.handle(now, Event::CampaignAllowed(true));
        assert_eq!(m.activity(), Activity::Campaign);
    }

    #[test]
    fn a_holding_won_while_not_ready_is_given_back() {
        let now = Instant::now();
        let mut m = Machine::new(timing(), DRAIN, false);
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
        let mut m = Machine::new(timing(), DRAIN, true);
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
        m.handle(
            now,
            Event::Observed(Observation {
                holder: Some("other".into()),
                term: 5,
            }),
        );
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
        let mut m = Machine::new(timing(), DRAIN, true);
        m.handle(
            now,
            Event::Observed(Observation {
                holder: Some("me".into()),
                term: 3,
            }),
        );
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
        m.handle(
            now,
            Event::Observed(Observation {
                holder: Some("other".into()),
                term: 2,
            }),
        );
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
}
