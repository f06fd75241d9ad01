//! The gRPC server: `baton.v1.Leadership` over the running elections, `grpc.health.v1.Health`
//! (SERVING only while every election's store answers), and server reflection v1 and v1alpha so
//! that `grpcurl` works with no proto file.
//!
//! Errors become a `tonic::Status` in exactly one place: `impl From<ApiError> for Status`.
//! (`crate::watch` also refuses a malformed request as tonic's own handler would, with tonic's
//! statuses.)

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tonic::{Request, Response, Status, transport::server::TlsConnectInfo};

use crate::{
    coalesce::ConnectionNumber,
    election::{Election, ElectionError, Leadership, Role, Subscription},
    fanout::{Fanout, Watch},
    proto::{self, leadership_server::LeadershipServer},
};

/// Why a request failed, before it becomes a `Status`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request named an election this daemon does not run.
    #[error("unknown election {name:?}; this daemon runs: {known}")]
    UnknownElection {
        /// The name asked for.
        name: String,
        /// The elections this daemon runs, comma-separated.
        known: String,
    },
    /// A request field is missing or malformed.
    #[error("{field}: {problem}")]
    InvalidArgument {
        /// The field's name in the request.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The election refused or could not answer.
    #[error(transparent)]
    Election(#[from] ElectionError),
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let message = error.to_string();
        match error {
            ApiError::UnknownElection { .. } => Status::not_found(message),
            ApiError::InvalidArgument { .. } => Status::invalid_argument(message),
            ApiError::Election(ElectionError::NotLeader { .. }) => {
                Status::failed_precondition(message)
            }
            ApiError::Election(ElectionError::UnknownWorker { .. }) => Status::not_found(message),
            ApiError::Election(ElectionError::Stopped { .. }) => Status::unavailable(message),
        }
    }
}

/// The `baton.v1.Leadership` service over a fixed set of elections.
#[derive(Clone)]
pub struct LeadershipService {
    elections: Arc<[Served]>,
}

/// An election, and the wake-ups of its WatchLeadership streams.
struct Served {
    election: Election,
    fanout: Fanout,
    /// The fan-out's relay: it stops when the last clone of the service goes, if the election
    /// has not stopped first.
    _relay: AbortOnDropHandle<()>,
}

