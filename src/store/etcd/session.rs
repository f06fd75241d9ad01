//! A candidate's session: the lease its queue key is bound to, and the owned task that keeps it
//! alive (every third of the TTL, and whenever the leader calls `keep`).

use std::time::Duration;

use etcd_client::{Client, LeaseClient, LeaseKeepAliveStream, LeaseKeeper};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};

use super::{error::EtcdError, revoke::ask};
use crate::store::StoreError;

/// Proof that the session lease is alive: a keep-alive sent at `sent_at` was answered with
/// `ttl`, so the server keeps the lease at least until `sent_at + ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Proof {
    pub(super) sent_at: Instant,
    pub(super) ttl: Duration,
}

impl Proof {
    pub(super) fn valid_until(&self) -> Instant {
        self.sent_at + self.ttl
    }
}

/// The session lease as its keep-alive task last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LeaseState {
    /// Renewed; the last proof.
    Alive(Proof),
    /// The server no longer knows the lease (expired or revoked): every key bound to it is gone.
    Gone,
}

/// What a renewal answers.
pub(super) enum Renewal {
    Renewed(Proof),
    Gone,
    Failed(StoreError),
}

pub(super) type RenewRequest = oneshot::Sender<Renewal>;

/// A task that is aborted when its owner drops this handle.
pub(super) struct OwnedTask(JoinHandle<()>);

impl OwnedTask {
    pub(super) fn spawn(task: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        OwnedTask(tokio::spawn(task))
    }
}

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A candidate's session: a lease and the task that keeps it alive.
pub(super) struct Session {
    pub(super) lease: i64,
    pub(super) renew: mpsc::Sender<RenewRequest>,
    pub(super) state: watch::Receiver<LeaseState>,
    pub(super) _task: OwnedTask,
}

impl Session {
    /// Grant a lease of `ttl_secs` and start keeping it alive.
    pub(super) async fn start(
        client: &Client,
        ttl_secs: i64,
        request_timeout: Duration,
        endpoints: &str,
    ) -> Result<Session, StoreError> {
        let mut leases = client.lease_client();
        let sent_at = Instant::now();
        let granted = match timeout(request_timeout, leases.grant(ttl_secs, None)).await {
            Ok(Ok(granted)) => granted,
            Ok(Err(source)) => {
                return Err(EtcdError::GrantLease {
                    endpoints: endpoints.to_owned(),
                    source,
                }
                .into());
            }
            Err(_) => {
                return Err(StoreError::Timeout {
                    op: "lease grant",
                    after: request_timeout,
                });
            }
        };
        let lease = granted.id();
        if granted.ttl() > ttl_secs {
            tracing::warn!(
                lease = format!("{lease:x}"),
                asked = ttl_secs,
                granted = granted.ttl(),
                "etcd raised the session TTL to its minimum; a crashed leader is replaced later"
            );
        }
        let proof = Proof {
            sent_at,
            ttl: Duration::from_secs(granted.ttl().max(0) as u64),
        };
        let (state_tx, state) = watch::channel(LeaseState::Alive(proof));
        let (renew, requests) = mpsc::channel(1);
        let keeper = KeepAlive {
            leases,
            lease,
            request_timeout,
            stream: None,
            state: state_tx,
        };
        let task = tokio::spawn(keeper.run(requests, proof));
        Ok(Session {
            lease,
            renew,
            state,
            _task: OwnedTask(task),
        })
    }

    /// Whether the keep-alive task saw the lease gone.
    pub(super) fn gone(&self) -> bool {
        *self.state.borrow() == LeaseState::Gone
    }

    /// Renew the lease now and return the proof.
    pub(super) async fn renew(&self) -> Renewal {
        let (reply, answer) = oneshot::channel();
        if self.renew.send(reply).await.is_err() {
            return Renewal::Gone;
        }
        answer.await.unwrap_or(Renewal::Gone)
    }

    /// Resolves when the lease is seen gone.
    pub(super) async fn wait_gone(&mut self) {
        let ended = self
            .state
            .wait_for(|state| *state == LeaseState::Gone)
            .await
            .is_err();
        if ended {
            // The task ended, which it does not while `self` lives: nothing more to see.
            std::future::pending::<()>().await;
        }
    }
}

