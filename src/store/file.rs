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
    fs::{DirBuilder, File, OpenOptions, Permissions, TryLockError},
    io::{self, Read, Write},
    os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt},
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
/// The largest state file Baton reads; a real record is a few hundred bytes.
const STATE_MAX_BYTES: u64 = 64 * 1024;
/// Lock and state files are private to the daemon's user: `flock` needs only read access, so a
/// readable lock file would let any local user hold the election hostage.
const FILE_MODE: u32 = 0o600;

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
    /// The lock directory belongs to another user, or others may write in it: they could
    /// replace the lock files or hold the election.
    #[error(
        "lock directory {path} is owned by uid {owner} (we are uid {uid}) or writable by \
         group or others (mode {mode:o}): use a directory of this user, mode 0700 or 0755"
    )]
    UnsafeLockDir {
        /// The lock directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective user.
        uid: u32,
        /// Its permission bits.
        mode: u32,
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
    /// The recorded term is the largest a term can be: no later holding can have a greater one.
    #[error(
        "{path} records term {term}, the largest possible: no greater term exists; remove \
         {path} and the state file to start the term over (and reset what fences on it)"
    )]
    TermAtMaximum {
        /// The lock or state file.
        path: PathBuf,
        /// The recorded term.
        term: u64,
    },
    /// The state file is larger than any record Baton writes.
    #[error("state file {path} is larger than {max} bytes: not Baton's record; remove it")]
    StateTooLarge {
        /// The state file.
        path: PathBuf,
        /// The limit.
        max: u64,
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
            | FileError::TermAtMaximum { .. }
            | FileError::StateTooLarge { .. }
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
    /// The boot (kernel boot id) on which `successor_until_ms` was measured: CLOCK_BOOTTIME
    /// restarts at boot, so a reservation from an earlier boot means nothing.
    #[serde(default)]
    successor_boot: Option<String>,
}

/// CLOCK_BOOTTIME now, as a duration since boot.
fn boot_time() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(Duration::ZERO, Duration::from)
}

/// The kernel's id of this boot, `None` if it cannot be read.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
}

impl StateRecord {
    /// How long the election stays reserved for a successor other than `me`, by the record's
    /// clock: only a reservation made on this boot (`boot`) counts.
    fn reserved_against(&self, me: &str, boot: Option<&str>) -> Option<Duration> {
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

/// Elections as files in one lock directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    crash_grace: Duration,
}

impl FileStore {
    /// Use `dir` as the lock directory. Creates nothing: a missing directory is created (mode
    /// 0700) when the first election joins, so that a start refused later leaves nothing behind.
    ///
    /// # Errors
    /// [`FileError::LockDir`] if it cannot be created or written; [`FileError::UnsafeLockDir`]
    /// if another user owns it or may write in it.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, FileError> {
        let dir = dir.into();
        let fail = |source| FileError::LockDir {
            path: dir.clone(),
            source,
        };
        // Prove that we may create files in the directory, or in the nearest ancestor it would
        // be created in, before any election needs to (the probe removes itself).
        let existing = dir
            .ancestors()
            .find(|d| d.exists())
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        tempfile::NamedTempFile::with_prefix_in(".baton-probe-", existing).map_err(fail)?;
        if existing == dir {
            check_owner(&dir)?;
        }
        Ok(FileStore {
            dir,
            crash_grace: DEFAULT_CRASH_GRACE,
        })
    }

    /// Create the lock directory (0700) if it is missing, and check whose it is.
    fn create_dir(&self) -> Result<(), FileError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|source| FileError::LockDir {
                path: self.dir.clone(),
                source,
            })?;
        check_owner(&self.dir)
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

