//! The file store: one host, no server. The default.
//!
//! An election `E` in lock directory `D` is two files:
//!
//! ```text
//! D/E.lock    held with an exclusive flock(2) by the leader; the kernel drops the lock when
//!             the leader's process dies, however it dies. Holds a fixed header (so that a file
//!             Baton did not write is recognised instead of silently shared) and the term, a
//!             fixed-width record overwritten in place and made durable (fdatasync) by each new
//!             holder before it reports leadership: terms survive releases, crashes and power
//!             loss, and grow by one with every new holding.
//! D/E.state   JSON {"holder", "term", "successor", ...} for observers, replaced atomically
//!             (write + rename) by whoever holds the lock. Not synced: it only describes the
//!             holding, and a stale copy after a power loss is rewritten by the next holder.
//! ```
//!
//! Followers do not poll and do not block a thread in `flock`: they watch `D` with inotify. The
//! kernel reports a close of `E.lock` (the leader released, or its process died and the kernel
//! closed its files) and a rename onto `E.state` (a new holder wrote its record); each wakes the
//! followers, which try the lock without blocking. A slow re-check every retry period guards
//! against a lost notification (inotify queue overflow).
//!
//! A holder that died without releasing (its process killed) is replaced at once, with one
//! precaution: the new holder reports leadership only [`DEFAULT_CRASH_GRACE`] after it took the
//! lock. The dead daemon's workers learn of its death from the same kernel, which closes their
//! gRPC streams as it frees the lock; the grace lets them stop before the standby's workers
//! start. A graceful release needs no grace: its workers confirmed their stop before it.
//!
//! One host only: `flock` on NFS is emulated with byte-range locks, and inotify does not see
//! other hosts' changes. Use etcd or Kubernetes across hosts.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{self, Write},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchMask};
use nix::time::{ClockId, clock_gettime};
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep, sleep_until};

use super::{Acquired, Candidate, ErrorKind, Holding, Observation, Store, StoreError, Timing};

/// The first bytes of every lock file Baton creates.
const LOCK_HEADER: &[u8] = b"baton file lock v1\n";
/// How long a new holder waits before reporting leadership when the previous holder died
/// without releasing: time for the dead daemon's workers to see their streams close and stop.
pub const DEFAULT_CRASH_GRACE: Duration = Duration::from_millis(25);

/// Width of the term record after the header: `term ` + 20 digits + newline.
const TERM_RECORD: usize = 26;

/// Errors of the file store, each naming the file it concerns.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The lock directory could not be created or written.
    #[error("lock directory {path} is not usable: {source}")]
    LockDir {
        /// The lock directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lock file could not be opened, created or locked.
    #[error("cannot use lock file {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The lock file holds data Baton did not write.
    #[error(
        "lock file {path} was not written by Baton (it does not start with {header:?}); \
         another program may use this name: choose another --lock-dir or remove the file"
    )]
    ForeignLock {
        /// The lock file.
        path: PathBuf,
        /// The header Baton expects.
        header: &'static str,
    },
    /// The state file could not be read or replaced.
    #[error("cannot {op} state file {path}: {source}")]
    State {
        /// `read` or `write`.
        op: &'static str,
        /// The state file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The term record in the lock file is damaged.
    #[error("lock file {path} has a damaged term record; remove it to start the term over")]
    CorruptTerm {
        /// The lock file.
        path: PathBuf,
    },
    /// The state file is not Baton's JSON.
    #[error(
        "state file {path} is corrupt (not Baton's JSON record); remove it to start the term over: {source}"
    )]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// inotify could not watch the lock directory.
    #[error("cannot watch lock directory {path} with inotify: {source}")]
    Watch {
        /// The lock directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// Foreign or corrupt files need a person; I/O failures may pass.
    pub fn kind(&self) -> ErrorKind {
        match self {
            FileError::ForeignLock { .. }
            | FileError::CorruptTerm { .. }
            | FileError::CorruptState { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Unavailable,
        }
    }
}

/// The record in `E.state`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
struct StateRecord {
    /// The current holder, `None` after a release.
    holder: Option<String>,
    /// The term of the current or last holding.
    term: u64,
    /// The holder's process id, for people reading the file.
    #[serde(default)]
    pid: Option<u32>,
    /// Written by a release: the holder's workers confirmed their stop. Any other end of a
    /// holding (a crash, or an observer clearing a dead holder's name) leaves it false, and the
    /// next holder waits the crash grace.
    #[serde(default)]
    released: bool,
    /// After a release with a successor: only it may take over until `successor_until_ms`.
    #[serde(default)]
    successor: Option<String>,
    /// CLOCK_BOOTTIME in milliseconds: one clock for every process on this host, which neither
    /// jumps with the wall clock nor stops while the machine sleeps.
    #[serde(default)]
    successor_until_ms: u64,
}

/// CLOCK_BOOTTIME now, as a duration since boot.
fn boot_time() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(Duration::ZERO, Duration::from)
}

