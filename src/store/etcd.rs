//! The etcd v3 store: the election recipe of etcd's own `concurrency` package, so that Baton and
//! `etcdctl elect` share elections both ways.
//!
//! ```text
//!  <prefix><election>/<lease hex>   one key per candidate, value = identity, bound to the
//!                                   candidate's session lease; created only if absent
//!  <prefix><election>.successor     Baton only: a reservation for a named successor (below)
//!
//!  queue (by create revision):   [ 41: a ] [ 57: b ] [ 63: x (etcdctl) ]
//!                                    │         │ watches 41 until it is deleted
//!                                  leader      └── 63 watches 57 (no herd, no polling)
//! ```
//!
//! - A candidate's **session** is a lease with TTL `--lease-duration` (whole seconds), kept alive
//!   by a task that the candidate owns (aborted when the candidate is dropped), every third of
//!   the TTL and whenever the leader calls `keep`. Followers never call `keep`, so the task is
//!   what keeps their place in the queue.
//! - **acquire** creates `<prefix><election>/<lease id in lowercase hex>` in a transaction on
//!   create revision 0. The key with the lowest create revision leads; the others each watch
//!   the newest key older than their own until it is deleted, and the leader key for a change of
//!   leader to report. **Term** = the leader key's create revision, so every new holding, by
//!   Baton or by `etcdctl`, gets a greater term.
//! - **keep** renews the lease now and reads the own key: the holding lasts until the send time
//!   of that keep-alive plus the TTL the server granted. A vanished key (lease expired, deleted
//!   by hand) or a lease the server no longer knows is [`StoreError::Lost`] at once.
//! - **release** deletes the own key in a transaction guarded by its create revision (also when
//!   merely queued: leaving the election). Dropping a candidate without releasing is a crash: its
//!   key lives until its lease expires.
//! - **observe** takes the own key out of the queue, then follows the leader key.
//! - A waiter **revokes its predecessor's lease the moment etcd's clock says it expired**
//!   ([`revoke_when_expired`]) instead of waiting up to 500 ms for etcd's lessor, which revokes
//!   expired leases lazily: a crashed leader is replaced within milliseconds of its TTL.
//!
//! ## Releasing to a named successor
//!
//! etcd's recipe has no notion of a successor; `etcdctl` does not know one. A release for
//! successor S writes, in the same transaction that deletes the leader key, a reservation key
//! `<prefix><election>.successor` = S bound to a fresh lease of `--lease-duration`. It lies
//! outside the key range `<prefix><election>/` that `etcdctl elect` reads, so `etcdctl` never
//! sees it. A Baton candidate other than S honours it: it does not join the queue while the
//! reservation lives, and one that finds itself at the head of the queue steps out of it again
//! (deleting its key) and waits. S leads as soon as it is at the head and deletes the
//! reservation, which wakes the others to queue behind it; if S never comes, the reservation's
//! lease expires after one lease duration and the others go ahead. The price is that an
//! `etcdctl elect -l` observer may see a waiting Baton candidate at the head for the moment it
//! takes that candidate to step aside (it never acts as leader), and that an `etcdctl`
//! candidate, which knows nothing of the reservation, may take over before S.
//!
//! ## Mapping to `etcdctl`
//!
//! With `--etcd-prefix P`, election E is `etcdctl elect PE`: with the default prefix `baton/`,
//! `etcdctl elect baton/orders` campaigns in Baton's election `orders`, and
//! `etcdctl elect -l baton/orders` prints its leader.

use std::{path::Path, time::Duration};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    LeaseClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions, SortOrder, SortTarget, TlsOptions,
    Txn, TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions,
};
use tokio::{
    sync::{Mutex, mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout},
};

use super::{Acquired, Candidate, ErrorKind, Holding, Observation, Store, StoreError, Timing};
use crate::config::EtcdConfig;

