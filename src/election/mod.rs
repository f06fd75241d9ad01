//! The elector: one task per election, running the role [`machine`] over a store, publishing
//! the current [`Leadership`] on a `tokio::sync::watch` channel, and keeping track of the
//! workers subscribed to it (their readiness and their acknowledgements when it steps down).
//!
//! ```text
//!  Store ──acquire/keep/release──► runtime ──events──► Machine ──commands──► runtime
//!                                     │
//!                                     ├─ watch<Leadership> ──► gRPC streams
//!                                     └─ watch<Workers>    ◄── subscriptions, readiness, acks
//! ```
//!
//! [`Election`] is the cheap, cloneable handle the gRPC server uses.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{metrics::ElectionMetrics, store::Store, timing::Timing};

pub mod machine;
mod runtime;

pub use machine::{Reason, Role, View};

/// When a replica campaigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CampaignMode {
    /// Always: a bare daemon leads even with no worker attached.
    #[default]
    Always,
    /// Only while at least one subscribed worker has declared itself ready (warm).
    WhenReady,
}

/// Settings of one election.
#[derive(Debug, Clone)]
pub struct ElectionConfig {
    /// The election's name.
    pub name: String,
    /// This replica's identity.
    pub identity: String,
    /// Lease, renew deadline and retry period.
    pub timing: Timing,
    /// How long a step-down waits for workers to confirm they stopped.
    pub drain_timeout: Duration,
    /// When to campaign.
    pub campaign: CampaignMode,
}

/// The published state of one election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election's name.
    pub election: Arc<str>,
    /// This replica's identity.
    pub identity: Arc<str>,
    /// Role, leader, term, validity and reason.
    pub view: View,
    /// Wall-clock time at which this state was produced (for people, never for timing).
    pub observed_at: SystemTime,
}

/// Errors of requests to an election.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// Resign was asked of a replica that does not lead.
    #[error("this replica does not lead election {election:?}")]
    NotLeader {
        /// The election.
        election: String,
    },
    /// A request named a worker that has no open subscription.
    #[error("worker {worker:?} has no open WatchLeadership stream for election {election:?}")]
    UnknownWorker {
        /// The election.
        election: String,
        /// The worker.
        worker: String,
    },
    /// The election's task has ended (the daemon is shutting down).
    #[error("election {election:?} has stopped")]
    Stopped {
        /// The election.
        election: String,
    },
}

/// Workers subscribed to one election, by name.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    entries: HashMap<String, Worker>,
}

#[derive(Debug, Clone, Default)]
struct Worker {
    /// Open WatchLeadership streams of this worker. Zero for a worker whose stream broke while
    /// it may still be working: it is kept until its last validity ran out.
    streams: usize,
    /// Declared warm.
    ready: bool,
    /// The last term in which this worker was told that its replica leads.
    told_term: u64,
    /// The validity sent with the last LEADER event: the worker stops by then at the latest.
    told_until: Option<Instant>,
    /// The last term whose work this worker confirmed stopped.
    stopped_term: u64,
}

impl Worker {
    /// Whether this worker may still be working in `term` at `now`.
    fn may_work(&self, term: u64, now: Instant) -> bool {
        self.told_term == term
            && self.stopped_term < term
            && (self.streams > 0 || self.told_until.is_some_and(|t| t > now))
    }
}

impl Workers {
    /// Whether any subscribed worker has declared itself ready.
    pub fn any_ready(&self) -> bool {
        self.entries.values().any(|w| w.streams > 0 && w.ready)
    }

    /// Whether every worker told it leads in `term` has confirmed it stopped, or (its stream
    /// gone) must have stopped because the validity it was sent ran out.
    pub fn drained(&self, term: u64, now: Instant) -> bool {
        !self.entries.values().any(|w| w.may_work(term, now))
    }

    /// When the next worker without a stream stops counting for `term`.
    pub fn next_expiry(&self, term: u64, now: Instant) -> Option<Instant> {
        self.entries
            .values()
            .filter(|w| w.streams == 0 && w.may_work(term, now))
            .filter_map(|w| w.told_until)
            .min()
    }

    /// Forget workers without a stream that can no longer be working.
    fn prune(&mut self, now: Instant) {
        self.entries
            .retain(|_, w| w.streams > 0 || w.may_work(w.told_term, now));
    }

    /// The number of workers with an open stream.
    pub fn subscribed(&self) -> usize {
        self.entries.values().filter(|w| w.streams > 0).count()
    }

    /// The number of subscribed workers.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no worker is subscribed.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

enum Request {
    Resign {
        successor: Option<String>,
        reply: oneshot::Sender<Result<u64, ElectionError>>,
    },
}

/// A handle on one running election.
#[derive(Clone)]
pub struct Election {
    name: Arc<str>,
    state: watch::Receiver<Leadership>,
    workers: Arc<watch::Sender<Workers>>,
    requests: mpsc::Sender<Request>,
    metrics: ElectionMetrics,
}

impl Election {
    /// Start the election's task over `store`. It runs until `cancel` fires and it has stepped
    /// down (announced, drained, released); the returned handle resolves then.
    pub fn spawn(
        store: Arc<dyn Store>,
        config: ElectionConfig,
        cancel: CancellationToken,
    ) -> (Election, JoinHandle<()>) {
        Self::spawn_with_metrics(store, config, ElectionMetrics::default(), cancel)
    }