impl StateRecord {
    /// How long the election stays reserved for a successor other than `me`.
    fn reserved_against(&self, me: &str) -> Option<Duration> {
        let successor = self.successor.as_deref()?;
        if successor == me {
            return None;
        }
        Duration::from_millis(self.successor_until_ms)
            .checked_sub(boot_time())
            .filter(|left| !left.is_zero())
    }
}

/// Elections as files in one lock directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    crash_grace: Duration,
}

impl FileStore {
    /// Use `dir` as the lock directory, creating it if needed.
    ///
    /// # Errors
    /// [`FileError::LockDir`] if it cannot be created or written.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, FileError> {
        let dir = dir.into();
        let fail = |source| FileError::LockDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(fail)?;
        // Prove that we may create files here before any election needs to.
        tempfile::NamedTempFile::with_prefix_in(".baton-probe-", &dir).map_err(fail)?;
        Ok(FileStore {
            dir,
            crash_grace: DEFAULT_CRASH_GRACE,
        })
    }

    /// Replace [`DEFAULT_CRASH_GRACE`].
    pub fn with_crash_grace(mut self, grace: Duration) -> Self {
        self.crash_grace = grace;
        self
    }

    /// The lock directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait]
impl Store for FileStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        let inotify = Inotify::init().map_err(|source| FileError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        let watch = inotify.watches().add(
            &self.dir,
            WatchMask::CLOSE_WRITE | WatchMask::CLOSE_NOWRITE | WatchMask::MOVED_TO,
        );
        let events = watch
            .and_then(|_| inotify.into_event_stream(vec![0u8; 4096]))
            .map_err(|source| FileError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        let candidate = FileCandidate {
            lock_path: self.dir.join(format!("{election}.lock")),
            state_path: self.dir.join(format!("{election}.state")),
            lock_name: format!("{election}.lock"),
            state_name: format!("{election}.state"),
            identity: identity.to_owned(),
            timing,
            crash_grace: self.crash_grace,
            lock: None,
            held: None,
            announce_at: None,
            created_lock: false,
            events,
        };
        candidate.open_lock()?;
        candidate.read_state()?;
        Ok(Box::new(candidate))
    }

    fn describe(&self) -> String {
        format!("file store in {}", self.dir.display())
    }
}

struct FileCandidate {
    lock_path: PathBuf,
    state_path: PathBuf,
    lock_name: String,
    state_name: String,
    identity: String,
    timing: Timing,
    crash_grace: Duration,
    /// Our open lock file; closed (and so unlocked) on release.
    lock: Option<File>,
    /// The term we hold, if we hold the lock.
    held: Option<u64>,
    /// After taking over from a dead holder: do not report the holding before this.
    announce_at: Option<Instant>,
    /// Whether we created the lock file we have open (it did not exist before).
    created_lock: bool,
    events: EventStream<Vec<u8>>,
}

impl FileCandidate {
    fn lock_error(&self, source: io::Error) -> FileError {
        FileError::Lock {
            path: self.lock_path.clone(),
            source,
        }
    }

