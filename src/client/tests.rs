//! Paused-time tests of the driver: a scripted event stream, a recording of the calls to the
//! daemon, and real work tasks that log what they were told and when, on tokio's clock under
//! test control. Also the client's small helpers.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{
    channel::{mpsc, oneshot},
    stream,
};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{
    driver::{DaemonCalls, Driver, Inbox, Running},
    lease::SharedEnding,
    *,
};

/// The work's polling step while it finishes, off the whole seconds the scripts use.
const TICK: Duration = Duration::from_millis(300);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// A call the driver made to the daemon.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Call {
    Acknowledge(u64),
    Resign,
    Ready(bool),
}

/// What the work of a term saw.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Seen {
    Started,
    Asked(Option<Ending>),
    Returned,
}

/// Things that happened, with the time since the test began.
#[derive(Clone)]
struct Log<T>(Instant, Arc<Mutex<Vec<(Duration, T)>>>);

impl<T: Clone> Log<T> {
    fn new(start: Instant) -> Self {
        Log(start, Arc::default())
    }

    fn push(&self, what: T) {
        let at = self.0.elapsed();
        self.1.lock().expect("log").push((at, what));
    }

    fn all(&self) -> Vec<(Duration, T)> {
        self.1.lock().expect("log").clone()
    }
}

impl DaemonCalls for Log<Call> {
    fn acknowledge_stop(&self, term: u64) -> impl Future<Output = Result<(), ClientError>> {
        self.push(Call::Acknowledge(term));
        std::future::ready(Ok(()))
    }

    fn resign(&self) -> impl Future<Output = Result<u64, ClientError>> {
        self.push(Call::Resign);
        std::future::ready(Ok(0))
    }

    fn set_ready(&self, ready: bool) -> impl Future<Output = Result<(), ClientError>> {
        self.push(Call::Ready(ready));
        std::future::ready(Ok(()))
    }
}

/// Work that runs until cancelled, then takes `finish` to return unless its ending turns abrupt
/// (it looks every [`TICK`]). `finish: None`: it returns at once, before being cancelled.
fn work(
    log: &Log<(u64, Seen)>,
    finish: Option<Duration>,
) -> impl FnMut(Lease) -> futures::future::BoxFuture<'static, ()> + Send + use<> {
    let log = log.clone();
    move |lease: Lease| {
        let log = log.clone();
        Box::pin(async move {
            let term = lease.term();
            log.push((term, Seen::Started));
            if let Some(finish) = finish {
                lease.cancelled().await;
                let mut seen = lease.ending();
                log.push((term, Seen::Asked(seen)));
                let done = Instant::now() + finish;
                while seen != Some(Ending::Abrupt) && Instant::now() < done {
                    sleep(TICK).await;
                    if lease.ending() != seen {
                        seen = lease.ending();
                        log.push((term, Seen::Asked(seen)));
                    }
                }
            }
            log.push((term, Seen::Returned));
        })
    }
}

/// One driver under test: its event stream, its shutdown, and what it did.
struct Harness {
    start: Instant,
    events: mpsc::UnboundedSender<WatchEvent>,
    shutdown: Option<oneshot::Sender<()>>,
    calls: Log<Call>,
    work: Log<(u64, Seen)>,
}

impl Harness {
    fn state(&self, role: Role, term: u64, valid_for: Option<f64>) {
        let state = LeaderState {
            election: "e".into(),
            role,
            identity: "me".into(),
            leader: None,
            term,
            valid_until: valid_for.map(|s| Instant::now() + secs(s)),
            observed_at: None,
            reason: String::new(),
            campaigning: true,
        };
        self.send(WatchEvent::State(state));
    }

    fn send(&self, event: WatchEvent) {
        self.events.unbounded_send(event).expect("driver running");
    }

    async fn at(&self, s: f64) {
        sleep_until(self.start + secs(s)).await;
    }

    fn shut_down(&mut self) {
        let _ = self.shutdown.take().expect("once").send(());
    }

    /// The calls made, at milliseconds since the start.
    fn calls(&self) -> Vec<(u128, Call)> {
        let calls = self.calls.all().into_iter();
        calls.map(|(at, c)| (at.as_millis(), c)).collect()
    }

    /// What the work saw, at milliseconds since the start.
    fn work(&self) -> Vec<(u128, u64, Seen)> {
        let work = self.work.all().into_iter();
        work.map(|(at, (term, seen))| (at.as_millis(), term, seen))
            .collect()
    }
}

