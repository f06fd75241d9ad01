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
//! [`Client::run_while_leader`] runs the work while the daemon leads; it cancels it on loss, on
//! stream loss and when `valid_for` runs out (a paused or dead daemon), confirms each stop, and
//! reconnects with back-off. [`Lease::ending`] tells the work how to stop. [`Client::watch`] is
//! the same stream as typed events. Here: the connection, its calls and the reconnecting watch;
//! `follower.rs` decides (a pure machine), `driver.rs` performs, `lease.rs` is what work holds.

mod driver;
mod follower;
mod lease;
#[cfg(test)]
mod tests;

use std::{
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

use futures::{Stream, stream};
use rand::Rng;
use tokio::{
    sync::watch,
    time::{Instant, sleep},
};
use tonic::transport::{Channel, Endpoint};

use self::driver::{Driver, WorkerCalls};
pub use self::lease::{Ending, Lease};
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

/// The error of gRPC call `call` that the daemon answered with a status.
fn failed(call: &'static str) -> impl FnOnce(tonic::Status) -> ClientError {
    move |status| ClientError::Call { call, status }
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
        let valid_until = lease::valid_until(received_at, event.valid_for);
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

/// What [`Client::status`] answers.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonStatus {
    /// Every election, in the order of the daemon's `--election` flags.
    pub elections: Vec<LeaderState>,
    /// With `--balance`: the group's members and what each leads.
    pub balance: Option<proto::BalanceGroup>,
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
            .map_err(failed("GetLeadership"))?;
        Ok(LeaderState::from_event(event.into_inner(), Instant::now()))
    }

    /// The current state of every election of the daemon.
    ///
    /// # Errors
    /// The call failed.
    pub async fn list(&self) -> Result<Vec<LeaderState>, ClientError> {
        Ok(self.status().await?.elections)
    }

    /// Every election of the daemon and, with `--balance`, its balancing group.
    ///
    /// # Errors
    /// The call failed.
    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        let response = self
            .rpc
            .clone()
            .list_leadership(proto::ListLeadershipRequest {})
            .await
            .map_err(failed("ListLeadership"))?
            .into_inner();
        let now = Instant::now();
        Ok(DaemonStatus {
            elections: response
                .elections
                .into_iter()
                .map(|e| LeaderState::from_event(e, now))
                .collect(),
            balance: response.balance,
        })
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
        let response = self
            .rpc
            .clone()
            .resign(request)
            .await
            .map_err(failed("Resign"))?;
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
            .map_err(failed("SetReadiness"))?;
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
            .map_err(failed("AcknowledgeStop"))?;
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
        let start = Reconnecting {
            rpc: self.rpc.clone(),
            request,
            ready: readiness,
            stream: None,
            backoff: Backoff::new(RECONNECT_MIN, RECONNECT_MAX),
        };
        stream::unfold(start, |mut reconnecting| async move {
            let event = reconnecting.next().await;
            Some((event, reconnecting))
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
    /// [`WorkerBuilder::run`].
    pub fn worker(&self, election: &str) -> WorkerBuilder<'_> {
        WorkerBuilder {
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
pub struct WorkerBuilder<'a> {
    client: &'a Client,
    election: String,
    name: String,
    ready: Option<watch::Receiver<bool>>,
    until: Option<Pin<Box<dyn Future<Output = ()> + Send + 'a>>>,
}

impl<'a> WorkerBuilder<'a> {
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
    /// daemon hands over at once), and [`WorkerBuilder::run`] returns `Ok(())`.
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
        let calls = WorkerCalls {
            client: self.client,
            election: &self.election,
            worker: &self.name,
        };
        Driver::new(calls, &self.election, work, self.ready)
            .run(events, until)
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

/// One watch that reconnects with back-off.
struct Reconnecting {
    rpc: LeadershipClient<Channel>,
    request: proto::WatchLeadershipRequest,
    /// The worker's current readiness, declared again on every (re)connection.
    ready: Option<watch::Receiver<bool>>,
    stream: Option<tonic::Streaming<proto::LeadershipEvent>>,
    backoff: Backoff,
}

impl Reconnecting {
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
/// [`WorkerBuilder::until`]. (A worker that is PID 1 in a container is not ended by SIGTERM
/// unless it handles it.)
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