    /// Open (creating if needed) the lock file and check that it is Baton's. Also says whether
    /// this call created it (a new inode: a previous holder may still hold a removed one).
    fn open_lock(&self) -> Result<(File, bool), FileError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.lock_path)
            .map_err(|e| self.lock_error(e))?;
        let mut head = vec![0u8; LOCK_HEADER.len()];
        let n = file.read_at(&mut head, 0).map_err(|e| self.lock_error(e))?;
        let created = n == 0;
        match &head[..n] {
            [] => file
                .write_all_at(LOCK_HEADER, 0)
                .map_err(|e| self.lock_error(e))?,
            h if h == LOCK_HEADER => {}
            _ => {
                return Err(FileError::ForeignLock {
                    path: self.lock_path.clone(),
                    header: "baton file lock v1",
                });
            }
        }
        Ok((file, created))
    }

    fn read_state(&self) -> Result<StateRecord, FileError> {
        match std::fs::read(&self.state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FileError::CorruptState {
                path: self.state_path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateRecord::default()),
            Err(source) => Err(FileError::State {
                op: "read",
                path: self.state_path.clone(),
                source,
            }),
        }
    }

    /// The term recorded in the lock file (0 if none yet). Only while holding the lock.
    fn read_term(&self, file: &File) -> Result<u64, FileError> {
        let mut record = [0u8; TERM_RECORD];
        let n = file
            .read_at(&mut record, LOCK_HEADER.len() as u64)
            .map_err(|e| self.lock_error(e))?;
        if n == 0 {
            return Ok(0);
        }
        std::str::from_utf8(&record[..n])
            .ok()
            .and_then(|r| r.strip_prefix("term ")?.strip_suffix('\n')?.parse().ok())
            .ok_or_else(|| FileError::CorruptTerm {
                path: self.lock_path.clone(),
            })
    }

    /// Record `term` in the lock file durably. Only while holding the lock.
    fn write_term(&self, file: &File, term: u64) -> Result<(), FileError> {
        let record = format!("term {term:020}\n");
        file.write_all_at(record.as_bytes(), LOCK_HEADER.len() as u64)
            .and_then(|()| file.sync_data())
            .map_err(|e| self.lock_error(e))
    }

    /// Report the holding of `term`, after the crash grace if one is running. Cancel-safe: the
    /// holding is recorded in `self` before this is awaited.
    async fn announce(&mut self, term: u64) -> Acquired {
        if let Some(at) = self.announce_at {
            sleep_until(at).await;
            self.announce_at = None;
        }
        let valid_until = Instant::now() + self.timing.lease_duration;
        Acquired::Held(Holding { term, valid_until })
    }

    /// Just locked: record the next term durably, then tell observers. Returns the term.
    fn take_over(&self, state_term: u64) -> Result<u64, FileError> {
        let file = self.lock.as_ref().ok_or_else(|| FileError::Lock {
            path: self.lock_path.clone(),
            source: io::Error::other("lock file closed while held"),
        })?;
        let term = self.read_term(file)?.max(state_term) + 1;
        self.write_term(file, term)?;
        self.write_state(&StateRecord {
            holder: Some(self.identity.clone()),
            term,
            pid: Some(std::process::id()),
            ..StateRecord::default()
        })?;
        Ok(term)
    }

    /// Replace the state file atomically. Only while holding the lock.
    fn write_state(&self, record: &StateRecord) -> Result<(), FileError> {
        let fail = |source| FileError::State {
            op: "write",
            path: self.state_path.clone(),
            source,
        };
        let dir = self.state_path.parent().unwrap_or(Path::new("."));
        let mut tmp =
            tempfile::NamedTempFile::with_prefix_in(".baton-state-", dir).map_err(fail)?;
        // Serialising a struct of strings and integers cannot fail.
        let json = serde_json::to_vec(record).unwrap_or_default();
        tmp.write_all(&json).map_err(fail)?;
        tmp.persist(&self.state_path).map_err(|e| fail(e.error))?;
        Ok(())
    }

    /// Whether the lock file at the path is still the one we have open (nobody removed or
    /// replaced it; otherwise a newcomer could lock a different inode).
    fn same_file(&self, file: &File) -> Result<bool, FileError> {
        let ours = file.metadata().map_err(|e| self.lock_error(e))?;
        match std::fs::metadata(&self.lock_path) {
            Ok(now) => Ok(now.dev() == ours.dev() && now.ino() == ours.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.lock_error(e)),
        }
    }

    /// Try the lock without blocking. `Ok(true)`: we hold it now (on the file at the path).
    fn try_lock(&mut self) -> Result<bool, FileError> {
        let file = match self.lock.take() {
            Some(file) => file,
            None => {
                let (file, created) = self.open_lock()?;
                self.created_lock = created;
                file
            }
        };
        match file.try_lock() {
            Ok(()) => {
                if self.same_file(&file)? {
                    self.lock = Some(file);
                    Ok(true)
                } else {
                    // Replaced under us: drop this inode and use the new file next time.
                    Ok(false)
                }
            }
            Err(TryLockError::WouldBlock) => {
                self.lock = Some(file);
                Ok(false)
            }
            Err(TryLockError::Error(e)) => Err(self.lock_error(e)),
        }
    }

    /// Close our lock file: unlocks it and wakes every follower's inotify watch.
    fn close_lock(&mut self) {
        self.lock = None;
        self.held = None;
        self.announce_at = None;
    }

    /// Wait for a notification about this election, or `at_most`.
    async fn wait(&mut self, at_most: Duration) {
        let deadline = sleep(at_most);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                event = self.events.next() => match event {
                    Some(Ok(event)) => {
                        let name = event.name.as_deref().and_then(|n| n.to_str());
                        let lock_closed = name == Some(self.lock_name.as_str())
                            && event.mask.intersects(EventMask::CLOSE_WRITE | EventMask::CLOSE_NOWRITE);
                        let state_replaced = name == Some(self.state_name.as_str())
                            && event.mask.contains(EventMask::MOVED_TO);
                        if lock_closed || state_replaced || event.mask.contains(EventMask::Q_OVERFLOW) {
                            return;
                        }
                    }
                    // A read error or the end of the stream: fall back to the timed re-check.
                    Some(Err(_)) | None => {
                        deadline.as_mut().await;
                        return;
                    }
                },
            }
        }
    }

    async fn campaign_or_observe(
        &mut self,
        last_seen: &Observation,
        campaign: bool,
    ) -> Result<Acquired, FileError> {
        loop {
            let state = self.read_state()?;
            let reserved = state.reserved_against(&self.identity);
            // Not campaigning, we still take the lock for an instant when the record names a
            // holder, to learn whether that holder is alive: a dead holder's name is cleared.
            let probe = campaign && reserved.is_none() || !campaign && state.holder.is_some();
            if probe && self.try_lock()? {
                // Decide on the record as it is now that we hold the lock: it may have changed
                // since the look above.
                let state = match self.read_state() {
                    Ok(state) => state,
                    Err(e) => {
                        self.close_lock();
                        return Err(e);
                    }
                };
                if campaign && state.reserved_against(&self.identity).is_some() {
                    self.close_lock();
                    continue;
                }
                if campaign {
                    let taken = self.take_over(state.term);
                    if taken.is_err() {
                        // Never hold the lock without saying so: let the next candidate try.
                        self.close_lock();
                    }
                    let term = taken?;
                    self.held = Some(term);
                    let grace = if self.created_lock && state.holder.is_some() {
                        // We created the lock file while the record names a holder: someone
                        // removed it, and that holder may still hold the old inode until its
                        // next renewal notices. Its workers' validity ends within a lease.
                        Some(self.timing.lease_duration)
                    } else if !state.released && state.term > 0 {
                        // The previous holding ended without a release: its holder died.
                        Some(self.crash_grace)
                    } else {
                        None
                    };
                    self.announce_at = grace.map(|g| Instant::now() + g);
                    return Ok(self.announce(term).await);
                }
                let cleared = StateRecord {
                    holder: None,
                    pid: None,
                    ..state
                };
                let written = self.write_state(&cleared);
                self.close_lock();
                written?;
                continue;
            }
            let seen = Observation {
                holder: state.holder,
                term: state.term,
            };
            if seen != *last_seen {
                return Ok(Acquired::Observed(seen));
            }
            let recheck = self.timing.retry_period;
            self.wait(reserved.map_or(recheck, |r| r.min(recheck)))
                .await;
        }
    }
}

