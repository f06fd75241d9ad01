//! The election's timing: how long a holding lasts, when a leader gives up renewing, and how
//! often it renews. A leaf module (it imports nothing from the crate) because the config, the
//! elector and every store read it.

use std::time::Duration;

/// Timing shared by the elector and the stores. Validated by the config: `lease_duration >
/// renew_deadline > retry_period > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a holding lasts in the store without renewal (etcd session TTL, Lease duration).
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long steps down, before the lease can expire.
    pub renew_deadline: Duration,
    /// Pause between renewals, and the base of the retry back-off.
    pub retry_period: Duration,
}

impl Default for Timing {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}
