//! The worker stub: follow a Baton daemon and work only while it leads.
//!
//! ```no_run
//! # async fn example() -> Result<(), baton::client::ClientError> {
//! let client = baton::client::Client::connect("http://127.0.0.1:50051").await?;
//! client
//!     .run_while_leader("orders", |lease| async move {
//!         // Publish, tagging every write with `lease.term()` as the fencing token ...
//!         lease.cancelled().await; // ... until told to stop; then flush and return.
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! [`Client::run_while_leader`] starts the work on acquire and cancels it on loss, on stream
//! loss, and when `valid_for` of the last LEADER event runs out with no new event (a paused or
//! dead daemon). It confirms each stop to the daemon, so that a graceful hand-off starts the
//! standby only after this worker stopped, and reconnects with jittered back-off. The work
//! learns how it must stop from [`Lease::ending`]: finish what it started when the daemon still
//! holds the leadership for it, drop what is not yet out when the leadership may be elsewhere.
//!
//! [`Client::watch`] is the same stream as typed events, for anything else.

use std::{
    collections::VecDeque,
    future::Future,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt, stream};
use rand::Rng;
use tokio::{
    sync::watch,
    time::{Instant, sleep, sleep_until, timeout},
};
use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
    task::AbortOnDropHandle,
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    backoff::Backoff,
    proto::{self, leadership_client::LeadershipClient},
};

/// First and longest pause between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon address is not a valid URI.
    #[error("invalid daemon address {addr:?}: {source}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// The daemon could not be reached.
    #[error("cannot connect to the Baton daemon at {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call was answered with an error.
    #[error("{call}: {}", status.message())]
    Call {
        /// The call.
        call: &'static str,
        /// The daemon's answer.
        #[source]
        status: tonic::Status,
    },
    /// The event stream ended (the daemon stopped or the connection broke).
    #[error("the WatchLeadership stream ended")]
    StreamEnded,
}

impl ClientError {
    /// The gRPC status code, for a call the daemon answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// A replica's role, as the daemon reports it (the wire enum).
pub use crate::proto::Role;

/// One state of an election, as received.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaderState {
    /// The election.
    pub election: String,
    /// The daemon's role.
    pub role: Role,
    /// The daemon's identity.
    pub identity: String,
    /// The leader's identity, `None` when nobody leads or it is unknown.
    pub leader: Option<String>,
    /// The fencing token of the current holding.
    pub term: u64,
    /// Leader only: until when the daemon certainly leads, on this process's clock (the
    /// `valid_for` of the event counted from its arrival).
    pub valid_until: Option<Instant>,
    /// The daemon's wall-clock time of the state (for people).
    pub observed_at: Option<SystemTime>,
    /// Why the daemon is not leading, in words.
    pub reason: String,
    /// Whether the daemon campaigns.
    pub campaigning: bool,
}

impl LeaderState {
    fn from_event(event: proto::LeadershipEvent, received_at: Instant) -> Self {
        let role = Role::try_from(event.role).unwrap_or(Role::Unknown);
        // An absurd validity (negative, or past the clock's range) counts as none.
        let valid_until = event
            .valid_for
            .and_then(|d| Duration::try_from(d).ok())
            .and_then(|d| received_at.checked_add(d));
        LeaderState {
            election: event.election,
            role,
            identity: event.identity,
            leader: Some(event.leader).filter(|l| !l.is_empty()),
            term: event.term,
            valid_until,
            observed_at: event.observed_at.and_then(|t| SystemTime::try_from(t).ok()),
            reason: event.reason,
            campaigning: event.campaigning,
        }
    }

    /// Whether this state lets a worker work at `now`: LEADER, and still valid.
    pub fn leads_at(&self, now: Instant) -> bool {
        self.role == Role::Leader && self.valid_until.is_some_and(|t| t > now)
    }
}

