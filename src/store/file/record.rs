//! The state record observers read (`E.state`), and the boot identity that limits a successor
//! reservation to the boot it was made on.

use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};

/// The record in `E.state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(super) struct StateRecord {
    /// The current holder, `None` after a release.
    pub(super) holder: Option<String>,
    /// The term of the current or last holding.
    pub(super) term: u64,
    /// The holder's process id, for people reading the file.
    #[serde(default)]
    pub(super) pid: Option<u32>,
    /// Written by a release: the holder's workers confirmed their stop. Any other end of a
    /// holding (a crash, or an observer clearing a dead holder's name) leaves it false, and the
    /// next holder waits the crash grace.
    #[serde(default)]
    pub(super) released: bool,
    /// After a release with a successor: only it may take over until `successor_until_ms`.
    #[serde(default)]
    pub(super) successor: Option<String>,
    /// CLOCK_BOOTTIME in milliseconds: one clock for every process on this host, which neither
    /// jumps with the wall clock nor stops while the machine sleeps.
    #[serde(default)]
    pub(super) successor_until_ms: u64,
    /// The boot (kernel boot id) on which `successor_until_ms` was measured: CLOCK_BOOTTIME
    /// restarts at boot, so a reservation from an earlier boot means nothing.
    #[serde(default)]
    pub(super) successor_boot: Option<String>,
}

/// CLOCK_BOOTTIME now, as a duration since boot.
pub(super) fn boot_time() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(Duration::ZERO, Duration::from)
}

/// The kernel's id of this boot, `None` if it cannot be read.
pub(super) fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
}

impl StateRecord {
    /// How long the election stays reserved for a successor other than `me`, by the record's
    /// clock: only a reservation made on this boot (`boot`) counts.
    pub(super) fn reserved_against(&self, me: &str, boot: Option<&str>) -> Option<Duration> {
        let successor = self.successor.as_deref()?;
        let other_boot =
            matches!((boot, &self.successor_boot), (Some(now), Some(then)) if now != then);
        if successor == me || other_boot {
            return None;
        }
        Duration::from_millis(self.successor_until_ms)
            .checked_sub(boot_time())
            .filter(|left| !left.is_zero())
    }
}
