//! The I/O around the [`Machine`]: one task per election that does the store calls the machine
//! asks for, feeds their outcomes back, keeps time, and publishes every change.

use std::{sync::Arc, time::SystemTime};

use tokio::{
    sync::{mpsc, watch},
    time::{Instant, sleep_until, timeout},
};
use tokio_util::sync::CancellationToken;

use super::{
    CampaignMode, ElectionConfig, ElectionError, Leadership, Request, Workers,
    machine::{Activity, Command, Event, Machine, Role, View},
};
use crate::backoff::Backoff;
use crate::{
    metrics::ElectionMetrics,
    store::{Acquired, Candidate, ErrorKind, Observation, Store, StoreError},
};

pub(super) struct Runtime {
    pub(super) store: Arc<dyn Store>,
    pub(super) config: ElectionConfig,
    pub(super) machine: Machine,
    pub(super) state: watch::Sender<Leadership>,
    pub(super) workers: Arc<watch::Sender<Workers>>,
    pub(super) requests: mpsc::Receiver<Request>,
    pub(super) cancel: CancellationToken,
    /// Where the runtime records what happens (the machine stays pure).
    pub(super) metrics: ElectionMetrics,
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
        let timing = self.config.timing;
        let mut seat: Option<Box<dyn Candidate>> = None;
        let mut last_seen = Observation::unseen();
        let mut backoff = Backoff::new(timing.retry_period, timing.lease_duration);
        // Store calls wait for this instant (back-off after a failure, renewal period).
        let mut not_before: Option<Instant> = None;
        let mut workers = self.workers.subscribe();
        let mut shutdown_seen = false;
        let ready = workers.borrow_and_update().any_ready();
        self.apply_readiness(ready);
        record(&self.metrics, &self.state.borrow().view);
        tracing::info!(
            election = %self.config.name,
            identity = %self.config.identity,
            store = %self.store.describe(),
            "election started"
        );

