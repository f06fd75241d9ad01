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
    path::{Path, PathBuf},
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
    dir: PathBuf,
    identity: String,
    /// The stem of this member's file names (see [`member_stem`]).
    stem: String,
    /// Held exclusively while this member lives; closing it (or dying) leaves the group.
    lock: Option<File>,
    events: EventStream<Vec<u8>>,
    recheck: Duration,
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
        Ok(FileMembership {
            dir,
            identity: identity.to_owned(),
            stem,
            lock: Some(lock),
            events,
            recheck,
        })
    }

    /// Publish the elections this member may lead.
    pub fn write_record(&mut self, eligible: &BTreeSet<String>) -> Result<(), FileError> {
        let record = Record {
            identity: self.identity.clone(),
            eligible: eligible.clone(),
        };
        let path = self.dir.join(format!("{}.member", self.stem));
        let staged = self.dir.join(format!(".{}.member.new", self.stem));
        let write_error = |source| FileError::State {
            op: "write",
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(&record)
            .map_err(io::Error::other)
            .map_err(write_error)?;
        fs::write(&staged, bytes).map_err(write_error)?;
        fs::rename(&staged, &path).map_err(write_error)
    }

    /// The live members now: those whose member lock is held.
    pub fn members(&self) -> Result<Vec<Member>, FileError> {
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
            if stem.starts_with('.') || !self.is_live(stem)? {
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
    fn is_live(&self, stem: &str) -> Result<bool, FileError> {
        if stem == self.stem {
            return Ok(self.lock.is_some());
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

    /// The live members once they differ from `last_seen`; a change is noticed by inotify, and
    /// by a re-read every `recheck` in case a notification was lost.
    pub async fn next_change(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, FileError> {
        loop {
            let now = self.members()?;
            if now != last_seen {
                return Ok(now);
            }
            let _ = tokio::time::timeout(self.recheck, self.events.next()).await;
        }
    }

    /// Leave the group at once: others see this member gone on their next read.
    pub fn drop_out(&mut self) {
        let _ = fs::remove_file(self.dir.join(format!("{}.member", self.stem)));
        self.lock = None;
    }

    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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
        Ok(self.write_record(eligible)?)
    }

    async fn changed(&mut self, last_seen: &[Member]) -> Result<Vec<Member>, StoreError> {
        Ok(self.next_change(last_seen).await?)
    }

    async fn leave(&mut self) -> Result<(), StoreError> {
        self.drop_out();
        Ok(())
    }
}
