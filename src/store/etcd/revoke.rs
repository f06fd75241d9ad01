//! Revoking a crashed predecessor's lease the moment etcd's clock says it expired, rather than
//! waiting up to 500 ms for etcd's lessor, which revokes expired leases lazily.

use std::time::Duration;

use etcd_client::LeaseClient;
use tokio::{
    sync::watch,
    time::{Instant, sleep_until, timeout},
};

use super::session::OwnedTask;

/// While a lease is in its last second, how often a waiter asks for it: the precision of the
/// take-over after a crash.
pub(super) const EXPIRY_POLL: Duration = Duration::from_millis(20);
/// The same for a lease of 2 s, which its holder keeps in its last second all the time (it
/// renews every 0.67 s): fewer requests, a coarser take-over.
pub(super) const EXPIRY_POLL_SHORT_TTL: Duration = Duration::from_millis(100);
/// Allowance for etcd's clock and ours running at different rates over that last second.
pub(super) const EXPIRY_MARGIN: Duration = Duration::from_millis(5);
/// The longest gap between two answers about a lease in its last second: a renewal restores a
/// TTL of at least 2 s, so it shows as a remaining TTL >= 1 for at least this long after it.
pub(super) const EXPIRY_MAX_GAP: Duration = Duration::from_secs(1);
/// Pause after a failed request about the predecessor's lease.
pub(super) const EXPIRY_RETRY: Duration = Duration::from_secs(1);

/// What etcd said of a lease.
pub(super) struct LeaseAnswer {
    /// The remaining TTL in whole seconds, rounded towards zero (negative: gone, or expired a
    /// second ago).
    pub(super) remaining: i64,
    /// The TTL it was granted.
    pub(super) granted: i64,
    /// The raft term of the etcd leader that answered: a new etcd leader extends every lease.
    pub(super) raft_term: u64,
}

/// Ask etcd about `lease`; `None` if it did not answer.
pub(super) async fn ask(
    leases: &mut LeaseClient,
    lease: i64,
    limit: Duration,
) -> Option<LeaseAnswer> {
    match timeout(limit, leases.time_to_live(lease, None)).await {
        Ok(Ok(answer)) => Some(LeaseAnswer {
            remaining: answer.ttl(),
            granted: answer.granted_ttl(),
            raft_term: answer.header().map_or(0, |h| h.raft_term()),
        }),
        Ok(Err(error)) => {
            tracing::debug!(lease = format!("{lease:x}"), %error, "lease time-to-live failed");
            None
        }
        Err(_) => None,
    }
}

