//! Membership of a balancing group in the file store: one lock file per member, write-locked
//! (an open file description lock) for the member's life, and a record beside it naming the
//! elections the member may lead. The kernel drops the lock when the member's process dies, so
//! a death is seen at once, with no lease to wait for. Others test the lock with `F_OFD_GETLK`,
//! which takes nothing, so a probe never makes an enrolling member look taken. A member's files
//! are named by [`member_stem`], never by the raw identity, which may hold `/` or `..`.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    hash::Hasher as _,
    io,
    path::PathBuf,
    time::Duration,
};

use async_trait::async_trait;
use futures::StreamExt;
use inotify::{EventStream, Inotify, WatchMask};
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, fcntl},
    libc,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{error::FileError, open_private};
use crate::{
    balance::Member,
    store::{Membership, StoreError},
};

/// The longest identity used as it is in a file name: with `.member.new` and a leading `.` it
/// stays far below `NAME_MAX` (255 bytes).
const PLAIN_STEM_MAX: usize = 100;

/// The stem of `identity`'s files in the group's directory (`STEM.lock`, `STEM.member`): the
/// identity itself when it is at most [`PLAIN_STEM_MAX`] bytes of `[A-Za-z0-9._-]` and does not
/// start with `.`; else `~` and the 16-hex FNV-1a hash of the identity. `~` never occurs in a
/// plain stem, so the two forms never collide, and no stem can leave the directory.
fn member_stem(identity: &str) -> String {
    let plain = identity.len() <= PLAIN_STEM_MAX
        && !identity.is_empty()
        && !identity.starts_with('.')
        && identity
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        return identity.to_owned();
    }
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(identity.as_bytes());
    format!("~{:016x}", hasher.finish())
}

/// The record of a member: `G.group/STEM.member`, replaced atomically.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    identity: String,
    eligible: BTreeSet<String>,
}

/// This daemon's place in a group: its held lock, and a watch on the group's directory.
pub struct FileMembership {
    group: Group,
    identity: String,
    /// Held exclusively while this member lives; closing it (or dying) leaves the group.
    lock: Option<File>,
    events: EventStream<Vec<u8>>,
    recheck: Duration,
    /// A record write still running on a blocking thread because its `announce` was dropped:
    /// the next write waits for it, so that an older record never lands over a newer one.
    writing: Option<JoinHandle<Result<(), FileError>>>,
}

/// The group's directory and this member's stem in it: what the blocking file operations need,
/// cloned onto a blocking thread.
#[derive(Debug, Clone)]
struct Group {
    dir: PathBuf,
    /// The stem of this member's file names (see [`member_stem`]).
    stem: String,
}

impl FileMembership {
    /// Enroll `identity` in the group kept in `dir`: take its member lock, refusing when another
    /// live process holds the same identity.
    pub(super) fn enroll(
        dir: PathBuf,
        identity: &str,
        recheck: Duration,
    ) -> Result<Self, FileError> {
        let watch_error = |source| FileError::Watch {
            path: dir.clone(),
            source,
        };
        let inotify = Inotify::init().map_err(watch_error)?;
        // A member's lock is closed after writing (CLOSE_WRITE: it left or died), its record is
        // renamed into place (MOVED_TO) or removed (DELETE). Not CLOSE_NOWRITE: reading the
        // group closes files unwritten, and would wake this member for its own reads forever.
        inotify
            .watches()
            .add(
                &dir,
                WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::DELETE,
            )
            .map_err(watch_error)?;
        let events = inotify
            .into_event_stream(vec![0u8; 4096])
            .map_err(watch_error)?;
        let stem = member_stem(identity);
        let lock_path = dir.join(format!("{stem}.lock"));
        let lock_error = |source| FileError::Lock {
            path: lock_path.clone(),
            source,
        };
        let lock = open_private(&lock_path, true).map_err(lock_error)?;
        match fcntl(&lock, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK))) {
            Ok(_) => {}
            Err(Errno::EAGAIN | Errno::EACCES) => {
                return Err(FileError::MemberInUse {
                    path: lock_path.clone(),
                });
            }
            Err(e) => return Err(lock_error(e.into())),
        }
        let group = Group { dir, stem };
        group.remove_stale_record()?;
        Ok(FileMembership {
            group,
            identity: identity.to_owned(),
            lock: Some(lock),
            events,
            recheck,
            writing: None,
        })
    }

    /// Publish the elections this member may lead, on this thread (for tests; the daemon
    /// announces through [`Membership::announce`], off the runtime).
    ///
    /// # Errors
    /// [`FileError::State`] if the record cannot be written.
    #[cfg(test)]
    pub(super) fn write_record(&mut self, eligible: &BTreeSet<String>) -> Result<(), FileError> {
        self.group.write(&self.record(eligible))
    }

    /// The live members now (those whose member lock is held), read on this thread (for tests).
    ///
    /// # Errors
    /// The directory, a lock or a record cannot be read; [`FileError::MisnamedMember`] if a
    /// record names another identity than its file's.
    #[cfg(test)]
    pub(super) fn members(&self) -> Result<Vec<Member>, FileError> {
        self.group.members(self.lock.is_some())
    }

    /// The live members once they differ from `last_seen`; a change is noticed by inotify, and
    /// by a re-read every `recheck` in case a notification was lost. The directory is read on a
    /// blocking thread. Cancel-safe: a read cut off is only wasted.
    ///
    /// # Errors
    /// The directory, a lock or a record cannot be read; [`FileError::MisnamedMember`] if a
    /// record names another identity than its file's.
    pub(super) async fn next_change(
        &mut self,
        last_seen: &[Member],
    ) -> Result<Vec<Member>, FileError> {
        loop {
            let group = self.group.clone();
            let own_live = self.lock.is_some();
            let read = tokio::task::spawn_blocking(move || group.members(own_live)).await;
            let now = read.unwrap_or_else(|e| {
                Err(FileError::LockDir {
                    path: self.group.dir.clone(),
                    source: io::Error::other(e),
                })
            })?;
            if now != last_seen {
                return Ok(now);
            }
            let _ = tokio::time::timeout(self.recheck, self.events.next()).await;
        }
    }

    /// Publish the elections this member may lead, on a blocking thread, after any write an
    /// earlier, dropped call left running. Cancel-safe: a write cut off still lands, before the
    /// next.
    async fn announce_off_runtime(&mut self, eligible: &BTreeSet<String>) -> Result<(), FileError> {
        self.finish_writing().await;
        let group = self.group.clone();
        let record = self.record(eligible);
        let write = self
            .writing
            .insert(tokio::task::spawn_blocking(move || group.write(&record)));
        let written = write.await;
        self.writing = None;
        written.unwrap_or_else(|e| Err(self.group.join_error(e)))
    }

    /// Wait for a write an earlier, dropped `announce` left running; its outcome is moot.
    async fn finish_writing(&mut self) {
        if let Some(write) = &mut self.writing {
            let _ = write.await;
            self.writing = None;
        }
    }

    /// Leave the group at once: others see this member gone on their next read.
    pub(super) fn drop_out(&mut self) {
        let _ = fs::remove_file(self.group.record_path());
        self.lock = None;
    }

    fn record(&self, eligible: &BTreeSet<String>) -> Record {
        Record {
            identity: self.identity.clone(),
            eligible: eligible.clone(),
        }
    }
}