/// What [`Client::watch`] yields.
#[derive(Debug)]
pub enum WatchEvent {
    /// A state (the current one on (re)connect, then every change and heartbeat).
    State(LeaderState),
    /// The stream broke; the next item comes after a reconnection.
    Disconnected(ClientError),
}

/// A connection to a Baton daemon.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    rpc: LeadershipClient<Channel>,
}

impl Client {
    /// Connect to the daemon at `addr`: `http://127.0.0.1:50051`, `127.0.0.1:50051` or
    /// `unix:/run/baton/baton.sock`.
    ///
    /// # Errors
    /// The address is invalid or the daemon cannot be reached now.
    pub async fn connect(addr: impl Into<String>) -> Result<Self, ClientError> {
        let addr = addr.into();
        let channel = endpoint(&addr)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        Ok(Client {
            addr,
            rpc: LeadershipClient::new(channel),
        })
    }

    /// A client that connects on first use and reconnects by itself: for a worker that may
    /// start before its daemon.
    ///
    /// # Errors
    /// The address is invalid.
    pub fn connect_lazy(addr: impl Into<String>) -> Result<Self, ClientError> {
        let addr = addr.into();
        let channel = endpoint(&addr)?.connect_lazy();
        Ok(Client {
            addr,
            rpc: LeadershipClient::new(channel),
        })
    }

    /// The daemon's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The current state of `election`.
    ///
    /// # Errors
    /// The call failed (NOT_FOUND names an unknown election).
    pub async fn get(&self, election: &str) -> Result<LeaderState, ClientError> {
        let request = proto::GetLeadershipRequest {
            election: election.to_owned(),
        };
        let event = self
            .rpc
            .clone()
            .get_leadership(request)
            .await
            .map_err(|status| ClientError::Call {
                call: "GetLeadership",
                status,
            })?;
        Ok(LeaderState::from_event(event.into_inner(), Instant::now()))
    }

    /// The current state of every election of the daemon.
    ///
    /// # Errors
    /// The call failed.
    pub async fn list(&self) -> Result<Vec<LeaderState>, ClientError> {
        let response = self
            .rpc
            .clone()
            .list_leadership(proto::ListLeadershipRequest {})
            .await
            .map_err(|status| ClientError::Call {
                call: "ListLeadership",
                status,
            })?;
        let now = Instant::now();
        Ok(response
            .into_inner()
            .elections
            .into_iter()
            .map(|e| LeaderState::from_event(e, now))
            .collect())
    }

    /// Ask the daemon to step down from `election`, optionally for `successor`; returns the
    /// term given up.
    ///
    /// # Errors
    /// The call failed (FAILED_PRECONDITION when the daemon does not lead).
    pub async fn resign(
        &self,
        election: &str,
        successor: Option<&str>,
    ) -> Result<u64, ClientError> {
        let request = proto::ResignRequest {
            election: election.to_owned(),
            successor: successor.unwrap_or_default().to_owned(),
        };
        let response =
            self.rpc
                .clone()
                .resign(request)
                .await
                .map_err(|status| ClientError::Call {
                    call: "Resign",
                    status,
                })?;
        Ok(response.into_inner().term)
    }

    /// Declare whether `worker` (subscribed through [`Client::watch_as`]) is warm.
    ///
    /// # Errors
    /// The call failed (NOT_FOUND when the worker has no open stream).
    pub async fn set_ready(
        &self,
        election: &str,
        worker: &str,
        ready: bool,
    ) -> Result<(), ClientError> {
        let request = proto::SetReadinessRequest {
            election: election.to_owned(),
            worker: worker.to_owned(),
            ready,
        };
        self.rpc
            .clone()
            .set_readiness(request)
            .await
            .map_err(|status| ClientError::Call {
                call: "SetReadiness",
                status,
            })?;
        Ok(())
    }

