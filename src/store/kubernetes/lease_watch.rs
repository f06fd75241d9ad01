//! Waiting for a change of Leases: a watch resumed from the last `resourceVersion`, listing
//! again after an error or `410 Gone`. A candidate watches its election's Lease by name; a
//! membership watches its group's Leases by label (`membership`).

use std::{pin::Pin, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{WatchEvent, WatchParams};
use tokio::time::{Instant, sleep, sleep_until};

use super::record::{LeaseCandidate, LeaseWatch};
use crate::store::StoreError;

/// Server-side timeout of one watch request; the watch is resumed after it.
pub(super) const WATCH_SECONDS: u32 = 290;
/// A watch that ends sooner than this after it started is restarted only after a pause, so a
/// server that closes watches at once is not hammered.
const WATCH_MIN_LIFE: Duration = Duration::from_secs(1);

/// An open watch and when it started.
pub(super) type OpenWatch = (LeaseWatch, Instant);

/// What [`next_event`] brought.
pub(super) enum Event {
    /// A Lease was created or changed.
    Applied(Lease),
    /// A Lease was deleted (its last state).
    Deleted(Lease),
    /// The watch ended; with `relist`, what was seen may be out of date (an error, `410 Gone`).
    Ended { relist: bool },
    /// The deadline came first.
    Deadline,
}

/// The next event of `watch`, taking bookmarks in as `resume_from`, or the deadline. A watch
/// that ends is dropped (`watch` becomes `None`); one that lived less than [`WATCH_MIN_LIFE`]
/// is followed by a pause of `retry_period` (at most until the deadline), so a server that ends
/// watches at once is not hammered. Cancel-safe: an event is taken off the stream only when it
/// is returned.
pub(super) async fn next_event(
    watch: &mut Option<OpenWatch>,
    resume_from: &mut Option<String>,
    retry_period: Duration,
    mut deadline: Pin<&mut impl Future<Output = ()>>,
    what: &str,
) -> Event {
    loop {
        let Some((stream, started)) = watch.as_mut() else {
            return Event::Ended { relist: false };
        };
        let started = *started;
        let stream = stream
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let event = tokio::select! {
            _ = deadline.as_mut() => return Event::Deadline,
            event = stream.next() => event,
        };
        let relist = match event {
            Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                return Event::Applied(lease);
            }
            Some(Ok(WatchEvent::Deleted(lease))) => {
                if let Some(rv) = &lease.metadata.resource_version {
                    *resume_from = Some(rv.clone());
                }
                return Event::Deleted(lease);
            }
            Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                *resume_from = Some(bookmark.metadata.resource_version);
                continue;
            }
            Some(Ok(WatchEvent::Error(status))) => {
                // 410 Gone: our version is too old; anything else: start over too.
                tracing::debug!(what, code = status.code, message = %status.message,
                    "watch ended with an error; listing again");
                true
            }
            Some(Err(error)) => {
                tracing::debug!(what, %error, "watch failed; listing again");
                true
            }
            // The server's timeout: resume from the last version.
            None => false,
        };
        *watch = None;
        if started.elapsed() < WATCH_MIN_LIFE {
            tokio::select! {
                _ = sleep(retry_period) => {}
                _ = deadline.as_mut() => {}
            }
        }
        return Event::Ended { relist };
    }
}

/// A future that ends at `until`, or never.
pub(super) async fn deadline(until: Option<Instant>) {
    match until {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl LeaseCandidate {
    /// Wait for a change of the Lease (a watch event) or `until`. Returns early, marking the
    /// record stale, when the watch fails or the server answers `410 Gone`.
    pub(super) async fn wait(&mut self, until: Option<Instant>) -> Result<(), StoreError> {
        if self.watch.is_none() {
            let params = WatchParams::default()
                .fields(&format!("metadata.name={}", self.name))
                .timeout(WATCH_SECONDS);
            let from = self.resume_from.clone().unwrap_or_else(|| "0".to_owned());
            let stream = self
                .bounded("watch", async {
                    self.api
                        .watch(&params, &from)
                        .await
                        .map_err(|e| self.fail("watch", e))
                })
                .await?;
            self.watch = Some((std::sync::Mutex::new(stream.boxed()), Instant::now()));
        }
        let deadline = deadline(until);
        tokio::pin!(deadline);
        let retry = self.timing.retry_period;
        match next_event(
            &mut self.watch,
            &mut self.resume_from,
            retry,
            deadline,
            &self.name,
        )
        .await
        {
            Event::Applied(lease) => self.apply(Some(lease)),
            Event::Deleted(_) => self.apply(None),
            Event::Ended { relist } => self.stale |= relist,
            Event::Deadline => {}
        }
        Ok(())
    }
}