/// How long connecting to an endpoint may take before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on open streams, to notice a dead connection. etcd answers pings more often
/// than every 5 s with GOAWAY ("too many pings"), so not more often than that.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the per-request timeout, which is otherwise the retry period.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Errors of the etcd store, each naming the operation that failed and where.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A file named by a flag could not be read when the store was opened.
    #[error("{flag} {}: cannot read: {source}", path.display())]
    ReadFile {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting (and, with a user, authenticating) failed.
    #[error(
        "cannot connect to etcd at {endpoints}: {}",
        explain_at(endpoints, source)
    )]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The session lease could not be granted.
    #[error(
        "cannot create an etcd session (lease grant) at {endpoints}: {}",
        explain_at(endpoints, source)
    )]
    GrantLease {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A keep-alive of the session lease failed.
    #[error("cannot keep etcd lease {lease:x} alive: {}", explain(source))]
    KeepAlive {
        /// The lease.
        lease: i64,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The candidate key could not be created.
    #[error("cannot create candidate key {key}: {}", explain(source))]
    Campaign {
        /// The candidate key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The election's keys could not be read.
    #[error("cannot read election keys {range}: {}", explain(source))]
    ReadElection {
        /// The key range of the election.
        range: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A watch on the election's keys failed or broke.
    #[error("watch on {key} failed: {}", explain(source))]
    Watch {
        /// The watched key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The candidate key could not be deleted (resign, release, stepping aside).
    #[error("cannot delete candidate key {key}: {}", explain(source))]
    Resign {
        /// The candidate key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The successor reservation could not be written or cleared.
    #[error("cannot write successor reservation {key}: {}", explain(source))]
    Reserve {
        /// The reservation key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
}

impl EtcdError {
    /// Unreadable files need a person; everything else (unreachable, slow, refused, TLS, bad
    /// password) is retried with back-off and reported as the reason.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EtcdError::ReadFile { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Unavailable,
        }
    }
}

/// One line for people: the whole chain of causes, and a hint for the common misconfigurations.
fn explain(error: &etcd_client::Error) -> String {
    let mut text = match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    // etcd_client::Error keeps its cause inside the variant and does not expose it as a source.
    let root: Option<&dyn std::error::Error> = match error {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(e) => Some(e),
        etcd_client::Error::IoError(e) => Some(e),
        _ => None,
    };
    let mut source = root.and_then(std::error::Error::source);
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    let hint = [
        (
            &["UnknownIssuer", "BadSignature"][..],
            "the server's certificate is not signed by --etcd-ca-file",
        ),
        (
            &["NotValidForName"],
            "the server's certificate does not name this endpoint's host",
        ),
        (
            &["CertificateRequired", "certificate required"],
            "etcd requires a client certificate: give --etcd-cert-file and --etcd-key-file",
        ),
        (
            &[
                "BadCertificate",
                "bad certificate",
                "UnknownCA",
                "unknown ca",
            ],
            "etcd rejected the client certificate (--etcd-cert-file, --etcd-key-file)",
        ),
        (
            &["authentication failed", "invalid user ID or password"],
            "wrong --etcd-username or password in --etcd-password-file",
        ),
        (
            &["user name is empty", "user name not found"],
            "etcd has authentication enabled: give --etcd-username and --etcd-password-file",
        ),
        (
            &["permission denied"],
            "the etcd user may not use this key prefix",
        ),
        (
            &[
                "InvalidContentType",
                "CorruptMessage",
                "wrong version number",
            ],
            "TLS and plain text mixed: check http:// versus https:// in --etcd-endpoints",
        ),
        (
            &["Connection refused", "connection refused"],
            "is etcd running there?",
        ),
    ]
    .into_iter()
    .find(|(needles, _)| needles.iter().any(|n| text.contains(n)));
    if let Some((_, hint)) = hint {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// [`explain`] for a call that may be the first on a connection to `endpoints`: over TLS, a
/// server that refuses the client certificate after a TLS 1.3 handshake often shows only as a
/// closed connection, so say so.
fn explain_at(endpoints: &str, error: &etcd_client::Error) -> String {
    let mut text = explain(error);
    if endpoints.contains("https://") && !text.ends_with(')') && text.contains("connection closed")
    {
        text.push_str(
            " (etcd closed the TLS connection: it may have refused the client certificate; \
             check --etcd-cert-file and --etcd-key-file)",
        );
    }
    text
}

/// Elections in an etcd cluster.
pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    options: ConnectOptions,
    /// Connected on first use, so that a daemon starts (and serves) while etcd is unreachable.
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::ReadFile {
        flag,
        path: path.to_owned(),
        source,
    })
}

impl EtcdStore {
    /// A store on the cluster of `config`. Reads the TLS and password files now; connects on
    /// first use.
    ///
    /// # Errors
    /// [`EtcdError::ReadFile`] naming the flag whose file cannot be read.
    pub fn new(config: &EtcdConfig) -> Result<Self, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            .with_keep_alive_while_idle(false)
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            let ca = read_file("--etcd-ca-file", &tls.ca_file)?;
            let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert_file, key_file)) = &tls.identity {
                let cert = read_file("--etcd-cert-file", cert_file)?;
                let key = read_file("--etcd-key-file", key_file)?;
                tls_options = tls_options.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls_options);
        }
        if let Some(auth) = &config.auth {
            let password = read_file("--etcd-password-file", &auth.password_file)?;
            let password = String::from_utf8_lossy(&password);
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            options = options
                .with_user(auth.username.clone(), password)
                .with_auto_token_refresh(true);
        }
        Ok(EtcdStore {
            endpoints: config.endpoints.clone(),
            prefix: config.prefix.clone(),
            options,
            client: Mutex::new(None),
        })
    }

    /// The client, connecting (and authenticating) first if needed.
    async fn client(&self) -> Result<Client, StoreError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let connect = Client::connect(&self.endpoints, Some(self.options.clone()));
        let client = match timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(source)) => {
                return Err(EtcdError::Connect {
                    endpoints: self.endpoints.join(","),
                    source,
                }
                .into());
            }
            Err(_) => {
                return Err(StoreError::Timeout {
                    op: "connect",
                    after: CONNECT_TIMEOUT,
                });
            }
        };
        *slot = Some(client.clone());
        Ok(client)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        let client = self.client().await?;
        let request_timeout = timing
            .retry_period
            .max(MIN_REQUEST_TIMEOUT)
            .min(timing.renew_deadline);
        let ttl_secs = timing.lease_duration.as_secs_f64().ceil().max(1.0) as i64;
        let endpoints = self.endpoints.join(",");
        let session = Session::start(&client, ttl_secs, request_timeout, &endpoints).await?;
        Ok(Box::new(EtcdCandidate {
            client,
            endpoints,
            queue: format!("{}{election}/", self.prefix),
            reservation: format!("{}{election}.successor", self.prefix),
            identity: identity.to_owned(),
            ttl_secs,
            request_timeout,
            session,
            mine: None,
            held: false,
            last_term: 0,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "etcd store at {} (prefix {:?})",
            self.endpoints.join(","),
            self.prefix
        )
    }
}

