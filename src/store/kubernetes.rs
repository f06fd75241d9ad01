//! The Kubernetes store: one `coordination.k8s.io/v1` Lease per election, written exactly as
//! client-go's `LeaseLock` writes it, so that `kubectl get lease` shows the holder and a client-go
//! candidate can contend for the same Lease.
//!
//! ```text
//! Lease <lease-name | election> in <namespace>
//!   spec.holderIdentity        the holder; "" after a release (client-go writes "" too)
//!   spec.leaseDurationSeconds  --lease-duration in whole seconds (kept on release)
//!   spec.acquireTime           when this holding began (MicroTime, the writer's wall clock)
//!   spec.renewTime             the last renewal (MicroTime, the writer's wall clock)
//!   spec.leaseTransitions      +1 on every new holding: Baton's term
//!   metadata.annotations       baton.dev/successor, baton.dev/successor-term: see below
//! ```
//!
//! ## Rules
//! - **Every write is a compare-and-swap.** A take-over, renewal or release replaces the Lease
//!   with the `resourceVersion` it last read; `409 Conflict` means someone else wrote first, and
//!   the candidate reads again ([`KubernetesError::Conflict`]). A missing Lease is created by the
//!   first campaigning candidate; `409 AlreadyExists` is the same lost race.
//! - **Expiry is judged on the local monotonic clock**, as client-go does: a candidate notes the
//!   [`tokio::time::Instant`] at which it first saw the current version of the record, and
//!   judges the holder gone only when the record has not changed for `leaseDurationSeconds`
//!   since. `renewTime` and `acquireTime` are written for people and tools and never compared
//!   with the local clock, so a replica whose wall clock is an hour off behaves the same.
//! - **A holder is respected whatever its name**, including a holder string no Baton wrote
//!   (client-go, or an earlier incarnation of this very identity): a candidate takes over only a
//!   free record (empty holder) or an expired one.
//! - **Terms**: `leaseTransitions` grows by one with every new holding, also when the same
//!   identity takes the Lease again after a release, so terms only grow. A Lease created by
//!   client-go starts at 0; Baton's first holding is term 1 or more. Deleting the Lease starts
//!   the count over for replicas that have not seen the old one: do not delete a live Lease.
//! - **Followers watch** the Lease (a watch on `metadata.name`, resumed from the last
//!   `resourceVersion`; on a watch error or `410 Gone` they list again), so a release or a new
//!   holder is seen at once. Steady state costs a follower one watch request per server-side
//!   watch timeout, and no writes; the leader writes once per retry period and reads nothing.
//! - **Release** writes an empty holder (keeping `leaseDurationSeconds` valid) so a standby takes
//!   over at once. A release *for a successor* also writes the annotations
//!   `baton.dev/successor: <identity>` and `baton.dev/successor-term: <leaseTransitions>`;
//!   Baton candidates other than the successor then treat the free record as reserved for one
//!   `leaseDurationSeconds` after they saw it, by the same local-observation rule (no
//!   timestamps are compared across clocks). The annotations bind only the record whose
//!   `leaseTransitions` they name, so a stale pair left behind by another writer is ignored.
//!   client-go ignores annotations: a client-go candidate may take a reserved Lease at once,
//!   which steers the hand-over but never breaks exclusivity.
//!
//! ## Access
//! The service account needs `get`, `list`, `watch`, `create` and `update` on
//! `leases.coordination.k8s.io` in the namespace (the Role in `deploy/`). A `403 Forbidden` is
//! reported with the verb, namespace and account ([`KubernetesError::Forbidden`]); the elector
//! reports UNKNOWN (health NOT_SERVING) and retries with back-off.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use async_trait::async_trait;
use base64::Engine as _;
use futures::{Stream, StreamExt};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    core::Status,
};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::{Acquired, Candidate, ErrorKind, Holding, Observation, Store, StoreError, Timing};

/// The annotation naming the identity a release was made for.
pub const SUCCESSOR_ANNOTATION: &str = "baton.dev/successor";
/// The annotation naming the `leaseTransitions` of the released record it belongs to.
pub const SUCCESSOR_TERM_ANNOTATION: &str = "baton.dev/successor-term";

