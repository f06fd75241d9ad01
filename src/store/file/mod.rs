//! The file store: an election is a lock file held with `flock(2)` plus a state record beside
//! it, in one lock directory. One host, no server; the default. [`FileStore`] describes the
//! files and the rules.

use std::{
    fs::{DirBuilder, File, OpenOptions, Permissions},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;

use super::{Candidate, Membership, Store, StoreError};
use crate::timing::Timing;

mod candidate;
mod error;
mod membership;
mod record;
#[cfg(test)]
mod tests;
mod watch;

use candidate::FileCandidate;
pub use error::FileError;
pub use membership::FileMembership;
use record::boot_id;

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

/// The lock directory when `--lock-dir` is not given: `$TMPDIR/baton`.
pub fn default_lock_dir() -> PathBuf {
    std::env::temp_dir().join("baton")
}

/// Elections as files in one lock directory: one host, no server. The default store.
///
/// An election `E` in lock directory `D` is two files:
///
/// ```text
/// D/E.lock    held with an exclusive flock(2) by the leader; the kernel drops the lock when
///             the leader's process dies, however it dies. Holds a fixed header (so that a file
///             Baton did not write is recognised instead of silently shared) and the term, a
///             fixed-width record overwritten in place and made durable (fdatasync) by each new
///             holder before it reports leadership: terms survive releases, crashes and power
///             loss, and grow by one with every new holding.
/// D/E.state   JSON {"holder", "term", "successor", ...} for observers, replaced atomically
///             (write + rename) by whoever holds the lock. Not synced: it only describes the
///             holding, and a stale copy after a power loss is rewritten by the next holder.
/// ```
///
/// Followers do not poll and do not block a thread in `flock`: they watch `D` with inotify, one
/// watch per store for all its elections. The kernel reports a close of `E.lock` (the leader
/// released, or its process died and the kernel closed its files) and a rename onto `E.state`
/// (a new holder wrote its record); each wakes the followers, which try the lock without
/// blocking. A queue overflow wakes every election; a watch that ends is replaced, and a slow
/// re-check every retry period covers the events missed meanwhile.
///
/// A holder that died without releasing (its process killed) is replaced at once, with one
/// precaution: the new holder reports leadership only [`DEFAULT_CRASH_GRACE`] after it took the
/// lock. The dead daemon's workers learn of its death from the same kernel, which closes their
/// gRPC streams as it frees the lock; the grace lets them stop before the standby's workers
/// start. A graceful release needs no grace: its workers confirmed their stop before it.
///
/// One host only: `flock` on NFS is emulated with byte-range locks, and inotify does not see
/// other hosts' changes. Use etcd or Kubernetes across hosts.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    crash_grace: Duration,
    /// One inotify watch on `dir` for every election joined through this store and its clones.
    watch: watch::StoreWatch,
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
            watch: watch::StoreWatch::default(),
        })
    }

    /// Create the lock directory (0700) if it is missing, and check whose it is.
    fn create_dir(&self) -> Result<(), FileError> {
        create_private_dir(&self.dir)
    }

    /// Replace [`DEFAULT_CRASH_GRACE`].
    pub fn with_crash_grace(mut self, grace: Duration) -> Self {
        self.crash_grace = grace;
        self
    }

    /// Enroll `identity` in balancing `group`, kept in `D/G.group/` (see [`FileMembership`]).
    ///
    /// # Errors
    /// The directory is not usable, or another live process is a member as `identity`.
    pub fn enroll_member(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<FileMembership, FileError> {
        self.create_dir()?;
        let dir = self.dir.join(format!("{group}.group"));
        create_private_dir(&dir)?;
        FileMembership::enroll(dir, identity, timing.retry_period)
    }

    /// The lock directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Create `dir` and any missing parents (mode 0700) if it is missing, and check whose it is.
fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| FileError::LockDir {
            path: dir.to_owned(),
            source,
        })?;
    check_owner(dir)
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
        let wake = self.watch.wake(&self.dir, election)?;
        let candidate = FileCandidate {
            lock_path: self.dir.join(format!("{election}.lock")),
            state_path: self.dir.join(format!("{election}.state")),
            identity: identity.to_owned(),
            timing,
            crash_grace: self.crash_grace,
            lock: None,
            held: None,
            announce_at: None,
            created_lock: false,
            boot: boot_id(),
            reservation: None,
            wake,
        };
        candidate.open_lock()?;
        candidate.read_state().await?;
        Ok(Box::new(candidate))
    }

    async fn enroll(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Membership>, StoreError> {
        Ok(Box::new(self.enroll_member(group, identity, timing)?))
    }

    fn describe(&self) -> String {
        format!("file store in {}", self.dir.display())
    }

    /// Its open lock file, and a state file being read or replaced.
    fn descriptors_per_election(&self) -> u64 {
        2
    }
}
