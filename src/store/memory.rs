//! An in-process store for paused-time tests of the elector: leases judged on tokio's clock,
//! change notification through a watch channel, and network faults on demand
//! ([`MemoryStore::partition`] cuts one identity off the store, [`MemoryStore::heal`] reconnects
//! it), after the `isolate`/`recover` helpers of raft-rs's test harness.
//!
//! It is a real store in every other respect: acquisition is exclusive, a holding lasts one lease
//! duration without renewal, and terms only grow.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
};

use async_trait::async_trait;
use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};

use super::{Acquired, Candidate, ErrorKind, Holding, Membership, Observation, Store, StoreError};
use crate::{balance::Member, timing::Timing};

/// Errors of the in-memory store.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The caller is cut off from the store by [`MemoryStore::partition`].
    #[error("memory store unreachable for {identity} (partitioned)")]
    Partitioned {
        /// The partitioned identity.
        identity: String,
    },
    /// The election's last term is `u64::MAX`: no greater term exists.
    #[error("election {election} is at the largest term: no greater term exists")]
    TermAtMaximum {
        /// The election.
        election: String,
    },
    /// Another live membership of the group has this identity.
    #[error("identity {identity:?} is already a live member of balancing group {group}")]
    MemberInUse {
        /// The group.
        group: String,
        /// The identity in use.
        identity: String,
    },
}

impl MemoryError {
    /// A partition, like a live duplicate member, is a refusal to retry; an exhausted term
    /// needs a person.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MemoryError::Partitioned { .. } | MemoryError::MemberInUse { .. } => {
                ErrorKind::Unavailable
            }
            MemoryError::TermAtMaximum { .. } => ErrorKind::Invalid,
        }
    }
}

/// A shared in-memory store; clones see the same elections.
#[derive(Clone, Default)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change of any record or partition, so waiters re-check.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct State {
    records: HashMap<String, Record>,
    partitioned: HashSet<String>,
    /// Balancing groups: group to identity to what the member announced (`None`: nothing yet).
    groups: HashMap<String, BTreeMap<String, Option<BTreeSet<String>>>>,
    /// Test hook: joining the key election panics once the value election is held.
    #[cfg(test)]
    panics: HashMap<String, String>,
}

#[derive(Default)]
struct Record {
    holder: Option<String>,
    term: u64,
    expires: Option<Instant>,
    successor: Option<(String, Instant)>,
}

impl Record {
    /// The holder whose lease has not expired at `now`.
    fn live_holder(&self, now: Instant) -> Option<&str> {
        match (&self.holder, self.expires) {
            (Some(h), Some(e)) if e > now => Some(h),
            _ => None,
        }
    }

    fn observation(&self, now: Instant) -> Observation {
        Observation {
            holder: self.live_holder(now).map(str::to_owned),
            term: self.term,
        }
    }