    /// [`Election::spawn`], recording the election's metrics into `metrics`.
    pub fn spawn_with_metrics(
        store: Arc<dyn Store>,
        config: ElectionConfig,
        metrics: ElectionMetrics,
        cancel: CancellationToken,
    ) -> (Election, JoinHandle<()>) {
        let name: Arc<str> = config.name.as_str().into();
        let machine = machine::Machine::new(
            config.timing,
            config.drain_timeout,
            config.campaign == CampaignMode::Always,
        );
        let initial = Leadership {
            election: name.clone(),
            identity: config.identity.as_str().into(),
            view: machine.view(&config.identity),
            observed_at: SystemTime::now(),
        };
        let (state_tx, state_rx) = watch::channel(initial);
        let workers = Arc::new(watch::Sender::new(Workers::default()));
        let (requests_tx, requests_rx) = mpsc::channel(16);
        let runtime = runtime::Runtime {
            store,
            config,
            machine,
            state: state_tx,
            workers: workers.clone(),
            requests: requests_rx,
            cancel,
            metrics: metrics.clone(),
        };
        let task = tokio::spawn(runtime.run());
        let handle = Election {
            name,
            state: state_rx,
            workers,
            requests: requests_tx,
            metrics,
        };
        (handle, task)
    }

    /// The election's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state.
    pub fn current(&self) -> Leadership {
        self.state.borrow().clone()
    }

    /// A receiver of every state change.
    pub fn changes(&self) -> watch::Receiver<Leadership> {
        self.state.clone()
    }

    /// The subscribed workers.
    pub fn workers(&self) -> watch::Receiver<Workers> {
        self.workers.subscribe()
    }

    /// Subscribe to the state. With a `worker` name the subscription counts for readiness and
    /// drain until it is dropped.
    pub fn subscribe(&self, worker: Option<&str>, ready: bool) -> Subscription {
        let worker = worker.map(|name| {
            self.workers.send_modify(|w| {
                w.prune(Instant::now());
                let entry = w.entries.entry(name.to_owned()).or_default();
                entry.streams += 1;
                entry.ready |= ready;
                // Under the same lock, so the gauge is right before anyone sees the change.
                self.metrics.subscribers(w.subscribed());
            });
            WorkerGuard {
                name: name.to_owned(),
                workers: self.workers.clone(),
                metrics: self.metrics.clone(),
            }
        });
        Subscription {
            state: self.state.clone(),
            worker,
        }
    }

    /// Record whether `worker` is warm.
    ///
    /// # Errors
    /// [`ElectionError::UnknownWorker`] if it has no open subscription.
    pub fn set_ready(&self, worker: &str, ready: bool) -> Result<(), ElectionError> {
        self.update_worker(worker, |w| w.ready = ready)
    }

    /// Record that `worker` stopped all work of `term`.
    ///
    /// # Errors
    /// [`ElectionError::UnknownWorker`] if it has no open subscription.
    pub fn acknowledge_stop(&self, worker: &str, term: u64) -> Result<(), ElectionError> {
        self.update_worker(worker, |w| w.stopped_term = w.stopped_term.max(term))
    }

    fn update_worker(
        &self,
        worker: &str,
        f: impl FnOnce(&mut Worker),
    ) -> Result<(), ElectionError> {
        let mut found = false;
        self.workers
            .send_if_modified(|w| match w.entries.get_mut(worker) {
                Some(entry) => {
                    f(entry);
                    found = true;
                    true
                }
                None => false,
            });
        if found {
            Ok(())
        } else {
            Err(ElectionError::UnknownWorker {
                election: self.name.to_string(),
                worker: worker.to_owned(),
            })
        }
    }

    /// Step down now, optionally for `successor`; returns the term given up. The loss is
    /// announced at once; the release follows when the workers confirmed (or the drain timeout).
    ///
    /// # Errors
    /// [`ElectionError::NotLeader`] if this replica does not lead; [`ElectionError::Stopped`]
    /// if the election has ended.
    pub async fn resign(&self, successor: Option<String>) -> Result<u64, ElectionError> {
        let stopped = || ElectionError::Stopped {
            election: self.name.to_string(),
        };
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Resign { successor, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// One subscriber's view of an election; for a worker it also carries its registration.
pub struct Subscription {
    state: watch::Receiver<Leadership>,
    worker: Option<WorkerGuard>,
}

struct WorkerGuard {
    name: String,
    workers: Arc<watch::Sender<Workers>>,
    metrics: ElectionMetrics,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.workers.send_modify(|w| {
            if let Some(entry) = w.entries.get_mut(&self.name) {
                entry.streams -= 1;
                if entry.streams == 0 {
                    // Not ready any more; kept while it may still be working (see `prune`).
                    entry.ready = false;
                }
            }
            w.prune(Instant::now());
            self.metrics.subscribers(w.subscribed());
        });
    }
}

impl Subscription {
    /// The state to send to the subscriber now; it counts as seen for [`Subscription::changed`].
    /// For a worker, being told LEADER is recorded atomically with reading the state: the
    /// elector checks the same record, under the same lock, before it releases, so a worker can
    /// never be told it leads after the release decision.
    pub fn deliver(&mut self) -> Leadership {
        let Some(guard) = &self.worker else {
            return self.state.borrow_and_update().clone();
        };
        let state = &mut self.state;
        let mut current = None;
        guard.workers.send_if_modified(|w| {
            let state = state.borrow_and_update().clone();
            let mut changed = false;
            if state.view.role == Role::Leader
                && let Some(entry) = w.entries.get_mut(&guard.name)
            {
                // Extending the validity needs no wake-up; a new term does.
                entry.told_until = state.view.valid_until;
                if entry.told_term != state.view.term {
                    entry.told_term = state.view.term;
                    changed = true;
                }
            }
            current = Some(state);
            changed
        });
        current.unwrap_or_else(|| self.state.borrow_and_update().clone())
    }

    /// Wait until the state changes after the one last delivered. `false` once the election
    /// has stopped and its last state has been delivered.
    pub async fn changed(&mut self) -> bool {
        self.state.changed().await.is_ok()
    }
}

#[cfg(test)]
mod tests;