/// Refuse a lock directory that another user owns or that group or others may write in. A
/// symlink in its place must be ours too, or whoever made it chooses where our files go.
fn check_owner(dir: &Path) -> Result<(), FileError> {
    let fail = |source| FileError::LockDir {
        path: dir.to_owned(),
        source,
    };
    let link = std::fs::symlink_metadata(dir).map_err(fail)?;
    let meta = std::fs::metadata(dir).map_err(fail)?;
    let uid = nix::unistd::geteuid().as_raw();
    let owner = if link.uid() != uid {
        link.uid()
    } else {
        meta.uid()
    };
    if owner != uid || meta.mode() & 0o022 != 0 {
        return Err(FileError::UnsafeLockDir {
            path: dir.to_owned(),
            owner,
            uid,
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Open a file of the lock directory without following a symlink, private to this user.
fn open_private(path: &Path, write: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    // A file made by an older Baton, or under a wider umask: narrow it.
    let meta = file.metadata()?;
    if write && meta.mode() & 0o777 != FILE_MODE {
        file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    }
    Ok(file)
}

#[async_trait]
impl Store for FileStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        self.create_dir()?;
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
            boot: boot_id(),
            reservation: None,
            events,
        };
        candidate.open_lock()?;
        candidate.read_state().await?;
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
    /// This boot's id, which binds a successor reservation to the boot it was made on.
    boot: Option<String>,
    /// The successor reservation last seen (successor, until) and when we first saw it: it
    /// holds us back for at most one lease from then, whatever its recorded end.
    reservation: Option<((String, u64), Instant)>,
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
        let file = open_private(&self.lock_path, true).map_err(|e| self.lock_error(e))?;
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

    /// Read the state file, at most [`STATE_MAX_BYTES`], on a blocking thread: a huge or slow
    /// file must not stall the runtime that serves every RPC.
    async fn read_state(&self) -> Result<StateRecord, FileError> {
        let path = self.state_path.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut bytes = Vec::new();
            open_private(&path, false)?
                .take(STATE_MAX_BYTES + 1)
                .read_to_end(&mut bytes)?;
            Ok::<_, io::Error>(bytes)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let fail = |source| FileError::State {
            op: "read",
            path: self.state_path.clone(),
            source,
        };
        match read {
            Ok(bytes) if bytes.len() as u64 > STATE_MAX_BYTES => Err(FileError::StateTooLarge {
                path: self.state_path.clone(),
                max: STATE_MAX_BYTES,
            }),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| FileError::CorruptState {
                path: self.state_path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateRecord::default()),
            Err(source) => Err(fail(source)),
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
        let (last, path) = match self.read_term(file)? {
            recorded if recorded >= state_term => (recorded, &self.lock_path),
            _ => (state_term, &self.state_path),
        };
        // A term must exceed every earlier one; at the maximum none does (and `+ 1` would wrap).
        let term = last
            .checked_add(1)
            .ok_or_else(|| FileError::TermAtMaximum {
                path: path.clone(),
                term: last,
            })?;
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

    /// How long `state` still reserves the election for a successor other than us: at most one
    /// lease (what a release grants) from when we first saw the reservation, which we log.
    fn reserved(&mut self, state: &StateRecord) -> Option<Duration> {
        let Some(left) = state.reserved_against(&self.identity, self.boot.as_deref()) else {
            self.reservation = None;
            return None;
        };
        let key = (
            state.successor.clone().unwrap_or_default(),
            state.successor_until_ms,
        );
        let now = Instant::now();
        let since = match &self.reservation {
            Some((seen, since)) if *seen == key => *since,
            _ => {
                let cap = self.timing.lease_duration;
                tracing::info!(
                    state_file = %self.state_path.display(),
                    successor = ?key.0,
                    left = ?left.min(cap),
                    "the election is reserved for a named successor; other candidates wait \
                     until it takes over or the reservation ends"
                );
                self.reservation = Some((key, now));
                now
            }
        };
        let capped = (since + self.timing.lease_duration).saturating_duration_since(now);
        Some(left.min(capped)).filter(|left| !left.is_zero())
    }

    async fn campaign_or_observe(
        &mut self,
        last_seen: &Observation,
        campaign: bool,
    ) -> Result<Acquired, FileError> {
        loop {
            let state = self.read_state().await?;
            let reserved = self.reserved(&state);
            // Not campaigning, we still take the lock for an instant when the record names a
            // holder, to learn whether that holder is alive: a dead holder's name is cleared.
            let probe = campaign && reserved.is_none() || !campaign && state.holder.is_some();
            if probe && self.try_lock()? {
                // Decide on the record as it is now that we hold the lock: it may have changed
                // since the look above.
                let state = match self.read_state().await {
                    Ok(state) => state,
                    Err(e) => {
                        self.close_lock();
                        return Err(e);
                    }
                };
                if campaign && self.reserved(&state).is_some() {
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
        let state = self.read_state().await?;
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
            successor_boot: self.boot.clone(),
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

    #[tokio::test]
    async fn a_term_at_its_maximum_is_refused_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let store = Arc::new(FileStore::new(dir.path()).unwrap());
        Suite::new(store.clone(), timing(), "lock-")
            .refuses_a_term_past_the_maximum(|e| {
                let mut forged = LOCK_HEADER.to_vec();
                forged.extend_from_slice(format!("term {}\n", u64::MAX).as_bytes());
                std::fs::write(path.join(format!("{e}.lock")), forged).unwrap();
            })
            .await;
        Suite::new(store, timing(), "state-")
            .refuses_a_term_past_the_maximum(|e| {
                let forged = format!(r#"{{"holder":null,"term":{}}}"#, u64::MAX);
                std::fs::write(path.join(format!("{e}.state")), forged).unwrap();
            })
            .await;
    }

    #[tokio::test]
    async fn a_reservation_holds_for_at_most_a_lease_and_only_on_its_boot() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let reserve = |boot: Option<String>, until: u64| {
            let record = StateRecord {
                term: 1,
                released: true,
                successor: Some("c".to_owned()),
                successor_until_ms: until,
                successor_boot: boot,
                ..StateRecord::default()
            };
            std::fs::write(
                dir.path().join("e.state"),
                serde_json::to_vec(&record).unwrap(),
            )
            .unwrap();
        };
        let store = &store;
        let win = |within: Duration| async move {
            let mut b = store.join("e", "b", timing()).await.unwrap();
            let mut seen = Observation::default();
            let held = tokio::time::timeout(within, async {
                loop {
                    match b.acquire(&seen).await.unwrap() {
                        Acquired::Held(held) => return held,
                        Acquired::Observed(now) => seen = now,
                    }
                }
            })
            .await;
            b.release(None).await.unwrap();
            held
        };
        let hour_ms = (boot_time() + Duration::from_secs(3600)).as_millis() as u64;
        // Made before a reboot: the old boot's clock says nothing about this one.
        reserve(Some("an-earlier-boot".to_owned()), hour_ms);
        win(Duration::from_secs(10))
            .await
            .expect("a reservation of another boot does not block");
        // On this boot but far beyond what a release grants: it ends a lease from now.
        reserve(boot_id(), u64::MAX);
        win(timing().lease_duration + Duration::from_secs(10))
            .await
            .expect("a reservation lasts at most one lease");
    }

    #[tokio::test]
    async fn files_are_private_and_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let locks = dir.path().join("locks");
        let store = FileStore::new(&locks).unwrap();
        assert!(
            !locks.exists(),
            "nothing is created before an election joins"
        );
        let mut a = store.join("e", "a", timing()).await.unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&locks), 0o700);
        assert!(matches!(
            a.acquire(&Observation::default()).await.unwrap(),
            Acquired::Held(_)
        ));
        assert_eq!(mode(&locks.join("e.lock")), FILE_MODE);
        assert_eq!(mode(&locks.join("e.state")), FILE_MODE);

        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, locks.join("s.lock")).unwrap();
        let error = store.join("s", "a", timing()).await.err().unwrap();
        assert!(!elsewhere.exists(), "followed the symlink; {error}");
    }

    #[test]
    fn a_lock_dir_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), Permissions::from_mode(0o777)).unwrap();
        let error = FileStore::new(dir.path()).unwrap_err();
        assert!(matches!(error, FileError::UnsafeLockDir { .. }), "{error}");
    }

    #[tokio::test]
    async fn an_oversized_state_file_is_invalid_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut padded = br#"{"holder":null,"term":1}"#.to_vec();
        padded.resize(STATE_MAX_BYTES as usize + 1, b' ');
        std::fs::write(dir.path().join("e.state"), padded).unwrap();
        let store = FileStore::new(dir.path()).unwrap();
        let error = store.join("e", "a", timing()).await.err().unwrap();
        assert_eq!(error.kind(), ErrorKind::Invalid);
        assert!(error.to_string().contains("e.state"), "{error}");
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
