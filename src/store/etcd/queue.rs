//! The candidate's key in the election's queue: consistent reads, guarded writes, the successor
//! reservation, and waiting on the predecessor's key.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::time::timeout;

use super::error::EtcdError;
use super::revoke::Reaper;
use super::session::Session;
use crate::store::{Observation, StoreError};

/// This candidate's key in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Queued {
    pub(super) revision: i64,
}

/// One consistent read of an election.
pub(super) struct View {
    /// The revision of the read; watches start after it.
    pub(super) revision: i64,
    /// The key with the lowest create revision.
    pub(super) leader: Option<KeyValue>,
    /// Our own key, if it exists.
    pub(super) mine: Option<KeyValue>,
    /// The newest key older than ours.
    pub(super) predecessor: Option<KeyValue>,
    /// The identity the election is reserved for.
    pub(super) reserved_for: Option<String>,
}

/// What to wait for after a read.
pub(super) struct WaitFor<'a> {
    /// Keys whose every event ends the wait.
    pub(super) keys: Vec<&'a str>,
    /// A range in which a new key ends the wait.
    pub(super) new_key_in: Option<&'a str>,
}

pub(super) struct EtcdCandidate {
    pub(super) client: Client,
    pub(super) endpoints: String,
    /// `<prefix><election>/`: the key range of the election.
    pub(super) queue: String,
    /// `<prefix><election>.successor`: the successor reservation.
    pub(super) reservation: String,
    pub(super) identity: String,
    pub(super) ttl_secs: i64,
    pub(super) request_timeout: Duration,
    pub(super) session: Session,
    /// Our key, as last created or read.
    pub(super) mine: Option<Queued>,
    /// Whether `acquire` reported the election held and nothing since ended it.
    pub(super) held: bool,
    /// The greatest leader term seen, reported while nobody leads.
    pub(super) last_term: u64,
    /// The revoke of the expired lease this candidate last waited on (its predecessor's, or
    /// the leader's while it observed).
    pub(super) reaper: Option<Reaper>,
}

pub(super) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(super) fn first_kv(response: Option<&TxnOpResponse>) -> Option<KeyValue> {
    match response {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    }
}

/// Run one request, failing with [`StoreError::Timeout`] after `limit`.
pub(super) async fn call_within<T>(
    limit: Duration,
    op: &'static str,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
    wrap: impl FnOnce(etcd_client::Error) -> EtcdError,
) -> Result<T, StoreError> {
    match timeout(limit, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(wrap(source).into()),
        Err(_) => Err(StoreError::Timeout { op, after: limit }),
    }
}

impl EtcdCandidate {
    /// Our key: the queue prefix and the session lease in lowercase hex, as etcd's recipe names
    /// it.
    pub(super) fn key(&self) -> String {
        format!("{}{:x}", self.queue, self.session.lease)
    }

