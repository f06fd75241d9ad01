//! **A test double of the Kubernetes API server**, for `coordination.k8s.io/v1` Leases only. It is
//! not Kubernetes: it serves exactly the calls Baton's Kubernetes store makes, over HTTPS on
//! `127.0.0.1:0` (HTTP/2 or HTTP/1.1 by ALPN, as the API server), and keeps the real API's
//! semantics for them (reference: the Kubernetes API concepts page, "Resource versions",
//! "Efficient detection of changes", and the Lease and Status API references).
//!
//! What it cannot show: anything of a real cluster beyond these calls (admission, priority and
//! fairness, etcd's own latency, a multi-replica API server, token review); it answers in
//! microseconds unless [`ApiServer::set_latency`] slows it down.
//!
//! Behaviours kept:
//! - Paths `/apis/coordination.k8s.io/v1/namespaces/{ns}/leases[/{name}]`: `GET` one, `GET`
//!   list (with `fieldSelector` on `metadata.name` / `metadata.namespace`, and `labelSelector`
//!   equality, inequality and existence terms), `GET ?watch=true` (the same selectors),
//!   `POST` (create), `PUT` (replace), `DELETE` (with `preconditions.resourceVersion` in its
//!   DeleteOptions: `409 Conflict` when the Lease has another version). A watch with a label
//!   selector judges each event's object as it is now: a Lease whose labels change is not
//!   turned into `ADDED`/`DELETED` as the real server does (Baton never relabels a Lease).
//! - A cluster-wide `resourceVersion` that grows on every write; a list carries the current one.
//!   A no-op update (nothing but the version differs) changes nothing and sends no event.
//! - `PUT` is a compare-and-swap when the body carries `metadata.resourceVersion`: a stale one is
//!   `409 Conflict`; without one the update is unconditional (allowed for Leases, as in the real
//!   API), and counted in [`Stats::unconditional_updates`] so tests can assert Baton never does
//!   that. `PUT` of a missing Lease is `404` (Leases do not allow create-on-update); `POST` of an
//!   existing one is `409 AlreadyExists`.
//! - Validation of what Baton writes: `leaseDurationSeconds > 0`, `leaseTransitions >= 0`, the
//!   name in the body matching the path (`422 Invalid` / `400`).
//! - Watches stream newline-delimited `{"type": ADDED|MODIFIED|DELETED|ERROR, "object": ...}`:
//!   from `resourceVersion` N they replay retained history after N, then live events; without a
//!   version (or "0") they start with synthetic `ADDED` events for the current objects. A
//!   version older than the retained history ([`ApiServer::compact`]) gets an `ERROR` event with
//!   a `410 Expired` Status, as the real server sends. `timeoutSeconds` ends the stream.
//!   Bookmarks are not sent (they are optional in the real API too).
//! - Bearer tokens with per-namespace grants, changeable at run time, and optionally a Role's
//!   rules ([`ApiServer::apply_role`]: verbs, `resourceNames`; a list or watch counts as a
//!   request for the name its `metadata.name` field selector gives, and one without that
//!   field selector, such as a label-selector list, only matches rules without
//!   `resourceNames`, as in the real API): an unknown token is `401`,
//!   a refused request is `403` with the real message (`User "..." cannot VERB
//!   resource "leases" in API group "coordination.k8s.io" in the namespace "..."`).
//! - Every error body is a `v1.Status` with `code`, `reason`, `message` and `details`.
//!
//! - `TCP_NODELAY` on every connection, as Go's `net/http` server (the API server) sets by
//!   default: a watch event is written at once, not held back by Nagle's algorithm until the
//!   client's delayed ACK. (The client's side is the client's: Nagle there shows.)
//! - HTTPS with a certificate for `127.0.0.1` signed by a CA of its own, whose PEM the
//!   kubeconfig carries as `certificate-authority-data`, as a real cluster's does; ALPN offers
//!   `h2` and `http/1.1`. Every connection pays a real TLS handshake.
//! - Requests a client gave up on before the answer (an HTTP/2 stream reset, a closed
//!   connection) are counted in [`Stats::abandoned`]: the real API server logs them as
//!   `5xx ... context canceled`. Each request's `User-Agent` is kept in [`Stats::user_agents`].
//!
//! Test controls: grants, compaction, ending all watches, a gate that holds LIST calls until
//! several clients have listed (to make candidates race), and per-token counters of requests,
//! 409s and writes (with the server's monotonic time of each write).
// The handlers' helpers return the refusal itself (an axum `Response`) as their error.
#![allow(clippy::result_large_err)]

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

mod tls;

const GROUP: &str = "coordination.k8s.io";
const API_VERSION: &str = "coordination.k8s.io/v1";
/// How many events the server remembers for watches that resume.
const HISTORY: usize = 1000;

/// CLOCK_MONOTONIC in nanoseconds: the clock the timer worker prints as `mono=`.
pub fn mono() -> i128 {
    use nix::time::{ClockId, clock_gettime};
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or_default()
}

