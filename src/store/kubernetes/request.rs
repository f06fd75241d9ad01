//! Calls to the API server as tasks of their own, so that a call cut off by a timeout is settled
//! (its outcome read back) before the candidate builds on a new read.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use tokio::time::timeout;

use super::error::KubernetesError;
use super::record::{Answer, Held, InFlight, LeaseCandidate, Seen};
use crate::store::StoreError;

impl LeaseCandidate {
    /// Map a kube error of `verb` to ours.
    pub(super) fn fail(&self, verb: &'static str, error: kube::Error) -> KubernetesError {
        KubernetesError::of_call(verb, &self.namespace, &self.name, &self.principal, error)
    }

    /// Send one request (a list or a write) as a task of its own, bounded by the renew deadline,
    /// and wait for its answer.
    ///
    /// If the caller stops waiting (the elector drops this future when a worker subscribes,
    /// at shutdown, or when a renewal outlives the retry period), the request still finishes
    /// on the wire: cut off, the API server would log it as a 5xx "context canceled", and
    /// operators alert on those. Letting it finish is safe: every later call first waits for
    /// it and takes in what it wrote ([`LeaseCandidate::settle`]), so a take-over that landed
    /// makes this replica the holder (kept or given back as the elector asks) before anything
    /// new is built on the record; a renewal landing late changes nothing this replica claims.
    /// Only a release (after half the renew deadline) and a dropped seat cut one off.
    pub(super) async fn request(
        &mut self,
        verb: &'static str,
        call: impl Future<Output = kube::Result<Answer>> + Send + 'static,
    ) -> Result<Answer, StoreError> {
        self.settle().await;
        let limit = self.timing.renew_deadline;
        let task = tokio::spawn(timeout(limit, call));
        let answer = &mut self.in_flight.insert(InFlight { verb, task }).task;
        let answer = answer.await;
        self.in_flight = None;
        match answer {
            Ok(Ok(answer)) => answer.map_err(|e| self.fail(verb, e).into()),
            Ok(Err(_)) => Err(StoreError::Timeout {
                op: verb,
                after: limit,
            }),
            Err(source) => Err(KubernetesError::Aborted {
                verb,
                namespace: self.namespace.clone(),
                lease: self.name.clone(),
                source,
            }
            .into()),
        }
    }

    /// Wait for a request whose caller stopped waiting (bounded by its own timeout), and take in
    /// what it wrote. The record is listed again before it is trusted.
    pub(super) async fn settle(&mut self) {
        let Some(in_flight) = self.in_flight.as_mut() else {
            return;
        };
        // Awaited in its slot: if this wait is itself cancelled, the next call waits again
        // (the task is never left running unowned).
        let outcome = (&mut in_flight.task).await;
        let verb = in_flight.verb;
        self.in_flight = None;
        self.stale = true;
        match outcome {
            Ok(Ok(Ok(Answer::Written(lease)))) => {
                tracing::debug!(lease = %self.name, verb, "a request left in flight applied");
                self.apply(Some(*lease));
            }
            Ok(Ok(Ok(Answer::Listed(_)))) => {}
            Ok(Ok(Err(error))) => {
                tracing::debug!(lease = %self.name, verb, %error, "a request left in flight failed");
            }
            Ok(Err(_)) | Err(_) => {}
        }
    }

    /// [`LeaseCandidate::settle`] for at most `budget`, then abort what is still in flight: a
    /// release must not wait behind a slow renewal, or the standby waits a whole lease. What was
    /// aborted may still land; the release is a compare-and-swap on a fresh read either way.
    pub(super) async fn settle_within(&mut self, budget: Duration) {
        if timeout(budget, self.settle()).await.is_err()
            && let Some(in_flight) = self.in_flight.take()
        {
            tracing::debug!(lease = %self.name, verb = in_flight.verb,
                "a request still in flight is cut off for the release");
            in_flight.task.abort();
            self.stale = true;
        }
    }

    /// Bound a non-watch call: a hung request must not hold a follower forever.
    pub(super) async fn bounded<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, KubernetesError>>,
    ) -> Result<T, StoreError> {
        let limit = self.timing.renew_deadline;
        match timeout(limit, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout { op, after: limit }),
        }
    }

    /// Take `lease` (or its absence) as the current state.
    pub(super) fn apply(&mut self, lease: Option<Lease>) {
        let Some(lease) = lease else {
            self.seen = None;
            return;
        };
        if let Some(rv) = &lease.metadata.resource_version {
            self.resume_from = Some(rv.clone());
        }
        let seen = Seen::observe(self.seen.as_ref(), lease);
        self.highest_term = self.highest_term.max(seen.record.transitions());
        self.seen = Some(seen);
        self.settle_attempt();
    }

    /// If a take-over of unknown outcome shows in the record, we hold the Lease; once the
    /// record moved past the version it was conditioned on, it can no longer apply.
    pub(super) fn settle_attempt(&mut self) {
        let Some(attempt) = &self.attempt else {
            return;
        };
        let Some(seen) = &self.seen else {
            return;
        };
        let ours = seen.record.holder() == Some(self.identity.as_str())
            && seen.record.transitions() == attempt.transitions
            && seen.record.spec.acquire_time == attempt.acquire_time;
        if ours {
            tracing::info!(lease = %self.name, term = attempt.transitions,
                "a take-over whose answer was lost did apply: holding");
            self.held = Some(Held {
                term: attempt.transitions,
                acquire_time: attempt.acquire_time.clone(),
            });
            self.attempt = None;
        } else if attempt.base.as_deref() != seen.lease.metadata.resource_version.as_deref() {
            self.attempt = None;
        }
    }

    /// List the Lease (the start of list-then-watch): the record and a version to watch from.
    pub(super) async fn refresh(&mut self) -> Result<(), StoreError> {
        let params = ListParams::default().fields(&format!("metadata.name={}", self.name));
        let api = self.api.clone();
        let Answer::Listed(list) = self
            .request("list", async move {
                api.list(&params).await.map(Answer::Listed)
            })
            .await?
        else {
            unreachable!("a list answers with a list")
        };
        self.watch = None;
        self.stale = false;
        let lease = list
            .items
            .into_iter()
            .find(|l| l.metadata.name.as_deref() == Some(self.name.as_str()));
        self.apply(lease);
        // After apply: the list's version is at least the object's.
        if let Some(rv) = list.metadata.resource_version {
            self.resume_from = Some(rv);
        }
        Ok(())
    }
}