    /// Run one request under the request timeout.
    pub(super) async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
        wrap: impl FnOnce(etcd_client::Error) -> EtcdError,
    ) -> Result<T, StoreError> {
        call_within(self.request_timeout, op, request, wrap).await
    }

    pub(super) async fn txn(
        &self,
        op: &'static str,
        txn: Txn,
        wrap: impl FnOnce(etcd_client::Error) -> EtcdError,
    ) -> Result<TxnResponse, StoreError> {
        let mut kv = self.client.kv_client();
        self.call(op, kv.txn(txn), wrap).await
    }

    /// Read the leader, our key, our predecessor and the reservation at one revision.
    pub(super) async fn read(&self) -> Result<View, StoreError> {
        let key = self.key();
        let mut ops = vec![
            TxnOp::get(
                self.queue.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(self.reservation.as_str(), None),
            TxnOp::get(key.as_str(), None),
        ];
        if let Some(mine) = self.mine {
            ops.push(TxnOp::get(
                self.queue.as_str(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Descend)
                        .with_max_create_revision(mine.revision - 1)
                        .with_limit(1),
                ),
            ));
        }
        let range = self.queue.clone();
        let response = self
            .txn("read election", Txn::new().and_then(ops), |source| {
                EtcdError::ReadElection { range, source }
            })
            .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let results = response.op_responses();
        let mine = first_kv(results.get(2));
        // The predecessor was read relative to the key we knew; if the key is another one now,
        // the caller reads again.
        let predecessor = match (&mine, self.mine) {
            (Some(kv), Some(known)) if kv.create_revision() == known.revision => {
                first_kv(results.get(3))
            }
            _ => None,
        };
        Ok(View {
            revision,
            leader: first_kv(results.first()),
            reserved_for: first_kv(results.get(1)).map(|kv| text(kv.value())),
            mine,
            predecessor,
        })
    }

    /// What followers report: the leader key's value and create revision.
    pub(super) fn observation(&mut self, leader: Option<&KeyValue>) -> Observation {
        match leader {
            Some(kv) => {
                let term = kv.create_revision().max(0) as u64;
                self.last_term = self.last_term.max(term);
                Observation {
                    holder: Some(text(kv.value())),
                    term,
                }
            }
            None => Observation {
                holder: None,
                term: self.last_term,
            },
        }
    }

    /// A new session if the lease is gone (its keys went with it).
    pub(super) async fn ensure_session(&mut self) -> Result<(), StoreError> {
        if self.session.gone() {
            tracing::info!(
                lease = format!("{:x}", self.session.lease),
                "etcd session lease gone; starting a new session"
            );
            self.mine = None;
            self.held = false;
            self.session = Session::start(
                &self.client,
                self.ttl_secs,
                self.request_timeout,
                &self.endpoints,
            )
            .await?;
        }
        Ok(())
    }

    /// Join the queue: create our key if absent, bound to the session lease.
    pub(super) async fn enqueue(&mut self) -> Result<(), StoreError> {
        let key = self.key();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.as_str(),
                self.identity.as_str(),
                Some(PutOptions::new().with_lease(self.session.lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let name = key.clone();
        let response = self
            .txn("create candidate key", txn, |source| EtcdError::Campaign {
                key: name,
                source,
            })
            .await?;
        let revision = if response.succeeded() {
            response.header().map_or(0, |h| h.revision())
        } else {
            first_kv(response.op_responses().first()).map_or(0, |kv| kv.create_revision())
        };
        self.mine = (revision > 0).then_some(Queued { revision });
        Ok(())
    }

    /// Delete our key: guarded by its create revision when we know it. With a successor, write
    /// the reservation in the same transaction.
    pub(super) async fn delete_mine(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
        let key = self.key();
        let mut then = vec![TxnOp::delete(key.as_str(), None)];
        if let Some(successor) = successor {
            let reservation_lease = self.grant_reservation_lease().await?;
            then.push(TxnOp::put(
                self.reservation.as_str(),
                successor,
                Some(PutOptions::new().with_lease(reservation_lease)),
            ));
        }
        let guard = match self.mine {
            Some(mine) => vec![Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                mine.revision,
            )],
            None => Vec::new(),
        };
        let name = key.clone();
        self.txn(
            "delete candidate key",
            Txn::new().when(guard).and_then(then),
            |source| EtcdError::Resign { key: name, source },
        )
        .await?;
        // Deleted now, or already gone (the guard failed): either way not ours any more.
        self.mine = None;
        self.held = false;
        Ok(())
    }

    pub(super) async fn grant_reservation_lease(&self) -> Result<i64, StoreError> {
        let mut leases = self.client.lease_client();
        let key = self.reservation.clone();
        let granted = self
            .call(
                "grant reservation lease",
                leases.grant(self.ttl_secs, None),
                |source| EtcdError::Reserve { key, source },
            )
            .await?;
        Ok(granted.id())
    }

    /// Delete the reservation for us, now that we lead; guarded by our key so that a stale
    /// candidate cannot clear another's reservation.
    pub(super) async fn clear_reservation(&self, mine: Queued) -> Result<(), StoreError> {
        let txn = Txn::new()
            .when([
                Compare::create_revision(self.key(), CompareOp::Equal, mine.revision),
                Compare::value(
                    self.reservation.as_str(),
                    CompareOp::Equal,
                    self.identity.as_str(),
                ),
            ])
            .and_then([TxnOp::delete(self.reservation.as_str(), None)]);
        let key = self.reservation.clone();
        self.txn("clear reservation", txn, |source| EtcdError::Reserve {
            key,
            source,
        })
        .await?;
        Ok(())
    }

    /// Wait until something in `what` changes after `revision`, or the session lease is gone.
    pub(super) async fn wait(
        &mut self,
        revision: i64,
        what: WaitFor<'_>,
    ) -> Result<(), StoreError> {
        // Start right after the read, so that no change in between is missed.
        let from = WatchOptions::new().with_start_revision(revision + 1);
        let mut targets: Vec<(String, WatchOptions)> = what
            .keys
            .iter()
            .map(|key| ((*key).to_owned(), from.clone()))
            .collect();
        if let Some(range) = what.new_key_in {
            let new_keys = from
                .clone()
                .with_prefix()
                .with_filters([WatchFilterType::NoDelete]);
            targets.push((range.to_owned(), new_keys));
        }
        let mut targets = targets.into_iter();
        let Some((first, options)) = targets.next() else {
            return Ok(());
        };
        let watch_error = |key: &str| {
            let key = key.to_owned();
            move |source| EtcdError::Watch { key, source }
        };
        let mut watches = self.client.watch_client();
        let mut stream = self
            .call(
                "watch",
                watches.watch(first.as_str(), Some(options)),
                watch_error(&first),
            )
            .await?;
        // More watches on the same stream.
        for (key, options) in targets {
            self.call(
                "watch",
                stream.watch(key.as_str(), Some(options)),
                watch_error(&key),
            )
            .await?;
        }
        loop {
            let message = tokio::select! {
                message = stream.message() => message,
                _ = self.session.wait_gone() => return Ok(()),
            };
            match message {
                Ok(Some(response)) => {
                    if response.canceled() || !response.events().is_empty() {
                        // A change, or the watch could not start at our revision (compacted):
                        // read again either way.
                        return Ok(());
                    }
                }
                Ok(None) => return Err(EtcdError::WatchEnded { key: first }.into()),
                Err(source) => return Err(EtcdError::Watch { key: first, source }.into()),
            }
        }
    }
}
