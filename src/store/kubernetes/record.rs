//! What a candidate keeps of the Lease: the record Baton judges (holder, term, successor
//! reservation), when it was first seen here, and the candidate's own state.

use std::{pin::Pin, time::Duration};

use futures::Stream;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{Api, api::WatchEvent};
use tokio::time::Instant;

use crate::store::Observation;
use crate::timing::Timing;

/// The annotation naming the identity a release was made for.
pub const SUCCESSOR_ANNOTATION: &str = "baton.dev/successor";
/// The annotation naming the `leaseTransitions` of the released record it belongs to.
pub const SUCCESSOR_TERM_ANNOTATION: &str = "baton.dev/successor-term";

/// A watch on one Lease. In a `Mutex` only to be `Sync` (the candidate is borrowed across
/// awaits); it is reached through `&mut` and never locked.
pub(super) type LeaseWatch =
    std::sync::Mutex<Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<Lease>>> + Send>>>;

/// The part of a Lease that Baton judges: the spec and the successor annotations.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Record {
    pub(super) spec: LeaseSpec,
    pub(super) successor: Option<String>,
    pub(super) successor_term: Option<String>,
}

impl Record {
    pub(super) fn of(lease: &Lease) -> Self {
        let annotations = lease.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).cloned();
        Record {
            spec: lease.spec.clone().unwrap_or_default(),
            successor: annotation(SUCCESSOR_ANNOTATION),
            successor_term: annotation(SUCCESSOR_TERM_ANNOTATION),
        }
    }

    pub(super) fn holder(&self) -> Option<&str> {
        self.spec
            .holder_identity
            .as_deref()
            .filter(|h| !h.is_empty())
    }

    pub(super) fn transitions(&self) -> i32 {
        self.spec.lease_transitions.unwrap_or(0)
    }

    pub(super) fn term(&self) -> u64 {
        self.transitions().max(0) as u64
    }

    /// The successor this free record is reserved for, if the reservation belongs to it.
    pub(super) fn successor(&self) -> Option<&str> {
        let term = self.successor_term.as_deref()?.parse::<i32>().ok()?;
        (self.holder().is_none() && term == self.transitions())
            .then_some(self.successor.as_deref())
            .flatten()
    }
}

/// The Lease as last read, and when this version of its record was first seen here.
pub(super) struct Seen {
    pub(super) lease: Lease,
    pub(super) record: Record,
    /// Local monotonic time at which the record was first seen as it is now.
    pub(super) changed_at: Instant,
}

impl Seen {
    /// `lease` as seen now, after `previous`: the observed-time rule of every Lease this store
    /// judges. The record keeps the time it was first seen as it is; any change restarts it.
    pub(super) fn observe(previous: Option<&Seen>, lease: Lease) -> Seen {
        let record = Record::of(&lease);
        let changed_at = match previous {
            Some(seen) if seen.record == record => seen.changed_at,
            _ => Instant::now(),
        };
        Seen {
            lease,
            record,
            changed_at,
        }
    }

    /// When the record expires unless it changes: its `leaseDurationSeconds` after it was first
    /// seen as it is (`default` when it names no valid duration, rather than "expired at once").
    pub(super) fn expiry(&self, default: Duration) -> Instant {
        let duration = match self.record.spec.lease_duration_seconds {
            Some(s) if s > 0 => Duration::from_secs(s as u64),
            _ => default,
        };
        self.changed_at + duration
    }
}

/// What a list or a write answered.
pub(super) enum Answer {
    Listed(kube::core::ObjectList<Lease>),
    Written(Box<Lease>),
}

/// A request running as a task of its own (see [`LeaseCandidate::request`]).
pub(super) struct InFlight {
    pub(super) verb: &'static str,
    pub(super) task:
        tokio::task::JoinHandle<Result<kube::Result<Answer>, tokio::time::error::Elapsed>>,
}

/// Our holding.
pub(super) struct Held {
    pub(super) term: i32,
    pub(super) acquire_time: Option<MicroTime>,
}

/// A take-over whose outcome is unknown (its call failed or was cancelled in flight): if the
/// record later shows exactly it, it was applied and we hold the Lease.
pub(super) struct Attempt {
    /// The resourceVersion the write was conditioned on (`None`: a create).
    pub(super) base: Option<String>,
    pub(super) transitions: i32,
    pub(super) acquire_time: Option<MicroTime>,
}

/// What one look at the record decided.
pub(super) struct Verdict {
    pub(super) seen: Observation,
    pub(super) may_take: bool,
    /// When the verdict changes by itself (an expiry), if ever.
    pub(super) until: Option<Instant>,
}

pub(super) struct LeaseCandidate {
    pub(super) api: Api<Lease>,
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) identity: String,
    pub(super) principal: String,
    pub(super) timing: Timing,
    pub(super) lease_seconds: i32,
    /// The Lease as last read (`None`: it does not exist).
    pub(super) seen: Option<Seen>,
    /// Where a watch resumes: the resourceVersion of the last list, write or event.
    pub(super) resume_from: Option<String>,
    /// `seen` may be out of date (a watch failed, or not watching): list before trusting it.
    pub(super) stale: bool,
    pub(super) watch: Option<(LeaseWatch, Instant)>,
    pub(super) held: Option<Held>,
    pub(super) attempt: Option<Attempt>,
    /// The highest `leaseTransitions` seen, so that a Lease deleted and created again (by a
    /// person) does not hand out a term this candidate has already seen.
    pub(super) highest_term: i32,
    /// A request whose caller stopped waiting for it.
    pub(super) in_flight: Option<InFlight>,
}

/// The current wall-clock time at the microsecond precision of a MicroTime, so that what we
/// write compares equal to what we read back.
pub(super) fn now_micro() -> MicroTime {
    let now = Timestamp::now();
    MicroTime(Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;

    #[test]
    fn a_successor_reservation_binds_only_its_own_record() {
        let mut lease = Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_transitions: Some(4),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        };
        LeaseCandidate::set_successor(&mut lease, Some(("c", 4)));
        assert_eq!(Record::of(&lease).successor(), Some("c"));
        // Another writer took and released the Lease since, leaving the annotations behind.
        if let Some(spec) = lease.spec.as_mut() {
            spec.lease_transitions = Some(5);
        }
        assert_eq!(Record::of(&lease).successor(), None);
        LeaseCandidate::set_successor(&mut lease, None);
        assert_eq!(lease.metadata.annotations, None);
    }

    #[test]
    fn micro_times_round_trip() {
        let now = now_micro();
        let json = serde_json::to_string(&now).unwrap();
        let back: MicroTime = serde_json::from_str(&json).unwrap();
        assert_eq!(now, back, "{json}");
    }
}