/// One write that the server applied.
#[derive(Debug, Clone)]
pub struct Write {
    /// The bearer token that wrote.
    pub token: String,
    /// `create`, `update` or `delete`.
    pub verb: &'static str,
    pub namespace: String,
    pub name: String,
    /// CLOCK_MONOTONIC ns when the server applied it.
    pub mono: i128,
    /// `spec.holderIdentity` after the write.
    pub holder: String,
    /// `spec.leaseTransitions` after the write.
    pub transitions: i64,
    /// The version the write replaced (`None` for a create).
    pub base: Option<u64>,
    /// The version it produced.
    pub rv: u64,
}

/// The last of `writes` by `token`.
pub fn last_write(writes: &[Write], token: &str) -> Write {
    writes
        .iter()
        .rfind(|w| w.token == token)
        .cloned()
        .unwrap_or_else(|| panic!("no write by {token}: {writes:#?}"))
}

/// The first of `writes` by `token` that made `holder` the holder.
pub fn take_over(writes: &[Write], token: &str, holder: &str) -> Write {
    writes
        .iter()
        .find(|w| w.token == token && w.holder == holder)
        .cloned()
        .unwrap_or_else(|| panic!("no take-over by {holder}: {writes:#?}"))
}

/// Requests of one token.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests by verb (`get`, `list`, `watch`, `create`, `update`, `delete`), refused ones too.
    pub requests: BTreeMap<&'static str, u64>,
    /// `409` answers (Conflict and AlreadyExists).
    pub conflicts: u64,
    /// `403` answers.
    pub forbidden: u64,
    /// Updates without a resourceVersion (blind overwrites).
    pub unconditional_updates: u64,
    /// Non-watch requests the client abandoned before the answer.
    pub abandoned: u64,
    /// Non-watch requests being served now.
    pub in_flight: u64,
    /// The `User-Agent` of every request (`""` when there was none).
    pub user_agents: std::collections::BTreeSet<String>,
    /// The HTTP version of every request (`HTTP/2.0`, `HTTP/1.1`).
    pub http_versions: std::collections::BTreeSet<String>,
}

impl Stats {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.requests.values().sum()
    }

    /// Requests that change state.
    pub fn writes(&self) -> u64 {
        ["create", "update", "delete", "patch"]
            .iter()
            .map(|v| self.requests.get(v).copied().unwrap_or(0))
            .sum()
    }
}

#[derive(Clone)]
struct Event {
    rv: u64,
    namespace: String,
    name: String,
    kind: &'static str,
    object: Value,
}

struct Account {
    user: String,
    namespaces: HashSet<String>,
    /// RBAC rules for Leases, as a Role's `rules` say them; `None`: every verb.
    rules: Option<Vec<Rule>>,
}

/// One RBAC rule on `leases.coordination.k8s.io`.
struct Rule {
    verbs: HashSet<String>,
    /// Empty: any name. Otherwise only these: a list or watch names one with a field selector
    /// `metadata.name=X`, as RBAC requires, and a create can never be limited by name.
    names: HashSet<String>,
}

impl Rule {
    fn allows(&self, verb: &str, name: Option<&str>) -> bool {
        let named = match name {
            _ if self.names.is_empty() => true,
            Some(name) => self.names.contains(name),
            None => false,
        };
        (self.verbs.contains(verb) || self.verbs.contains("*")) && named
    }
}

