//! The thin async loop behind [`super::Client::run_while_leader`]: it reads the daemon's stream,
//! the deadlines, the work's task, shutdown and readiness, feeds them to the pure
//! [`Follower`] as events, and performs the actions it returns (spawn and cancel the work, call
//! the daemon through [`DaemonCalls`]). Every decision is the follower's; this file waits and calls.

use std::{collections::VecDeque, future::Future, pin::Pin, pin::pin};

use futures::{Stream, StreamExt};
use tokio::{
    sync::watch,
    task::JoinError,
    time::{Instant, sleep_until, timeout},
};
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};

use super::{
    Client, ClientError, WatchEvent,
    follower::{Action, Event, Exit, Follower, Loss, Why},
    lease::{Ending, Lease, RPC_TIMEOUT, SharedEnding, call_budget},
};

/// The calls a worker makes to its daemon: the [`Client`]'s, or a recording in paused-time
/// tests.
pub(super) trait DaemonCalls {
    /// Confirm that the work of `term` stopped.
    fn acknowledge_stop(&self, term: u64) -> impl Future<Output = Result<(), ClientError>>;
    /// Ask the daemon to step down.
    fn resign(&self) -> impl Future<Output = Result<u64, ClientError>>;
    /// Declare whether the worker is warm.
    fn set_ready(&self, ready: bool) -> impl Future<Output = Result<(), ClientError>>;
}

/// One worker's calls through a [`Client`].
pub(super) struct WorkerCalls<'a> {
    pub(super) client: &'a Client,
    pub(super) election: &'a str,
    pub(super) worker: &'a str,
}

impl DaemonCalls for WorkerCalls<'_> {
    fn acknowledge_stop(&self, term: u64) -> impl Future<Output = Result<(), ClientError>> {
        self.client
            .acknowledge_stop(self.election, self.worker, term)
    }

    fn resign(&self) -> impl Future<Output = Result<u64, ClientError>> {
        self.client.resign(self.election, None)
    }

    fn set_ready(&self, ready: bool) -> impl Future<Output = Result<(), ClientError>> {
        self.client.set_ready(self.election, self.worker, ready)
    }
}

/// The work of one term, on its own task so that the watchdog stays responsive whatever the
/// work does. Dropping it cancels the work and aborts the task: no work outlives its
/// `run_while_leader`.
pub(super) struct Running {
    pub(super) term: u64,
    pub(super) token: CancellationToken,
    pub(super) ending: SharedEnding,
    pub(super) task: AbortOnDropHandle<()>,
    /// Why it was cancelled; `None` while it may go on.
    pub(super) why: Option<Why>,
}

impl Running {
    /// Cancel the work with `ending`; an abrupt ending overrides a hand-over, never the reverse.
    pub(super) fn cancel(&self, ending: Ending) {
        self.ending.raise(ending);
        self.token.cancel();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel(Ending::Abrupt);
    }
}

/// The daemon's events, and those read while a hand-over finished (handed out first).
pub(super) struct Inbox<S> {
    pub(super) events: Pin<Box<S>>,
    pub(super) held: VecDeque<WatchEvent>,
}

impl<S: Stream<Item = WatchEvent>> Inbox<S> {
    pub(super) async fn next(&mut self) -> Option<WatchEvent> {
        match self.held.pop_front() {
            Some(event) => Some(event),
            None => self.events.next().await,
        }
    }
}

/// How a lost stream counts.
fn loss(error: &ClientError) -> Loss {
    if error.code() == Some(tonic::Code::NotFound) {
        Loss::ElectionUnknown
    } else {
        Loss::Broken
    }
}

/// The next value of a readiness receiver, `None` once it closed (then pending forever).
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

/// Resolves when the running work's task ends; pending while none runs.
async fn ended(running: &mut Option<Running>) -> Result<(), JoinError> {
    match running {
        Some(running) => (&mut running.task).await,
        None => std::future::pending().await,
    }
}

/// Drives a [`Follower`] for one worker of one election.
pub(super) struct Driver<'a, F, D> {
    daemon: D,
    election: &'a str,
    work: F,
    follower: Follower,
    running: Option<Running>,
    /// The readiness source, read again on each new stream.
    ready: Option<watch::Receiver<bool>>,
    /// The NOT_FOUND that ends the run once the work stopped.
    unknown: Option<ClientError>,
}

