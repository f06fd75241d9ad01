//! A follower's wait for a change of the Lease: a watch resumed from the last `resourceVersion`,
//! listing again after an error or `410 Gone`.

use std::{pin::Pin, time::Duration};

use futures::StreamExt;
use kube::api::{WatchEvent, WatchParams};
use tokio::time::{Instant, sleep, sleep_until};

use super::record::LeaseCandidate;
use crate::store::StoreError;

/// Server-side timeout of one watch request; the watch is resumed after it.
const WATCH_SECONDS: u32 = 290;
/// A watch that ends sooner than this after it started is restarted only after a pause, so a
/// server that closes watches at once is not hammered.
const WATCH_MIN_LIFE: Duration = Duration::from_secs(1);

impl LeaseCandidate {
    /// Wait for a change of the Lease (a watch event) or `until`. Returns early, marking the
    /// record stale, when the watch fails or the server answers `410 Gone`.
    pub(super) async fn wait(&mut self, until: Option<Instant>) -> Result<(), StoreError> {
        let deadline = async {
            match until {
                Some(t) => sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
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
        loop {
            let Some((stream, started)) = self.watch.as_mut() else {
                return Ok(());
            };
            let started = *started;
            let stream = stream
                .get_mut()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let event = tokio::select! {
                _ = &mut deadline => return Ok(()),
                event = stream.next() => event,
            };
            match event {
                Some(Ok(WatchEvent::Added(lease) | WatchEvent::Modified(lease))) => {
                    self.apply(Some(lease));
                    return Ok(());
                }
                Some(Ok(WatchEvent::Deleted(lease))) => {
                    if let Some(rv) = lease.metadata.resource_version {
                        self.resume_from = Some(rv);
                    }
                    self.apply(None);
                    return Ok(());
                }
                Some(Ok(WatchEvent::Bookmark(bookmark))) => {
                    self.resume_from = Some(bookmark.metadata.resource_version);
                }
                Some(Ok(WatchEvent::Error(status))) => {
                    // 410 Gone: our version is too old; anything else: start over too.
                    tracing::debug!(lease = %self.name, code = status.code,
                        message = %status.message, "watch ended with an error; listing again");
                    self.watch = None;
                    self.stale = true;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
                Some(Err(error)) => {
                    tracing::debug!(lease = %self.name, %error, "watch failed; listing again");
                    self.watch = None;
                    self.stale = true;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
                None => {
                    // The server's timeout: resume from the last version.
                    self.watch = None;
                    self.pause_if_short(started, &mut deadline).await;
                    return Ok(());
                }
            }
        }
    }

    /// After a watch that lived less than [`WATCH_MIN_LIFE`], pause (at most until the
    /// deadline) so a server that ends watches at once is not hammered.
    pub(super) async fn pause_if_short(
        &self,
        started: Instant,
        deadline: &mut Pin<&mut impl Future<Output = ()>>,
    ) {
        if started.elapsed() < WATCH_MIN_LIFE {
            tokio::select! {
                _ = sleep(self.timing.retry_period) => {}
                _ = deadline.as_mut() => {}
            }
        }
    }
}