#[derive(Default)]
struct Inner {
    rv: u64,
    leases: BTreeMap<(String, String), Value>,
    history: VecDeque<Event>,
    /// Versions at or below this are no longer in the history.
    compacted: u64,
    accounts: HashMap<String, Account>,
    stats: HashMap<String, Stats>,
    writes: Vec<Write>,
    /// Hold LIST calls until this many distinct tokens have listed.
    list_gate: Option<(usize, HashSet<String>)>,
    /// How long every non-watch request waits before it is served.
    latency: Duration,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    gate: Notify,
    /// Bumped to end every open watch.
    end_watches: watch::Sender<u64>,
    /// TLS connections accepted (handshakes completed).
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl Shared {
    fn new() -> Arc<Shared> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            events,
            gate: Notify::new(),
            end_watches: watch::channel(0).0,
            connections: Arc::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running server. Runs on its own thread and runtime, so tests may block.
pub struct ApiServer {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The PEM of the CA that signed the server's certificate.
    pub ca_pem: String,
    /// The server's TLS setup, kept for [`ApiServer::start_again`].
    tls: tls::Tls,
    shared: Arc<Shared>,
    /// Where it listens (kept for [`ApiServer::start_again`]).
    addr: SocketAddr,
    /// The network namespace it listens in, if not the test's.
    netns: Option<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How the server's thread ends.
enum Stop {
    /// Finish the requests in flight (dropping the server).
    Graceful,
    /// Drop every connection now (an outage).
    Abort,
}

/// Run the API on a thread of its own (in network namespace `netns` if given), bound to `bind`;
/// returns the bound address, the stop switch and the thread.
fn serve(
    shared: Arc<Shared>,
    bind: SocketAddr,
    netns: Option<PathBuf>,
    acceptor: tokio_rustls::TlsAcceptor,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<Stop>,
    std::thread::JoinHandle<()>,
) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
    let thread = std::thread::spawn(move || {
        if let Some(path) = &netns {
            let ns = std::fs::File::open(path)
                .unwrap_or_else(|e| panic!("open network namespace {}: {e}", path.display()));
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("enter network namespace {}: {e}", path.display()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("test double runtime");
        // Returning drops the runtime and with it every connection task.
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(bind)
                .await
                .unwrap_or_else(|e| panic!("bind test double on {bind}: {e}"));
            addr_tx
                .send(listener.local_addr().expect("local addr"))
                .expect("report address");
            let prefix = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";
            let accepted = shared.connections.clone();
            let app = Router::new()
                .route(prefix, get(collection).post(collection))
                .route(
                    &format!("{prefix}/{{name}}"),
                    get(item).put(item).delete(item),
                )
                .fallback(|| async {
                    status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        "the server could not find the requested resource",
                        json!({}),
                    )
                })
                .layer(axum::middleware::from_fn_with_state(shared.clone(), track))
                .with_state(shared);
            let (graceful_tx, graceful_rx) = tokio::sync::oneshot::channel::<()>();
            let graceful = async {
                let _ = graceful_rx.await;
            };
            let server = async move {
                let listener = tls::TlsListener {
                    tcp: listener,
                    acceptor,
                    accepted,
                };
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(graceful)
                    .await;
            };
            tokio::pin!(server);
            tokio::select! {
                _ = &mut server => {}
                how = stop_rx => {
                    if !matches!(how, Ok(Stop::Abort)) {
                        let _ = graceful_tx.send(());
                        server.await;
                    }
                }
            }
        });
    });
    let addr = addr_rx.recv().expect("test double address");
    (addr, stop_tx, thread)
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Graceful);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bearer token that looks like a service account token (a JWT with `sub`), unsigned: the
/// double does not verify it, and Baton decodes `sub` only to name the account in errors.
pub fn service_account_token(namespace: &str, account: &str) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.{}",
        b64(&json!({"alg": "none"})),
        b64(&json!({
            "sub": format!("system:serviceaccount:{namespace}:{account}"),
            "jti": uuid::Uuid::new_v4().to_string(),
        })),
        "unsigned"
    )
}

