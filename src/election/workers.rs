//! The workers subscribed to one election, and their subscriptions to its state.
//!
//! [`Subscription::deliver`] is the one back-channel from a gRPC stream to the elector: when it
//! hands a worker a LEADER state it writes, from inside the stream's poll, that the worker was
//! told it leads in that term. The elector reads these records before it releases a holding
//! (it waits until every worker told it leads has confirmed it stopped, or must have stopped),
//! so this write is safety-critical for the release: a worker is never told it leads unseen.

use std::{collections::HashMap, sync::Arc};

use tokio::{sync::watch, time::Instant};

use super::{Leadership, Role};
use crate::metrics::ElectionMetrics;

/// Workers subscribed to one election, by name.
#[derive(Debug, Clone, Default)]
pub struct Workers {
    records: HashMap<String, WorkerRecord>,
}

/// What the elector knows of one named worker.
#[derive(Debug, Clone, Default)]
struct WorkerRecord {
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

impl WorkerRecord {
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
        self.records.values().any(|w| w.streams > 0 && w.ready)
    }

    /// Whether every worker told it leads in `term` has confirmed it stopped, or (its stream
    /// gone) must have stopped because the validity it was sent ran out.
    pub fn drained(&self, term: u64, now: Instant) -> bool {
        !self.records.values().any(|w| w.may_work(term, now))
    }

    /// When the next worker without a stream stops counting for `term`.
    pub fn next_expiry(&self, term: u64, now: Instant) -> Option<Instant> {
        self.records
            .values()
            .filter(|w| w.streams == 0 && w.may_work(term, now))
            .filter_map(|w| w.told_until)
            .min()
    }

    /// Forget workers without a stream that can no longer be working.
    fn prune(&mut self, now: Instant) {
        self.records
            .retain(|_, w| w.streams > 0 || w.may_work(w.told_term, now));
    }

    /// The number of workers with an open stream.
    pub fn subscribed(&self) -> usize {
        self.records.values().filter(|w| w.streams > 0).count()
    }

    /// The number of subscribed workers.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no worker is subscribed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Record whether `worker` is warm; `false` if it has no record.
pub(super) fn set_ready(workers: &watch::Sender<Workers>, worker: &str, ready: bool) -> bool {
    update(workers, worker, |w| w.ready = ready)
}

/// Record that `worker` stopped all work of `term`; `false` if it has no record.
pub(super) fn acknowledge_stop(workers: &watch::Sender<Workers>, worker: &str, term: u64) -> bool {
    update(workers, worker, |w| {
        w.stopped_term = w.stopped_term.max(term)
    })
}

fn update(
    workers: &watch::Sender<Workers>,
    worker: &str,
    f: impl FnOnce(&mut WorkerRecord),
) -> bool {
    let mut found = false;
    workers.send_if_modified(|w| match w.records.get_mut(worker) {
        Some(record) => {
            f(record);
            found = true;
            true
        }
        None => false,
    });
    found
}

/// One subscriber's view of an election; for a worker it also carries its registration.
pub struct Subscription {
    state: watch::Receiver<Leadership>,
    worker: Option<Registration>,
}

/// A worker's open stream, counted in its record until dropped.
struct Registration {
    name: String,
    workers: Arc<watch::Sender<Workers>>,
    metrics: ElectionMetrics,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.workers.send_modify(|w| {
            if let Some(record) = w.records.get_mut(&self.name) {
                record.streams -= 1;
                if record.streams == 0 {
                    // Not ready any more; kept while it may still be working (see `prune`).
                    record.ready = false;
                }
            }
            w.prune(Instant::now());
            self.metrics.subscribers(w.subscribed());
        });
    }
}

impl Subscription {
    /// Subscribe to `state`. With a `worker` name the subscription counts in `workers` for
    /// readiness and drain until it is dropped.
    pub(super) fn new(
        state: watch::Receiver<Leadership>,
        workers: &Arc<watch::Sender<Workers>>,
        metrics: &ElectionMetrics,
        worker: Option<&str>,
        ready: bool,
    ) -> Subscription {
        let worker = worker.map(|name| {
            workers.send_modify(|w| {
                w.prune(Instant::now());
                let record = w.records.entry(name.to_owned()).or_default();
                record.streams += 1;
                record.ready |= ready;
                // Under the same lock, so the gauge is right before anyone sees the change.
                metrics.subscribers(w.subscribed());
            });
            Registration {
                name: name.to_owned(),
                workers: workers.clone(),
                metrics: metrics.clone(),
            }
        });
        Subscription { state, worker }
    }

    /// The state to send to the subscriber now; it counts as seen for [`Subscription::changed`].
    /// For a worker, being told LEADER is recorded atomically with reading the state: the
    /// elector checks the same record, under the same lock, before it releases, so a worker can
    /// never be told it leads after the release decision. This is the back-channel named in the
    /// module docs.
    pub fn deliver(&mut self) -> Leadership {
        let Some(registration) = &self.worker else {
            return self.state.borrow_and_update().clone();
        };
        let state = &mut self.state;
        let mut current = None;
        registration.workers.send_if_modified(|w| {
            let state = state.borrow_and_update().clone();
            let mut changed = false;
            if state.view.role == Role::Leader
                && let Some(record) = w.records.get_mut(&registration.name)
            {
                // Extending the validity needs no wake-up; a new term does.
                record.told_until = state.view.valid_until;
                if record.told_term != state.view.term {
                    record.told_term = state.view.term;
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
