//! Exponential back-off with jitter, shared by the elector's store retries and the client's
//! reconnections: each delay is half fixed and half random below a ceiling that doubles from
//! `base` up to `cap`, so replicas neither hammer a failing server nor retry in lockstep.

use std::time::Duration;

use rand::Rng;

/// The delays between attempts.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Delays from about `base` up to `cap`.
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        ceiling / 2 + ceiling.mul_f64(rand::rng().random::<f64>() / 2.0)
    }

    /// Whether the last attempt failed (a delay is due before the next).
    pub(crate) fn failing(&self) -> bool {
        self.attempt > 0
    }

    /// After a success: start again from `base`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1), "{d:?}");
        }
        let late = b.next_delay();
        assert!(late >= Duration::from_millis(500), "at the cap: {late:?}");
        assert!(b.failing());
        b.reset();
        assert!(!b.failing());
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