impl ApiServer {
    /// Start on `127.0.0.1:0`, HTTPS with a server certificate signed by a fresh CA.
    pub fn start() -> ApiServer {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), None)
    }

    /// Start inside the network namespace at `netns` (`/var/run/netns/NAME`, made with
    /// `ip netns add`; needs root), on `ip:0`, an address of that namespace. The server's
    /// thread enters the namespace before it binds; the test's other threads stay where they are.
    pub fn start_in_netns(netns: &Path, ip: std::net::IpAddr) -> ApiServer {
        Self::start_at(SocketAddr::new(ip, 0), Some(netns.to_owned()))
    }

    fn start_at(bind: SocketAddr, netns: Option<PathBuf>) -> ApiServer {
        let tls = tls::Tls::new(bind.ip());
        let shared = Shared::new();
        let (addr, stop, thread) = serve(shared.clone(), bind, netns.clone(), tls.acceptor.clone());
        ApiServer {
            url: format!("https://{addr}"),
            ca_pem: tls.ca_pem.clone(),
            tls,
            shared,
            addr,
            netns,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// How many connections clients have opened (TLS handshakes completed).
    pub fn connections(&self) -> u64 {
        self.shared
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Make every non-watch request wait this long before it is served (a loaded API server),
    /// so that a client that gives up on a request in flight shows in [`Stats::abandoned`].
    pub fn set_latency(&self, latency: Duration) {
        self.shared.lock().latency = latency;
    }

    /// The counters of every token together.
    pub fn all_stats(&self) -> Stats {
        let inner = self.shared.lock();
        let mut all = Stats::default();
        for stats in inner.stats.values() {
            for (verb, n) in &stats.requests {
                *all.requests.entry(verb).or_default() += n;
            }
            all.conflicts += stats.conflicts;
            all.forbidden += stats.forbidden;
            all.unconditional_updates += stats.unconditional_updates;
            all.abandoned += stats.abandoned;
            all.in_flight += stats.in_flight;
            all.user_agents.extend(stats.user_agents.iter().cloned());
            all.http_versions
                .extend(stats.http_versions.iter().cloned());
        }
        all
    }

    /// An outage: stop serving at once, cutting every open connection and watch, as a crashed
    /// API server would. The Leases and the resourceVersion are kept for [`ApiServer::start_again`].
    pub fn stop_abruptly(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Abort);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Serve again after [`ApiServer::stop_abruptly`], on the same address (and network
    /// namespace), with the same state and certificate.
    pub fn start_again(&mut self) {
        assert!(self.thread.is_none(), "the test double is running");
        let (addr, stop, thread) = serve(
            self.shared.clone(),
            self.addr,
            self.netns.clone(),
            self.tls.acceptor.clone(),
        );
        assert_eq!(addr, self.addr);
        self.stop = Some(stop);
        self.thread = Some(thread);
    }

    /// Let `token` act as `user` in `namespaces`.
    pub fn add_token(&self, token: &str, user: &str, namespaces: &[&str]) {
        self.shared.lock().accounts.insert(
            token.to_owned(),
            Account {
                user: user.to_owned(),
                namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
                rules: None,
            },
        );
    }

    /// A new service account token, granted `namespaces`.
    pub fn service_account(&self, namespace: &str, account: &str, namespaces: &[&str]) -> String {
        let token = service_account_token(namespace, account);
        self.add_token(
            &token,
            &format!("system:serviceaccount:{namespace}:{account}"),
            namespaces,
        );
        token
    }

    /// Limit `token` to the Lease rules of an RBAC Role (its `rules`, as JSON): only rules for
    /// `leases` in `coordination.k8s.io` count.
    pub fn apply_role(&self, token: &str, rules: &Value) {
        let strings = |rule: &Value, key: &str| -> HashSet<String> {
            rule[key]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let rules = rules
            .as_array()
            .expect("rules is a list")
            .iter()
            .filter(|rule| {
                strings(rule, "apiGroups").contains(GROUP)
                    && strings(rule, "resources").contains("leases")
            })
            .map(|rule| Rule {
                verbs: strings(rule, "verbs"),
                names: strings(rule, "resourceNames"),
            })
            .collect();
        if let Some(account) = self.shared.lock().accounts.get_mut(token) {
            account.rules = Some(rules);
        }
    }

    /// Grant `token` the namespace.
    pub fn grant(&self, token: &str, namespace: &str) {
        if let Some(account) = self.shared.lock().accounts.get_mut(token) {
            account.namespaces.insert(namespace.to_owned());
        }
    }

    /// Take the namespace away from `token`.
    pub fn revoke(&self, token: &str, namespace: &str) {
        if let Some(account) = self.shared.lock().accounts.get_mut(token) {
            account.namespaces.remove(namespace);
        }
    }

    /// Forget the event history: watches from any earlier version get `410`.
    pub fn compact(&self) {
        let mut inner = self.shared.lock();
        inner.history.clear();
        inner.compacted = inner.rv;
    }

    /// End every open watch (as an API server restart does).
    pub fn end_watches(&self) {
        self.shared.end_watches.send_modify(|g| *g += 1);
    }

    /// Hold LIST calls until `n` distinct tokens have listed, then let them all through.
    pub fn gate_lists(&self, n: usize) {
        self.shared.lock().list_gate = Some((n, HashSet::new()));
    }

    /// The Lease as stored.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .leases
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Counters of `token`.
    pub fn stats(&self, token: &str) -> Stats {
        self.shared
            .lock()
            .stats
            .get(token)
            .cloned()
            .unwrap_or_default()
    }

    /// Every applied write, in order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// Write `lease` into the store as a privileged client would (no resourceVersion check),
    /// e.g. a foreign holder. Returns the stored object.
    pub fn put(&self, namespace: &str, mut lease: Value) -> Value {
        let name = lease["metadata"]["name"]
            .as_str()
            .expect("lease has a name")
            .to_owned();
        let mut inner = self.shared.lock();
        let key = (namespace.to_owned(), name.clone());
        let existed = inner.leases.contains_key(&key);
        inner.rv += 1;
        let rv = inner.rv;
        lease["apiVersion"] = json!(API_VERSION);
        lease["kind"] = json!("Lease");
        lease["metadata"]["namespace"] = json!(namespace);
        lease["metadata"]["resourceVersion"] = json!(rv.to_string());
        if lease["metadata"]["uid"].is_null() {
            lease["metadata"]["uid"] = json!(uuid::Uuid::new_v4().to_string());
        }
        inner.leases.insert(key, lease.clone());
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        record(
            &mut inner,
            &self.shared,
            "admin",
            if existed { "update" } else { "create" },
            namespace,
            &name,
            None,
            rv,
            kind,
            &lease,
        );
        lease
    }

    /// A kubeconfig for this server with `token`, default namespace `namespace`.
    pub fn kubeconfig(&self, token: &str, namespace: &str) -> String {
        let ca = format!(
            "    certificate-authority-data: {}\n",
            base64::engine::general_purpose::STANDARD.encode(&self.ca_pem)
        );
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {url}\n{ca}\
             contexts:\n- name: double\n  context:\n    cluster: double\n    user: baton\n    namespace: {namespace}\n\
             current-context: double\nusers:\n- name: baton\n  user:\n    token: {token}\n",
            url = self.url
        )
    }

    /// Write [`ApiServer::kubeconfig`] into `dir`; returns its path.
    pub fn write_kubeconfig(
        &self,
        dir: &Path,
        file: &str,
        token: &str,
        namespace: &str,
    ) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.kubeconfig(token, namespace)).expect("write kubeconfig");
        path
    }
}

/// Apply the bookkeeping of a write: history, broadcast, the write log.
#[allow(clippy::too_many_arguments)]
fn record(
    inner: &mut Inner,
    shared: &Shared,
    token: &str,
    verb: &'static str,
    namespace: &str,
    name: &str,
    base: Option<u64>,
    rv: u64,
    kind: &'static str,
    object: &Value,
) {
    let event = Event {
        rv,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        kind,
        object: object.clone(),
    };
    inner.history.push_back(event.clone());
    while inner.history.len() > HISTORY {
        if let Some(old) = inner.history.pop_front() {
            inner.compacted = old.rv;
        }
    }
    inner.writes.push(Write {
        token: token.to_owned(),
        verb,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        mono: mono(),
        holder: object["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        transitions: object["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
        base,
        rv,
    });
    // Sent under the lock, so a watch that subscribes under the lock misses nothing.
    let _ = shared.events.send(event);
}

fn status(code: StatusCode, reason: &str, message: &str, details: Value) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn details(name: Option<&str>) -> Value {
    match name {
        Some(name) => json!({"name": name, "group": GROUP, "kind": "leases"}),
        None => json!({"group": GROUP, "kind": "leases"}),
    }
}

fn resource(name: Option<&str>) -> String {
    match name {
        Some(name) => format!("leases.{GROUP} {name:?}"),
        None => format!("leases.{GROUP}"),
    }
}

/// The bearer token of a request (`""` without one).
fn bearer(headers: &HeaderMap) -> String {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned()
}

/// Every request: keeps its `User-Agent`; a non-watch request waits the configured latency and
/// is counted as in flight until answered, or as abandoned if the client gives up first (hyper
/// then drops this future).
async fn track(
    State(shared): State<Arc<Shared>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = bearer(request.headers());
    let agent = request
        .headers()
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    let watching = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
    let latency = {
        let mut inner = shared.lock();
        let stats = inner.stats.entry(token.clone()).or_default();
        stats.user_agents.insert(agent);
        stats
            .http_versions
            .insert(format!("{:?}", request.version()));
        if !watching {
            stats.in_flight += 1;
        }
        inner.latency
    };
    if watching {
        return next.run(request).await;
    }
    /// Counts the request out when dropped: abandoned unless it was answered.
    struct Serving {
        shared: Arc<Shared>,
        token: String,
        answered: bool,
    }
    impl Drop for Serving {
        fn drop(&mut self) {
            let mut inner = self.shared.lock();
            let stats = inner.stats.entry(self.token.clone()).or_default();
            stats.in_flight -= 1;
            if !self.answered {
                stats.abandoned += 1;
            }
        }
    }
    let mut serving = Serving {
        shared: shared.clone(),
        token,
        answered: false,
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = next.run(request).await;
    serving.answered = true;
    response
}

/// Authenticate and authorise; counts the request. Returns the token.
fn authorise(
    shared: &Shared,
    headers: &HeaderMap,
    verb: &'static str,
    namespace: &str,
    name: Option<&str>,
) -> Result<String, Response> {
    let token = bearer(headers);
    let mut inner = shared.lock();
    *inner
        .stats
        .entry(token.clone())
        .or_default()
        .requests
        .entry(verb)
        .or_default() += 1;
    let Some(account) = inner.accounts.get(&token) else {
        return Err(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
            json!({}),
        ));
    };
    let allowed = account.namespaces.contains(namespace)
        && account
            .rules
            .as_ref()
            .is_none_or(|rules| rules.iter().any(|r| r.allows(verb, name)));
    if !allowed {
        let message = format!(
            "{} is forbidden: User {:?} cannot {verb} resource \"leases\" in API group {GROUP:?} in the namespace {namespace:?}",
            resource(name),
            account.user
        );
        inner.stats.entry(token).or_default().forbidden += 1;
        return Err(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &message,
            details(name),
        ));
    }
    Ok(token)
}

fn count_conflict(shared: &Shared, token: &str) {
    shared
        .lock()
        .stats
        .entry(token.to_owned())
        .or_default()
        .conflicts += 1;
}

/// `metadata.name=X,metadata.namespace=Y`: the name wanted, if any. Unknown fields are `400`.
fn parse_field_selector(selector: Option<&String>) -> Result<Option<String>, Response> {
    let mut name = None;
    for term in selector
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
    {
        let (field, value) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .ok_or_else(|| {
                status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("invalid selector: {term:?}"),
                    json!({}),
                )
            })?;
        match field {
            "metadata.name" => name = Some(value.to_owned()),
            "metadata.namespace" => {}
            other => {
                return Err(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("field label not supported: {other}"),
                    json!({}),
                ));
            }
        }
    }
    Ok(name)
}

