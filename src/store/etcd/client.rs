//! [`EtcdStore`]: the connection to the cluster (endpoints, TLS, user and password, connected
//! on first use so the daemon serves while etcd is down) and joining an election.

use std::{path::Path, time::Duration};

use async_trait::async_trait;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::{sync::Mutex, time::timeout};

use super::config::EtcdConfig;
use super::error::EtcdError;
use super::membership::{EtcdMembership, member_range};
use super::queue::EtcdCandidate;
use super::session::Session;
use crate::store::{Candidate, Membership, Store, StoreError};
use crate::timing::Timing;

/// How long connecting to an endpoint may take before the attempt counts as failed.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on open streams, to notice a dead connection. etcd answers pings more often
/// than every 5 s with GOAWAY ("too many pings"), so not more often than that.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(10);
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds of the per-request timeout, which is otherwise the retry period.
pub(super) const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Elections in an etcd cluster, after the election recipe of etcd's own `concurrency`
/// package, so that Baton and `etcdctl elect` share elections both ways.
///
/// ```text
///  <prefix><election>/<lease hex>   one key per candidate, value = identity, bound to the
///                                   candidate's session lease; created only if absent
///  <prefix><election>.successor     Baton only: a reservation for a named successor (below)
///  <prefix>_members/<group>/<id>    Baton only: a member of a balancing group, bound to the
///                                   member's own session lease (`membership`)
///
///  queue (by create revision):   [ 41: a ] [ 57: b ] [ 63: x (etcdctl) ]
///                                    │         │ watches 41 until it is deleted
///                                  leader      └── 63 watches 57 (no herd, no polling)
/// ```
///
/// - A candidate's **session** is a lease with TTL `--lease-duration` (whole seconds), kept alive
///   by a task that the candidate owns (aborted when the candidate is dropped), every third of
///   the TTL and whenever the leader calls `keep`. Followers never call `keep`, so the task is
///   what keeps their place in the queue.
/// - **acquire** creates `<prefix><election>/<lease id in lowercase hex>` in a transaction on
///   create revision 0. The key with the lowest create revision leads; the others each watch
///   the newest key older than their own until it is deleted, and the leader key for a change of
///   leader to report. **Term** = the leader key's create revision, so every new holding, by
///   Baton or by `etcdctl`, gets a greater term.
/// - **keep** renews the lease now and reads the own key: the holding lasts until the send time
///   of that keep-alive plus the TTL the server granted. A vanished key (lease expired, deleted
///   by hand) or a lease the server no longer knows is [`StoreError::Lost`] at once.
/// - **release** deletes the own key in a transaction guarded by its create revision (also when
///   merely queued: leaving the election). Dropping a candidate without releasing is a crash: its
///   key lives until its lease expires.
/// - **observe** takes the own key out of the queue, then follows the leader key.
/// - A waiter **revokes its predecessor's lease the moment etcd's clock says it expired**
///   (`revoke::revoke_when_expired`) instead of waiting up to 500 ms for etcd's lessor, which
///   revokes expired leases lazily: a crashed leader is replaced within milliseconds of its TTL.
///   An observer does the same with the leader's lease.
///
/// ## Releasing to a named successor
///
/// etcd's recipe has no notion of a successor; `etcdctl` does not know one. A release for
/// successor S writes, in the same transaction that deletes the leader key, a reservation key
/// `<prefix><election>.successor` = S bound to a fresh lease of `--lease-duration`. It lies
/// outside the key range `<prefix><election>/` that `etcdctl elect` reads, so `etcdctl` never
/// sees it. A Baton candidate other than S honours it: it does not join the queue while the
/// reservation lives, and one that finds itself at the head of the queue steps out of it again
/// (deleting its key) and waits. S leads as soon as it is at the head and deletes the
/// reservation, which wakes the others to queue behind it; if S never comes, the reservation's
/// lease expires after one lease duration and the others go ahead. The price is that an
/// `etcdctl elect -l` observer may see a waiting Baton candidate at the head for the moment it
/// takes that candidate to step aside (it never acts as leader), and that an `etcdctl`
/// candidate, which knows nothing of the reservation, may take over before S.
///
/// ## Mapping to `etcdctl`
///
/// With `--etcd-prefix P`, election E is `etcdctl elect PE`: with the default prefix `baton/`,
/// `etcdctl elect baton/orders` campaigns in Baton's election `orders`, and
/// `etcdctl elect -l baton/orders` prints its leader.
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

/// The TTL of a session lease: `--lease-duration` in whole seconds, rounded up.
pub(super) fn session_ttl_secs(timing: Timing) -> i64 {
    timing.lease_duration.as_secs_f64().ceil().max(1.0) as i64
}

/// The per-request timeout: the retry period, within [`MIN_REQUEST_TIMEOUT`] and the renew
/// deadline.
pub(super) fn request_timeout(timing: Timing) -> Duration {
    timing
        .retry_period
        .max(MIN_REQUEST_TIMEOUT)
        .min(timing.renew_deadline)
}

pub(super) fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
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
    pub(super) async fn client(&self) -> Result<Client, StoreError> {
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
        let request_timeout = request_timeout(timing);
        let ttl_secs = session_ttl_secs(timing);
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
            reaper: None,
        }))
    }

    async fn enroll(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Membership>, StoreError> {
        let client = self.client().await?;
        let range = member_range(&self.prefix, group);
        let endpoints = self.endpoints.join(",");
        let membership = EtcdMembership::enroll(client, endpoints, range, identity, timing).await?;
        Ok(Box::new(membership))
    }

    fn describe(&self) -> String {
        format!(
            "etcd store at {} (prefix {:?})",
            self.endpoints.join(","),
            self.prefix
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ErrorKind, etcd::EtcdTls};

    #[test]
    fn unreadable_files_name_their_flag() {
        let config = EtcdConfig {
            endpoints: vec!["https://127.0.0.1:2379".into()],
            prefix: "baton/".into(),
            tls: Some(EtcdTls {
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
