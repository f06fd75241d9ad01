//! The store contract: what every backend answers so that the elector never names a backend.
//! A [`Store`] opens one [`Candidate`] per election, through which the elector asks the four
//! questions of the design (acquire, keep, release, observe). Every backend passes the same
//! behavioural checks in `conformance`, built (with the in-memory store) for the crate's own
//! tests and with the `test-util` feature.

use std::{collections::BTreeSet, time::Duration};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::balance::Member;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod etcd;
pub mod file;
pub mod kubernetes;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;

/// The timing every [`Store::join`] takes; defined in its own leaf module, named here as part
/// of the store contract.
pub use crate::timing::Timing;

/// Who holds an election, as last seen in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// The holder's identity; `None` when nobody holds the election.
    pub holder: Option<String>,
    /// The term of the current (or, with no holder, the last) holding; 0 if never held.
    pub term: u64,
}

impl Observation {
    /// What a caller has seen before its first look: differs from every real observation, so
    /// the store answers the first `acquire`/`observe` at once, even for a free election.
    pub fn unseen() -> Self {
        Observation {
            holder: None,
            term: u64::MAX,
        }
    }
}

/// A holding won by [`Candidate::acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    /// The fencing token of this holding: greater than every earlier term of the election.
    pub term: u64,
    /// Until when this replica certainly holds the election without another `keep`.
    pub valid_until: Instant,
}

/// What [`Candidate::acquire`] returns: it wins, or it learns that the holder changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This candidate now holds the election.
    Held(Holding),
    /// Someone else holds it (or nobody, but another candidate has precedence), and that differs
    /// from what the caller last saw. Call `acquire` again to keep campaigning.
    Observed(Observation),
}

/// A backend: opens this replica's seat in an election.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Join `election` as `identity`. Joining does not campaign; it prepares the seat (opens the
    /// lock file, creates the etcd session) so that [`Candidate::acquire`] can.
    ///
    /// # Errors
    /// The store cannot be reached, refuses, or holds data Baton cannot read.
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError>;

    /// Enroll `identity` in the balancing `group` (see [`crate::balance`]): from now until
    /// [`Membership::leave`] or its drop, other members see it live. A member whose process
    /// dies drops out within one lease duration.
    ///
    /// # Errors
    /// The store cannot be reached or refuses, or another live member has the same identity.
    async fn enroll(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Membership>, StoreError>;

    /// One line for logs: the backend and where it keeps its state.
    fn describe(&self) -> String;

    /// Descriptors each election holds open besides the store's shared connections, which the
    /// daemon keeps free of its listeners' connections.
    fn descriptors_per_election(&self) -> u64 {
        0
    }
}

/// This daemon's place in a balancing group. The store keeps it alive on its own (a held lock,
/// a session lease, a renewed Lease) until [`Membership::leave`] or its drop.
///
/// Every future returned here is cancel-safe: the balancer drops [`Membership::changed`] when
/// something else needs it, and calls again.
#[async_trait]
pub trait Membership: Send {
    /// Publish the elections this member may lead now (its record in the group).
    ///
    /// # Errors
    /// The store failed or refused; the balancer retries.
    async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError>;

    /// The live members that have announced, sorted by identity, as soon as they differ from
    /// `last_seen`. A member that left or whose membership expired is not among them.
    ///
    /// # Errors
    /// The store failed or refused; the balancer retries with back-off.
    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError>;

    /// Leave the group at once: others see this member gone on their next read.
    ///
    /// # Errors
    /// The store could not be told; the membership then ends by expiry.
    async fn leave(&mut self) -> Result<(), StoreError>;
}

/// This replica's seat in one election. The elector calls one method at a time.
///
/// | question | call | answer |
/// |---|---|---|
/// | acquire  | [`Candidate::acquire`] | we hold it ([`Acquired::Held`]), or who does ([`Acquired::Observed`]) |
/// | keep     | [`Candidate::keep`]    | until when we certainly still hold it (a monotonic deadline) |
/// | release  | [`Candidate::release`] | gone; the next candidate may take over at once |
/// | observe  | [`Candidate::observe`] | the holder now, or the next change of holder |
///
/// Every new holding carries a term strictly greater than all earlier ones (the fencing token).
/// Backends wait on the store's own notification (inotify on the lock, an etcd watch, a
/// Kubernetes watch) rather than polling, so that a release is seen within milliseconds.
///
/// Every future returned here is cancel-safe: dropping it leaves the candidate either holding
/// (visible to the next call) or not, never holding in secret.
#[async_trait]
pub trait Candidate: Send {
    /// Campaign until this candidate holds the election, or until the holder differs from
    /// `last_seen`. Followers wait on the store's notification, not on a poll.
    ///
    /// # Errors
    /// The store failed or refused; the elector retries with back-off.
    async fn acquire(&mut self, last_seen: &Observation) -> Result<Acquired, StoreError>;

    /// Prove that this candidate still holds the election and extend the holding; returns until
    /// when it certainly holds.
    ///
    /// # Errors
    /// [`StoreError::Lost`] when the store shows the holding is gone; any other error when it
    /// cannot be proven now (the elector retries until its renew deadline).
    async fn keep(&mut self) -> Result<Instant, StoreError>;

    /// Give the election up so the next candidate takes over at once. With a `successor`, only
    /// that identity may take over until one lease duration has passed. Releasing when not
    /// holding is a no-op.
    ///
    /// # Errors
    /// The store could not be told; the holding then ends by lease expiry.
    async fn release(&mut self, successor: Option<&str>) -> Result<(), StoreError>;

    /// Without campaigning: the holder now if it differs from `last_seen`, else wait for the
    /// next change.
    ///
    /// # Errors
    /// The store failed or refused.
    async fn observe(&mut self, last_seen: &Observation) -> Result<Observation, StoreError>;
}

/// What went wrong in a store. Each backend has its own error type; this wraps them and says
/// how the elector should react ([`StoreError::kind`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The holding ended: the store shows another holder, or our record is gone.
    #[error("leadership lost: {reason}")]
    Lost {
        /// What the store showed.
        reason: String,
    },
    /// A store call did not answer in time.
    #[error("store did not answer {op} within {after:?}")]
    Timeout {
        /// The call.
        op: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The file store failed.
    #[error(transparent)]
    File(#[from] file::FileError),
    /// The in-memory store failed (partitioned in a test).
    #[cfg(any(test, feature = "test-util"))]
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The etcd store failed.
    #[cfg(feature = "etcd")]
    #[error(transparent)]
    Etcd(#[from] etcd::EtcdError),
    /// The Kubernetes store failed or was refused.
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubernetesError),
}

/// How the elector treats a [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The holding is gone: step down at once.
    Lost,
    /// Unreachable, slow or refusing (403, auth): report UNKNOWN and retry with back-off.
    Unavailable,
    /// The store holds data Baton cannot use (a foreign or corrupt lock file): retrying will not
    /// help until someone fixes it; the daemon says so and retries with back-off, re-opening
    /// its seat from scratch, so a fix takes effect without a restart.
    Invalid,
}

impl StoreError {
    /// How the elector should react to this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Lost { .. } => ErrorKind::Lost,
            StoreError::Timeout { .. } => ErrorKind::Unavailable,
            StoreError::File(e) => e.kind(),
            #[cfg(any(test, feature = "test-util"))]
            StoreError::Memory(e) => e.kind(),
            #[cfg(feature = "etcd")]
            StoreError::Etcd(e) => e.kind(),
            #[cfg(feature = "kubernetes")]
            StoreError::Kubernetes(e) => e.kind(),
        }
    }
}
