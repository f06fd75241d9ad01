//! The store contract for Kubernetes: judging the record on the local monotonic clock, and
//! compare-and-swap writes to take, renew and release the Lease.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::PostParams;
use tokio::time::Instant;

use super::error::{KubernetesError, is_not_found};
use super::record::{
    Answer, Attempt, Held, LeaseCandidate, SUCCESSOR_ANNOTATION, SUCCESSOR_TERM_ANNOTATION,
    Verdict, now_micro,
};
use crate::store::{Acquired, Candidate, Holding, Observation, StoreError};

/// How many times a renewal or release re-reads after a conflict that left us the holder (a
/// third party edited labels or annotations) before giving up for this call.
const CAS_ATTEMPTS: usize = 3;

impl LeaseCandidate {
    /// Judge the record at `now`.
    pub(super) fn verdict(&self, now: Instant) -> Verdict {
        let Some(seen) = &self.seen else {
            // No Lease: free; a campaigning candidate creates it.
            return Verdict {
                seen: Observation::default(),
                may_take: true,
                until: None,
            };
        };
        let record = &seen.record;
        let expiry = seen.expiry(self.timing.lease_duration);
        let term = record.term();
        match record.holder() {
            // Whoever it is (client-go, or an earlier process of our own identity): respected
            // until the record has not changed for its lease duration.
            Some(holder) if now < expiry => Verdict {
                seen: Observation {
                    holder: Some(holder.to_owned()),
                    term,
                },
                may_take: false,
                until: Some(expiry),
            },
            Some(_) => Verdict {
                seen: Observation { holder: None, term },
                may_take: true,
                until: None,
            },
            None => {
                let reserved = record
                    .successor()
                    .is_some_and(|s| s != self.identity && now < expiry);
                Verdict {
                    seen: Observation { holder: None, term },
                    may_take: !reserved,
                    until: reserved.then_some(expiry),
                }
            }
        }
    }

    /// The successor annotations written or removed on `lease`.
    pub(super) fn set_successor(lease: &mut Lease, successor: Option<(&str, i32)>) {
        let annotations = lease.metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.remove(SUCCESSOR_ANNOTATION);
        annotations.remove(SUCCESSOR_TERM_ANNOTATION);
        if let Some((identity, term)) = successor {
            annotations.insert(SUCCESSOR_ANNOTATION.to_owned(), identity.to_owned());
            annotations.insert(SUCCESSOR_TERM_ANNOTATION.to_owned(), term.to_string());
        }
        if annotations.is_empty() {
            lease.metadata.annotations = None;
        }
    }

    /// Write `lease` (which carries the resourceVersion it was read at) or, without a base,
    /// create it. Returns the written Lease.
    pub(super) async fn write(&mut self, lease: &Lease, create: bool) -> Result<Lease, StoreError> {
        let (api, name, lease) = (self.api.clone(), self.name.clone(), lease.clone());
        let params = PostParams::default();
        let answer = if create {
            self.request("create", async move {
                api.create(&params, &lease)
                    .await
                    .map(|l| Answer::Written(Box::new(l)))
            })
            .await?
        } else {
            self.request("update", async move {
                api.replace(&name, &params, &lease)
                    .await
                    .map(|l| Answer::Written(Box::new(l)))
            })
            .await?
        };
        let Answer::Written(written) = answer else {
            unreachable!("a write answers with the Lease")
        };
        Ok(*written)
    }