/// Revoke `lease` (a predecessor's) as soon as etcd's own clock says it expired; resolves when
/// the lease is gone. Errors only delay it: the watch on the predecessor's key stays the way
/// the waiter learns of the deletion.
///
/// etcd revokes expired leases lazily (its lessor looks every 500 ms), so a crashed leader's
/// key can outlive its TTL by half a second. A waiter asks for the remaining TTL instead, which
/// etcd reports in whole seconds, rounded towards zero:
///
/// - A lease granted less than 2 s: never revoked here (a renewal may restore only 1 s, so the
///   proof below does not hold); etcd's lessor revokes it.
/// - `v >= 2`: the lease cannot reach its last second for `v - 1` s: sleep that long. With the
///   holder renewing every third of the TTL, that is a few requests per minute.
/// - `v == 1`: ask every [`EXPIRY_POLL`] ([`EXPIRY_POLL_SHORT_TTL`] for a TTL of 2 s), to see
///   the moment it turns 0.
/// - The first `0`, received at `d`: the lease had less than 1 s left when etcd answered, so
///   unless renewed it expires before `d + 1 s`. Keep asking every [`EXPIRY_POLL`]: a renewal
///   restores at least 2 s, so any answer `>= 1` is one (start over), and a gap of more than
///   [`EXPIRY_MAX_GAP`] between answers could hide one (start over too).
/// - A `0` to a request sent after `d + 1 s +` [`EXPIRY_MARGIN`] proves the lease expired on
///   etcd's clock with no renewal. The etcd leader never renews an expired lease again (its
///   `Renew` waits for the revocation), so revoking it takes nothing from a live holder: it does
///   now what etcd's lessor would do within 500 ms.
/// - A new etcd leader extends every lease when it takes office, expired ones included, and a
///   holder's renewal may then succeed: every answer from `d` on must come from the same raft
///   term, or the waiter starts over. What remains is the instant between the last answer and
///   the revoke: an etcd leader election exactly then, and a renewal right after it, would lose
///   that renewal's key to the revoke. A Baton holder is safe even then: it stepped down at its
///   renew deadline, before the TTL counted from the send time of its last renewal, and does
///   not lead on that lease again. A holder whose deadline counts from the answer (`etcdctl
///   elect`, client-go) is exposed in that instant only.
pub(super) async fn revoke_when_expired(
    mut leases: LeaseClient,
    lease: i64,
    limit: Duration,
    whose: &str,
) {
    if lease == 0 {
        // A key without a lease (written by hand): nothing expires.
        return std::future::pending().await;
    }
    let name = format!("{lease:x}");
    'watch: loop {
        // Until the lease is in its last second.
        let (mut asked, expires_by, raft_term) = loop {
            let sent = Instant::now();
            let Some(answer) = ask(&mut leases, lease, limit).await else {
                tokio::time::sleep(EXPIRY_RETRY).await;
                continue;
            };
            match answer.remaining {
                v if v < 0 => break 'watch,
                // A renewal of this lease restores less than 2 s (etcd grants 1 s under a short
                // election timeout), so no run of zeros proves it expired: leave it to etcd.
                _ if answer.granted < 2 => return std::future::pending().await,
                0 => {
                    let expires_by = Instant::now() + Duration::from_secs(1) + EXPIRY_MARGIN;
                    break (sent, expires_by, answer.raft_term);
                }
                1 if answer.granted <= 2 => tokio::time::sleep(EXPIRY_POLL_SHORT_TTL).await,
                1 => tokio::time::sleep(EXPIRY_POLL).await,
                v => tokio::time::sleep(Duration::from_secs(v as u64 - 1)).await,
            }
        };
        loop {
            sleep_until(expires_by.min(Instant::now() + EXPIRY_POLL)).await;
            let sent = Instant::now();
            let answer = ask(&mut leases, lease, limit).await;
            if Instant::now() - asked > EXPIRY_MAX_GAP {
                continue 'watch;
            }
            match answer {
                Some(a) if a.raft_term != raft_term => continue 'watch,
                Some(a) if a.remaining == 0 && sent >= expires_by => break 'watch,
                Some(a) if a.remaining == 0 => asked = sent,
                Some(a) if a.remaining < 0 => break 'watch,
                // Renewed, or no answer: the holder may be alive.
                _ => continue 'watch,
            }
        }
    }
    // Expired on etcd's clock (or already gone, when revoking again does nothing).
    match timeout(limit, leases.revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!(
            lease = name,
            "the {whose}'s session lease expired; revoked it without waiting for etcd"
        ),
        Ok(Err(error)) => {
            // Gone already, or etcd is struggling: do not ask again at once.
            tracing::debug!(lease = name, %error, "revoking an expired lease");
            tokio::time::sleep(EXPIRY_RETRY).await;
        }
        Err(_) => {
            tracing::debug!(lease = name, "revoking an expired lease timed out");
            tokio::time::sleep(EXPIRY_RETRY).await;
        }
    }
}

/// A [`revoke_when_expired`] of one lease, kept by its candidate across calls: a standby that
/// observed a dead leader and then campaigns for the election (under `--balance`, once the
/// leader's member key is gone) keeps the proof of expiry it has built, rather than start one
/// anew, which would take a second more and lose to etcd's lessor.
pub(super) struct Reaper {
    lease: i64,
    done: watch::Receiver<bool>,
    _task: OwnedTask,
}

impl Reaper {
    /// Until `lease` is revoked (or found gone), reusing `slot`'s reaper when it runs for the
    /// same lease; a finished one is replaced, so a revoke that failed is tried again.
    pub(super) fn wait(
        slot: &mut Option<Reaper>,
        leases: LeaseClient,
        lease: i64,
        limit: Duration,
        whose: &'static str,
    ) -> impl Future<Output = ()> + Send + 'static {
        let running = slot
            .as_ref()
            .is_some_and(|reaper| reaper.lease == lease && !*reaper.done.borrow());
        if !running {
            let (finished, done) = watch::channel(false);
            let task = OwnedTask::spawn(async move {
                revoke_when_expired(leases, lease, limit, whose).await;
                let _ = finished.send(true);
            });
            *slot = Some(Reaper {
                lease,
                done,
                _task: task,
            });
        }
        let mut done = slot.as_ref().map(|reaper| reaper.done.clone());
        async move {
            if let Some(done) = &mut done {
                let _ = done.wait_for(|finished| *finished).await;
            }
        }
    }
}
