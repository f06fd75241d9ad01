//! The elector: one task per election runs the role [`machine`] over a store, publishes the
//! current [`Leadership`] on a `tokio::sync::watch` channel, and keeps track of the workers
//! subscribed to it. [`Election`] is the cheap, cloneable handle the gRPC server uses.
//!
//! ```text
//!  Store ──acquire/keep/release──► runtime ──events──► Machine ──commands──► runtime
//!                                     │
//!                                     ├─ watch<Leadership> ──► gRPC streams
//!                                     └─ watch<Workers>    ◄── subscriptions, readiness, acks
//! ```

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{metrics::ElectionMetrics, store::Store, timing::Timing};

pub mod machine;
mod runtime;
mod workers;

pub use machine::{Reason, Role, View};
pub use workers::{Subscription, Workers};

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
    /// Start standing by (see [`Election::stand_by`]): a balanced daemon campaigns only where
    /// its balancer says so.
    pub balanced: bool,
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

enum Request {
    Resign {
        successor: Option<String>,
        reply: oneshot::Sender<Result<u64, ElectionError>>,
    },
    StandBy(bool),
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
        let balanced = config.balanced;
        let machine = machine::Machine::new(
            config.timing,
            config.drain_timeout,
            match (config.campaign, config.balanced) {
                (CampaignMode::WhenReady, _) => machine::Gate::NoReadyWorker,
                (CampaignMode::Always, true) => machine::Gate::StandingBy,
                (CampaignMode::Always, false) => machine::Gate::Open,
            },
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
            calls: runtime::StoreCalls::new(store, config.timing),
            config,
            machine,
            state: state_tx,
            worker_changes: workers.subscribe(),
            workers: workers.clone(),
            requests: requests_rx,
            cancel,
            shutdown_seen: false,
            metrics: metrics.clone(),
            standing_by: balanced,
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
        Subscription::new(
            self.state.clone(),
            &self.workers,
            &self.metrics,
            worker,
            ready,
        )
    }

    /// Record whether `worker` is warm.
    ///
    /// # Errors
    /// [`ElectionError::UnknownWorker`] if it has no open subscription.
    pub fn set_ready(&self, worker: &str, ready: bool) -> Result<(), ElectionError> {
        self.known(worker, workers::set_ready(&self.workers, worker, ready))
    }

    /// Record that `worker` stopped all work of `term`.
    ///
    /// # Errors
    /// [`ElectionError::UnknownWorker`] if it has no open subscription.
    pub fn acknowledge_stop(&self, worker: &str, term: u64) -> Result<(), ElectionError> {
        self.known(
            worker,
            workers::acknowledge_stop(&self.workers, worker, term),
        )
    }

    fn known(&self, worker: &str, found: bool) -> Result<(), ElectionError> {
        if found {
            Ok(())
        } else {
            Err(ElectionError::UnknownWorker {
                election: self.name.to_string(),
                worker: worker.to_owned(),
            })
        }
    }

    /// Stand by (`true`): do not campaign, as balancing asks when another member should lead.
    /// A holding in progress is kept; balancing ends it by [`Election::resign`] to a successor.
    ///
    /// # Errors
    /// [`ElectionError::Stopped`] if the election has ended.
    pub async fn stand_by(&self, stand_by: bool) -> Result<(), ElectionError> {
        self.requests
            .send(Request::StandBy(stand_by))
            .await
            .map_err(|_| ElectionError::Stopped {
                election: self.name.to_string(),
            })
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

#[cfg(test)]
mod tests;