impl LeadershipService {
    /// Serve these elections, with one [`Fanout`] relay task per election.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn new(elections: Vec<Election>) -> Self {
        let elections = elections
            .into_iter()
            .map(|election| {
                let (fanout, relay) = Fanout::spawn(election.changes());
                Served {
                    election,
                    fanout,
                    _relay: relay,
                }
            })
            .collect();
        LeadershipService { elections }
    }

    /// The tonic server for this service. The daemon also puts a
    /// [`WatchLayer`](crate::watch::WatchLayer) over this service in front of its router, which
    /// answers WatchLeadership with less work per event; without it, this server answers it.
    pub fn into_server(self) -> LeadershipServer<Self> {
        LeadershipServer::new(self)
    }

    fn find(&self, name: &str) -> Result<&Election, ApiError> {
        self.served(name).map(|s| &s.election)
    }

    fn served(&self, name: &str) -> Result<&Served, ApiError> {
        if name.is_empty() {
            return Err(ApiError::InvalidArgument {
                field: "election",
                problem: "must name an election",
            });
        }
        self.elections
            .iter()
            .find(|s| s.election.name() == name)
            .ok_or_else(|| ApiError::UnknownElection {
                name: name.to_owned(),
                known: self
                    .elections
                    .iter()
                    .map(|s| s.election.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// An open WatchLeadership stream: the fan-out's "changed", and what to tell the subscriber.
pub(crate) struct Watching {
    changes: Watch,
    subscription: Subscription,
}

impl Watching {
    /// Ready after each change: then send [`Watching::event`]. `None` once the election has
    /// stopped.
    pub(crate) fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.changes.poll_next_unpin(cx)
    }

    /// The event to send now. Each state is read by `Subscription::deliver`, which records a
    /// worker being told LEADER atomically with reading it. When the client goes away the
    /// stream is dropped, and with it the subscription.
    pub(crate) fn event(&self) -> proto::LeadershipEvent {
        to_event(&self.subscription.deliver())
    }

    /// For a stream that no worker opened (an observer), `f` of the state now, read in place.
    /// `None` for a worker's stream, whose event must be the state its [`Watching::event`]
    /// reads (and records).
    pub(crate) fn observe<R>(&self, f: impl FnOnce(&Leadership) -> R) -> Option<R> {
        self.subscription.observe(f)
    }
}

impl LeadershipService {
    /// Open a WatchLeadership stream for a client on connection number `connection`, from
    /// `route` (for the log: `watch` for [`crate::watch`]'s, `tonic` for the generated one).
    pub(crate) fn open_watch(
        &self,
        request: &proto::WatchLeadershipRequest,
        connection: Option<u64>,
        route: &'static str,
    ) -> Result<Watching, ApiError> {
        let served = self.served(&request.election)?;
        let worker = Some(request.worker.as_str()).filter(|w| !w.is_empty());
        tracing::debug!(election = %request.election, ?worker, ?connection, %route,
            "watch opened");
        Ok(Watching {
            changes: served.fanout.watch(connection),
            subscription: served.election.subscribe(worker, request.ready),
        })
    }
}

fn require_worker(worker: &str) -> Result<&str, ApiError> {
    if worker.is_empty() {
        Err(ApiError::InvalidArgument {
            field: "worker",
            problem: "must name the worker",
        })
    } else {
        Ok(worker)
    }
}

/// Encode a state as the wire event, with `valid_for` counted from now.
pub fn to_event(state: &Leadership) -> proto::LeadershipEvent {
    to_event_within(state, Duration::ZERO)
}

/// Encode a state as the wire event, for sending within `age` from now: `valid_for` counted
/// from now, less `age`, so that it never says more than is left when the event is sent.
pub(crate) fn to_event_within(state: &Leadership, age: Duration) -> proto::LeadershipEvent {
    let view = &state.view;
    let role = match view.role {
        Role::Unknown => proto::Role::Unknown,
        Role::Follower => proto::Role::Follower,
        Role::Leader => proto::Role::Leader,
    };
    let valid_for = view.valid_until.map(|until| {
        let left = until
            .saturating_duration_since(Instant::now())
            .saturating_sub(age);
        prost_types::Duration {
            seconds: left.as_secs() as i64,
            nanos: left.subsec_nanos() as i32,
        }
    });
    proto::LeadershipEvent {
        election: state.election.to_string(),
        role: role as i32,
        identity: state.identity.to_string(),
        leader: view.leader.clone().unwrap_or_default(),
        term: view.term,
        valid_for,
        observed_at: Some(prost_types::Timestamp::from(state.observed_at)),
        reason: view.reason.to_string(),
        campaigning: view.campaigning,
    }
}

/// The number [`Coalesced`](crate::coalesce::Coalesced) gave the request's connection: tonic
/// puts the connect info in the request's extensions, under TLS inside its own.
pub(crate) fn connection_number(extensions: &tonic::Extensions) -> Option<u64> {
    extensions
        .get::<ConnectionNumber>()
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<ConnectionNumber>>()
                .map(TlsConnectInfo::get_ref)
        })
        .map(|n| n.0)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::LeadershipEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::leadership_server::Leadership for LeadershipService {
    type WatchLeadershipStream = EventStream;

    async fn watch_leadership(
        &self,
        request: Request<proto::WatchLeadershipRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // The daemon answers this method before tonic's router does ([`crate::watch`]). This
        // is the same stream for a server built from `into_server` alone; it sends the same
        // events, each encoded for its stream.
        let connection = connection_number(request.extensions());
        let mut watching = self.open_watch(request.get_ref(), connection, "tonic")?;
        let events = futures::stream::poll_fn(move |cx| {
            watching
                .poll_change(cx)
                .map(|changed| changed.map(|()| Ok(watching.event())))
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn get_leadership(
        &self,
        request: Request<proto::GetLeadershipRequest>,
    ) -> Result<Response<proto::LeadershipEvent>, Status> {
        let election = self.find(&request.get_ref().election)?;
        Ok(Response::new(to_event(&election.current())))
    }

    async fn list_leadership(
        &self,
        _request: Request<proto::ListLeadershipRequest>,
    ) -> Result<Response<proto::ListLeadershipResponse>, Status> {
        let elections = self
            .elections
            .iter()
            .map(|s| to_event(&s.election.current()))
            .collect();
        Ok(Response::new(proto::ListLeadershipResponse { elections }))
    }

    async fn resign(
        &self,
        request: Request<proto::ResignRequest>,
    ) -> Result<Response<proto::ResignResponse>, Status> {
        let request = request.into_inner();
        let election = self.find(&request.election)?;
        let successor = Some(request.successor).filter(|s| !s.is_empty());
        if successor
            .as_deref()
            .is_some_and(|s| !crate::config::valid_identity(s))
        {
            return Err(ApiError::InvalidArgument {
                field: "successor",
                problem: "must be 1-128 printable characters without whitespace or format \
                          characters",
            }
            .into());
        }
        if successor.as_deref() == Some(&*election.current().identity) {
            return Err(ApiError::InvalidArgument {
                field: "successor",
                problem: "names this replica; name a standby",
            }
            .into());
        }
        let term = election.resign(successor).await.map_err(ApiError::from)?;
        Ok(Response::new(proto::ResignResponse { term }))
    }

    async fn set_readiness(
        &self,
        request: Request<proto::SetReadinessRequest>,
    ) -> Result<Response<proto::SetReadinessResponse>, Status> {
        let request = request.get_ref();
        let election = self.find(&request.election)?;
        election
            .set_ready(require_worker(&request.worker)?, request.ready)
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::SetReadinessResponse {}))
    }

    async fn acknowledge_stop(
        &self,
        request: Request<proto::AcknowledgeStopRequest>,
    ) -> Result<Response<proto::AcknowledgeStopResponse>, Status> {
        let request = request.get_ref();
        let election = self.find(&request.election)?;
        election
            .acknowledge_stop(require_worker(&request.worker)?, request.term)
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::AcknowledgeStopResponse {}))
    }
}