        loop {
            self.publish();
            if let Some(command) = self.check_drained() {
                self.obey(command, &mut seat, &mut last_seen, &mut not_before)
                    .await;
                continue;
            }
            let activity = self.machine.activity();
            if activity == Activity::Stop {
                break;
            }
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
            let wake = {
                let step = store_step(
                    &*self.store,
                    &self.config,
                    &mut seat,
                    activity,
                    &last_seen,
                    not_before,
                );
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled(), if !shutdown_seen => Wake::Shutdown,
                    request = self.requests.recv(), if !shutdown_seen => Wake::Request(request),
                    _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => Wake::Deadline,
                    Ok(()) = workers.changed() => Wake::Workers,
                    step = step => Wake::Store(step),
                }
            };
            let now = Instant::now();
            let command = match wake {
                Wake::Shutdown => {
                    shutdown_seen = true;
                    tracing::info!(election = %self.config.name, "shutting down");
                    self.machine.handle(now, Event::Shutdown)
                }
                Wake::Request(Some(Request::Resign { successor, reply })) => {
                    match self.machine.view(&self.config.identity).role {
                        Role::Leader => {
                            tracing::info!(election = %self.config.name, ?successor, "resigning");
                            let term = self.machine.held_term().unwrap_or_default();
                            let command = self.machine.handle(now, Event::Resign { successor });
                            let _ = reply.send(Ok(term));
                            command
                        }
                        _ => {
                            let _ = reply.send(Err(ElectionError::NotLeader {
                                election: self.config.name.clone(),
                            }));
                            None
                        }
                    }
                }
                // Every handle is gone: nobody can ask anything any more.
                Wake::Request(None) => {
                    shutdown_seen = true;
                    self.machine.handle(now, Event::Shutdown)
                }
                Wake::Deadline => self.machine.tick(now),
                Wake::Workers => {
                    let ready = workers.borrow_and_update().any_ready();
                    self.apply_readiness(ready)
                }
                Wake::Store(step) => match step {
                    Step::Acquired(Acquired::Held(holding)) => {
                        backoff.reset();
                        // Renewals are timed from the store's proof, not from our reading it.
                        let proven_at = holding
                            .valid_until
                            .checked_sub(timing.lease_duration)
                            .unwrap_or(now)
                            .min(now);
                        not_before = Some(proven_at + timing.retry_period);
                        self.machine.handle(now, Event::Acquired(holding))
                    }
                    Step::Acquired(Acquired::Observed(seen)) | Step::Observed(seen) => {
                        backoff.reset();
                        not_before = None;
                        last_seen = seen.clone();
                        self.machine.handle(now, Event::Observed(seen))
                    }
                    Step::Renewed {
                        sent_at,
                        valid_until,
                    } => {
                        backoff.reset();
                        self.metrics.renewed(now.saturating_duration_since(sent_at));
                        not_before = Some(sent_at + timing.retry_period);
                        self.machine.handle(
                            now,
                            Event::Renewed {
                                sent_at,
                                valid_until,
                            },
                        )
                    }
                    Step::Failed(error) => {
                        let kind = error.kind();
                        self.metrics.store_failed(kind);
                        let retry_in = if self.machine.held_term().is_some() {
                            // A leader retries every retry period until its renew deadline.
                            timing.retry_period
                        } else {
                            backoff.next_delay()
                        };
                        tracing::warn!(
                            election = %self.config.name,
                            store = %self.store.describe(),
                            error = %error,
                            retry_in = ?retry_in,
                            "store call failed"
                        );
                        not_before = Some(now + retry_in);
                        // The machine now reports UNKNOWN: the next answer must be reported even
                        // if the store sees what it saw before the failure, or a follower stays
                        // UNKNOWN until the leadership next changes.
                        last_seen = Observation::unseen();
                        if kind == ErrorKind::Invalid && self.machine.held_term().is_none() {
                            // Re-open from scratch next time: the fix may be a new file. Never
                            // while holding: dropping the seat would end the holding in secret.
                            seat = None;
                        }
                        self.machine.handle(
                            now,
                            Event::StoreFailed {
                                kind,
                                reason: error.to_string(),
                            },
                        )
                    }
                },
            };
            if let Some(command) = command {
                self.obey(command, &mut seat, &mut last_seen, &mut not_before)
                    .await;
            }
        }
        self.publish();
        tracing::info!(election = %self.config.name, "election stopped");
    }

    /// Carry out a command of the machine, announcing the new state first.
    async fn obey(
        &mut self,
        command: Command,
        seat: &mut Option<Box<dyn Candidate>>,
        last_seen: &mut Observation,
        not_before: &mut Option<Instant>,
    ) {
        // The loss is announced before the store hears of it.
        self.publish();
        self.execute(command, seat).await;
        if self.machine.activity() != Activity::Renew {
            // Campaign afresh: report the first observation at once.
            *last_seen = Observation::unseen();
            *not_before = None;
        }
    }

    /// Carry out a command of the machine.
    async fn execute(&mut self, command: Command, seat: &mut Option<Box<dyn Candidate>>) {
        let timing = self.config.timing;
        let name = &self.config.name;
        match command {
            Command::Release { successor } => {
                let Some(candidate) = seat.as_mut() else {
                    return;
                };
                match timeout(
                    timing.renew_deadline,
                    candidate.release(successor.as_deref()),
                )
                .await
                {
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
                drop(seat.take());
            }
        }
    }

    /// Tell the machine whether readiness allows campaigning (idempotent for the machine).
    fn apply_readiness(&mut self, any_ready: bool) -> Option<Command> {
        let allowed = match self.config.campaign {
            CampaignMode::Always => true,
            CampaignMode::WhenReady => any_ready,
        };
        self.machine
            .handle(Instant::now(), Event::CampaignAllowed(allowed))
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
    metrics.published(view.role == Role::Leader, view.leader.is_some(), view.term);
}

/// One store call for the current activity, after waiting for `not_before`.
async fn store_step(
    store: &dyn Store,
    config: &ElectionConfig,
    seat: &mut Option<Box<dyn Candidate>>,
    activity: Activity,
    last_seen: &Observation,
    not_before: Option<Instant>,
) -> Step {
    if let Some(at) = not_before {
        sleep_until(at).await;
    }
    let candidate = match seat {
        Some(candidate) => candidate,
        None => match store
            .join(&config.name, &config.identity, config.timing)
            .await
        {
            Ok(candidate) => seat.insert(candidate),
            Err(error) => return Step::Failed(error),
        },
    };
    match activity {
        Activity::Campaign => match candidate.acquire(last_seen).await {
            Ok(outcome) => Step::Acquired(outcome),
            Err(error) => Step::Failed(error),
        },
        Activity::Observe => match candidate.observe(last_seen).await {
            Ok(seen) => Step::Observed(seen),
            Err(error) => Step::Failed(error),
        },
        Activity::Renew => {
            let sent_at = Instant::now();
            match timeout(config.timing.retry_period, candidate.keep()).await {
                Ok(Ok(valid_until)) => Step::Renewed {
                    sent_at,
                    valid_until,
                },
                Ok(Err(error)) => Step::Failed(error),
                Err(_) => Step::Failed(StoreError::Timeout {
                    op: "keep",
                    after: config.timing.retry_period,
                }),
            }
        }
        Activity::Stop => std::future::pending().await,
    }
}