/// Proof that the session lease is alive: a keep-alive sent at `sent_at` was answered with
/// `ttl`, so the server keeps the lease at least until `sent_at + ttl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proof {
    sent_at: Instant,
    ttl: Duration,
}

impl Proof {
    fn valid_until(&self) -> Instant {
        self.sent_at + self.ttl
    }
}

/// The session lease as its keep-alive task last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeaseState {
    /// Renewed; the last proof.
    Alive(Proof),
    /// The server no longer knows the lease (expired or revoked): every key bound to it is gone.
    Gone,
}

/// What a renewal answers.
enum Renewal {
    Renewed(Proof),
    Gone,
    Failed(StoreError),
}

type RenewRequest = oneshot::Sender<Renewal>;

/// A task that is aborted when its owner drops this handle.
struct OwnedTask(JoinHandle<()>);

impl Drop for OwnedTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A candidate's session: a lease and the task that keeps it alive.
struct Session {
    lease: i64,
    renew: mpsc::Sender<RenewRequest>,
    state: watch::Receiver<LeaseState>,
    _task: OwnedTask,
}

impl Session {
    /// Grant a lease of `ttl_secs` and start keeping it alive.
    async fn start(
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
    fn gone(&self) -> bool {
        *self.state.borrow() == LeaseState::Gone
    }

    /// Renew the lease now and return the proof.
    async fn renew(&self) -> Renewal {
        let (reply, answer) = oneshot::channel();
        if self.renew.send(reply).await.is_err() {
            return Renewal::Gone;
        }
        answer.await.unwrap_or(Renewal::Gone)
    }

    /// Resolves when the lease is seen gone.
    async fn wait_gone(&mut self) {
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
struct KeepAlive {
    leases: LeaseClient,
    lease: i64,
    request_timeout: Duration,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    state: watch::Sender<LeaseState>,
}

impl KeepAlive {
    /// Renew every third of the TTL and on request, until the owner drops the session.
    async fn run(mut self, mut requests: mpsc::Receiver<RenewRequest>, first: Proof) {
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

    async fn renew_once(&mut self) -> Renewal {
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
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(message)))
                    if message.contains("not found") =>
                {
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
            Ok(Ok(None)) => failed(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".to_owned(),
            )),
            Ok(Err(source)) => failed(source),
            Err(_) => timed_out(),
        };
        // After a failure the stream may be broken or out of step: open a new one next time.
        self.stream = None;
        outcome
    }
}

/// This candidate's key in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Queued {
    revision: i64,
}

