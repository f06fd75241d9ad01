//! The store contract for etcd: acquire, keep, release and observe on a candidate's queue key.

use async_trait::async_trait;
use tokio::time::Instant;

use super::error::EtcdError;
use super::queue::{EtcdCandidate, Queued, View, WaitFor, text};
use super::revoke::Reaper;
use super::session::Renewal;
use crate::store::{Acquired, Candidate, Holding, Observation, StoreError};

#[async_trait]
impl Candidate for EtcdCandidate {
    async fn acquire(&mut self, last_seen: &Observation) -> Result<Acquired, StoreError> {
        loop {
            self.ensure_session().await?;
            let view = self.read().await?;
            match (&view.mine, self.mine) {
                (Some(kv), Some(known)) if kv.create_revision() == known.revision => {}
                (Some(kv), _) => {
                    // Created by a call that was cancelled before it could record it: adopt it
                    // and read again for its predecessor.
                    self.mine = Some(Queued {
                        revision: kv.create_revision(),
                    });
                    continue;
                }
                (None, _) => {
                    self.mine = None;
                    self.held = false;
                }
            }
            let reserved_for_other = view
                .reserved_for
                .as_deref()
                .is_some_and(|s| s != self.identity);
            let Some(mine) = self.mine else {
                if !reserved_for_other {
                    self.enqueue().await?;
                } else if let Some(seen) = self.wait_out_reservation(&view, last_seen).await? {
                    return Ok(Acquired::Observed(seen));
                }
                continue;
            };
            if view.predecessor.is_some() {
                if let Some(seen) = self.wait_for_predecessor(&view, last_seen).await? {
                    return Ok(Acquired::Observed(seen));
                }
                continue;
            }
            if reserved_for_other {
                // At the head of the queue, but the election is reserved for another: step aside.
                self.delete_mine(None).await?;
                continue;
            }
            // Ours: the lowest create revision. Prove the session now.
            let proof = match self.session.renew().await {
                Renewal::Renewed(proof) => proof,
                Renewal::Gone => continue,
                Renewal::Failed(error) => return Err(error),
            };
            if view.reserved_for.is_some() {
                self.clear_reservation(mine).await?;
            }
            self.held = true;
            self.reaper = None;
            // No overflow check: the term is our key's create revision, which etcd makes
            // greater than every earlier revision (and a key is created only after the
            // previous leader's), so it exceeds every earlier term; an i64 never reaches u64::MAX.
            let term = mine.revision.max(0) as u64;
            self.last_term = self.last_term.max(term);
            return Ok(Acquired::Held(Holding {
                term,
                valid_until: proof.valid_until(),
            }));
        }
    }

    async fn keep(&mut self) -> Result<Instant, StoreError> {
        let (true, Some(mine)) = (self.held, self.mine) else {
            return Err(StoreError::Lost {
                reason: format!("{} is not held by this candidate", self.queue),
            });
        };
        let key = self.key();
        let mut kv = self.client.kv_client();
        let name = key.clone();
        let (renewal, read) = tokio::join!(
            self.session.renew(),
            self.call("read candidate key", kv.get(key.as_str(), None), |source| {
                EtcdError::ReadElection {
                    range: name,
                    source,
                }
            })
        );
        let proof = match renewal {
            Renewal::Renewed(proof) => proof,
            Renewal::Gone => {
                self.held = false;
                self.mine = None;
                return Err(StoreError::Lost {
                    reason: format!(
                        "etcd session lease {:x} is gone (expired or revoked)",
                        self.session.lease
                    ),
                });
            }
            Renewal::Failed(error) => return Err(error),
        };
        let read = read?;
        match read.kvs().first() {
            Some(kv) if kv.create_revision() == mine.revision => Ok(proof.valid_until()),
            _ => {
                self.held = false;
                self.mine = None;
                Err(StoreError::Lost {
                    reason: format!(
                        "candidate key {key} (create revision {}) vanished: lease expired or \
                         deleted by hand",
                        mine.revision
                    ),
                })
            }
        }
    }

