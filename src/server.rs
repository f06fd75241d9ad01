//! The gRPC server: `baton.v1.Leadership` over the running elections. WatchLeadership serves an
//! election's state channel as a stream, as `tonic-health` does: the state at once, then the
//! state as it is each time the stream is polled after a change (a state replaced before that
//! is skipped), and the last state before the stream ends. Errors become a `tonic::Status` in
//! exactly one place: `impl From<ApiError> for Status`.

use std::{fmt, net::SocketAddr, pin::Pin, sync::Arc};

use futures::Stream;
use tokio::{net::unix::UCred, sync::watch, time::Instant};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use crate::{
    balance::GroupView,
    election::{Election, ElectionError, Leadership, Role},
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
    elections: Arc<[Election]>,
    group: Option<watch::Receiver<GroupView>>,
}

impl LeadershipService {
    /// Serve these elections.
    pub fn new(elections: Vec<Election>) -> Self {
        LeadershipService {
            elections: elections.into(),
            group: None,
        }
    }

    /// Also answer with the balancing group that `group` shows (`--balance`).
    pub fn with_group(mut self, group: watch::Receiver<GroupView>) -> Self {
        self.group = Some(group);
        self
    }

    /// The tonic server for this service. Requests are a few names: one over
    /// [`MAX_REQUEST_BYTES`] is refused by tonic (OUT_OF_RANGE) before it is decoded.
    pub fn into_server(self) -> LeadershipServer<Self> {
        LeadershipServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn find(&self, name: &str) -> Result<&Election, ApiError> {
        if name.is_empty() {
            return Err(ApiError::InvalidArgument {
                field: "election",
                problem: "must name an election",
            });
        }
        // Checked before it is echoed in NOT_FOUND: at most 63 bytes.
        if !crate::config::valid_election_name(name) {
            return Err(ApiError::InvalidArgument {
                field: "election",
                problem: "not an election name (lowercase letters, digits, '-' and '.', at \
                          most 63 characters)",
            });
        }
        self.elections
            .iter()
            .find(|e| e.name() == name)
            .ok_or_else(|| ApiError::UnknownElection {
                name: name.to_owned(),
                known: self
                    .elections
                    .iter()
                    .map(Election::name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Who opened a call, as the transport tells tonic: a TCP peer's address (with or without
/// TLS), or a Unix socket peer's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A client on a Unix socket.
    Unix(UCred),
}

impl Peer {
    /// The peer of `request`; `None` for a call that came through no transport (a test's).
    pub fn of<T>(request: &Request<T>) -> Option<Peer> {
        if let Some(addr) = request.remote_addr() {
            return Some(Peer::Tcp(addr));
        }
        let uds = request.extensions().get::<UdsConnectInfo>()?;
        uds.peer_cred.map(Peer::Unix)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "tcp:{addr}"),
            Peer::Unix(cred) => {
                let pid = cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string());
                write!(f, "unix:pid={pid},uid={}", cred.uid())
            }
        }
    }
}

/// The largest request message accepted (every request is an election and a worker name).
pub const MAX_REQUEST_BYTES: usize = 4096;

fn require_worker(worker: &str) -> Result<&str, ApiError> {
    if worker.is_empty() {
        return Err(ApiError::InvalidArgument {
            field: "worker",
            problem: "must name the worker",
        });
    }
    check_name("worker", worker)
}

/// A worker or successor name is shown in logs (a worker's is kept per election): bounded and
/// printable, as identities.
fn check_name<'a>(field: &'static str, name: &'a str) -> Result<&'a str, ApiError> {
    if crate::config::valid_identity(name) {
        Ok(name)
    } else {
        Err(ApiError::InvalidArgument {
            field,
            problem: "must be 1-128 printable characters without whitespace or format \
                      characters",
        })
    }
}

/// The peer of `request` for a log line.
fn peer<T>(request: &Request<T>) -> String {
    Peer::of(request).map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

/// Encode a state as the wire event, with `valid_for` counted from now.
pub fn to_event(state: &Leadership) -> proto::LeadershipEvent {
    let view = &state.view;
    let role = match view.role {
        Role::Unknown => proto::Role::Unknown,
        Role::Follower => proto::Role::Follower,
        Role::Leader => proto::Role::Leader,
    };
    let valid_for = view.valid_until.map(|until| {
        let left = until.saturating_duration_since(Instant::now());
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

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::LeadershipEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::leadership_server::Leadership for LeadershipService {
    type WatchLeadershipStream = EventStream;

    async fn watch_leadership(
        &self,
        request: Request<proto::WatchLeadershipRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let peer = peer(&request);
        let request = request.into_inner();
        let election = self.find(&request.election)?;
        let worker = Some(request.worker.as_str())
            .filter(|w| !w.is_empty())
            .map(|w| check_name("worker", w))
            .transpose()?;
        tracing::debug!(election = %request.election, ?worker, %peer,
            "watch opened");
        if request.ready {
            // Readiness decides whether a --campaign when-ready daemon campaigns.
            tracing::info!(election = %request.election, ?worker, %peer,
                "worker subscribed ready");
        }
        let subscription = election.subscribe(worker, request.ready);
        // Each event is read by `Subscription::deliver`, which records a worker being told
        // LEADER atomically with reading it. The client gone, the stream and the subscription
        // are dropped.
        let events = futures::stream::unfold(
            (subscription, true),
            |(mut subscription, first)| async move {
                if !first && !subscription.changed().await {
                    return None;
                }
                let event = to_event(&subscription.deliver());
                Some((Ok(event), (subscription, false)))
            },
        );
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
            .map(|e| to_event(&e.current()))
            .collect();
        let balance = self.group.as_ref().map(|group| {
            let group = group.borrow();
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            proto::BalanceGroup {
                group: group.group.clone(),
                members: group
                    .members
                    .iter()
                    .map(|m| proto::BalanceMember {
                        identity: m.identity.clone(),
                        eligible: count(m.eligible),
                        leads: count(m.leads),
                        share: count(m.share),
                    })
                    .collect(),
            }
        });
        Ok(Response::new(proto::ListLeadershipResponse {
            elections,
            balance,
        }))
    }

    async fn resign(
        &self,
        request: Request<proto::ResignRequest>,
    ) -> Result<Response<proto::ResignResponse>, Status> {
        let peer = peer(&request);
        let request = request.into_inner();
        let election = self.find(&request.election)?;
        let successor = Some(request.successor).filter(|s| !s.is_empty());
        if let Some(successor) = &successor {
            check_name("successor", successor)?;
        }
        if successor.as_deref() == Some(&*election.current().identity) {
            return Err(ApiError::InvalidArgument {
                field: "successor",
                problem: "names this replica; name a standby",
            }
            .into());
        }
        tracing::info!(election = %request.election, ?successor, %peer, "resign requested");
        let term = election.resign(successor).await.map_err(ApiError::from)?;
        Ok(Response::new(proto::ResignResponse { term }))
    }

    async fn set_readiness(
        &self,
        request: Request<proto::SetReadinessRequest>,
    ) -> Result<Response<proto::SetReadinessResponse>, Status> {
        let peer = peer(&request);
        let request = request.get_ref();
        let election = self.find(&request.election)?;
        let worker = require_worker(&request.worker)?;
        tracing::info!(election = %request.election, worker, ready = request.ready, %peer,
            "worker readiness set");
        election
            .set_ready(worker, request.ready)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{
        election::{CampaignMode, ElectionConfig},
        proto::leadership_server::Leadership as _,
        store::memory::MemoryStore,
        timing::Timing,
    };

    /// The service over election "e", in which this replica ("a") leads.
    async fn setup() -> (LeadershipService, Election, CancellationToken) {
        let cancel = CancellationToken::new();
        let (election, _task) = Election::spawn(
            Arc::new(MemoryStore::new()),
            ElectionConfig {
                name: "e".into(),
                identity: "a".into(),
                timing: Timing {
                    lease_duration: Duration::from_secs(15),
                    renew_deadline: Duration::from_secs(10),
                    retry_period: Duration::from_secs(2),
                },
                drain_timeout: Duration::from_secs(5),
                campaign: CampaignMode::Always,
                balanced: false,
            },
            cancel.child_token(),
        );
        election
            .changes()
            .wait_for(|s| s.view.role == Role::Leader)
            .await
            .expect("running");
        let service = LeadershipService::new(vec![election.clone()]);
        (service, election, cancel)
    }

    async fn open_stream(service: &LeadershipService, election: &str, worker: &str) -> EventStream {
        try_open_stream(service, election, worker)
            .await
            .expect("a stream")
    }

    async fn try_open_stream(
        service: &LeadershipService,
        election: &str,
        worker: &str,
    ) -> Result<EventStream, Status> {
        let request = proto::WatchLeadershipRequest {
            election: election.into(),
            worker: worker.into(),
            ready: false,
        };
        let response = service.watch_leadership(Request::new(request)).await?;
        Ok(response.into_inner())
    }

    async fn next(stream: &mut EventStream) -> proto::LeadershipEvent {
        stream
            .next()
            .await
            .expect("an event")
            .expect("not an error")
    }

    fn valid_for(event: &proto::LeadershipEvent) -> Duration {
        let d = event.valid_for.expect("valid_for");
        Duration::new(d.seconds as u64, d.nanos as u32)
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_streams_the_state_then_each_change_then_the_last_state_and_ends() {
        let (service, election, cancel) = setup().await;
        let mut stream = open_stream(&service, "e", "").await;
        let first = next(&mut stream).await;
        assert_eq!(first, to_event(&election.current()), "the state at once");
        assert_eq!(
            (first.role(), first.leader.as_str()),
            (proto::Role::Leader, "a")
        );

        election.resign(None).await.unwrap();
        let changed = next(&mut stream).await;
        assert_ne!(changed.role(), proto::Role::Leader);
        assert_eq!(changed, to_event(&election.current()), "the state it left");

        // The election stops: the last state, then the end.
        cancel.cancel();
        let mut last = None;
        while let Some(event) = stream.next().await {
            last = Some(event.unwrap());
        }
        assert_eq!(last.expect("the last state"), to_event(&election.current()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_watch_is_refused_with_its_status() {
        let (service, ..) = setup().await;
        let code = |r: Result<EventStream, Status>| r.err().map(|s| s.code());
        assert_eq!(
            code(try_open_stream(&service, "nope", "").await),
            Some(tonic::Code::NotFound)
        );
        assert_eq!(
            code(try_open_stream(&service, "", "").await),
            Some(tonic::Code::InvalidArgument)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_workers_stream_records_that_it_was_told_it_leads() {
        let (service, election, _cancel) = setup().await;
        let term = election.current().view.term;
        let workers = election.workers();
        let drained = || workers.borrow().drained(term, Instant::now());

        let mut observer = open_stream(&service, "e", "").await;
        next(&mut observer).await;
        assert_eq!(workers.borrow().subscribed(), 0, "an observer is no worker");
        assert!(drained(), "nobody was told it leads");

        let mut worker = open_stream(&service, "e", "w").await;
        assert_eq!(workers.borrow().subscribed(), 1, "a worker");
        assert!(drained(), "subscribed, not yet told");
        let told = next(&mut worker).await;
        assert_eq!(told.role(), proto::Role::Leader);
        assert!(!drained(), "told it leads: a release waits for it");

        // Its stream gone, it counts until the validity it was sent runs out, and not longer.
        drop(worker);
        assert_eq!(workers.borrow().subscribed(), 0, "no stream left");
        tokio::time::advance(valid_for(&told) - Duration::from_nanos(1)).await;
        assert!(!drained(), "not before the validity it was sent ran out");
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(drained(), "once it ran out");
    }
}