    /// Confirm that `worker` stopped all work of `term`.
    ///
    /// # Errors
    /// The call failed.
    pub async fn acknowledge_stop(
        &self,
        election: &str,
        worker: &str,
        term: u64,
    ) -> Result<(), ClientError> {
        let request = proto::AcknowledgeStopRequest {
            election: election.to_owned(),
            worker: worker.to_owned(),
            term,
        };
        self.rpc
            .clone()
            .acknowledge_stop(request)
            .await
            .map_err(|status| ClientError::Call {
                call: "AcknowledgeStop",
                status,
            })?;
        Ok(())
    }

    /// Follow `election` as a plain observer: the current state at once, then every change.
    /// The stream never ends: a broken stream yields [`WatchEvent::Disconnected`] and is
    /// reconnected with jittered back-off.
    pub fn watch(&self, election: &str) -> impl Stream<Item = WatchEvent> + Send + 'static {
        self.watch_as(election, None, false)
    }

    /// Follow `election` as worker `worker` (counted for readiness and drain), declaring
    /// `ready` on every (re)connection.
    pub fn watch_as(
        &self,
        election: &str,
        worker: Option<&str>,
        ready: bool,
    ) -> impl Stream<Item = WatchEvent> + Send + 'static {
        self.watch_with(election, worker, ready, None)
    }

    fn watch_with(
        &self,
        election: &str,
        worker: Option<&str>,
        ready: bool,
        readiness: Option<watch::Receiver<bool>>,
    ) -> impl Stream<Item = WatchEvent> + Send + 'static {
        let request = proto::WatchLeadershipRequest {
            election: election.to_owned(),
            worker: worker.unwrap_or_default().to_owned(),
            ready,
        };
        let start = Watching {
            rpc: self.rpc.clone(),
            request,
            ready: readiness,
            stream: None,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
        };
        stream::unfold(start, |mut watching| async move {
            let event = watching.next().await;
            Some((event, watching))
        })
    }

    /// Run `work` while this replica leads `election`, as a worker that is ready at once.
    ///
    /// `work` gets a [`Lease`] with the term and a cancellation token; once the token is
    /// cancelled it must finish as [`Lease::ending`] says (a hand-over: complete what was started
    /// within the daemon's hold; abrupt: drop it at once) and return, which is what the daemon
    /// is told as "stopped". It is cancelled when leadership is lost, when the stream to the
    /// daemon breaks, and when the last LEADER event's `valid_for` runs out. If `work` returns
    /// while still leading, this replica resigns so a standby takes over. Runs until the process
    /// ends; returns only if the election does not exist.
    ///
    /// # Errors
    /// The daemon does not run `election` (NOT_FOUND).
    pub async fn run_while_leader<F, Fut>(&self, election: &str, work: F) -> Result<(), ClientError>
    where
        F: FnMut(Lease) -> Fut + Send,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.worker(election).run(work).await
    }

    /// A worker of `election`, to configure (its name, its readiness) before
    /// [`Worker::run`].
    pub fn worker(&self, election: &str) -> Worker<'_> {
        Worker {
            client: self,
            election: election.to_owned(),
            name: worker_name(),
            ready: None,
            until: None,
        }
    }
}

/// A worker that runs its work only while its replica leads: [`Client::run_while_leader`] with
/// settings.
pub struct Worker<'a> {
    client: &'a Client,
    election: String,
    name: String,
    ready: Option<watch::Receiver<bool>>,
    until: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
}

impl<'a> Worker<'a> {
    /// Name this worker (unique per process; default: host, pid and a random suffix).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Declare readiness from `ready` (e.g. true once caches are warm and the sink is
    /// reachable). With `baton run --campaign when-ready` the replica campaigns only while a
    /// worker is ready, so a replica still warming never wins. Without this, the worker is ready
    /// at once.
    pub fn ready_when(mut self, ready: watch::Receiver<bool>) -> Self {
        self.ready = Some(ready);
        self
    }