impl Group {
    fn record_path(&self) -> PathBuf {
        self.dir.join(format!("{}.member", self.stem))
    }

    /// Remove the record a dead process of this identity left (its lock went with it, its
    /// record did not): until this member announces, it is not listed. Called with the member
    /// lock held, so no live process owns that record.
    fn remove_stale_record(&self) -> Result<(), FileError> {
        let path = self.record_path();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FileError::State {
                op: "remove",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Replace this member's record atomically (write beside it, then rename).
    fn write(&self, record: &Record) -> Result<(), FileError> {
        let path = self.record_path();
        let staged = self.dir.join(format!(".{}.member.new", self.stem));
        let write_error = |source| FileError::State {
            op: "write",
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(record)
            .map_err(io::Error::other)
            .map_err(write_error)?;
        fs::write(&staged, bytes).map_err(write_error)?;
        fs::rename(&staged, &path).map_err(write_error)
    }

    /// A blocking thread that failed (panicked, or the runtime shut down) while it wrote.
    fn join_error(&self, error: tokio::task::JoinError) -> FileError {
        FileError::State {
            op: "write",
            path: self.record_path(),
            source: io::Error::other(error),
        }
    }

    /// The live members: those whose member lock is held (this member's own while `own_live`).
    fn members(&self, own_live: bool) -> Result<Vec<Member>, FileError> {
        let read_error = |source| FileError::LockDir {
            path: self.dir.clone(),
            source,
        };
        let mut members = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(read_error)? {
            let name = entry.map_err(read_error)?.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".member")) else {
                continue;
            };
            if stem.starts_with('.') || !self.is_live(stem, own_live)? {
                continue;
            }
            let path = self.dir.join(&name);
            let record: Record = match fs::read(&path) {
                Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| FileError::State {
                    op: "read",
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                })?,
                // Replaced or removed between the listing and the read: next time.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(FileError::State {
                        op: "read",
                        path,
                        source,
                    });
                }
            };
            // The lock that proved it live is the one named like this file: a record of another
            // identity would borrow that lock's life.
            if member_stem(&record.identity) != stem {
                return Err(FileError::MisnamedMember {
                    path,
                    identity: record.identity,
                });
            }
            members.push(Member {
                identity: record.identity,
                eligible: record.eligible,
            });
        }
        members.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(members)
    }

    /// Whether the member lock `STEM.lock` is held: by this member, or by a live process.
    fn is_live(&self, stem: &str, own_live: bool) -> Result<bool, FileError> {
        if stem == self.stem {
            return Ok(own_live);
        }
        let path = self.dir.join(format!("{stem}.lock"));
        let file = match open_private(&path, false) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(FileError::Lock { path, source }),
        };
        // Asks whether a read lock could be placed, without placing one.
        let mut probe = whole_file(libc::F_RDLCK);
        fcntl(&file, FcntlArg::F_OFD_GETLK(&mut probe)).map_err(|e| FileError::Lock {
            path,
            source: e.into(),
        })?;
        Ok(i32::from(probe.l_type) != libc::F_UNLCK)
    }
}

/// A lock of `kind` over the whole file, as open file description locks want it (`l_pid` 0).
fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

#[async_trait]
impl Membership for FileMembership {
    async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError> {
        Ok(self.announce_off_runtime(eligible).await?)
    }

    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError> {
        Ok(self.next_change(last_seen).await?)
    }

    async fn leave(&mut self) -> Result<(), StoreError> {
        // A write left running would put the record back after its removal.
        self.finish_writing().await;
        self.drop_out();
        Ok(())
    }
}
