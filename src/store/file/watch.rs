//! One inotify watch on the lock directory for all of a store's elections. An inotify instance
//! per election would spend one of the user's instances (`fs.inotify.max_user_instances`, 128
//! by default, shared by every process of the user) and one descriptor each, so a daemon with a
//! few hundred elections could not start. One reader task hands each event to the election it
//! names, through a counter that its candidates wait on.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::{sync::watch, task::JoinHandle};

use super::error::FileError;

/// Each election's wake counter, by election name.
type Wakers = Arc<Mutex<HashMap<String, watch::Sender<u64>>>>;

/// The watch on one lock directory, while any of its elections is joined; dropping the last
/// [`Wake`] stops the reader task and closes the inotify instance.
pub(super) struct DirWatch {
    wakers: Wakers,
    reader: JoinHandle<()>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The watch of a store: the live [`DirWatch`], shared by the store's clones.
#[derive(Debug, Clone, Default)]
pub(super) struct Shared(Arc<Mutex<Weak<DirWatch>>>);

impl Shared {
    /// A wake for `election`, on the store's watch of `dir`, started if none is live.
    pub(super) fn wake(&self, dir: &Path, election: &str) -> Result<Wake, FileError> {
        let mut live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let watch = match live.upgrade() {
            Some(watch) => watch,
            None => {
                let watch = Arc::new(DirWatch::start(dir)?);
                *live = Arc::downgrade(&watch);
                watch
            }
        };
        let changes = watch
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(election.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Ok(Wake {
            election: election.to_owned(),
            changes,
            watch,
        })
    }

    /// Whether a watch is live (for tests: it must end with the last election).
    #[cfg(test)]
    pub(super) fn is_live(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .strong_count()
            > 0
    }
}

impl DirWatch {
    fn start(dir: &Path) -> Result<DirWatch, FileError> {
        let fail = |source| FileError::Watch {
            path: dir.to_owned(),
            source,
        };
        let inotify = Inotify::init().map_err(fail)?;
        inotify
            .watches()
            .add(
                dir,
                WatchMask::CLOSE_WRITE | WatchMask::CLOSE_NOWRITE | WatchMask::MOVED_TO,
            )
            .map_err(fail)?;
        let mut events = inotify.into_event_stream(vec![0u8; 4096]).map_err(fail)?;
        let wakers = Wakers::default();
        let wake = Arc::clone(&wakers);
        let dir = dir.to_owned();
        let reader = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) if event.mask.contains(EventMask::Q_OVERFLOW) => wake_all(&wake),
                    Ok(event) => {
                        if let Some(election) = event
                            .name
                            .as_deref()
                            .and_then(|name| name.to_str())
                            .and_then(|name| wakes(name, event.mask))
                        {
                            wake_one(&wake, election);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(
                            lock_dir = %dir.display(),
                            %error,
                            "cannot read the lock directory's inotify events; elections \
                             re-check the directory every retry period instead"
                        );
                        break;
                    }
                }
            }
            // Dropping the counters ends every wait at once; candidates then re-check on their
            // timer alone.
            wake.lock().unwrap_or_else(PoisonError::into_inner).clear();
        });
        Ok(DirWatch { wakers, reader })
    }
}

/// The election an event concerns, if it is one that may change who holds it: a close of
/// `E.lock` (its holder released, or died and the kernel closed its files) or a rename onto
/// `E.state` (a new record).
fn wakes(name: &str, mask: EventMask) -> Option<&str> {
    if mask.intersects(EventMask::CLOSE_WRITE | EventMask::CLOSE_NOWRITE) {
        name.strip_suffix(".lock")
    } else if mask.contains(EventMask::MOVED_TO) {
        name.strip_suffix(".state")
    } else {
        None
    }
}

fn wake_one(wakers: &Wakers, election: &str) {
    if let Some(counter) = wakers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(election)
    {
        counter.send_modify(|n| *n = n.wrapping_add(1));
    }
}

fn wake_all(wakers: &Wakers) {
    for counter in wakers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        counter.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// One candidate's view of the watch: woken by each event about its election.
pub(super) struct Wake {
    election: String,
    changes: watch::Receiver<u64>,
    watch: Arc<DirWatch>,
}

impl Wake {
    /// Forget the events seen so far: call before reading the election's files, so that a
    /// change made after the read still ends the next [`Wake::changed`].
    pub(super) fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    /// Until an event about the election arrives after the last [`Wake::mark_seen`]. Never
    /// returns if the watch has failed: callers race it with their re-check timer.
    pub(super) async fn changed(&mut self) {
        if self.changes.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let mut wakers = self
            .watch
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Our receiver is still alive here: we were the last if it is the only one.
        if wakers
            .get(&self.election)
            .is_some_and(|counter| counter.receiver_count() <= 1)
        {
            wakers.remove(&self.election);
        }
    }
}