    /// Stop for good once `shutdown` resolves (e.g. on SIGTERM): the running work is cancelled
    /// with [`Ending::HandOver`] (the daemon still holds the leadership until it returns), the
    /// stop is confirmed, the worker declares itself not ready (so a `--campaign when-ready`
    /// daemon hands over at once), and [`Worker::run`] returns `Ok(())`.
    pub fn until(mut self, shutdown: impl Future<Output = ()> + Send + 'a) -> Self {
        self.until = Some(Box::pin(shutdown));
        self
    }

    /// Run `work` while the replica leads; see [`Client::run_while_leader`].
    ///
    /// # Errors
    /// The daemon does not run the election (NOT_FOUND).
    pub async fn run<F, Fut>(self, work: F) -> Result<(), ClientError>
    where
        F: FnMut(Lease) -> Fut + Send,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let until = self
            .until
            .unwrap_or_else(|| Box::pin(std::future::pending()));
        let ready_now = self.ready.as_ref().is_none_or(|r| *r.borrow());
        let events = self.client.watch_with(
            &self.election,
            Some(&self.name),
            ready_now,
            self.ready.clone(),
        );
        Follower {
            client: self.client,
            election: &self.election,
            worker: &self.name,
            work,
            running: None,
            stopped: 0,
            resigned: 0,
        }
        .run(events, self.ready, until)
        .await
    }
}

/// The endpoint for a daemon address. `HOST:PORT`, the form `--listen` takes, means plain
/// HTTP/2 over TCP (`http://HOST:PORT`); `unix:PATH` is a Unix socket.
fn endpoint(addr: &str) -> Result<Endpoint, ClientError> {
    let uri = if addr.contains("://") || addr.starts_with("unix:") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
        })
        .map_err(|source| ClientError::Address {
            addr: addr.to_owned(),
            source,
        })
}

/// A unique name for this worker process.
fn worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "{}-{}-{:08x}",
        host.trim(),
        std::process::id(),
        rand::rng().random::<u32>()
    )
}

/// The state of one reconnecting watch.
struct Watching {
    rpc: LeadershipClient<Channel>,
    request: proto::WatchLeadershipRequest,
    /// The worker's current readiness, declared again on every (re)connection.
    ready: Option<watch::Receiver<bool>>,
    stream: Option<tonic::Streaming<proto::LeadershipEvent>>,
    backoff: Backoff,
}

impl Watching {
    async fn next(&mut self) -> WatchEvent {
        loop {
            let Some(stream) = &mut self.stream else {
                if self.backoff.failing() {
                    sleep(self.backoff.next_delay()).await;
                }
                if let Some(ready) = &self.ready {
                    self.request.ready = *ready.borrow();
                }
                match self.rpc.watch_leadership(self.request.clone()).await {
                    Ok(response) => {
                        self.stream = Some(response.into_inner());
                        continue;
                    }
                    Err(status) => {
                        self.backoff.next_delay();
                        return WatchEvent::Disconnected(ClientError::Call {
                            call: "WatchLeadership",
                            status,
                        });
                    }
                }
            };
            let error = match stream.message().await {
                Ok(Some(event)) => {
                    self.backoff.reset();
                    return WatchEvent::State(LeaderState::from_event(event, Instant::now()));
                }
                Ok(None) => ClientError::StreamEnded,
                Err(status) => ClientError::Call {
                    call: "WatchLeadership",
                    status,
                },
            };
            self.stream = None;
            self.backoff.next_delay();
            return WatchEvent::Disconnected(error);
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT, with the signal's name: the usual `shutdown` for
/// [`Worker::until`]. (A worker that is PID 1 in a container is not ended by SIGTERM unless it
/// handles it.)
///
/// # Errors
/// The signal handlers cannot be installed.
pub fn terminated() -> std::io::Result<impl Future<Output = &'static str> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

/// How a term's work is asked to stop: what it may still do before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Ending {
    /// The daemon still holds the leadership and waits for this work to return (bounded by its
    /// `--drain-timeout`): finish what was started (flush, commit), then return.
    HandOver = 1,
    /// The leadership may already be someone else's: the stream to the daemon broke, the
    /// term's validity ran out, or the daemon moved on without waiting. Drop what is not yet
    /// out (purge queues, abort transactions) and return at once: late is worse than lost.
    Abrupt = 2,
}

/// An [`Ending`] shared between the client and the work, as its discriminant (0: the work may
/// go on). It only grows: a hand-over can turn abrupt, never the reverse.
#[derive(Debug, Clone, Default)]
struct SharedEnding(Arc<AtomicU8>);

impl SharedEnding {
    fn get(&self) -> Option<Ending> {
        match self.0.load(Ordering::Acquire) {
            code if code == Ending::HandOver as u8 => Some(Ending::HandOver),
            code if code == Ending::Abrupt as u8 => Some(Ending::Abrupt),
            _ => None,
        }
    }

    fn raise(&self, ending: Ending) {
        self.0.fetch_max(ending as u8, Ordering::AcqRel);
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ending::HandOver => "hand-over",
            Ending::Abrupt => "abrupt",
        })
    }
}