/// `key=value`, `key==value`, `key!=value`, `key`, `!key` terms, comma-separated (all must
/// hold), as the API server parses a `labelSelector`; `key!=value` also matches objects without
/// the label. Set-based terms (`in`, `notin`) are not served here: `400`.
#[derive(Default)]
struct LabelSelector(Vec<(String, Requirement)>);

enum Requirement {
    Equals(String),
    Differs(String),
    Exists,
    Absent,
}

fn parse_label_selector(selector: Option<&String>) -> Result<LabelSelector, Response> {
    let mut terms = Vec::new();
    for term in selector
        .map(String::as_str)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let (key, requirement) = if let Some((k, v)) = term.split_once("!=") {
            (k, Requirement::Differs(v.trim().to_owned()))
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            (k, Requirement::Equals(v.trim().to_owned()))
        } else if let Some(k) = term.strip_prefix('!') {
            (k, Requirement::Absent)
        } else {
            (term, Requirement::Exists)
        };
        let key = key.trim();
        if key.is_empty() || key.contains(' ') {
            return Err(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unable to parse requirement: {term:?}"),
                json!({}),
            ));
        }
        terms.push((key.to_owned(), requirement));
    }
    Ok(LabelSelector(terms))
}

/// Which objects a list or watch returns: its namespace, the name a field selector gives, and
/// the labels a label selector asks for.
struct Filter {
    namespace: String,
    name: Option<String>,
    labels: LabelSelector,
}

