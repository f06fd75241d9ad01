//! The I/O around the [`Machine`]: one task per election that does the store calls the machine
//! asks for, feeds their outcomes back, keeps time, and publishes every change. [`Runtime`]
//! decides what to wait for; [`StoreCalls`] owns the store's scheduling state (the seat, what
//! was last seen, the back-off and when the next call may go out).

use std::{sync::Arc, time::SystemTime};

use tokio::{
    sync::{mpsc, watch},
    time::{Duration, Instant, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

use super::{
    CampaignMode, ElectionConfig, ElectionError, Leadership, Request, Workers,
    machine::{Activity, Command, Event, Gate, Machine, Role, View},
};
use crate::backoff::Backoff;
use crate::{
    metrics::{ElectionMetrics, Published},
    store::{Acquired, Candidate, ErrorKind, Observation, Store, StoreError, Timing},
};

/// The elector's driver: the machine, the channels around it and the store calls.
pub(super) struct Runtime {
    pub(super) config: ElectionConfig,
    pub(super) machine: Machine,
    pub(super) calls: StoreCalls,
    pub(super) state: watch::Sender<Leadership>,
    pub(super) workers: Arc<watch::Sender<Workers>>,
    /// Wakes the loop when a worker subscribes, declares readiness or confirms a stop.
    pub(super) worker_changes: watch::Receiver<Workers>,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) cancel: CancellationToken,
    /// Set once shutdown was asked for (cancelled, or every handle dropped).
    pub(super) shutdown_seen: bool,
    /// Where the runtime records what happens (the machine stays pure).
    pub(super) metrics: ElectionMetrics,
    /// Balancing asked this replica not to campaign.
    pub(super) standing_by: bool,
}

/// The store side of one election and when it may next be called.
pub(super) struct StoreCalls {
    store: Arc<dyn Store>,
    /// The joined candidate; `None` before joining and after it was dropped.
    seat: Option<Box<dyn Candidate>>,
    /// The last observation fed to the machine: the store answers when it differs.
    last_seen: Observation,
    /// Delays between retries of a replica that holds nothing.
    backoff: Backoff,
    /// Store calls wait for this instant (back-off after a failure, renewal period).
    not_before: Option<Instant>,
}

/// What one store step produced.
enum Step {
    Acquired(Acquired),
    Observed(Observation),
    Renewed {
        sent_at: Instant,
        valid_until: Instant,
    },
    Failed(StoreError),
}

/// What woke the loop.
enum Wake {
    Shutdown,
    Request(Option<Request>),
    Deadline,
    Workers,
    Store(Step),
}

impl Runtime {
    pub(super) async fn run(mut self) {
        self.worker_changes.borrow_and_update();
        self.apply_gate();
        record(&self.metrics, &self.state.borrow().view);
        tracing::info!(
            election = %self.config.name,
            identity = %self.config.identity,
            store = %self.calls.store.describe(),
            "election started"
        );
        loop {
            self.publish();
            if let Some(command) = self.check_drained() {
                self.obey(command).await;
                continue;
            }
            let activity = self.machine.activity();
            if activity == Activity::Stop {
                break;
            }
            let wake = self.wait(activity).await;
            if let Some(command) = self.on_wake(wake) {
                self.obey(command).await;
            }
        }
        self.publish();
        tracing::info!(election = %self.config.name, "election stopped");
    }

    /// Wait for the first of: shutdown, a request, a deadline, a worker change, a store answer.
    async fn wait(&mut self, activity: Activity) -> Wake {
        // While draining, also wake when a vanished worker's validity runs out.
        let vanished = self
            .machine
            .held_term()
            .filter(|_| self.machine.draining())
            .and_then(|term| self.workers.borrow().next_expiry(term, Instant::now()));
        let deadline = self
            .machine
            .next_deadline()
            .into_iter()
            .chain(vanished)
            .min();
        let accepting = !self.shutdown_seen;
        let step = self.calls.step(&self.config, activity);
        tokio::select! {
            biased;
            _ = self.cancel.cancelled(), if accepting => Wake::Shutdown,
            request = self.requests.recv(), if accepting => Wake::Request(request),
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Wake::Deadline,
            Ok(()) = self.worker_changes.changed() => Wake::Workers,
            step = step => Wake::Store(step),
        }
    }

    /// Feed what woke the loop to the machine; returns its command.
    fn on_wake(&mut self, wake: Wake) -> Option<Command> {
        let now = Instant::now();
        match wake {
            Wake::Shutdown => {
                self.shutdown_seen = true;
                tracing::info!(election = %self.config.name, "shutting down");
                self.machine.handle(now, Event::Shutdown)
            }
            Wake::Request(Some(Request::Resign { successor, reply })) => {
                if self.machine.view(&self.config.identity).role != Role::Leader {
                    let _ = reply.send(Err(ElectionError::NotLeader {
                        election: self.config.name.clone(),
                    }));
                    return None;
                }
                tracing::info!(election = %self.config.name, ?successor, "resigning");
                let term = self.machine.held_term().unwrap_or_default();
                let command = self.machine.handle(now, Event::Resign { successor });
                let _ = reply.send(Ok(term));
                command
            }
            Wake::Request(Some(Request::StandBy(stand_by))) => {
                self.standing_by = stand_by;
                self.apply_gate()
            }
            // Every handle is gone: nobody can ask anything any more.
            Wake::Request(None) => {
                self.shutdown_seen = true;
                self.machine.handle(now, Event::Shutdown)
            }
            Wake::Deadline => self.machine.tick(now),
            Wake::Workers => {
                self.worker_changes.borrow_and_update();
                self.apply_gate()
            }
            Wake::Store(step) => self.on_store(now, step),
        }
    }

    /// Feed a store answer to the machine and schedule the next call.
    fn on_store(&mut self, now: Instant, step: Step) -> Option<Command> {
        match step {
            Step::Acquired(Acquired::Held(holding)) => {
                let command = self.machine.handle(now, Event::Acquired(holding));
                self.calls.renew_at(self.machine.next_renewal());
                command
            }
            Step::Acquired(Acquired::Observed(seen)) | Step::Observed(seen) => {
                self.calls.observed(&seen);
                self.machine.handle(now, Event::Observed(seen))
            }
            Step::Renewed {
                sent_at,
                valid_until,
            } => {
                self.metrics.renewed(now.saturating_duration_since(sent_at));
                let command = self.machine.handle(
                    now,
                    Event::Renewed {
                        sent_at,
                        valid_until,
                    },
                );
                self.calls.renew_at(self.machine.next_renewal());
                command
            }
            Step::Failed(error) => {
                let kind = error.kind();
                self.metrics.store_failed(kind);
                let holding = self.machine.held_term().is_some();
                let retry_in = self.calls.failed(now, kind, holding, self.config.timing);
                tracing::warn!(
                    election = %self.config.name,
                    store = %self.calls.store.describe(),
                    error = %error,
                    retry_in = ?retry_in,
                    "store call failed"
                );
                let reason = error.to_string();
                self.machine
                    .handle(now, Event::StoreFailed { kind, reason })
            }
        }
    }

    /// Carry out a command of the machine, announcing the new state first.
    async fn obey(&mut self, command: Command) {
        // The loss is announced before the store hears of it.
        self.publish();
        self.execute(command).await;
        if self.machine.activity() != Activity::Renew {
            self.calls.restart();
        }
    }

    /// Carry out a command of the machine.
    async fn execute(&mut self, command: Command) {
        let name = &self.config.name;
        match command {
            Command::Release { successor } => {
                let Some(candidate) = self.calls.seat.as_mut() else {
                    return;
                };
                let release = candidate.release(successor.as_deref());
                match timeout(self.config.timing.renew_deadline, release).await {
                    Ok(Ok(())) => tracing::info!(election = %name, ?successor, "released"),
                    Ok(Err(e)) => tracing::warn!(election = %name, error = %e,
                        "release failed; the holding ends when the lease expires"),
                    Err(_) => tracing::warn!(election = %name,
                        "release timed out; the holding ends when the lease expires"),
                }
            }
            Command::Abandon => {
                tracing::warn!(election = %name, reason = %self.machine.view(&self.config.identity).reason,
                    "leadership ended without a release");
                // No release: the holding ends the store's own way (lease expiry, or the file
                // lock closed without the "released" mark), so the next holder allows for
                // workers that may still be stopping, exactly as after a crash.
                drop(self.calls.seat.take());
            }
        }
    }

    /// Tell the machine whether readiness and balancing allow campaigning (idempotent for the
    /// machine). Standing by never ends a holding: balancing hands it over by a resign.
    fn apply_gate(&mut self) -> Option<Command> {
        let ready = match self.config.campaign {
            CampaignMode::Always => true,
            CampaignMode::WhenReady => self.workers.borrow().any_ready(),
        };
        let gate = if !ready {
            Gate::NoReadyWorker
        } else if self.standing_by {
            Gate::StandingBy
        } else {
            Gate::Open
        };
        self.machine.handle(Instant::now(), Event::Gate(gate))
    }

    /// If stepping down and every worker confirmed, tell the machine; returns its release.
    fn check_drained(&mut self) -> Option<Command> {
        if !self.machine.draining() {
            return None;
        }
        let term = self.machine.held_term()?;
        // Read under the same lock that a worker's stream takes when it is told LEADER, after
        // the stepping-down state was published: a worker told LEADER is counted here.
        let drained = self.workers.borrow().drained(term, Instant::now());
        if drained {
            tracing::info!(election = %self.config.name, term, "workers stopped; releasing");
            self.machine.handle(Instant::now(), Event::Drained)
        } else {
            None
        }
    }

    /// Publish the machine's view if it changed, and log role changes.
    fn publish(&self) {
        let view = self.machine.view(&self.config.identity);
        let mut previous = None;
        self.state.send_if_modified(|current| {
            if current.view == view {
                return false;
            }
            previous = Some(current.view.clone());
            current.view = view.clone();
            current.observed_at = SystemTime::now();
            // Before the receivers are woken: whoever sees this state scrapes it too.
            record(&self.metrics, &view);
            true
        });
        if let Some(previous) = previous
            && (previous.role != view.role
                || previous.leader != view.leader
                || previous.term != view.term)
        {
            tracing::info!(
                election = %self.config.name,
                role = ?view.role,
                leader = view.leader.as_deref().unwrap_or(""),
                term = view.term,
                reason = %view.reason,
                "leadership changed"
            );
        }
    }
}

/// Record a published view in the metrics, which take plain values.
fn record(metrics: &ElectionMetrics, view: &View) {
    metrics.published(Published {
        leading: view.role == Role::Leader,
        leader_known: view.leader.is_some(),
        term: view.term,
    });
}

impl StoreCalls {
    /// Nothing joined or seen yet.
    pub(super) fn new(store: Arc<dyn Store>, timing: Timing) -> Self {
        StoreCalls {
            store,
            seat: None,
            last_seen: Observation::unseen(),
            backoff: Backoff::new(timing.retry_period, timing.lease_duration),
            not_before: None,
        }
    }

    /// After a holding was proven: the next call is the renewal due at `at` (the machine's).
    fn renew_at(&mut self, at: Option<Instant>) {
        self.backoff.reset();
        self.not_before = at;
    }

    /// After an observation: wait for the store to show something else.
    fn observed(&mut self, seen: &Observation) {
        self.backoff.reset();
        self.not_before = None;
        self.last_seen = seen.clone();
    }

    /// After a failure: when to retry. A holder retries every retry period until its renew
    /// deadline; anyone else backs off.
    fn failed(&mut self, now: Instant, kind: ErrorKind, holding: bool, timing: Timing) -> Duration {
        let retry_in = if holding {
            timing.retry_period
        } else {
            self.backoff.next_delay()
        };
        self.not_before = Some(now + retry_in);
        // The machine now reports UNKNOWN: the next answer must be reported even if the store
        // sees what it saw before the failure, or a follower stays UNKNOWN until the leadership
        // next changes.
        self.last_seen = Observation::unseen();
        if kind == ErrorKind::Invalid && !holding {
            // Re-open from scratch next time: the fix may be a new file. Never while holding:
            // dropping the seat would end the holding in secret.
            self.seat = None;
        }
        retry_in
    }

    /// Campaign afresh: report the first observation at once.
    fn restart(&mut self) {
        self.last_seen = Observation::unseen();
        self.not_before = None;
    }

    /// One store call for `activity`, after waiting for `not_before`.
    async fn step(&mut self, config: &ElectionConfig, activity: Activity) -> Step {
        if let Some(at) = self.not_before {
            sleep_until(at).await;
        }
        let candidate = match &mut self.seat {
            Some(candidate) => candidate,
            None => match self
                .store
                .join(&config.name, &config.identity, config.timing)
                .await
            {
                Ok(candidate) => self.seat.insert(candidate),
                Err(error) => return Step::Failed(error),
            },
        };
        match activity {
            Activity::Campaign => match candidate.acquire(&self.last_seen).await {
                Ok(outcome) => Step::Acquired(outcome),
                Err(error) => Step::Failed(error),
            },
            Activity::Observe => match candidate.observe(&self.last_seen).await {
                Ok(seen) => Step::Observed(seen),
                Err(error) => Step::Failed(error),
            },
            Activity::Renew => {
                let sent_at = Instant::now();
                let after = config.timing.retry_period;
                match timeout(after, candidate.keep()).await {
                    Ok(Ok(valid_until)) => Step::Renewed {
                        sent_at,
                        valid_until,
                    },
                    Ok(Err(error)) => Step::Failed(error),
                    Err(_) => Step::Failed(StoreError::Timeout { op: "keep", after }),
                }
            }
            Activity::Stop => std::future::pending().await,
        }
    }
}