    /// The next instant at which this record changes by itself (an expiry).
    fn next_expiry(&self, now: Instant) -> Option<Instant> {
        let lease = self.expires.filter(|e| *e > now && self.holder.is_some());
        let successor = self
            .successor
            .as_ref()
            .map(|(_, t)| *t)
            .filter(|t| *t > now);
        lease.into_iter().chain(successor).min()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cut `identity` off the store: its calls fail until [`MemoryStore::heal`].
    pub fn partition(&self, identity: &str) {
        self.lock().partitioned.insert(identity.to_owned());
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// Reconnect `identity`.
    pub fn heal(&self, identity: &str) {
        self.lock().partitioned.remove(identity);
        self.shared.changed.send_modify(|v| *v += 1);
    }

    /// The holder of `election` with a live lease, as the store sees it now.
    pub fn holder(&self, election: &str) -> Option<String> {
        let now = Instant::now();
        let state = self.lock();
        state
            .records
            .get(election)
            .and_then(|r| r.live_holder(now))
            .map(str::to_owned)
    }

    /// Make joining `election` panic once `held` has a holder: a bug in one election's task.
    #[cfg(test)]
    pub(crate) fn panic_once_held(&self, election: &str, held: &str) {
        self.lock()
            .panics
            .insert(election.to_owned(), held.to_owned());
    }

    /// Set the last term of `election`, as a person editing the store could.
    #[cfg(test)]
    pub(crate) fn set_term(&self, election: &str, term: u64) {
        self.lock()
            .records
            .entry(election.to_owned())
            .or_default()
            .term = term;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock can only come from a bug in this file; the state is
        // plain data and stays consistent, so keep going with it.
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        #[cfg(test)]
        let panics = self.lock().panics.get(election).cloned();
        #[cfg(test)]
        if let Some(held) = panics {
            let mut changes = self.shared.changed.subscribe();
            while self.holder(&held).is_none() {
                let _ = changes.changed().await;
            }
            panic!("test hook: election {election} panics once {held} is held");
        }
        let candidate = MemoryCandidate {
            store: self.clone(),
            election: election.to_owned(),
            identity: identity.to_owned(),
            timing,
        };
        candidate.reachable()?;
        Ok(Box::new(candidate))
    }

    async fn enroll(
        &self,
        group: &str,
        identity: &str,
        _timing: Timing,
    ) -> Result<Box<dyn Membership>, StoreError> {
        let mut state = self.lock();
        let members = state.groups.entry(group.to_owned()).or_default();
        // A second live membership of one identity would overwrite the first's record, and
        // the first's leave would end both.
        if members.contains_key(identity) {
            return Err(MemoryError::MemberInUse {
                group: group.to_owned(),
                identity: identity.to_owned(),
            }
            .into());
        }
        members.insert(identity.to_owned(), None);
        drop(state);
        self.shared.changed.send_modify(|v| *v += 1);
        Ok(Box::new(MemoryMembership {
            store: self.clone(),
            group: group.to_owned(),
            identity: identity.to_owned(),
            live: true,
        }))
    }

    fn describe(&self) -> String {
        "in-memory store".to_owned()
    }
}

/// A member of a group in the in-memory store: live until it leaves or is dropped.
struct MemoryMembership {
    store: MemoryStore,
    group: String,
    identity: String,
    /// Cleared by `leave`: from then on this membership writes nothing, so that neither a late
    /// announce nor its drop touches a later membership of the same identity.
    live: bool,
}

impl MemoryMembership {
    fn members(&self) -> Vec<Member> {
        let state = self.store.lock();
        let group = state.groups.get(&self.group).into_iter().flatten();
        group
            .filter_map(|(identity, eligible)| {
                Some(Member {
                    identity: identity.clone(),
                    eligible: eligible.clone()?,
                })
            })
            .collect()
    }

    fn set(&self, record: Option<Option<BTreeSet<String>>>) {
        if !self.live {
            return;
        }
        let mut state = self.store.lock();
        let group = state.groups.entry(self.group.clone()).or_default();
        match record {
            Some(record) => group.insert(self.identity.clone(), record),
            None => group.remove(&self.identity),
        };
        drop(state);
        self.store.shared.changed.send_modify(|v| *v += 1);
    }
}

#[async_trait]
impl Membership for MemoryMembership {
    async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError> {
        self.set(Some(Some(eligible.clone())));
        Ok(())
    }

    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError> {
        let mut changes = self.store.shared.changed.subscribe();
        loop {
            let now = self.members();
            if now != last_seen {
                return Ok(now);
            }
            let _ = changes.changed().await;
        }
    }

    async fn leave(&mut self) -> Result<(), StoreError> {
        self.set(None);
        self.live = false;
        Ok(())
    }
}

impl Drop for MemoryMembership {
    fn drop(&mut self) {
        self.set(None);
    }
}

struct MemoryCandidate {
    store: MemoryStore,
    election: String,
    identity: String,
    timing: Timing,
}

/// What one look at the record decided.
enum Look {
    Done(Acquired),
    Wait(Option<Instant>),
}

impl MemoryCandidate {
    fn reachable(&self) -> Result<(), MemoryError> {
        if self.store.lock().partitioned.contains(&self.identity) {
            return Err(MemoryError::Partitioned {
                identity: self.identity.clone(),
            });
        }
        Ok(())
    }

    /// Look at the record once: take it if `campaign` and free, report it if it changed.
    fn look(&self, last_seen: &Observation, campaign: bool) -> Result<Look, StoreError> {
        self.reachable()?;
        let now = Instant::now();
        let mut state = self.store.lock();
        let record = state.records.entry(self.election.clone()).or_default();
        let reserved_for_other = record
            .successor
            .as_ref()
            .is_some_and(|(s, until)| *s != self.identity && *until > now);
        if campaign && record.live_holder(now).is_none() && !reserved_for_other {
            record.term = record
                .term
                .checked_add(1)
                .ok_or_else(|| MemoryError::TermAtMaximum {
                    election: self.election.clone(),
                })?;
            record.holder = Some(self.identity.clone());
            record.successor = None;
            let valid_until = now + self.timing.lease_duration;
            record.expires = Some(valid_until);
            let term = record.term;
            drop(state);
            self.store.shared.changed.send_modify(|v| *v += 1);
            return Ok(Look::Done(Acquired::Held(Holding { term, valid_until })));
        }
        let seen = record.observation(now);
        if seen != *last_seen {
            return Ok(Look::Done(Acquired::Observed(seen)));
        }
        Ok(Look::Wait(record.next_expiry(now)))
    }

    /// Wait for any change in the store, or until `until`.
    async fn wait(&self, changes: &mut watch::Receiver<u64>, until: Option<Instant>) {
        let changed = changes.changed();
        match until {
            Some(t) => {
                tokio::select! {
                    _ = changed => {}
                    _ = sleep_until(t) => {}
                }
            }
            None => {
                // The sender lives in `self.store`, so this cannot fail while we wait.
                let _ = changed.await;
            }
        }
    }

    async fn campaign_or_observe(
        &self,
        last_seen: &Observation,
        campaign: bool,
    ) -> Result<Acquired, StoreError> {
        let mut changes = self.store.shared.changed.subscribe();
        loop {
            changes.mark_unchanged();
            match self.look(last_seen, campaign)? {
                Look::Done(outcome) => return Ok(outcome),
                Look::Wait(until) => self.wait(&mut changes, until).await,
            }
        }
    }
}

#[async_trait]
impl Candidate for MemoryCandidate {
    async fn acquire(&mut self, last_seen: &Observation) -> Result<Acquired, StoreError> {
        self.campaign_or_observe(last_seen, true).await
    }

    async fn keep(&mut self) -> Result<Instant, StoreError> {
        self.reachable()?;
        let now = Instant::now();
        let mut state = self.store.lock();
        let record = state.records.entry(self.election.clone()).or_default();
        if record.live_holder(now) != Some(self.identity.as_str()) {
            return Err(StoreError::Lost {
                reason: format!("the record of {} names another holder", self.election),
            });
        }
        let valid_until = now + self.timing.lease_duration;
        record.expires = Some(valid_until);
        Ok(valid_until)
    }

    async fn release(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
        self.reachable()?;
        let now = Instant::now();
        let mut state = self.store.lock();
        let record = state.records.entry(self.election.clone()).or_default();
        if record.live_holder(now) == Some(self.identity.as_str()) {
            record.holder = None;
            record.expires = None;
            record.successor = successor.map(|s| (s.to_owned(), now + self.timing.lease_duration));
            drop(state);
            self.store.shared.changed.send_modify(|v| *v += 1);
        }
        Ok(())
    }

    async fn observe(&mut self, last_seen: &Observation) -> Result<Observation, StoreError> {
        match self.campaign_or_observe(last_seen, false).await? {
            Acquired::Observed(seen) => Ok(seen),
            Acquired::Held(_) => unreachable!("observing never campaigns"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::conformance::Suite;

    #[tokio::test(start_paused = true)]
    async fn passes_the_conformance_suite() {
        let timing = Timing {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
        };
        let store = MemoryStore::new();
        let suite = Suite::new(Arc::new(store.clone()), timing, "mem-");
        suite.test_all().await;
        suite
            .refuses_a_term_past_the_maximum(|e| store.set_term(e, u64::MAX))
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_partitioned_candidate_fails_and_recovers_on_heal() {
        let store = MemoryStore::new();
        let mut a = store.join("e", "a", Timing::default()).await.unwrap();
        store.partition("a");
        let error = a.acquire(&Observation::default()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        store.heal("a");
        assert!(matches!(
            a.acquire(&Observation::default()).await.unwrap(),
            Acquired::Held(_)
        ));
    }
}