#[async_trait]
impl Candidate for FileCandidate {
    async fn acquire(&mut self, last_seen: &Observation) -> Result<Acquired, StoreError> {
        if let Some(term) = self.held {
            // Still ours (the elector lost track, e.g. after a cancelled call).
            self.keep().await?;
            return Ok(self.announce(term).await);
        }
        Ok(self.campaign_or_observe(last_seen, true).await?)
    }

    async fn keep(&mut self) -> Result<Instant, StoreError> {
        let (Some(term), Some(file)) = (self.held, self.lock.as_ref()) else {
            return Err(StoreError::Lost {
                reason: format!("{} is not locked by this replica", self.lock_path.display()),
            });
        };
        if !self.same_file(file)? {
            self.close_lock();
            return Err(StoreError::Lost {
                reason: format!("{} was removed or replaced", self.lock_path.display()),
            });
        }
        let state = self.read_state()?;
        if state.holder.as_deref() != Some(self.identity.as_str()) || state.term != term {
            self.close_lock();
            return Err(StoreError::Lost {
                reason: format!(
                    "{} names {:?} in term {} (we hold term {term})",
                    self.state_path.display(),
                    state.holder,
                    state.term
                ),
            });
        }
        Ok(Instant::now() + self.timing.lease_duration)
    }

    async fn release(&mut self, successor: Option<&str>) -> Result<(), StoreError> {
        let Some(term) = self.held else {
            return Ok(());
        };
        let until = boot_time() + self.timing.lease_duration;
        let written = self.write_state(&StateRecord {
            holder: None,
            term,
            pid: None,
            released: true,
            successor: successor.map(str::to_owned),
            successor_until_ms: until.as_millis() as u64,
        });
        // Unlock whatever happened to the record: the next holder rewrites it anyway.
        self.close_lock();
        Ok(written?)
    }

