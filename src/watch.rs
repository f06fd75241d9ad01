//! WatchLeadership on its own route, in front of tonic's router.
//!
//! A leadership change is one small event on every WatchLeadership stream: at 10,000
//! subscribers, 10,000 times the per-event cost of the path from the stream to HTTP/2. Through
//! tonic's generic path, each event went through the router's and the generated service's
//! response bodies (a box and an error mapping each) and tonic's encoder, which encodes into a
//! per-call buffer and splits it off; `perf` put that path at about a third of the daemon's CPU
//! in a fan-out, most of it the cache misses of touching each layer of each of 10,000 streams.
//!
//! [`WatchLayer`] answers `/baton.v1.Leadership/WatchLeadership` itself and passes every other
//! request on. It does what tonic's server-streaming handler does, with tonic's own pieces where
//! they are public:
//!
//! - the request message is read with [`tonic::codec::Streaming`] (tonic's framing, limits and
//!   errors); a compressed request is refused as tonic refuses it, since this server accepts no
//!   compression. Unlike tonic, the stream starts once the message is read, without waiting for
//!   the request's end (its trailers, which nothing here would read);
//! - a request error is a trailers-only response, from [`Status::into_http`];
//! - the response has tonic's headers, one gRPC message per event, written straight into the
//!   frame's bytes, and `grpc-status: 0` in the trailers when the election stops.
//!
//! What the stream says is [`crate::server`]'s (`LeadershipService::open_watch`), shared with
//! the generated service's method, so both routes send the same events. One thing differs:
//! observers (streams opened without a worker name) that find the same state on the same thread
//! within [`REUSE`] are sent the same bytes, encoded once, with `valid_for` short by `REUSE` so
//! that it never says more than is left. Each stream is still sent the state as it finds it
//! when polled. A worker's stream is always encoded from the state its own read recorded (see
//! `Subscription::deliver`).

use std::{
    cell::RefCell,
    convert::Infallible,
    future::Future,
    pin::{Pin, pin},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header::CONTENT_TYPE};
use http_body::Frame;
use http_body_util::Either;
use prost::Message;
use tokio::time::Instant;
use tonic::{Status, body::Body, codec::Codec as _, metadata::MetadataValue};

use crate::{
    election::Leadership,
    proto::{self, Codec},
    server::{LeadershipService, Watching, connection_number, to_event_within},
};

/// The route this module answers.
pub const PATH: &str = "/baton.v1.Leadership/WatchLeadership";

/// Puts [`WatchRoute`] in front of a service (tonic's router): see the module.
#[derive(Clone)]
pub struct WatchLayer {
    leadership: LeadershipService,
}

impl WatchLayer {
    /// Answer WatchLeadership from `leadership`.
    pub fn new(leadership: LeadershipService) -> Self {
        WatchLayer { leadership }
    }
}

impl<S> tower_layer::Layer<S> for WatchLayer {
    type Service = WatchRoute<S>;

    fn layer(&self, inner: S) -> WatchRoute<S> {
        WatchRoute {
            inner,
            leadership: self.leadership.clone(),
        }
    }
}

/// WatchLeadership answered here, everything else by `inner`.
#[derive(Clone)]
pub struct WatchRoute<S> {
    inner: S,
    leadership: LeadershipService,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<Body>> for WatchRoute<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Either<WatchBody, B>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        // Readiness is the inner service's even for a call answered here: tonic's router is
        // always ready. A limit put inside this layer would count WatchLeadership as a call.
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != PATH {
            let response = self.inner.call(request);
            return Box::pin(async move { Ok(response.await?.map(Either::Right)) });
        }
        let leadership = self.leadership.clone();
        Box::pin(async move {
            let response = match open(&leadership, request).await {
                Ok(body) => {
                    let mut response = http::Response::new(body);
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                    response
                }
                Err(status) => status.into_http(),
            };
            Ok(response.map(Either::Left))
        })
    }
}

/// Read the request and open the stream.
async fn open(
    leadership: &LeadershipService,
    request: http::Request<Body>,
) -> Result<WatchBody, Status> {
    if let Some(encoding) = request.headers().get("grpc-encoding")
        && encoding != "identity"
    {
        let mut status = Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            String::from_utf8_lossy(encoding.as_bytes())
        ));
        status.metadata_mut().insert(
            "grpc-accept-encoding",
            MetadataValue::from_static("identity"),
        );
        return Err(status);
    }
    let connection = connection_number(request.extensions());
    let decoder =
        Codec::<proto::LeadershipEvent, proto::WatchLeadershipRequest>::default().decoder();
    let mut messages = pin!(tonic::codec::Streaming::new_request(
        decoder,
        request.into_body(),
        None,
        None
    ));
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    let watching = leadership.open_watch(&message, connection, "watch")?;
    Ok(WatchBody {
        watching: Some(watching),
    })
}