impl Filter {
    fn admits(&self, namespace: &str, name: &str, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        namespace == self.namespace
            && self.name.as_deref().is_none_or(|n| n == name)
            && self.labels.0.iter().all(|(key, requirement)| {
                let value = labels[key.as_str()].as_str();
                match requirement {
                    Requirement::Equals(v) => value == Some(v.as_str()),
                    Requirement::Differs(v) => value != Some(v.as_str()),
                    Requirement::Exists => value.is_some(),
                    Requirement::Absent => value.is_none(),
                }
            })
    }
}

/// `GET` (list, watch) and `POST` on the collection.
async fn collection(
    State(shared): State<Arc<Shared>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method == Method::POST {
        return create(&shared, &namespace, &headers, &body);
    }
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = if watching { "watch" } else { "list" };
    let name = match parse_field_selector(query.get("fieldSelector")) {
        Ok(name) => name,
        Err(response) => return response,
    };
    let labels = match parse_label_selector(query.get("labelSelector")) {
        Ok(labels) => labels,
        Err(response) => return response,
    };
    // RBAC authorises a list or watch limited to `metadata.name=X` as a request for X; a label
    // selector names nothing, so only a rule without resourceNames allows it.
    let token = match authorise(&shared, &headers, verb, &namespace, name.as_deref()) {
        Ok(token) => token,
        Err(response) => return response,
    };
    let filter = Filter {
        namespace,
        name,
        labels,
    };
    if watching {
        return start_watch(shared, filter, &query);
    }
    wait_at_gate(&shared, &token).await;
    let inner = shared.lock();
    let items: Vec<Value> = inner
        .leases
        .iter()
        .filter(|((ns, n), lease)| filter.admits(ns, n, lease))
        .map(|(_, lease)| lease.clone())
        .collect();
    ok(
        StatusCode::OK,
        &json!({
            "apiVersion": API_VERSION,
            "kind": "LeaseList",
            "metadata": {"resourceVersion": inner.rv.to_string()},
            "items": items,
        }),
    )
}

async fn wait_at_gate(shared: &Shared, token: &str) {
    loop {
        let notified = shared.gate.notified();
        {
            let mut inner = shared.lock();
            let Some((n, seen)) = inner.list_gate.as_mut() else {
                return;
            };
            seen.insert(token.to_owned());
            if seen.len() >= *n {
                inner.list_gate = None;
                shared.gate.notify_waiters();
                return;
            }
        }
        // Bounded, so a test that miscounts fails instead of hanging.
        if tokio::time::timeout(Duration::from_secs(30), notified)
            .await
            .is_err()
        {
            return;
        }
    }
}