/// One consistent read of an election.
struct View {
    /// The revision of the read; watches start after it.
    revision: i64,
    /// The key with the lowest create revision.
    leader: Option<KeyValue>,
    /// Our own key, if it exists.
    mine: Option<KeyValue>,
    /// The newest key older than ours.
    predecessor: Option<KeyValue>,
    /// The identity the election is reserved for.
    reserved_for: Option<String>,
}

/// What to wait for after a read.
struct WaitFor<'a> {
    /// Keys whose every event ends the wait.
    keys: Vec<&'a str>,
    /// A range in which a new key ends the wait.
    new_key_in: Option<&'a str>,
}

struct EtcdCandidate {
    client: Client,
    endpoints: String,
    /// `<prefix><election>/`: the key range of the election.
    queue: String,
    /// `<prefix><election>.successor`: the successor reservation.
    reservation: String,
    identity: String,
    ttl_secs: i64,
    request_timeout: Duration,
    session: Session,
    /// Our key, as last created or read.
    mine: Option<Queued>,
    /// Whether `acquire` reported the election held and nothing since ended it.
    held: bool,
    /// The greatest leader term seen, reported while nobody leads.
    last_term: u64,
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn first_kv(response: Option<&TxnOpResponse>) -> Option<KeyValue> {
    match response {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    }
}

impl EtcdCandidate {
    /// Our key: the queue prefix and the session lease in lowercase hex, as etcd's recipe names
    /// it.
    fn key(&self) -> String {
        format!("{}{:x}", self.queue, self.session.lease)
    }