/// Where a pod finds its own namespace.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The resource, as RBAC and error messages name it.
const RESOURCE: &str = "leases.coordination.k8s.io";
/// Server-side timeout of one watch request; the watch is resumed after it.
const WATCH_SECONDS: u32 = 290;
/// A watch that ends sooner than this after it started is restarted only after a pause, so a
/// server that closes watches at once is not hammered.
const WATCH_MIN_LIFE: Duration = Duration::from_secs(1);
/// How many times a renewal or release re-reads after a conflict that left us the holder (a
/// third party edited labels or annotations) before giving up for this call.
const CAS_ATTEMPTS: usize = 3;

/// Errors of the Kubernetes store, each naming the call and the Lease it concerns.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Neither a kubeconfig nor the in-cluster service account could be loaded.
    #[error(
        "no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), or run in a pod \
         with a service account: {source}"
    )]
    Config {
        /// What kube reported for both attempts.
        #[source]
        source: Box<kube::config::InferConfigError>,
    },
    /// The kubeconfig given explicitly could not be used.
    #[error("cannot use kubeconfig: {source}")]
    Kubeconfig {
        /// Why.
        #[source]
        source: Box<kube::config::KubeconfigError>,
    },
    /// The HTTP client could not be built from the configuration (TLS material, proxy).
    #[error("cannot build the Kubernetes client: {source}")]
    Client {
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// The API server refused the call: the service account lacks an RBAC grant.
    #[error(
        "{principal} may not {verb} {RESOURCE} in namespace {namespace:?} (403 Forbidden: \
         {message}); grant get, list, watch, create and update on leases in that namespace \
         (see the Role and RoleBinding in deploy/)"
    )]
    Forbidden {
        /// The refused verb (`get`, `list`, `watch`, `create`, `update`).
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// Who we are to the API server (the service account, when known).
        principal: String,
        /// The server's message.
        message: String,
    },
    /// The API server did not accept our credentials.
    #[error(
        "the API server rejected the credentials of {principal} for {verb} {RESOURCE} in \
         namespace {namespace:?} (401 Unauthorized: {message})"
    )]
    Unauthorized {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// Who we claimed to be.
        principal: String,
        /// The server's message.
        message: String,
    },
    /// A compare-and-swap lost: the Lease changed since it was read (409 Conflict or
    /// AlreadyExists). The candidate reads again; this never overwrites.
    #[error("lease {namespace}/{lease} changed since it was read ({verb} lost the race): {source}")]
    Conflict {
        /// The write (`create`, `update`).
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// The server's answer.
        #[source]
        source: Box<Status>,
    },
    /// Any other failure of an API call (network, server error, bad answer).
    #[error("cannot {verb} lease {namespace}/{lease}: {source}")]
    Api {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// The error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The task that sent a request ended without an answer (it panicked, or the runtime is
    /// stopping).
    #[error("the {verb} request of lease {namespace}/{lease} was aborted: {source}")]
    Aborted {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// `leaseTransitions` cannot grow any more (it is an int32).
    #[error("lease {namespace}/{lease}: leaseTransitions is at its maximum; delete the Lease")]
    TermExhausted {
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
    },
}

impl KubernetesError {
    /// Refusals and failures may pass (RBAC gets fixed, servers come back); configuration and an
    /// exhausted term need a person.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KubernetesError::Config { .. }
            | KubernetesError::Kubeconfig { .. }
            | KubernetesError::Client { .. }
            | KubernetesError::TermExhausted { .. } => ErrorKind::Invalid,
            KubernetesError::Forbidden { .. }
            | KubernetesError::Unauthorized { .. }
            | KubernetesError::Conflict { .. }
            | KubernetesError::Aborted { .. }
            | KubernetesError::Api { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Elections as Leases in one namespace.
#[derive(Clone)]
pub struct KubernetesStore {
    client: Client,
    namespace: String,
    lease_name: Option<String>,
    principal: String,
}

impl KubernetesStore {
    /// Connect with the in-cluster service account or `KUBECONFIG` (kube's inference), in
    /// `namespace`, else the pod's namespace, else the kubeconfig context's. With `lease_name`,
    /// every election uses that Lease (the config allows it with a single election only).
    ///
    /// # Errors
    /// No usable configuration, or the client cannot be built from it. Nothing is sent yet.
    pub async fn connect(
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let config = kube::Config::infer()
            .await
            .map_err(|source| KubernetesError::Config {
                source: Box::new(source),
            })?;
        Self::with_config(config, namespace, lease_name)
    }

    /// Connect with the kubeconfig file at `path` (its current context).
    ///
    /// # Errors
    /// The file cannot be read or used, or the client cannot be built.
    pub async fn from_kubeconfig(
        path: &std::path::Path,
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
            KubernetesError::Kubeconfig {
                source: Box::new(source),
            }
        })?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|source| KubernetesError::Kubeconfig {
                source: Box::new(source),
            })?;
        Self::with_config(config, namespace, lease_name)
    }

    /// Connect with a ready configuration.
    ///
    /// # Errors
    /// The client cannot be built from `config`.
    pub fn with_config(
        config: kube::Config,
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let namespace = namespace
            .or_else(|| {
                std::fs::read_to_string(POD_NAMESPACE_FILE)
                    .ok()
                    .map(|ns| ns.trim().to_owned())
                    .filter(|ns| !ns.is_empty())
            })
            .unwrap_or_else(|| config.default_namespace.clone());
        let principal = principal(&config);
        let client = http_client(config).map_err(|source| KubernetesError::Client {
            source: Box::new(source),
        })?;
        Ok(KubernetesStore {
            client,
            namespace,
            lease_name,
            principal,
        })
    }

    /// The namespace of the Leases.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// What Baton sends as `User-Agent`, as client-go sends its own name and version.
pub const USER_AGENT: &str = concat!("baton/", env!("CARGO_PKG_VERSION"));

/// HTTP/2 pings on an idle connection, so that a dead one is noticed and replaced although a
/// watch keeps it busy.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// The API client: kube's own layers (base URL, credentials, extra headers) over a connector of
/// our own, with `TCP_NODELAY` on (a small request is not held back for the server's delayed
/// ACK) and HTTP/2 offered, as client-go does, so calls share the watch's warm connection. kube's
/// tracing layer is left out: the elector reports every failure once. A kubeconfig with a proxy
/// keeps kube's default stack (with `User-Agent`).
fn http_client(mut config: kube::Config) -> Result<Client, kube::Error> {
    use http::{HeaderValue, header};
    use hyper_util::{
        client::legacy::{Builder, connect::HttpConnector},
        rt::{TokioExecutor, TokioTimer},
    };
    use kube::client::ConfigExt as _;

    config
        .headers
        .push((header::USER_AGENT, HeaderValue::from_static(USER_AGENT)));
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(config.connect_timeout);
    let mut tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = name.clone().try_into().map_err(|e| {
            kube::Error::RustlsTls(kube::client::RustlsTlsError::InvalidServerName(e))
        })?;
        tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let connector = tls.enable_http1().enable_http2().wrap_connector(tcp);
    let http = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEPALIVE)
        .http2_keep_alive_timeout(KEEPALIVE)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        // The auth layer's errors are boxed: box the client's too.
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

/// Who the credentials of `config` name, for error messages: the `sub` claim of a service
/// account token (`system:serviceaccount:NS:NAME`), decoded without verification.
fn principal(config: &kube::Config) -> String {
    use secrecy::ExposeSecret as _;
    let token = config
        .auth_info
        .token
        .as_ref()
        .map(|t| t.expose_secret().to_owned())
        .or_else(|| {
            let file = config.auth_info.token_file.as_deref()?;
            std::fs::read_to_string(file).ok()
        });
    let subject = token.as_deref().and_then(|t| jwt_subject(t.trim()));
    match subject {
        Some(sub) => match sub.strip_prefix("system:serviceaccount:") {
            Some(account) => format!("service account {} ({sub})", account.replacen(':', "/", 1)),
            None => format!("user {sub:?}"),
        },
        None => "this replica's Kubernetes user".to_owned(),
    }
}

/// The `sub` claim of a JWT, if `token` is one.
fn jwt_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

#[async_trait]
impl Store for KubernetesStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        // Whole seconds, rounded up: followers wait at least as long as the leader may hold.
        let lease_seconds = timing
            .lease_duration
            .as_millis()
            .div_ceil(1000)
            .clamp(1, i32::MAX as u128) as i32;
        Ok(Box::new(LeaseCandidate {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            name: self
                .lease_name
                .clone()
                .unwrap_or_else(|| election.to_owned()),
            identity: identity.to_owned(),
            principal: self.principal.clone(),
            timing,
            lease_seconds,
            seen: None,
            resume_from: None,
            stale: true,
            watch: None,
            held: None,
            attempt: None,
            highest_term: 0,
            in_flight: None,
        }))
    }

    fn describe(&self) -> String {
        format!("kubernetes store (leases in namespace {})", self.namespace)
    }
}