fn start_watch(shared: Arc<Shared>, filter: Filter, query: &HashMap<String, String>) -> Response {
    let from = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .map(|v| v.parse::<u64>());
    let limit = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let line = |kind: &str, object: &Value| {
        Ok(Bytes::from(format!(
            "{}\n",
            json!({"type": kind, "object": object})
        )))
    };
    let mut initial = Vec::new();
    let mut live;
    {
        let inner = shared.lock();
        live = shared.events.subscribe();
        match from {
            None => {
                for ((ns, n), lease) in &inner.leases {
                    if filter.admits(ns, n, lease) {
                        initial.push(line("ADDED", lease));
                    }
                }
            }
            Some(Err(_)) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "invalid resourceVersion",
                    json!({}),
                );
            }
            Some(Ok(rv)) if rv < inner.compacted => {
                let gone = json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {rv} ({})", inner.compacted + 1),
                    "reason": "Expired", "code": 410,
                });
                initial.push(line("ERROR", &gone));
                drop(inner);
                let stream = ReceiverStream::new(rx);
                tokio::spawn(async move {
                    for l in initial {
                        let _ = tx.send(l).await;
                    }
                });
                return Response::builder()
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from_stream(stream))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
            }
            Some(Ok(rv)) => {
                for event in inner.history.iter().filter(|e| e.rv > rv) {
                    if filter.admits(&event.namespace, &event.name, &event.object) {
                        initial.push(line(event.kind, &event.object));
                    }
                }
            }
        }
    }
    let mut ended = shared.end_watches.subscribe();
    tokio::spawn(async move {
        for l in initial {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        let timeout = tokio::time::sleep(limit.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(timeout);
        loop {
            tokio::select! {
                _ = &mut timeout => return,
                _ = ended.changed() => return,
                _ = tx.closed() => return,
                event = live.recv() => match event {
                    Ok(event) => {
                        if filter.admits(&event.namespace, &event.name, &event.object)
                            && tx.send(line(event.kind, &event.object)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes or lists.
                    Err(_) => return,
                },
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Checks of the Lease validation that Baton's writes could violate.
fn validate(lease: &Value, name: &str) -> Result<(), Response> {
    let invalid = |message: String| {
        status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            &format!("Lease.{GROUP} {name:?} is invalid: {message}"),
            details(Some(name)),
        )
    };
    if lease["kind"] != json!("Lease") || lease["apiVersion"] != json!(API_VERSION) {
        return Err(status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a coordination.k8s.io/v1 Lease",
            json!({}),
        ));
    }
    let spec = &lease["spec"];
    if let Some(d) = spec.get("leaseDurationSeconds").filter(|v| !v.is_null())
        && d.as_i64().is_none_or(|d| d <= 0)
    {
        return Err(invalid(format!(
            "spec.leaseDurationSeconds: Invalid value: {d}: must be greater than 0"
        )));
    }
    if let Some(t) = spec.get("leaseTransitions").filter(|v| !v.is_null())
        && t.as_i64().is_none_or(|t| t < 0)
    {
        return Err(invalid(format!(
            "spec.leaseTransitions: Invalid value: {t}: must be greater than or equal to 0"
        )));
    }
    Ok(())
}

/// A request's JSON body, or `400 BadRequest`.
fn parse_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|_| {
        status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
            json!({}),
        )
    })
}

fn create(shared: &Shared, namespace: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    let token = match authorise(shared, headers, "create", namespace, None) {
        Ok(token) => token,
        Err(response) => return response,
    };
    let mut lease = match parse_body(body) {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    let Some(name) = lease["metadata"]["name"].as_str().map(str::to_owned) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value: name or generateName is required",
            details(None),
        );
    };
    if let Err(response) = validate(&lease, &name) {
        return response;
    }
    if let Some(ns) = lease["metadata"]["namespace"].as_str()
        && ns != namespace
    {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            json!({}),
        );
    }
    let mut inner = shared.lock();
    let key = (namespace.to_owned(), name.clone());
    if inner.leases.contains_key(&key) {
        drop(inner);
        count_conflict(shared, &token);
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{} already exists", resource(Some(&name))),
            details(Some(&name)),
        );
    }
    inner.rv += 1;
    let rv = inner.rv;
    let metadata = &mut lease["metadata"];
    metadata["namespace"] = json!(namespace);
    metadata["resourceVersion"] = json!(rv.to_string());
    metadata["uid"] = json!(uuid::Uuid::new_v4().to_string());
    metadata["creationTimestamp"] =
        json!(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
    inner.leases.insert(key, lease.clone());
    record(
        &mut inner, shared, &token, "create", namespace, &name, None, rv, "ADDED", &lease,
    );
    ok(StatusCode::CREATED, &lease)
}

/// `GET`, `PUT` and `DELETE` of one Lease.
async fn item(
    State(shared): State<Arc<Shared>>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let verb = match method {
        Method::GET => "get",
        Method::PUT => "update",
        _ => "delete",
    };
    let token = match authorise(&shared, &headers, verb, &namespace, Some(&name)) {
        Ok(token) => token,
        Err(response) => return response,
    };
    let key = (namespace.clone(), name.clone());
    let not_found = || {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} not found", resource(Some(&name))),
            details(Some(&name)),
        )
    };
    match verb {
        "get" => match shared.lock().leases.get(&key) {
            Some(lease) => ok(StatusCode::OK, lease),
            None => not_found(),
        },
        "delete" => {
            // DeleteOptions may carry `preconditions.resourceVersion`: a compare-and-delete.
            let wanted = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|options| {
                    options["preconditions"]["resourceVersion"]
                        .as_str()
                        .map(str::to_owned)
                });
            let mut inner = shared.lock();
            let Some(stored) = inner.leases.get(&key) else {
                return not_found();
            };
            let stored_rv = stored["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if let Some(wanted) = wanted.filter(|w| w != stored_rv) {
                let message = format!(
                    "Operation cannot be fulfilled on {}: the ResourceVersion in the precondition ({wanted}) does not match the ResourceVersion in record ({stored_rv}). The object might have been modified",
                    resource(Some(&name))
                );
                drop(inner);
                count_conflict(&shared, &token);
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    &message,
                    details(Some(&name)),
                );
            }
            let Some(mut lease) = inner.leases.remove(&key) else {
                return not_found();
            };
            inner.rv += 1;
            let rv = inner.rv;
            lease["metadata"]["resourceVersion"] = json!(rv.to_string());
            record(
                &mut inner, &shared, &token, "delete", &namespace, &name, None, rv, "DELETED",
                &lease,
            );
            ok(StatusCode::OK, &lease)
        }
        _ => update(&shared, &token, &namespace, &name, &body),
    }
}