/// A WatchLeadership response body: one gRPC message per event, then `grpc-status: 0` once the
/// election stops. The default is an ended body (a trailers-only response's).
#[derive(Default)]
pub struct WatchBody {
    watching: Option<Watching>,
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let Some(watching) = &mut self.watching else {
            return Poll::Ready(None);
        };
        let frame = match ready!(watching.poll_change(cx)) {
            Some(()) => Frame::data(
                watching
                    .observe(observed_message)
                    .unwrap_or_else(|| message(&watching.event())),
            ),
            None => {
                self.watching = None;
                let mut trailers = HeaderMap::with_capacity(1);
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                Frame::trailers(trailers)
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.watching.is_none()
    }
}

/// How long an observer's message is sent again on the thread that encoded it, to other
/// observers that find the same state; its `valid_for` is short by this much, so it never says
/// more than is left.
pub const REUSE: Duration = Duration::from_millis(1);

/// An observer's message, and what it was encoded from.
struct Encoded {
    state: Leadership,
    at: Instant,
    message: Bytes,
}

thread_local! {
    /// The observer's message this thread encoded last.
    static LAST: RefCell<Option<Encoded>> = const { RefCell::new(None) };
}

/// The message for an observer that finds `state`: the one this thread encoded from an equal
/// state in the last [`REUSE`], or `state` encoded now. In a fan-out to thousands of observers
/// each thread encodes about once a millisecond, and the observers share its bytes. (A state
/// names its election and replica, so observers of another election never match.)
fn observed_message(state: &Leadership) -> Bytes {
    let now = Instant::now();
    LAST.with_borrow_mut(|last| {
        if let Some(last) = last
            && last.state == *state
            && now.duration_since(last.at) < REUSE
        {
            return last.message.clone();
        }
        let message = message(&to_event_within(state, REUSE));
        *last = Some(Encoded {
            state: state.clone(),
            at: now,
            message: message.clone(),
        });
        message
    })
}

/// One length-prefixed, uncompressed gRPC message.
fn message(event: &impl Message) -> Bytes {
    let len = event.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("an event is far below 4 GiB"));
    event.encode_raw(&mut buf);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use futures::StreamExt;
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};
    use tokio_util::sync::CancellationToken;
    use tower_layer::Layer;
    use tower_service::Service;

    use super::*;
    use crate::{
        election::{CampaignMode, Election, ElectionConfig, Role},
        proto::leadership_server::Leadership as _,
        server::to_event,
        store::{Timing, memory::MemoryStore},
    };

    /// A service for every other route: answers with a marker header.
    #[derive(Clone)]
    struct Elsewhere;

    impl Service<http::Request<Body>> for Elsewhere {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-elsewhere", HeaderValue::from_static("1"));
            std::future::ready(Ok(response))
        }
    }

    struct Setup {
        route: WatchRoute<Elsewhere>,
        leadership: LeadershipService,
        election: Election,
        cancel: CancellationToken,
    }

    /// A route over election "e", in which this replica ("a") leads.
    async fn setup() -> Setup {
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
            },
            cancel.child_token(),
        );
        election
            .changes()
            .wait_for(|s| s.view.role == Role::Leader)
            .await
            .expect("running");
        let leadership = LeadershipService::new(vec![election.clone()]);
        Setup {
            route: WatchLayer::new(leadership.clone()).layer(Elsewhere),
            leadership,
            election,
            cancel,
        }
    }

    fn request(path: &str, body: Vec<u8>) -> http::Request<Body> {
        http::Request::post(path)
            .header(CONTENT_TYPE, "application/grpc")
            .body(Body::new(Full::new(Bytes::from(body))))
            .unwrap()
    }

    fn watch_request(election: &str, worker: &str) -> proto::WatchLeadershipRequest {
        proto::WatchLeadershipRequest {
            election: election.into(),
            worker: worker.into(),
            ready: false,
        }
    }

    fn watch(election: &str, worker: &str) -> http::Request<Body> {
        request(PATH, message(&watch_request(election, worker)).to_vec())
    }

    type Answer = http::Response<Either<WatchBody, Body>>;

    async fn call(route: &mut WatchRoute<Elsewhere>, request: http::Request<Body>) -> Answer {
        route.call(request).await.unwrap()
    }

    /// The next data frame's bytes.
    async fn next_message(answer: &mut Answer) -> Bytes {
        let frame = answer.body_mut().frame().await.expect("a frame").unwrap();
        frame.into_data().expect("a data frame")
    }

    fn decode(message: &Bytes) -> proto::LeadershipEvent {
        assert_eq!(message[0], 0, "not compressed");
        let len = u32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, message.len() - 5, "one whole message");
        proto::LeadershipEvent::decode(&message[5..]).unwrap()
    }

    fn valid_for(event: &proto::LeadershipEvent) -> Duration {
        let d = event.valid_for.expect("valid_for");
        Duration::new(d.seconds as u64, d.nanos as u32)
    }

    /// An event without its times (`valid_for`, `observed_at`), to compare with a state.
    fn untimed(event: &proto::LeadershipEvent) -> proto::LeadershipEvent {
        proto::LeadershipEvent {
            valid_for: None,
            observed_at: None,
            ..event.clone()
        }
    }

    fn untimed_state(state: &Leadership) -> proto::LeadershipEvent {
        untimed(&to_event(state))
    }

    /// The `grpc-status` of a trailers-only answer.
    fn status(answer: &Answer) -> &str {
        assert!(answer.body().is_end_stream(), "trailers-only");
        answer.headers()["grpc-status"].to_str().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn other_routes_go_to_the_inner_service() {
        let Setup { mut route, .. } = setup().await;
        let answer = call(&mut route, request("/grpc.health.v1.Health/Check", vec![])).await;
        assert!(answer.headers().contains_key("x-elsewhere"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_streams_each_state_then_the_last_then_ok_when_the_election_stops() {
        let Setup {
            mut route,
            election,
            cancel,
            ..
        } = setup().await;
        let mut answer = call(&mut route, watch("e", "")).await;
        assert_eq!(answer.status(), http::StatusCode::OK);
        assert_eq!(answer.headers()[CONTENT_TYPE], "application/grpc");
        let first = decode(&next_message(&mut answer).await);
        assert_eq!(
            (first.election.as_str(), first.role(), first.leader.as_str()),
            ("e", proto::Role::Leader, "a")
        );
        let state = election.current();
        assert_eq!(untimed(&first), untimed_state(&state));
        // Counted from now (paused), less the time an observer's message may be reused.
        let left = state.view.valid_until.unwrap() - Instant::now() - REUSE;
        assert_eq!(valid_for(&first), left);

        // A change is sent as the state it left.
        election.resign(None).await.unwrap();
        let next = decode(&next_message(&mut answer).await);
        assert_ne!(untimed(&next), untimed(&first));
        assert_eq!(untimed(&next), untimed_state(&election.current()));

        // The election stops: its last state, then the trailers.
        cancel.cancel();
        let (mut last, mut trailers) = (None, None);
        while let Some(frame) = answer.body_mut().frame().await {
            match frame.unwrap().into_data() {
                Ok(data) => last = Some(decode(&data)),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let last = last.expect("the last state is sent");
        assert_eq!(untimed(&last), untimed_state(&election.current()));
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(answer.body().is_end_stream());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_request_is_answered_trailers_only_as_tonic_would() {
        let Setup { mut route, .. } = setup().await;
        let not_found = call(&mut route, watch("nope", "")).await;
        assert_eq!(status(&not_found), "5", "an unknown election");
        let unnamed = call(&mut route, watch("", "")).await;
        assert_eq!(status(&unnamed), "3", "no election named");
        let empty = call(&mut route, request(PATH, vec![])).await;
        assert_eq!(status(&empty), "13", "no request message");
        let garbage = call(&mut route, request(PATH, vec![0, 0, 0, 0, 2, 0xff, 0xff])).await;
        assert_eq!(status(&garbage), "13", "a message that does not decode");
        let mut flagged = message(&watch_request("e", "")).to_vec();
        flagged[0] = 1;
        let flagged = call(&mut route, request(PATH, flagged)).await;
        assert_eq!(status(&flagged), "13", "compressed, with no grpc-encoding");
        let mut huge = vec![0, 0, 0x50, 0, 0];
        huge.resize(5 + 0x50_0000, 0);
        let huge = call(&mut route, request(PATH, huge)).await;
        assert_eq!(
            status(&huge),
            "11",
            "over tonic's 4 MiB limit (its OUT_OF_RANGE)"
        );

        let mut gzip = watch("e", "");
        gzip.headers_mut()
            .insert("grpc-encoding", HeaderValue::from_static("gzip"));
        let compressed = call(&mut route, gzip).await;
        assert_eq!(status(&compressed), "12", "compression");
        assert_eq!(compressed.headers()["grpc-accept-encoding"], "identity");
        let mut identity = watch("e", "");
        identity
            .headers_mut()
            .insert("grpc-encoding", HeaderValue::from_static("identity"));
        let mut plain = call(&mut route, identity).await;
        assert_eq!(
            decode(&next_message(&mut plain).await).role(),
            proto::Role::Leader
        );
    }

    #[tokio::test(start_paused = true)]
    async fn observers_share_a_message_and_a_worker_gets_its_own() {
        let Setup {
            mut route,
            election,
            ..
        } = setup().await;
        let mut first = call(&mut route, watch("e", "")).await;
        let mut second = call(&mut route, watch("e", "")).await;
        let shared = next_message(&mut first).await;
        assert_eq!(
            next_message(&mut second).await.as_ptr(),
            shared.as_ptr(),
            "the same bytes"
        );
        let mut worker = call(&mut route, watch("e", "w")).await;
        let own = next_message(&mut worker).await;
        assert_ne!(own.as_ptr(), shared.as_ptr());
        let told = decode(&own);
        assert_eq!(told.role(), proto::Role::Leader);
        let left = election.current().view.valid_until.unwrap() - Instant::now();
        assert_eq!(valid_for(&told), left, "counted from now");
    }

    #[tokio::test(start_paused = true)]
    async fn a_workers_stream_records_that_it_was_told_it_leads() {
        let Setup {
            mut route,
            election,
            ..
        } = setup().await;
        let term = election.current().view.term;
        let workers = election.workers();
        let drained = || workers.borrow().drained(term, Instant::now());

        // An observer first: this thread now holds a shared message that the worker must not
        // be sent (its `valid_for` is short, and sending it records nothing).
        let mut observer = call(&mut route, watch("e", "")).await;
        next_message(&mut observer).await;
        assert_eq!(workers.borrow().subscribed(), 0, "an observer is no worker");
        assert!(drained(), "nobody was told it leads");

        let mut worker = call(&mut route, watch("e", "w")).await;
        assert_eq!(workers.borrow().subscribed(), 1, "a worker");
        assert!(drained(), "subscribed, not yet told");
        let told = decode(&next_message(&mut worker).await);
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

    #[tokio::test(start_paused = true)]
    async fn the_generated_route_sends_the_same_events() {
        let Setup {
            mut route,
            leadership,
            ..
        } = setup().await;
        let mut generated = leadership
            .watch_leadership(tonic::Request::new(watch_request("e", "")))
            .await
            .unwrap()
            .into_inner();
        let tonic_event = generated.next().await.unwrap().unwrap();
        let mut answer = call(&mut route, watch("e", "")).await;
        let event = decode(&next_message(&mut answer).await);
        assert_eq!(untimed(&event), untimed(&tonic_event));
        assert_eq!(event.observed_at, tonic_event.observed_at);
        assert_eq!(valid_for(&event) + REUSE, valid_for(&tonic_event));
    }

    #[tokio::test(start_paused = true)]
    async fn an_observers_message_is_encoded_again_for_another_state_or_once_reuse_old() {
        let Setup { election, .. } = setup().await;
        let state = election.current();
        let first = observed_message(&state);
        assert_eq!(observed_message(&state).as_ptr(), first.as_ptr());
        let mut other = state.clone();
        other.view.term += 1;
        let other = observed_message(&other);
        assert_ne!(other.as_ptr(), first.as_ptr(), "another state");
        assert_eq!(decode(&other).term, state.view.term + 1);

        let first = observed_message(&state);
        tokio::time::advance(REUSE - Duration::from_nanos(1)).await;
        assert_eq!(observed_message(&state).as_ptr(), first.as_ptr());
        tokio::time::advance(Duration::from_nanos(1)).await;
        let fresh = observed_message(&state);
        assert_ne!(fresh.as_ptr(), first.as_ptr());
        assert_eq!(
            valid_for(&decode(&fresh)) + REUSE,
            valid_for(&decode(&first)),
            "counted from {REUSE:?} later"
        );
    }
}