/// A watch on one Lease. In a `Mutex` only to be `Sync` (the candidate is borrowed across
/// awaits); it is reached through `&mut` and never locked.
type LeaseWatch =
    std::sync::Mutex<Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<Lease>>> + Send>>>;

/// The part of a Lease that Baton judges: the spec and the successor annotations.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    spec: LeaseSpec,
    successor: Option<String>,
    successor_term: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        Record {
            spec: lease.spec.clone().unwrap_or_default(),
            successor: annotation(SUCCESSOR_ANNOTATION),
            successor_term: annotation(SUCCESSOR_TERM_ANNOTATION),
        }
    }

    fn holder(&self) -> Option<&str> {
        self.spec
            .holder_identity
            .as_deref()
            .filter(|h| !h.is_empty())
    }

    fn transitions(&self) -> i32 {
        self.spec.lease_transitions.unwrap_or(0)
    }

    fn term(&self) -> u64 {
        self.transitions().max(0) as u64
    }

    /// The successor this free record is reserved for, if the reservation belongs to it.
    fn successor(&self) -> Option<&str> {
        let term = self.successor_term.as_deref()?.parse::<i32>().ok()?;
        (self.holder().is_none() && term == self.transitions())
            .then_some(self.successor.as_deref())
            .flatten()
    }
}