/// Run a driver whose work takes `finish` to finish (see [`work`]) beside `script`; the run's
/// result and the harness.
async fn drive(
    finish: Option<Duration>,
    ready: Option<tokio::sync::watch::Receiver<bool>>,
    script: impl AsyncFnOnce(&mut Harness),
) -> (Result<(), ClientError>, Harness) {
    let start = Instant::now();
    let (events, rx) = mpsc::unbounded();
    let (shutdown, until) = oneshot::channel::<()>();
    let mut h = Harness {
        start,
        events,
        shutdown: Some(shutdown),
        calls: Log::new(start),
        work: Log::new(start),
    };
    let driver = Driver::new(h.calls.clone(), "e", work(&h.work, finish), ready);
    let until = async {
        let _ = until.await;
    };
    let (result, ()) = tokio::join!(driver.run(rx, until), script(&mut h));
    (result, h)
}

const LEADER: Role = Role::Leader;
const FOLLOWER: Role = Role::Follower;
use Seen::{Asked, Returned, Started};
const HAND_OVER: Seen = Asked(Some(Ending::HandOver));
const ABRUPT: Seen = Asked(Some(Ending::Abrupt));

#[tokio::test(start_paused = true)]
async fn work_stops_at_once_when_valid_for_runs_out_and_its_term_never_restarts() {
    let (result, h) = drive(Some(secs(1.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(20.0).await;
        // The daemon comes back from a pause still reporting term 3.
        h.state(LEADER, 3, Some(10.0));
        h.state(LEADER, 3, Some(10.0));
        h.at(21.0).await;
        h.shut_down();
    })
    .await;
    result.expect("shut down");
    let work = [(0, 3, Started), (10000, 3, ABRUPT), (10000, 3, Returned)];
    assert_eq!(h.work(), work);
    let calls = [(10000, Call::Acknowledge(3)), (20000, Call::Resign)];
    assert_eq!(h.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_of_the_term_keep_the_work_going() {
    let (_, h) = drive(Some(secs(1.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(8.0).await;
        h.state(LEADER, 3, Some(10.0));
        h.at(30.0).await;
        h.shut_down();
    })
    .await;
    let work = [(0, 3, Started), (18000, 3, ABRUPT), (18000, 3, Returned)];
    assert_eq!(h.work(), work);
    assert_eq!(h.calls(), [(18000, Call::Acknowledge(3))]);
}

#[tokio::test(start_paused = true)]
async fn a_step_down_hands_over_and_the_stop_is_acknowledged_when_the_work_returns() {
    let (_, h) = drive(Some(secs(0.9)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.state(FOLLOWER, 3, Some(5.0));
        h.at(30.0).await;
        h.shut_down();
    })
    .await;
    // Returned at the third look (2.9 s), within the hold: still a hand-over.
    let work = [(0, 3, Started), (2000, 3, HAND_OVER), (2900, 3, Returned)];
    assert_eq!(h.work(), work);
    assert_eq!(h.calls(), [(2900, Call::Acknowledge(3))]);
}

#[tokio::test(start_paused = true)]
async fn a_hand_over_turns_abrupt_when_the_hold_runs_out() {
    let (_, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.state(FOLLOWER, 3, Some(5.0));
        h.at(30.0).await;
        h.shut_down();
    })
    .await;
    // The hold ends at 7 s; the work sees it at its next look (7.1 s) and returns.
    let work = [
        (0, 3, Started),
        (2000, 3, HAND_OVER),
        (7100, 3, ABRUPT),
        (7100, 3, Returned),
    ];
    assert_eq!(h.work(), work);
    assert_eq!(h.calls(), [(7100, Call::Acknowledge(3))]);
}

#[tokio::test(start_paused = true)]
async fn events_of_the_term_extend_a_hand_over() {
    let (_, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.state(FOLLOWER, 3, Some(5.0));
        h.at(6.0).await;
        h.state(FOLLOWER, 3, Some(6.0));
        h.at(30.0).await;
        h.shut_down();
    })
    .await;
    // Held until 12 s now: the work's look at 12.2 s sees the abrupt ending.
    let work = [
        (0, 3, Started),
        (2000, 3, HAND_OVER),
        (12200, 3, ABRUPT),
        (12200, 3, Returned),
    ];
    assert_eq!(h.work(), work);
}

#[tokio::test(start_paused = true)]
async fn a_new_term_during_a_hand_over_turns_it_abrupt_then_starts() {
    let (_, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.state(FOLLOWER, 3, Some(5.0));
        h.at(3.0).await;
        h.state(LEADER, 4, Some(10.0));
        h.at(30.0).await;
        h.shut_down();
    })
    .await;
    let work = &h.work()[..5];
    let expected = [
        (0, 3, Started),
        (2000, 3, HAND_OVER),
        (3200, 3, ABRUPT),
        (3200, 3, Returned),
        (3200, 4, Started),
    ];
    assert_eq!(work, expected, "term 4 starts once term 3 returned");
    assert_eq!(h.calls()[0], (3200, Call::Acknowledge(3)));
}

#[tokio::test(start_paused = true)]
async fn a_lost_stream_stops_the_work_abruptly_and_the_worker_follows_on() {
    let (result, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.send(WatchEvent::Disconnected(ClientError::StreamEnded));
        h.at(4.0).await;
        h.state(LEADER, 4, Some(10.0));
        h.at(5.0).await;
        h.shut_down();
    })
    .await;
    result.expect("a broken stream does not end the run");
    let work = &h.work()[..4];
    let expected = [
        (0, 3, Started),
        (2000, 3, ABRUPT),
        (2000, 3, Returned),
        (4000, 4, Started),
    ];
    assert_eq!(work, expected);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_election_stops_the_work_and_ends_the_run() {
    let (result, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        let status = tonic::Status::not_found("no election e");
        let call = "WatchLeadership";
        h.send(WatchEvent::Disconnected(ClientError::Call { call, status }));
    })
    .await;
    let error = result.expect_err("NOT_FOUND ends the run");
    assert_eq!(error.code(), Some(tonic::Code::NotFound));
    let work = [(0, 3, Started), (2000, 3, ABRUPT), (2000, 3, Returned)];
    assert_eq!(h.work(), work);
    assert_eq!(h.calls(), [(2000, Call::Acknowledge(3))]);
}