impl<'a, F, Fut, D> Driver<'a, F, D>
where
    F: FnMut(Lease) -> Fut + Send,
    Fut: Future<Output = ()> + Send + 'static,
    D: DaemonCalls,
{
    /// A driver that runs `work` for `election`, declaring readiness from `ready` if given.
    pub(super) fn new(
        daemon: D,
        election: &'a str,
        work: F,
        ready: Option<watch::Receiver<bool>>,
    ) -> Self {
        Driver {
            daemon,
            election,
            work,
            follower: Follower::new(ready.is_some()),
            running: None,
            ready,
            unknown: None,
        }
    }

    /// Follow `events` until shut down by `until`, or the election turns out unknown.
    pub(super) async fn run<S: Stream<Item = WatchEvent> + Send>(
        mut self,
        events: S,
        until: impl Future<Output = ()>,
    ) -> Result<(), ClientError> {
        let inbox = &mut Inbox {
            events: Box::pin(events),
            held: VecDeque::new(),
        };
        let mut until = pin!(until);
        loop {
            let event = if self.follower.is_stopping() {
                self.next_while_stopping(inbox).await
            } else {
                self.next_event(inbox, until.as_mut()).await
            };
            let reached = (event == Event::DeadlineReached).then(|| self.follower.deadline());
            for action in self.follower.handle(event, Instant::now()) {
                if let Some(exit) = self.perform(action).await {
                    return exit;
                }
            }
            // A deadline the follower kept after it passed would fire again at once, forever.
            debug_assert!(
                reached.is_none_or(|reached| reached != self.follower.deadline()),
                "the follower kept a deadline it reached"
            );
        }
    }

    /// The next event while following. Deadline first, so a late event never extends a term
    /// that already ran out.
    async fn next_event<S: Stream<Item = WatchEvent>>(
        &mut self,
        inbox: &mut Inbox<S>,
        until: Pin<&mut impl Future<Output = ()>>,
    ) -> Event {
        let deadline = self.follower.deadline();
        tokio::select! {
            biased;
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                Event::DeadlineReached
            }
            () = until => Event::Shutdown,
            finished = ended(&mut self.running) => self.work_ended(finished),
            event = inbox.next() => match event {
                Some(WatchEvent::State(state)) => Event::State(state),
                Some(WatchEvent::Disconnected(error)) => {
                    let loss = loss(&error);
                    if loss == Loss::ElectionUnknown {
                        self.unknown = Some(error);
                    } else {
                        tracing::warn!(election = self.election, %error, "lost the daemon; stopping work");
                    }
                    Event::StreamLost(loss)
                }
                None => Event::StreamLost(Loss::Ended),
            },
            ready = changed(&mut self.ready) => Event::Readiness(ready),
        }
    }

    /// The next event while the work stops. During a hand-over the stream is read to learn
    /// whether the daemon still holds the term; what is read is kept for after the stop.
    async fn next_while_stopping<S: Stream<Item = WatchEvent>>(
        &mut self,
        inbox: &mut Inbox<S>,
    ) -> Event {
        let hold = self.follower.deadline();
        tokio::select! {
            biased;
            finished = ended(&mut self.running) => self.work_ended(finished),
            _ = sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {
                Event::DeadlineReached
            }
            event = inbox.events.next(), if hold.is_some() => {
                let seen = match &event {
                    Some(WatchEvent::State(state)) => Event::State(state.clone()),
                    Some(WatchEvent::Disconnected(error)) => Event::StreamLost(loss(error)),
                    None => Event::StreamLost(Loss::Ended),
                };
                inbox.held.extend(event);
                seen
            }
        }
    }

    /// The running work's task ended: log how, and let it go.
    fn work_ended(&mut self, finished: Result<(), JoinError>) -> Event {
        let Some(running) = self.running.take() else {
            return Event::WorkEnded;
        };
        let term = running.term;
        if let Err(e) = finished {
            tracing::error!(election = self.election, term, error = %e, "work panicked");
        }
        match &running.why {
            None => tracing::warn!(
                election = self.election,
                term,
                "work returned while leading; resigning"
            ),
            Some(why) => tracing::info!(
                election = self.election,
                term,
                why = %why,
                ending = %running.ending.get().unwrap_or(Ending::Abrupt),
                "work stopped"
            ),
        }
        Event::WorkEnded
    }

    /// Perform `action`; the run's result once it is over.
    async fn perform(&mut self, action: Action) -> Option<Result<(), ClientError>> {
        match action {
            Action::Start { term } => self.start(term),
            Action::Cancel { ending, why } => self.cancel(ending, why),
            Action::Acknowledge { term } => self.acknowledge(term).await,
            Action::Resign { term } => self.resign(term).await,
            Action::DeclareReady { ready, by } => self.declare_ready(ready, by).await,
            Action::Exit(Exit::Shutdown) => return Some(Ok(())),
            Action::Exit(Exit::ElectionUnknown) => {
                return Some(Err(self.unknown.take().unwrap_or(ClientError::StreamEnded)));
            }
            Action::Exit(Exit::StreamEnded) => return Some(Err(ClientError::StreamEnded)),
        }
        None
    }

    fn start(&mut self, term: u64) {
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
            token,
            ending,
            task,
            why: None,
        });
    }

    fn cancel(&mut self, ending: Ending, why: Why) {
        let Some(running) = &mut self.running else {
            return;
        };
        if let Some(first) = &running.why {
            tracing::warn!(
                election = self.election,
                term = running.term,
                turned = %why,
                was = %first,
                "the hand-over turned abrupt while the work was finishing"
            );
        } else {
            running.why = Some(why);
        }
        running.cancel(ending);
    }

    async fn acknowledge(&self, term: u64) {
        match timeout(RPC_TIMEOUT, self.daemon.acknowledge_stop(term)).await {
            Ok(Ok(())) => {}
            // The daemon is gone or restarted: it no longer waits for this worker.
            Ok(Err(error)) => {
                tracing::debug!(election = self.election, %error, "stop not acknowledged")
            }
            Err(_) => tracing::debug!(election = self.election, "stop acknowledgement timed out"),
        }
    }

    async fn resign(&self, term: u64) {
        match timeout(RPC_TIMEOUT, self.daemon.resign()).await {
            Ok(Ok(_)) => tracing::info!(
                election = self.election,
                term,
                "asked the daemon for a new term"
            ),
            Ok(Err(error)) => tracing::debug!(election = self.election, %error, "resign refused"),
            Err(_) => tracing::debug!(election = self.election, "resign timed out"),
        }
    }

    /// Tell the daemon whether this worker is warm (`None`: as its source says now), never
    /// waiting past `by`.
    async fn declare_ready(&self, ready: Option<bool>, by: Option<Instant>) {
        let Some(ready) = ready.or_else(|| self.ready.as_ref().map(|rx| *rx.borrow())) else {
            return;
        };
        let call = self.daemon.set_ready(ready);
        let limit = call_budget(by, Instant::now());
        if !matches!(timeout(limit, call).await, Ok(Ok(()))) {
            // Not subscribed right now: the next (re)connection declares it.
            tracing::debug!(election = self.election, ready, "readiness not declared");
        }
    }
}