/// The Lease as last read, and when this version of its record was first seen here.
struct Seen {
    lease: Lease,
    record: Record,
    /// Local monotonic time at which the record was first seen as it is now.
    changed_at: Instant,
}

/// What a list or a write answered.
enum Answer {
    Listed(kube::core::ObjectList<Lease>),
    Written(Box<Lease>),
}

/// A request running as a task of its own (see [`LeaseCandidate::request`]).
struct InFlight {
    verb: &'static str,
    task: tokio::task::JoinHandle<Result<kube::Result<Answer>, tokio::time::error::Elapsed>>,
}

/// Our holding.
struct Held {
    term: i32,
    acquire_time: Option<MicroTime>,
}

/// A take-over whose outcome is unknown (its call failed or was cancelled in flight): if the
/// record later shows exactly it, it was applied and we hold the Lease.
struct Attempt {
    /// The resourceVersion the write was conditioned on (`None`: a create).
    base: Option<String>,
    transitions: i32,
    acquire_time: Option<MicroTime>,
}

/// What one look at the record decided.
struct Verdict {
    seen: Observation,
    may_take: bool,
    /// When the verdict changes by itself (an expiry), if ever.
    until: Option<Instant>,
}

struct LeaseCandidate {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    principal: String,
    timing: Timing,
    lease_seconds: i32,
    /// The Lease as last read (`None`: it does not exist).
    seen: Option<Seen>,
    /// Where a watch resumes: the resourceVersion of the last list, write or event.
    resume_from: Option<String>,
    /// `seen` may be out of date (a watch failed, or not watching): list before trusting it.
    stale: bool,
    watch: Option<(LeaseWatch, Instant)>,
    held: Option<Held>,
    attempt: Option<Attempt>,
    /// The highest `leaseTransitions` seen, so that a Lease deleted and created again (by a
    /// person) does not hand out a term this candidate has already seen.
    highest_term: i32,
    /// A request whose caller stopped waiting for it.
    in_flight: Option<InFlight>,
}