/// What a worker's task is handed while its replica leads.
#[derive(Debug, Clone)]
pub struct Lease {
    election: String,
    term: u64,
    token: CancellationToken,
    ending: SharedEnding,
}

impl Lease {
    /// The election.
    pub fn election(&self) -> &str {
        &self.election
    }

    /// The fencing token: strictly greater for every new leadership. Hand it to the sink.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Resolves when the work must stop.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Whether the work must stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The cancellation token, to pass into tasks the work starts.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// How the work must stop: `None` while it may go on; set before the token is cancelled.
    /// A hand-over can still turn abrupt while the work finishes (the daemon is lost meanwhile):
    /// work that takes long to finish should look again between steps.
    pub fn ending(&self) -> Option<Ending> {
        self.ending.get().or_else(|| {
            // Cancelled through a clone of the token: nothing promised, so the safe way.
            self.token.is_cancelled().then_some(Ending::Abrupt)
        })
    }
}

/// How long a call to the daemon may take outside a running term.
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// The work of one term, on its own task so that the watchdog below stays responsive whatever
/// the work does. Dropping it cancels the work and aborts the task: no work outlives its
/// `run_while_leader`.
struct Running {
    term: u64,
    valid_until: Instant,
    token: CancellationToken,
    ending: SharedEnding,
    task: AbortOnDropHandle<()>,
}

impl Running {
    /// Cancel the work with `ending`; an abrupt ending overrides a hand-over, never the reverse.
    fn cancel(&self, ending: Ending) {
        self.ending.raise(ending);
        self.token.cancel();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel(Ending::Abrupt);
    }
}