    /// Run one request under the request timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
        wrap: impl FnOnce(etcd_client::Error) -> EtcdError,
    ) -> Result<T, StoreError> {
        match timeout(self.request_timeout, request).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(wrap(source).into()),
            Err(_) => Err(StoreError::Timeout {
                op,
                after: self.request_timeout,
            }),
        }
    }

    async fn txn(
        &self,
        op: &'static str,
        txn: Txn,
        wrap: impl FnOnce(etcd_client::Error) -> EtcdError,
    ) -> Result<TxnResponse, StoreError> {
        let mut kv = self.client.kv_client();
        self.call(op, kv.txn(txn), wrap).await
    }

    /// Read the leader, our key, our predecessor and the reservation at one revision.
    async fn read(&self) -> Result<View, StoreError> {
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
    fn observation(&mut self, leader: Option<&KeyValue>) -> Observation {
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
    async fn ensure_session(&mut self) -> Result<(), StoreError> {
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
    async fn enqueue(&mut self) -> Result<(), StoreError> {
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
    async fn delete_mine(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
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

    async fn grant_reservation_lease(&self) -> Result<i64, StoreError> {
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
    async fn clear_reservation(&self, mine: Queued) -> Result<(), StoreError> {
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
    async fn wait(&mut self, revision: i64, what: WaitFor<'_>) -> Result<(), StoreError> {
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
                Ok(None) => {
                    return Err(EtcdError::Watch {
                        key: first,
                        source: etcd_client::Error::WatchError("the watch stream ended".into()),
                    }
                    .into());
                }
                Err(source) => return Err(EtcdError::Watch { key: first, source }.into()),
            }
        }
    }
}

/// While a lease is in its last second, how often a waiter asks for it: the precision of the
/// take-over after a crash.
const EXPIRY_POLL: Duration = Duration::from_millis(20);
/// The same for a lease of 2 s, which its holder keeps in its last second all the time (it
/// renews every 0.67 s): fewer requests, a coarser take-over.
const EXPIRY_POLL_SHORT_TTL: Duration = Duration::from_millis(100);
/// Allowance for etcd's clock and ours running at different rates over that last second.
const EXPIRY_MARGIN: Duration = Duration::from_millis(5);
/// The longest gap between two answers about a lease in its last second: a renewal restores a
/// TTL of at least 2 s, so it shows as a remaining TTL >= 1 for at least this long after it.
const EXPIRY_MAX_GAP: Duration = Duration::from_secs(1);
/// Pause after a failed request about the predecessor's lease.
const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// What etcd said of a lease.
struct LeaseAnswer {
    /// The remaining TTL in whole seconds, rounded towards zero (negative: gone, or expired a
    /// second ago).
    remaining: i64,
    /// The TTL it was granted.
    granted: i64,
    /// The raft term of the etcd leader that answered: a new etcd leader extends every lease.
    raft_term: u64,
}

/// Ask etcd about `lease`; `None` if it did not answer.
async fn ask(leases: &mut LeaseClient, lease: i64, limit: Duration) -> Option<LeaseAnswer> {
    match timeout(limit, leases.time_to_live(lease, None)).await {
        Ok(Ok(answer)) => Some(LeaseAnswer {
            remaining: answer.ttl(),
            granted: answer.granted_ttl(),
            raft_term: answer.header().map_or(0, |h| h.raft_term()),
        }),
        Ok(Err(error)) => {
            tracing::debug!(lease = format!("{lease:x}"), %error, "lease time-to-live failed");
            None
        }
        Err(_) => None,
    }
}

/// Revoke `lease` (a predecessor's) as soon as etcd's own clock says it expired; resolves when
/// the lease is gone. Errors only delay it: the watch on the predecessor's key stays the way
/// the waiter learns of the deletion.
///
/// etcd revokes expired leases lazily (its lessor looks every 500 ms), so a crashed leader's
/// key can outlive its TTL by half a second. A waiter asks for the remaining TTL instead, which
/// etcd reports in whole seconds, rounded towards zero:
///
/// - `v >= 2`: the lease cannot reach its last second for `v - 1` s: sleep that long. With the
///   holder renewing every third of the TTL, that is a few requests per minute.
/// - `v == 1`: ask every [`EXPIRY_POLL`] ([`EXPIRY_POLL_SHORT_TTL`] for a TTL of 2 s), to see
///   the moment it turns 0.
/// - The first `0`, received at `d`: the lease had less than 1 s left when etcd answered, so
///   unless renewed it expires before `d + 1 s`. Keep asking every [`EXPIRY_POLL`]: a renewal
///   restores at least 2 s, so any answer `>= 1` is one (start over), and a gap of more than
///   [`EXPIRY_MAX_GAP`] between answers could hide one (start over too).
/// - A `0` to a request sent after `d + 1 s +` [`EXPIRY_MARGIN`] proves the lease expired on
///   etcd's clock with no renewal. The etcd leader never renews an expired lease again (its
///   `Renew` waits for the revocation), so revoking it takes nothing from a live holder: it does
///   now what etcd's lessor would do within 500 ms.
/// - A new etcd leader extends every lease when it takes office, expired ones included, and a
///   holder's renewal may then succeed: every answer from `d` on must come from the same raft
///   term, or the waiter starts over. What remains is the instant between the last answer and
///   the revoke: an etcd leader election exactly then, and a renewal right after it, would lose
///   that renewal's key to the revoke. A Baton holder is safe even then: it stepped down at its
///   renew deadline, before the TTL counted from the send time of its last renewal, and does
///   not lead on that lease again. A holder whose deadline counts from the answer (`etcdctl
///   elect`, client-go) is exposed in that instant only.
async fn revoke_when_expired(mut leases: LeaseClient, lease: i64, limit: Duration) {
    if lease == 0 {
        // A key without a lease (written by hand): nothing expires.
        return std::future::pending().await;
    }
    let name = format!("{lease:x}");
    'watch: loop {
        // Until the lease is in its last second.
        let (mut asked, expires_by, raft_term) = loop {
            let sent = Instant::now();
            let Some(answer) = ask(&mut leases, lease, limit).await else {
                tokio::time::sleep(EXPIRY_RETRY).await;
                continue;
            };
            match answer.remaining {
                v if v < 0 => break 'watch,
                0 => {
                    let expires_by = Instant::now() + Duration::from_secs(1) + EXPIRY_MARGIN;
                    break (sent, expires_by, answer.raft_term);
                }
                1 if answer.granted <= 2 => tokio::time::sleep(EXPIRY_POLL_SHORT_TTL).await,
                1 => tokio::time::sleep(EXPIRY_POLL).await,
                v => tokio::time::sleep(Duration::from_secs(v as u64 - 1)).await,
            }
        };
        loop {
            sleep_until(expires_by.min(Instant::now() + EXPIRY_POLL)).await;
            let sent = Instant::now();
            let answer = ask(&mut leases, lease, limit).await;
            if Instant::now() - asked > EXPIRY_MAX_GAP {
                continue 'watch;
            }
            match answer {
                Some(a) if a.raft_term != raft_term => continue 'watch,
                Some(a) if a.remaining == 0 && sent >= expires_by => break 'watch,
                Some(a) if a.remaining == 0 => asked = sent,
                Some(a) if a.remaining < 0 => break 'watch,
                // Renewed, or no answer: the holder may be alive.
                _ => continue 'watch,
            }
        }
    }
    // Expired on etcd's clock (or already gone, when revoking again does nothing).
    match timeout(limit, leases.revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!(
            lease = name,
            "the predecessor's session lease expired; revoked it without waiting for etcd"
        ),
        Ok(Err(error)) => {
            // Gone already, or etcd is struggling: do not ask again at once.
            tracing::debug!(lease = name, %error, "revoking an expired lease");
            tokio::time::sleep(EXPIRY_RETRY).await;
        }
        Err(_) => {
            tracing::debug!(lease = name, "revoking an expired lease timed out");
            tokio::time::sleep(EXPIRY_RETRY).await;
        }
    }
}

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
                    continue;
                }
                // Reserved for a named successor: stay out of the queue until it takes over or
                // the reservation expires, reporting the leader meanwhile.
                let seen = self.observation(view.leader.as_ref());
                if seen != *last_seen {
                    return Ok(Acquired::Observed(seen));
                }
                let leader = view.leader.as_ref().map(|kv| text(kv.key()));
                let mut keys = vec![self.reservation.clone()];
                keys.extend(leader);
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let queue = self.queue.clone();
                let new_key_in = view.leader.is_none().then_some(queue.as_str());
                self.wait(view.revision, WaitFor { keys, new_key_in })
                    .await?;
                continue;
            };
            if let Some(predecessor) = &view.predecessor {
                self.held = false;
                let seen = self.observation(view.leader.as_ref());
                if seen != *last_seen {
                    return Ok(Acquired::Observed(seen));
                }
                let mut keys = vec![text(predecessor.key())];
                if let Some(leader) = &view.leader
                    && leader.key() != predecessor.key()
                {
                    keys.push(text(leader.key()));
                }
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                let expiry = revoke_when_expired(
                    self.client.lease_client(),
                    predecessor.lease(),
                    self.request_timeout,
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
            self.wait(view.revision, WaitFor { keys, new_key_in })
                .await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_names_the_cause_and_a_hint() {
        let error = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ));
        let text = explain(&error);
        assert!(text.contains("authentication failed"), "{text}");
        assert!(text.contains("--etcd-password-file"), "{text}");
    }

    #[test]
    fn unreadable_files_name_their_flag() {
        let config = EtcdConfig {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            prefix: "baton/".into(),
            tls: Some(crate::config::EtcdTls {
                ca_file: "/nonexistent/ca.pem".into(),
                identity: None,
            }),
            auth: None,
        };
        let error = EtcdStore::new(&config).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Invalid);
        let text = error.to_string();
        assert!(
            text.contains("--etcd-ca-file") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }
}
