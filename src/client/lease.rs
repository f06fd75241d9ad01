//! What a term's work holds: the validity of its leadership on this process's clock, and how it
//! is asked to end. The daemon sends `valid_for` (a duration, never a remote timestamp); it
//! counts from the event's arrival, so a paused or unreachable daemon cannot extend it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// How long a call to the daemon may take outside a running term.
pub(super) const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// Until when an event received at `received_at` with `valid_for` certainly holds. An absurd
/// validity (negative, or past the clock's range) counts as none.
pub(super) fn valid_until(
    received_at: Instant,
    valid_for: Option<prost_types::Duration>,
) -> Option<Instant> {
    valid_for
        .and_then(|d| Duration::try_from(d).ok())
        .and_then(|d| received_at.checked_add(d))
}

/// How long a call made at `now` may take: [`RPC_TIMEOUT`], and never past `by`, the validity of
/// a running term (the watchdog must fire on time).
pub(super) fn call_budget(by: Option<Instant>, now: Instant) -> Duration {
    by.map_or(RPC_TIMEOUT, |by| {
        by.saturating_duration_since(now).min(RPC_TIMEOUT)
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

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ending::HandOver => "hand-over",
            Ending::Abrupt => "abrupt",
        })
    }
}

/// An [`Ending`] shared between the client and the work, as its discriminant (0: the work may
/// go on). It only grows: a hand-over can turn abrupt, never the reverse.
#[derive(Debug, Clone, Default)]
pub(super) struct SharedEnding(Arc<AtomicU8>);

impl SharedEnding {
    pub(super) fn get(&self) -> Option<Ending> {
        match self.0.load(Ordering::Acquire) {
            code if code == Ending::HandOver as u8 => Some(Ending::HandOver),
            code if code == Ending::Abrupt as u8 => Some(Ending::Abrupt),
            _ => None,
        }
    }

    pub(super) fn raise(&self, ending: Ending) {
        self.0.fetch_max(ending as u8, Ordering::AcqRel);
    }
}

/// What a worker's task is handed while its replica leads.
#[derive(Debug, Clone)]
pub struct Lease {
    pub(super) election: String,
    pub(super) term: u64,
    pub(super) token: CancellationToken,
    pub(super) ending: SharedEnding,
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