/// The next value of a readiness receiver; pending forever without one (or once it closed).
async fn changed(ready: &mut Option<watch::Receiver<bool>>) -> Option<bool> {
    match ready {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(*rx.borrow_and_update()),
            Err(_) => {
                *ready = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// How a stop asks the work to finish.
#[derive(Debug, Clone, Copy)]
enum Finish {
    /// The daemon keeps the holding until `until` (or longer, as its events say).
    HandOver { until: Instant },
    /// The leadership may be elsewhere already.
    Abrupt,
}

/// The daemon's events, and those that arrived while a stop was under way (handled after it).
struct Inbox<S> {
    events: Pin<Box<S>>,
    held: VecDeque<WatchEvent>,
}

impl<S: Stream<Item = WatchEvent>> Inbox<S> {
    async fn next(&mut self) -> Option<WatchEvent> {
        match self.held.pop_front() {
            Some(event) => Some(event),
            None => self.events.next().await,
        }
    }
}

/// The loop behind [`Client::run_while_leader`].
struct Follower<'a, F> {
    client: &'a Client,
    election: &'a str,
    worker: &'a str,
    work: F,
    running: Option<Running>,
    /// The last term whose work stopped (and was confirmed so). A term is never started again
    /// after that: the daemon already counts this worker as stopped for it.
    stopped: u64,
    /// The last term this worker asked to resign from.
    resigned: u64,
}

impl<F, Fut> Follower<'_, F>
where
    F: FnMut(Lease) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
{
    async fn run<S: Stream<Item = WatchEvent> + Send>(
        mut self,
        events: S,
        mut ready: Option<watch::Receiver<bool>>,
        until: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        let inbox = &mut Inbox {
            events: Box::pin(events),
            held: VecDeque::new(),
        };
        let mut until = pin!(until);
        // Declare readiness again once each new stream is registered: a declaration made
        // between connecting and registering would be lost.
        let mut fresh_stream = true;
        loop {
            let deadline = self.running.as_ref().map(|r| r.valid_until);
            tokio::select! {
                biased;
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.stop("valid_for ran out with no new event", Finish::Abrupt, inbox).await;
                }
                () = &mut until => {
                    // The daemon still leads: the term's validity bounds the hand-over.
                    let until = self.running.as_ref().map_or_else(Instant::now, |r| r.valid_until);
                    self.stop("the worker is shutting down", Finish::HandOver { until }, inbox).await;
                    if ready.is_some() {
                        self.declare_ready(false).await;
                    }
                    return Ok(());
                }
                finished = async { (&mut self.running.as_mut().expect("guarded").task).await }, if self.running.is_some() => {
                    let term = self.running.take().map(|r| r.term).unwrap_or_default();
                    if let Err(e) = finished {
                        tracing::error!(election = self.election, term, error = %e, "work panicked");
                    }
                    tracing::warn!(election = self.election, term, "work returned while leading; resigning");
                    self.stopped = self.stopped.max(term);
                    self.acknowledge(term).await;
                    self.resign(term).await;
                }
                event = inbox.next() => match event {
                    Some(WatchEvent::State(state)) => {
                        if std::mem::take(&mut fresh_stream)
                            && let Some(rx) = &ready
                        {
                            let now_ready = *rx.borrow();
                            self.declare_ready(now_ready).await;
                        }
                        self.on_state(state, inbox).await;
                    }
                    Some(WatchEvent::Disconnected(error)) => {
                        fresh_stream = true;
                        if error.code() == Some(tonic::Code::NotFound) {
                            self.stop("election unknown to the daemon", Finish::Abrupt, inbox).await;
                            return Err(error);
                        }
                        tracing::warn!(election = self.election, %error, "lost the daemon; stopping work");
                        self.stop("stream to the daemon lost", Finish::Abrupt, inbox).await;
                    }
                    None => {
                        self.stop("stream ended", Finish::Abrupt, inbox).await;
                        return Err(ClientError::StreamEnded);
                    }
                },
                Some(now_ready) = changed(&mut ready) => self.declare_ready(now_ready).await,
            }
        }
    }

    async fn on_state<S: Stream<Item = WatchEvent>>(
        &mut self,
        state: LeaderState,
        inbox: &mut Inbox<S>,
    ) {
        let now = Instant::now();
        if !state.leads_at(now) {
            if let Some(running) = &self.running {
                // Stepping down, the daemon keeps this term's holding for a while (the event's
                // validity) for its workers to finish; anything else may be elsewhere already.
                let finish = match state.valid_until {
                    Some(until) if state.term == running.term && until > now => {
                        Finish::HandOver { until }
                    }
                    _ => Finish::Abrupt,
                };
                self.stop(
                    &format!("daemon reports {:?}: {}", state.role, state.reason),
                    finish,
                    inbox,
                )
                .await;
            }
            return;
        }
        let valid_until = state.valid_until.unwrap_or(now);
        match &mut self.running {
            Some(running) if running.term == state.term => running.valid_until = valid_until,
            _ if state.term <= self.stopped => {
                // This worker stopped in this term already (its validity ran out, or its work
                // returned). Starting again would work while the daemon counts it as stopped:
                // ask for a new term instead.
                self.resign(state.term).await;
            }
            _ => {
                self.stop("a new term began", Finish::Abrupt, inbox).await;
                self.start(state.term, valid_until);
            }
        }
    }

    fn start(&mut self, term: u64, valid_until: Instant) {
        tracing::info!(election = self.election, term, "leading: starting work");
        let token = CancellationToken::new();
        let ending = SharedEnding::default();
        let lease = Lease {
            election: self.election.to_owned(),
            term,
            token: token.clone(),
            ending: ending.clone(),
        };
        let task = AbortOnDropHandle::new(tokio::spawn((self.work)(lease)));
        self.running = Some(Running {
            term,
            valid_until,
            token,
            ending,
            task,
        });
    }

    /// Cancel the running work, wait for it to return, and confirm the stop. While a hand-over
    /// finishes, the events are still read (and kept for later): if the daemon is lost
    /// meanwhile, the leadership may pass on before the work returns, so the hand-over turns
    /// abrupt.
    async fn stop<S: Stream<Item = WatchEvent>>(
        &mut self,
        why: &str,
        finish: Finish,
        inbox: &mut Inbox<S>,
    ) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        // A hand-over lasts while the daemon keeps the holding: until `kept_until`, moved on
        // by every event of this term that carries a validity.
        let mut kept_until = match finish {
            Finish::HandOver { until } => {
                running.cancel(Ending::HandOver);
                Some(until)
            }
            Finish::Abrupt => {
                running.cancel(Ending::Abrupt);
                None
            }
        };
        let finished = loop {
            let turned = tokio::select! {
                biased;
                finished = &mut running.task => break finished,
                _ = sleep_until(kept_until.unwrap_or_else(Instant::now)), if kept_until.is_some() => {
                    "the daemon's hold for the hand-over ran out"
                }
                event = inbox.events.next(), if kept_until.is_some() => {
                    let kept = match &event {
                        Some(WatchEvent::State(state)) if state.term == running.term => {
                            state.valid_until
                        }
                        _ => None,
                    };
                    inbox.held.extend(event);
                    match kept {
                        Some(until) => {
                            kept_until = Some(until);
                            continue;
                        }
                        None => "the daemon no longer holds the term",
                    }
                }
            };
            tracing::warn!(
                election = self.election,
                term = running.term,
                turned,
                "the hand-over turned abrupt while the work was finishing"
            );
            kept_until = None;
            running.cancel(Ending::Abrupt);
        };
        let ending = running.ending.get().unwrap_or(Ending::Abrupt);
        if let Err(e) = finished {
            tracing::error!(election = self.election, term = running.term, error = %e, "work panicked");
        }
        tracing::info!(
            election = self.election,
            term = running.term,
            why,
            %ending,
            "work stopped"
        );
        self.stopped = self.stopped.max(running.term);
        self.acknowledge(running.term).await;
    }

    async fn acknowledge(&self, term: u64) {
        let ack = self
            .client
            .acknowledge_stop(self.election, self.worker, term);
        match timeout(RPC_TIMEOUT, ack).await {
            Ok(Ok(())) => {}
            // The daemon is gone or restarted: it no longer waits for this worker.
            Ok(Err(error)) => {
                tracing::debug!(election = self.election, %error, "stop not acknowledged")
            }
            Err(_) => tracing::debug!(election = self.election, "stop acknowledgement timed out"),
        }
    }

    async fn resign(&mut self, term: u64) {
        if self.resigned >= term {
            return;
        }
        self.resigned = term;
        match timeout(RPC_TIMEOUT, self.client.resign(self.election, None)).await {
            Ok(Ok(_)) => tracing::info!(
                election = self.election,
                term,
                "asked the daemon for a new term"
            ),
            Ok(Err(error)) => tracing::debug!(election = self.election, %error, "resign refused"),
            Err(_) => tracing::debug!(election = self.election, "resign timed out"),
        }
    }

    /// Tell the daemon whether this worker is warm; while working, never wait past the term's
    /// validity (the watchdog must fire on time).
    async fn declare_ready(&self, ready: bool) {
        let limit = self.running.as_ref().map_or(RPC_TIMEOUT, |r| {
            r.valid_until
                .saturating_duration_since(Instant::now())
                .min(RPC_TIMEOUT)
        });
        let call = self.client.set_ready(self.election, self.worker, ready);
        if !matches!(timeout(limit, call).await, Ok(Ok(()))) {
            // Not subscribed right now: the next (re)connection declares it.
            tracing::debug!(election = self.election, ready, "readiness not declared");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_plain_http() {
        let uri = |addr: &str| endpoint(addr).expect(addr).uri().to_string();
        assert_eq!(uri("127.0.0.1:50051"), "http://127.0.0.1:50051/");
        assert_eq!(uri("localhost:50051"), "http://localhost:50051/");
        assert_eq!(uri("http://10.0.0.1:9090"), "http://10.0.0.1:9090/");
        // unix:PATH is left to tonic (tests/listen.rs serves and connects over a socket).
    }

    fn running(term: u64) -> (Running, Lease) {
        let token = CancellationToken::new();
        let ending = SharedEnding::default();
        let lease = Lease {
            election: "e".into(),
            term,
            token: token.clone(),
            ending: ending.clone(),
        };
        let task = AbortOnDropHandle::new(tokio::spawn(std::future::pending::<()>()));
        let running = Running {
            term,
            valid_until: Instant::now(),
            token,
            ending,
            task,
        };
        (running, lease)
    }

    fn state(term: u64) -> WatchEvent {
        WatchEvent::State(LeaderState {
            election: "e".into(),
            role: Role::Follower,
            identity: "me".into(),
            leader: None,
            term,
            valid_until: None,
            observed_at: None,
            reason: String::new(),
            campaigning: true,
        })
    }

    fn term(event: Option<WatchEvent>) -> u64 {
        match event {
            Some(WatchEvent::State(state)) => state.term,
            other => panic!("a state, not {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_running_term_has_no_ending() {
        let (_running, lease) = running(3);
        assert_eq!(lease.ending(), None);
        assert!(!lease.is_cancelled());
    }

    #[tokio::test]
    async fn a_hand_over_can_turn_abrupt_but_never_back() {
        let (running, lease) = running(3);
        running.cancel(Ending::HandOver);
        assert!(lease.is_cancelled());
        assert_eq!(lease.ending(), Some(Ending::HandOver));
        running.cancel(Ending::Abrupt);
        assert_eq!(lease.ending(), Some(Ending::Abrupt));
        running.cancel(Ending::HandOver);
        assert_eq!(lease.ending(), Some(Ending::Abrupt));
    }

    #[tokio::test]
    async fn dropping_the_running_term_ends_it_abruptly() {
        let (running, lease) = running(3);
        drop(running);
        assert_eq!(lease.ending(), Some(Ending::Abrupt));
    }

    #[tokio::test]
    async fn a_token_cancelled_by_the_work_itself_counts_as_abrupt() {
        let (_running, lease) = running(3);
        lease.token().cancel();
        assert_eq!(lease.ending(), Some(Ending::Abrupt));
    }

    #[tokio::test]
    async fn the_inbox_hands_out_held_events_first_in_order() {
        let mut inbox = Inbox {
            events: Box::pin(stream::iter([state(7), state(8)])),
            held: VecDeque::from([state(5), state(6)]),
        };
        for expected in 5..=8 {
            assert_eq!(term(inbox.next().await), expected);
        }
        assert!(inbox.next().await.is_none());
    }

    #[test]
    fn endings_read_as_words() {
        assert_eq!(Ending::HandOver.to_string(), "hand-over");
        assert_eq!(Ending::Abrupt.to_string(), "abrupt");
    }
}
