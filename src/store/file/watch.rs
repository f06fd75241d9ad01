//! One inotify watch on the lock directory for all of a store's elections. Linux allows a user
//! 128 inotify instances by default, for all of the user's processes, so a daemon cannot spend
//! one per election. One reader task hands each event to the election it names, through a
//! counter that the election's candidates wait on.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError, Weak},
};

use futures::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use tokio::{sync::watch, task::JoinHandle};

use super::error::FileError;

/// Each election's wake counter, by election name; `None` once the reader task has ended.
#[derive(Default)]
struct Wakers(Mutex<Option<HashMap<String, watch::Sender<u64>>>>);

impl Wakers {
    fn lock(&self) -> MutexGuard<'_, Option<HashMap<String, watch::Sender<u64>>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(counter: &watch::Sender<u64>) {
        counter.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The watch on one lock directory, while any of its elections is joined; dropping the last
/// [`Wake`] stops the reader task and closes the inotify instance.
struct DirWatch {
    wakers: Arc<Wakers>,
    reader: JoinHandle<()>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Ends the watch when the reader task ends, however it ends (its runtime may drop it): the
/// counters are dropped, which ends every wait on them.
struct EndOnDrop(Arc<Wakers>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.lock().take();
    }
}

/// The watch of a store, shared by the store's clones: the live [`DirWatch`], if any.
#[derive(Debug, Clone, Default)]
pub(super) struct StoreWatch(Arc<Mutex<Weak<DirWatch>>>);

impl StoreWatch {
    /// A wake for `election`, on the store's watch of `dir`; a new watch is started if none
    /// runs (none yet, the last election left, or the reader ended).
    pub(super) fn wake(&self, dir: &Path, election: &str) -> Result<Wake, FileError> {
        let mut live = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(watch) = live.upgrade()
            && let Some(wake) = watch.subscribe(self, dir, election)
        {
            return Ok(wake);
        }
        let watch = Arc::new(DirWatch::start(dir)?);
        *live = Arc::downgrade(&watch);
        watch
            .subscribe(self, dir, election)
            .ok_or_else(|| FileError::Watch {
                path: dir.to_owned(),
                source: std::io::Error::other("the inotify reader ended at once"),
            })
    }

    /// Whether a watch is live (for tests: it must end with the last election).
    #[cfg(test)]
    pub(super) fn is_live(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .upgrade()
            .is_some_and(|watch| watch.wakers.lock().is_some())
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
        let wakers = Arc::new(Wakers(Mutex::new(Some(HashMap::new()))));
        let end = EndOnDrop(Arc::clone(&wakers));
        let dir = dir.to_owned();
        let reader = tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        tracing::warn!(
                            lock_dir = %dir.display(),
                            %error,
                            "cannot read the lock directory's inotify events; starting a new watch"
                        );
                        break;
                    }
                };
                // The directory was removed or unmounted: this watch sees nothing more.
                if event.mask.contains(EventMask::IGNORED) {
                    break;
                }
                let wakers = end.0.lock();
                let Some(wakers) = wakers.as_ref() else { break };
                if event.mask.contains(EventMask::Q_OVERFLOW) {
                    wakers.values().for_each(Wakers::bump);
                } else if let Some(counter) = event
                    .name
                    .as_deref()
                    .and_then(|name| name.to_str())
                    .and_then(|name| election_of(name, event.mask))
                    .and_then(|election| wakers.get(election))
                {
                    Wakers::bump(counter);
                }
            }
            drop(end);
        });
        Ok(DirWatch { wakers, reader })
    }

    /// A wake for `election` on this watch; `None` if its reader has ended.
    fn subscribe(self: &Arc<Self>, store: &StoreWatch, dir: &Path, election: &str) -> Option<Wake> {
        let changes = self
            .wakers
            .lock()
            .as_mut()?
            .entry(election.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Some(Wake {
            election: election.to_owned(),
            changes,
            watch: Arc::clone(self),
            store: store.clone(),
            dir: dir.to_owned(),
        })
    }
}

/// The election an event concerns, if it is one that may change who holds it: a close of
/// `E.lock` (its holder released, or died and the kernel closed its files) or a rename onto
/// `E.state` (a new record).
fn election_of(name: &str, mask: EventMask) -> Option<&str> {
    if mask.intersects(EventMask::CLOSE_WRITE | EventMask::CLOSE_NOWRITE) {
        name.strip_suffix(".lock")
    } else if mask.contains(EventMask::MOVED_TO) {
        name.strip_suffix(".state")
    } else {
        None
    }
}

/// One candidate's view of the store's watch: woken by each event about its election.
pub(super) struct Wake {
    election: String,
    changes: watch::Receiver<u64>,
    watch: Arc<DirWatch>,
    /// Where to start a new watch if this one ends.
    store: StoreWatch,
    dir: PathBuf,
}

impl Wake {
    /// Forget the events seen so far: call before reading the election's files, so that a
    /// change made after the read still ends the next [`Wake::changed`].
    pub(super) fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    /// Whether an event about the election arrived since the last [`Wake::mark_seen`].
    #[cfg(test)]
    pub(super) fn has_changed(&self) -> bool {
        self.changes.has_changed().unwrap_or(false)
    }

    /// Until an event about the election arrives after the last [`Wake::mark_seen`]. If the
    /// watch has ended, moves to a new one and waits on that; if that fails too, never returns:
    /// callers race this with their re-check timer.
    pub(super) async fn changed(&mut self) {
        if self.changes.changed().await.is_ok() {
            return;
        }
        match self.store.wake(&self.dir, &self.election) {
            Ok(fresh) => {
                *self = fresh;
                if self.changes.changed().await.is_ok() {
                    return;
                }
            }
            Err(error) => tracing::warn!(
                election = %self.election,
                %error,
                "cannot watch the lock directory again; re-checking every retry period"
            ),
        }
        std::future::pending::<()>().await;
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        let mut wakers = self.watch.wakers.lock();
        // Our receiver is still alive here: we were the last if it is the only one.
        if let Some(wakers) = wakers.as_mut()
            && wakers
                .get(&self.election)
                .is_some_and(|counter| counter.receiver_count() <= 1)
        {
            wakers.remove(&self.election);
        }
    }
}