    /// Try to take the Lease, which the last look found free or expired.
    pub(super) async fn take(&mut self) -> Result<Holding, StoreError> {
        let transitions = self
            .seen
            .as_ref()
            .map_or(0, |seen| seen.record.transitions())
            .max(self.highest_term)
            .max(0)
            .checked_add(1)
            .ok_or_else(|| KubernetesError::TermExhausted {
                namespace: self.namespace.clone(),
                lease: self.name.clone(),
            })?;
        let now = now_micro();
        let (mut lease, base) = match &self.seen {
            Some(seen) => (
                seen.lease.clone(),
                seen.lease.metadata.resource_version.clone(),
            ),
            None => (
                Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                },
                None,
            ),
        };
        let old = lease.spec.take().unwrap_or_default();
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_seconds),
            acquire_time: Some(now.clone()),
            renew_time: Some(now.clone()),
            lease_transitions: Some(transitions),
            preferred_holder: old.preferred_holder,
            strategy: old.strategy,
        });
        Self::set_successor(&mut lease, None);
        lease.metadata.managed_fields = None;
        let create = base.is_none();
        let sent_at = Instant::now();
        self.attempt = Some(Attempt {
            base,
            transitions,
            acquire_time: Some(now.clone()),
        });
        let written = self.write(&lease, create).await?;
        self.attempt = None;
        self.held = Some(Held {
            term: transitions,
            acquire_time: Some(now),
        });
        self.watch = None;
        self.apply(Some(written));
        Ok(Holding {
            term: transitions as u64,
            valid_until: sent_at + self.timing.lease_duration,
        })
    }

    /// Whether the record still shows our holding.
    pub(super) fn still_ours(&self) -> bool {
        match (&self.held, &self.seen) {
            (Some(held), Some(seen)) => {
                seen.record.holder() == Some(self.identity.as_str())
                    && seen.record.transitions() == held.term
                    && seen.record.spec.acquire_time == held.acquire_time
            }
            _ => false,
        }
    }

    /// Write our record (renewed, or released for `release`), compare-and-swap on the version
    /// last read; after a conflict, read again and retry while the record is still ours.
    pub(super) async fn rewrite(
        &mut self,
        release: Option<Option<&str>>,
    ) -> Result<(), StoreError> {
        for _ in 0..CAS_ATTEMPTS {
            self.settle().await;
            if self.stale {
                self.refresh().await?;
            }
            if !self.still_ours() {
                self.held = None;
                return Err(self.lost());
            }
            let (Some(held), Some(seen)) = (&self.held, &self.seen) else {
                return Err(self.lost());
            };
            let now = now_micro();
            let mut lease = seen.lease.clone();
            lease.metadata.managed_fields = None;
            let old = lease.spec.take().unwrap_or_default();
            let (holder, acquire_time, successor) = match release {
                None => (self.identity.clone(), held.acquire_time.clone(), None),
                // client-go's release also stamps both times.
                Some(successor) => (
                    String::new(),
                    Some(now.clone()),
                    successor.map(|s| (s, held.term)),
                ),
            };
            lease.spec = Some(LeaseSpec {
                holder_identity: Some(holder),
                lease_duration_seconds: Some(self.lease_seconds),
                acquire_time,
                renew_time: Some(now),
                lease_transitions: Some(held.term),
                preferred_holder: old.preferred_holder,
                strategy: old.strategy,
            });
            Self::set_successor(&mut lease, successor);
            match self.write(&lease, false).await {
                Ok(written) => {
                    if release.is_some() {
                        self.held = None;
                    }
                    self.apply(Some(written));
                    return Ok(());
                }
                Err(StoreError::Kubernetes(KubernetesError::Conflict { .. })) => {
                    self.refresh().await?;
                }
                Err(e) if is_not_found(&e) => {
                    self.seen = None;
                    self.held = None;
                    return Err(self.lost());
                }
                Err(e) => return Err(e),
            }
        }
        // Someone keeps editing the Lease under us; the elector retries.
        Err(KubernetesError::Contended {
            namespace: self.namespace.clone(),
            lease: self.name.clone(),
        }
        .into())
    }

    pub(super) fn lost(&self) -> StoreError {
        let reason = match &self.seen {
            None => format!("lease {}/{} is gone", self.namespace, self.name),
            Some(seen) => format!(
                "lease {}/{} names {:?} in term {}",
                self.namespace,
                self.name,
                seen.record.holder().unwrap_or(""),
                seen.record.term()
            ),
        };
        StoreError::Lost { reason }
    }

    pub(super) async fn campaign_or_observe(
        &mut self,
        last_seen: &Observation,
        campaign: bool,
    ) -> Result<Acquired, StoreError> {
        if self.watch.is_none() {
            // Not watching: what we saw may be old. A live watch keeps `seen` current.
            self.stale = true;
        }
        loop {
            // First what a call left in flight wrote (a take-over that landed makes us the
            // holder), so that no new take-over is built on an older read.
            self.settle().await;
            if self.stale {
                self.refresh().await?;
            }
            if let Some(held) = &self.held {
                let term = held.term;
                if !campaign {
                    // A take-over cancelled in flight applied after all; give it back.
                    self.rewrite(Some(None)).await?;
                    continue;
                }
                let sent_at = Instant::now();
                self.rewrite(None).await?;
                return Ok(Acquired::Held(Holding {
                    term: term as u64,
                    valid_until: sent_at + self.timing.lease_duration,
                }));
            }
            let verdict = self.verdict(Instant::now());
            if campaign && verdict.may_take {
                match self.take().await {
                    Ok(holding) => return Ok(Acquired::Held(holding)),
                    Err(StoreError::Kubernetes(KubernetesError::Conflict { .. })) => {
                        tracing::debug!(lease = %self.name, "lost the race to take the lease");
                        self.stale = true;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            if verdict.seen != *last_seen {
                return Ok(Acquired::Observed(verdict.seen));
            }
            self.wait(verdict.until).await?;
        }
    }
}

impl Drop for LeaseCandidate {
    /// A seat dropped (the holding abandoned, the daemon stopping) sends nothing more: a renewal
    /// landing after an abandoned holding would only delay the standby.
    fn drop(&mut self) {
        if let Some(in_flight) = self.in_flight.take() {
            in_flight.task.abort();
        }
    }
}

#[async_trait]
impl Candidate for LeaseCandidate {
    async fn acquire(&mut self, last_seen: &Observation) -> Result<Acquired, StoreError> {
        self.campaign_or_observe(last_seen, true).await
    }

    async fn keep(&mut self) -> Result<Instant, StoreError> {
        if self.held.is_none() {
            return Err(StoreError::Lost {
                reason: format!(
                    "lease {}/{} is not held by this replica",
                    self.namespace, self.name
                ),
            });
        }
        let sent_at = Instant::now();
        self.rewrite(None).await?;
        Ok(sent_at + self.timing.lease_duration)
    }

    async fn release(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
        self.settle_within(self.timing.renew_deadline / 2).await;
        if self.held.is_none() && self.attempt.is_some() {
            // A take-over cancelled in flight may have applied: find out before leaving.
            self.refresh().await?;
        }
        if self.held.is_none() {
            return Ok(());
        }
        let released = self.rewrite(Some(successor)).await;
        // Whatever happened, we no longer claim it: a failed release ends by expiry.
        self.held = None;
        self.attempt = None;
        match released {
            Err(StoreError::Lost { .. }) => Ok(()),
            other => other,
        }
    }

    async fn observe(&mut self, last_seen: &Observation) -> Result<Observation, StoreError> {
        match self.campaign_or_observe(last_seen, false).await? {
            Acquired::Observed(seen) => Ok(seen),
            Acquired::Held(_) => unreachable!("observing never campaigns"),
        }
    }
}