#[tokio::test(start_paused = true)]
async fn the_end_of_the_event_stream_stops_the_work_and_ends_the_run() {
    let (result, h) = drive(Some(secs(60.0)), None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.events.close_channel();
    })
    .await;
    assert!(
        matches!(result, Err(ClientError::StreamEnded)),
        "{result:?}"
    );
    let work = [(0, 3, Started), (2000, 3, ABRUPT), (2000, 3, Returned)];
    assert_eq!(h.work(), work);
    assert_eq!(h.calls(), [(2000, Call::Acknowledge(3))]);
}

#[tokio::test(start_paused = true)]
async fn a_closed_readiness_source_is_declared_no_more() {
    let (ready_tx, ready) = tokio::sync::watch::channel(true);
    let (result, h) = drive(Some(secs(0.5)), Some(ready), async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(1.0).await;
        drop(ready_tx);
        h.at(2.0).await;
        h.send(WatchEvent::Disconnected(ClientError::StreamEnded));
        h.state(FOLLOWER, 3, None);
        h.at(3.0).await;
        h.shut_down();
    })
    .await;
    result.expect("shut down");
    // Declared once; neither the new stream nor the shutdown declares again.
    let calls = [(0, Call::Ready(true)), (2000, Call::Acknowledge(3))];
    assert_eq!(h.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn shutdown_hands_over_then_declares_the_worker_not_ready() {
    let (_ready_tx, ready) = tokio::sync::watch::channel(true);
    let (result, h) = drive(Some(secs(0.6)), Some(ready), async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.shut_down();
    })
    .await;
    result.expect("shut down");
    let work = [(0, 3, Started), (2000, 3, HAND_OVER), (2600, 3, Returned)];
    assert_eq!(h.work(), work);
    let calls = [
        (0, Call::Ready(true)),
        (2600, Call::Acknowledge(3)),
        (2600, Call::Ready(false)),
    ];
    assert_eq!(h.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn readiness_changes_are_declared_and_again_on_each_new_stream() {
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let (_, h) = drive(None, Some(ready), async |h: &mut Harness| {
        h.state(FOLLOWER, 1, None);
        h.at(1.0).await;
        ready_tx.send(true).expect("driver running");
        h.at(2.0).await;
        h.send(WatchEvent::Disconnected(ClientError::StreamEnded));
        h.state(FOLLOWER, 1, None);
        h.at(3.0).await;
        h.shut_down();
    })
    .await;
    let calls = [
        (0, Call::Ready(false)),
        (1000, Call::Ready(true)),
        (2000, Call::Ready(true)),
        (3000, Call::Ready(false)),
    ];
    assert_eq!(h.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn work_that_returns_while_leading_resigns_its_term_once() {
    let (_, h) = drive(None, None, async |h: &mut Harness| {
        h.state(LEADER, 3, Some(10.0));
        h.at(1.0).await;
        h.state(LEADER, 3, Some(10.0));
        h.at(2.0).await;
        h.shut_down();
    })
    .await;
    assert_eq!(h.work(), [(0, 3, Started), (0, 3, Returned)]);
    let calls = [(0, Call::Acknowledge(3)), (0, Call::Resign)];
    assert_eq!(h.calls(), calls);
}

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
        token,
        ending,
        task,
        why: None,
    };
    (running, lease)
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

fn follower_state(term: u64) -> WatchEvent {
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
async fn the_inbox_hands_out_held_events_first_in_order() {
    let mut inbox = Inbox {
        events: Box::pin(stream::iter([follower_state(7), follower_state(8)])),
        held: VecDeque::from([follower_state(5), follower_state(6)]),
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