/// The current wall-clock time at the microsecond precision of a MicroTime, so that what we
/// write compares equal to what we read back.
fn now_micro() -> MicroTime {
    let now = Timestamp::now();
    MicroTime(Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now))
}

impl LeaseCandidate {
    fn lease_duration_of(&self, record: &Record) -> Duration {
        match record.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s as u64),
            // No valid duration written: assume ours rather than "expired at once".
            _ => self.timing.lease_duration,
        }
    }

    /// Map a kube error of `verb` to ours.
    fn fail(&self, verb: &'static str, error: kube::Error) -> KubernetesError {
        match error {
            kube::Error::Api(status) if status.code == 403 => KubernetesError::Forbidden {
                verb,
                namespace: self.namespace.clone(),
                principal: self.principal.clone(),
                message: status.message,
            },
            kube::Error::Api(status) if status.code == 401 => KubernetesError::Unauthorized {
                verb,
                namespace: self.namespace.clone(),
                principal: self.principal.clone(),
                message: status.message,
            },
            kube::Error::Api(status) if status.code == 409 => KubernetesError::Conflict {
                verb,
                namespace: self.namespace.clone(),
                lease: self.name.clone(),
                source: status,
            },
            source => KubernetesError::Api {
                verb,
                namespace: self.namespace.clone(),
                lease: self.name.clone(),
                source: Box::new(source),
            },
        }
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
    async fn request(
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
    async fn settle(&mut self) {
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
    async fn settle_within(&mut self, budget: Duration) {
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
    async fn bounded<T>(
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
    fn apply(&mut self, lease: Option<Lease>) {
        let Some(lease) = lease else {
            self.seen = None;
            return;
        };
        if let Some(rv) = &lease.metadata.resource_version {
            self.resume_from = Some(rv.clone());
        }
        let record = Record::of(&lease);
        self.highest_term = self.highest_term.max(record.transitions());
        let changed_at = match &self.seen {
            Some(seen) if seen.record == record => seen.changed_at,
            _ => Instant::now(),
        };
        self.seen = Some(Seen {
            lease,
            record,
            changed_at,
        });
        self.settle_attempt();
    }

    /// If a take-over of unknown outcome shows in the record, we hold the Lease; once the
    /// record moved past the version it was conditioned on, it can no longer apply.
    fn settle_attempt(&mut self) {
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
    async fn refresh(&mut self) -> Result<(), StoreError> {
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

    /// Judge the record at `now`.
    fn verdict(&self, now: Instant) -> Verdict {
        let Some(seen) = &self.seen else {
            // No Lease: free; a campaigning candidate creates it.
            return Verdict {
                seen: Observation::default(),
                may_take: true,
                until: None,
            };
        };
        let record = &seen.record;
        let expiry = seen.changed_at + self.lease_duration_of(record);
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
    fn set_successor(lease: &mut Lease, successor: Option<(&str, i32)>) {
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
    async fn write(&mut self, lease: &Lease, create: bool) -> Result<Lease, StoreError> {
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
    async fn take(&mut self) -> Result<Holding, StoreError> {
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
    fn still_ours(&self) -> bool {
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
    async fn rewrite(&mut self, release: Option<Option<&str>>) -> Result<(), StoreError> {
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
                Err(StoreError::Kubernetes(KubernetesError::Api { source, .. })) if matches!(&*source, kube::Error::Api(status) if status.code == 404) =>
                {
                    self.seen = None;
                    self.held = None;
                    return Err(self.lost());
                }
                Err(e) => return Err(e),
            }
        }
        // Someone keeps editing the Lease under us; the elector retries.
        Err(KubernetesError::Conflict {
            verb: "update",
            namespace: self.namespace.clone(),
            lease: self.name.clone(),
            source: Box::new(Status::failure(
                "the Lease kept changing while it still named us",
                "Conflict",
            )),
        }
        .into())
    }

    fn lost(&self) -> StoreError {
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

    /// Wait for a change of the Lease (a watch event) or `until`. Returns early, marking the
    /// record stale, when the watch fails or the server answers `410 Gone`.
    async fn wait(&mut self, until: Option<Instant>) -> Result<(), StoreError> {
        let deadline = async {
            match until {
                Some(t) => sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        if self.watch.is_none() {
            let params = WatchParams::default()
                .fields(&format!("metadata.name={}", self.name))
                .timeout(WATCH_SECONDS);
            let from = self.resume_from.clone().unwrap_or_else(|| "0".to_owned());
            let stream = self
                .bounded("watch", async {
                    self.api
                        .watch(&params, &from)
                        .await
                        .map_err(|e| self.fail("watch", e))
                })
                .await?;
            self.watch = Some((std::sync::Mutex::new(stream.boxed()), Instant::now()));
        }
        loop {
            let Some((stream, started)) = self.watch.as_mut() else {
                return Ok(());
            };
            let started = *started;
            let stream = stream
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let event = tokio::select! {
                _ = &mut deadline => return Ok(()),
                event = stream.next() => event,
            };
            match event {
                Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                    self.apply(Some(lease));
                    return Ok(());
                }
                Some(Ok(WatchEvent::Deleted(lease))) => {
                    if let Some(rv) = lease.metadata.resource_version {
                        self.resume_from = Some(rv);
                    }
                    self.apply(None);
                    return Ok(());
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    self.resume_from = Some(bookmark.metadata.resource_version);
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    // 410 Gone: our version is too old; anything else: start over too.
                    tracing::debug!(lease = %self.name, code = status.code,
                        message = %status.message, "watch ended with an error; listing again");
                    self.watch = None;
                    self.stale = true;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
                Some(Err(error)) => {
                    tracing::debug!(lease = %self.name, %error, "watch failed; listing again");
                    self.watch = None;
                    self.stale = true;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
                None => {
                    // The server's timeout: resume from the last version.
                    self.watch = None;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
            }
        }
    }

    /// After a watch that lived less than [`WATCH_MIN_LIFE`], pause (at most until the
    /// deadline) so a server that ends watches at once is not hammered.
    async fn pause_if_short(
        &self,
        started: Instant,
        deadline: &mut Pin<&mut impl Future<Output = ()>>,
    ) {
        if started.elapsed() < WATCH_MIN_LIFE {
            tokio::select! {
                _ = sleep(self.timing.retry_period) => {}
                _ = deadline.as_mut() => {}
            }
        }
    }

    async fn campaign_or_observe(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_tokens_name_the_account() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"system:serviceaccount:prod:baton"}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_subject(&token).as_deref(),
            Some("system:serviceaccount:prod:baton")
        );
        assert_eq!(jwt_subject("opaque-token"), None);
    }

    #[test]
    fn a_successor_reservation_binds_only_its_own_record() {
        let mut lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_transitions: Some(4),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        LeaseCandidate::set_successor(&mut lease, Some(("c", 4)));
        assert_eq!(Record::of(&lease).successor(), Some("c"));
        // Another writer took and released the Lease since, leaving the annotations behind.
        if let Some(spec) = lease.spec.as_mut() {
            spec.lease_transitions = Some(5);
        }
        assert_eq!(Record::of(&lease).successor(), None);
        LeaseCandidate::set_successor(&mut lease, None);
        assert_eq!(lease.metadata.annotations, None);
    }

    #[test]
    fn micro_times_round_trip() {
        let now = now_micro();
        let json = serde_json::to_string(&now).unwrap();
        let back: MicroTime = serde_json::from_str(&json).unwrap();
        assert_eq!(now, back, "{json}");
    }
}