    async fn observe(&mut self, last_seen: &Observation) -> Result<Observation, StoreError> {
        loop {
            if let Acquired::Observed(seen) = self.campaign_or_observe(last_seen, false).await? {
                return Ok(seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::Suite;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
        }
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        Suite::new(Arc::new(store), timing(), "file-")
            .test_all()
            .await;
    }

    #[tokio::test]
    async fn terms_survive_a_new_store_instance() {
        let dir = tempfile::tempdir().unwrap();
        let mut last = 0;
        for _ in 0..3 {
            let store = FileStore::new(dir.path()).unwrap();
            let mut a = store.join("e", "a", timing()).await.unwrap();
            let Acquired::Held(held) = a.acquire(&Observation::default()).await.unwrap() else {
                panic!("a free election is acquired");
            };
            assert!(held.term > last);
            last = held.term;
            drop(a);
        }
    }

    #[tokio::test]
    async fn a_foreign_lock_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.lock"), "pid 1234\n").unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let error = store.join("e", "a", timing()).await.err().unwrap();
        assert_eq!(error.kind(), ErrorKind::Invalid);
        let text = error.to_string();
        assert!(
            text.contains("e.lock") && text.contains("not written by Baton"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("e.state"), [0xff, 0x00, 0x13]).unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let error = store.join("e", "a", timing()).await.err().unwrap();
        assert_eq!(error.kind(), ErrorKind::Invalid);
        assert!(error.to_string().contains("e.state"), "{error}");
    }

    #[tokio::test]
    async fn a_crashed_holder_is_replaced_after_the_crash_grace() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(2);
        let store = FileStore::new(dir.path()).unwrap().with_crash_grace(grace);
        let mut a = store.join("e", "a", timing()).await.unwrap();
        let mut b = store.join("e", "b", timing()).await.unwrap();
        assert!(matches!(
            a.acquire(&Observation::default()).await.unwrap(),
            Acquired::Held(_)
        ));
        let mut seen = Observation::default();
        loop {
            match b.acquire(&seen).await.unwrap() {
                Acquired::Observed(o) if o.holder.as_deref() == Some("a") => {
                    seen = o;
                    break;
                }
                Acquired::Observed(o) => seen = o,
                Acquired::Held(_) => panic!("b must not win while a holds"),
            }
        }
        let died = Instant::now();
        drop(a);
        let Acquired::Held(_) = b.acquire(&seen).await.unwrap() else {
            panic!("b takes over")
        };
        assert!(
            Instant::now() - died >= grace,
            "reported before the grace passed"
        );

        // A clean release hands over without the grace.
        b.release(None).await.unwrap();
        let mut c = store.join("e", "c", timing()).await.unwrap();
        let released = Instant::now();
        let Acquired::Held(_) = c.acquire(&Observation::default()).await.unwrap() else {
            panic!("c wins")
        };
        assert!(
            Instant::now() - released < grace,
            "no grace after a release"
        );
    }

    #[tokio::test]
    async fn a_damaged_term_record_is_a_clear_error_and_frees_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let mut damaged = LOCK_HEADER.to_vec();
        damaged.extend_from_slice(b"term 12x4\n");
        std::fs::write(dir.path().join("e.lock"), damaged).unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let mut a = store.join("e", "a", timing()).await.unwrap();
        let error = a.acquire(&Observation::default()).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Invalid);
        assert!(error.to_string().contains("e.lock"), "{error}");
        // The failed candidate does not sit on the lock.
        let probe = File::open(dir.path().join("e.lock")).unwrap();
        probe
            .try_lock()
            .expect("the lock is free after the failure");
    }

    #[tokio::test]
    async fn a_replaced_lock_file_ends_the_holding() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let mut a = store.join("e", "a", timing()).await.unwrap();
        assert!(matches!(
            a.acquire(&Observation::default()).await.unwrap(),
            Acquired::Held(_)
        ));
        std::fs::remove_file(dir.path().join("e.lock")).unwrap();
        let error = a.keep().await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Lost, "{error}");
    }

    #[test]
    fn an_unwritable_lock_dir_is_refused_up_front() {
        let error = FileStore::new("/proc/baton-cannot-be-here").unwrap_err();
        assert!(
            error.to_string().contains("/proc/baton-cannot-be-here"),
            "{error}"
        );
    }
}