/// The keep-alive task of one session.
pub(super) struct KeepAlive {
    pub(super) leases: LeaseClient,
    pub(super) lease: i64,
    pub(super) request_timeout: Duration,
    pub(super) stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    pub(super) state: watch::Sender<LeaseState>,
}

impl KeepAlive {
    /// Renew every third of the TTL and on request, until the owner drops the session.
    pub(super) async fn run(mut self, mut requests: mpsc::Receiver<RenewRequest>, first: Proof) {
        let mut next = first.sent_at + first.ttl / 3;
        loop {
            let reply = tokio::select! {
                request = requests.recv() => match request {
                    Some(reply) => Some(reply),
                    None => return,
                },
                _ = sleep_until(next), if *self.state.borrow() != LeaseState::Gone => None,
            };
            let outcome = if *self.state.borrow() == LeaseState::Gone {
                Renewal::Gone
            } else {
                self.renew_once().await
            };
            match &outcome {
                Renewal::Renewed(proof) => {
                    next = proof.sent_at + proof.ttl / 3;
                    self.state.send_replace(LeaseState::Alive(*proof));
                }
                Renewal::Gone => {
                    self.state.send_replace(LeaseState::Gone);
                }
                Renewal::Failed(error) => {
                    let retry = match *self.state.borrow() {
                        LeaseState::Alive(proof) => proof.ttl / 6,
                        LeaseState::Gone => Duration::ZERO,
                    };
                    next = Instant::now() + retry.max(Duration::from_millis(200));
                    tracing::debug!(lease = format!("{:x}", self.lease), error = %error,
                        "keep-alive failed; retrying");
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    }

    /// Whether the server says the lease has expired or was revoked (TimeToLive answers -1).
    /// No answer is no proof: the caller then treats its error as a failure to retry.
    async fn expired(&mut self) -> bool {
        let answer = ask(&mut self.leases, self.lease, self.request_timeout).await;
        answer.is_some_and(|a| a.remaining < 0)
    }

    pub(super) async fn renew_once(&mut self) -> Renewal {
        let sent_at = Instant::now();
        let after = self.request_timeout;
        let lease = self.lease;
        let failed =
            |source| Renewal::Failed(StoreError::from(EtcdError::KeepAlive { lease, source }));
        let timed_out = || {
            Renewal::Failed(StoreError::Timeout {
                op: "lease keep-alive",
                after,
            })
        };
        let Some((keeper, responses)) = self.stream.as_mut() else {
            // Opening the stream sends the first keep-alive and waits for its answer.
            return match timeout(after, self.leases.keep_alive(lease)).await {
                Ok(Ok((keeper, responses))) => {
                    self.stream = Some((keeper, responses));
                    match *self.state.borrow() {
                        LeaseState::Alive(proof) => Renewal::Renewed(Proof {
                            sent_at,
                            ttl: proof.ttl,
                        }),
                        LeaseState::Gone => Renewal::Gone,
                    }
                }
                // Whether the lease is gone is asked of the server, not read from the error's
                // text.
                Ok(Err(source)) if self.expired().await => {
                    tracing::debug!(lease = format!("{lease:x}"), %source, "keep-alive: lease gone");
                    Renewal::Gone
                }
                Ok(Err(source)) => failed(source),
                Err(_) => timed_out(),
            };
        };
        let exchange = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        let outcome = match timeout(after, exchange).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                return Renewal::Renewed(Proof {
                    sent_at,
                    ttl: Duration::from_secs(response.ttl() as u64),
                });
            }
            Ok(Ok(Some(_))) => Renewal::Gone,
            Ok(Ok(None)) => Renewal::Failed(EtcdError::KeepAliveEnded { lease }.into()),
            Ok(Err(source)) => failed(source),
            Err(_) => timed_out(),
        };
        // After a failure the stream may be broken or out of step: open a new one next time.
        self.stream = None;
        outcome
    }
}