fn update(shared: &Shared, token: &str, namespace: &str, name: &str, body: &Bytes) -> Response {
    let mut lease = match parse_body(body) {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    if lease["metadata"]["name"].as_str() != Some(name) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the name of the object does not match the name on the URL",
            json!({}),
        );
    }
    if let Err(response) = validate(&lease, name) {
        return response;
    }
    let mut inner = shared.lock();
    let key = (namespace.to_owned(), name.to_owned());
    let Some(stored) = inner.leases.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} not found", resource(Some(name))),
            details(Some(name)),
        );
    };
    let stored_rv = stored["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    match lease["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty())
    {
        Some(rv) if rv.parse::<u64>().ok() != Some(stored_rv) => {
            drop(inner);
            count_conflict(shared, token);
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {}: the object has been modified; please apply your changes to the latest version and try again",
                    resource(Some(name))
                ),
                details(Some(name)),
            );
        }
        Some(_) => {}
        None => {
            inner
                .stats
                .entry(token.to_owned())
                .or_default()
                .unconditional_updates += 1;
        }
    }
    // Server-owned fields come from the stored object.
    for field in ["uid", "creationTimestamp", "namespace"] {
        lease["metadata"][field] = stored["metadata"][field].clone();
    }
    lease["metadata"]["resourceVersion"] = stored["metadata"]["resourceVersion"].clone();
    if lease == stored {
        // A no-op update: no new version, no event.
        return ok(StatusCode::OK, &stored);
    }
    inner.rv += 1;
    let rv = inner.rv;
    lease["metadata"]["resourceVersion"] = json!(rv.to_string());
    inner.leases.insert(key, lease.clone());
    record(
        &mut inner,
        shared,
        token,
        "update",
        namespace,
        name,
        Some(stored_rv),
        rv,
        "MODIFIED",
        &lease,
    );
    ok(StatusCode::OK, &lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(labels: &str) -> Filter {
        Filter {
            namespace: "ns".to_owned(),
            name: None,
            labels: parse_label_selector(Some(&labels.to_owned()))
                .unwrap_or_else(|_| panic!("{labels:?} parses")),
        }
    }

    #[test]
    fn label_selectors_match_as_the_api_server_s() {
        let lease = json!({"metadata": {"labels": {"g": "b-1", "x": "y"}}});
        let bare = json!({"metadata": {}});
        for (selector, on_lease, on_bare) in [
            ("", true, true),
            ("g=b-1", true, false),
            ("g==b-1", true, false),
            ("g=b-2", false, false),
            ("g!=b-2", true, true),
            ("g=b-1,x=y", true, false),
            ("g=b-1,x=z", false, false),
            ("g", true, false),
            ("!g", false, true),
        ] {
            let f = filter(selector);
            assert_eq!(
                f.admits("ns", "l", &lease),
                on_lease,
                "{selector:?} on the lease"
            );
            assert_eq!(
                f.admits("ns", "l", &bare),
                on_bare,
                "{selector:?} on no labels"
            );
            assert!(
                !f.admits("other", "l", &bare) || !on_bare,
                "{selector:?}: namespace"
            );
        }
        assert!(parse_label_selector(Some(&"=v".to_owned())).is_err());
    }

    #[test]
    fn a_rule_with_resource_names_allows_no_list_without_a_name() {
        let rule = Rule {
            verbs: ["list", "watch"].map(str::to_owned).into(),
            names: ["a"].map(str::to_owned).into(),
        };
        assert!(rule.allows("list", Some("a")));
        assert!(
            !rule.allows("list", None),
            "a label-selector list names nothing"
        );
        let open = Rule {
            verbs: ["list"].map(str::to_owned).into(),
            names: HashSet::new(),
        };
        assert!(open.allows("list", None));
    }
}