    async fn release(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
        if self.session.gone() {
            self.mine = None;
            self.held = false;
            return Ok(());
        }
        let successor = successor.filter(|s| self.held && *s != self.identity);
        self.delete_mine(successor).await
    }

    async fn observe(&mut self, last_seen: &Observation) -> Result<Observation, StoreError> {
        loop {
            let view = self.read().await?;
            if view.mine.is_some() {
                // Not campaigning: leave the queue, so that we never lead in secret.
                self.mine = view.mine.as_ref().map(|kv| Queued {
                    revision: kv.create_revision(),
                });
                self.delete_mine(None).await?;
                continue;
            }
            self.mine = None;
            self.held = false;
            let seen = self.observation(view.leader.as_ref());
            if seen != *last_seen {
                return Ok(seen);
            }
            let leader = view.leader.as_ref().map(|kv| text(kv.key()));
            let keys: Vec<&str> = leader.iter().map(String::as_str).collect();
            let queue = self.queue.clone();
            let new_key_in = view.leader.is_none().then_some(queue.as_str());
            // A dead leader's key goes the moment its lease expires, not up to 500 ms later
            // when etcd's lessor gets to it: a member that stands by under --balance may be
            // the one to take the election over once its holder's member key is gone too.
            let expiry = match &view.leader {
                Some(leader) => Some(Reaper::wait(
                    &mut self.reaper,
                    self.client.lease_client(),
                    leader.lease(),
                    self.request_timeout,
                    "leader",
                )),
                None => {
                    self.reaper = None;
                    None
                }
            };
            let waited = self.wait(view.revision, WaitFor { keys, new_key_in });
            let Some(expiry) = expiry else {
                waited.await?;
                continue;
            };
            tokio::select! {
                waited = waited => waited?,
                // Revoked (or found gone): the watch reports the deletion; read again.
                () = expiry => {}
            }
        }
    }
}

impl EtcdCandidate {
    /// Out of the queue while the election is reserved for a named successor: the leader if it
    /// differs from `last_seen`, else wait until the reservation, the leader or the queue
    /// changes (`None`: read again).
    async fn wait_out_reservation(
        &mut self,
        view: &View,
        last_seen: &Observation,
    ) -> Result<Option<Observation>, StoreError> {
        let seen = self.observation(view.leader.as_ref());
        if seen != *last_seen {
            return Ok(Some(seen));
        }
        let leader = view.leader.as_ref().map(|kv| text(kv.key()));
        let mut keys = vec![self.reservation.clone()];
        keys.extend(leader);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let queue = self.queue.clone();
        let new_key_in = view.leader.is_none().then_some(queue.as_str());
        self.wait(view.revision, WaitFor { keys, new_key_in })
            .await?;
        Ok(None)
    }

    /// Queued behind a predecessor: the leader if it differs from `last_seen`, else wait until
    /// the predecessor's key (or the leader's) is deleted, revoking the predecessor's lease the
    /// moment it expires (`None`: read again).
    async fn wait_for_predecessor(
        &mut self,
        view: &View,
        last_seen: &Observation,
    ) -> Result<Option<Observation>, StoreError> {
        let Some(predecessor) = &view.predecessor else {
            return Ok(None);
        };
        self.held = false;
        let seen = self.observation(view.leader.as_ref());
        if seen != *last_seen {
            return Ok(Some(seen));
        }
        let mut keys = vec![text(predecessor.key())];
        if let Some(leader) = &view.leader
            && leader.key() != predecessor.key()
        {
            keys.push(text(leader.key()));
        }
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let expiry = Reaper::wait(
            &mut self.reaper,
            self.client.lease_client(),
            predecessor.lease(),
            self.request_timeout,
            "predecessor",
        );
        let waited = self.wait(
            view.revision,
            WaitFor {
                keys,
                new_key_in: None,
            },
        );
        tokio::select! {
            waited = waited => waited?,
            // Revoked (or found gone): the watch reports the deletion; read again.
            () = expiry => {}
        }
        Ok(None)
    }
}
