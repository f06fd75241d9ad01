//! The file store's errors, each naming the file it concerns, and how the elector treats them.

use std::{io, path::PathBuf};

use crate::store::ErrorKind;

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
    /// Another live process is already a member of the group under this identity.
    #[error(
        "member lock {path} is held by another process: another daemon runs with this \
         --identity in the group; give each daemon its own identity"
    )]
    MemberInUse {
        /// The member lock file.
        path: PathBuf,
    },
    /// A member record holds the record of another identity than the one its file is named
    /// after.
    #[error(
        "member record {path} holds the record of {identity:?}; remove it if no Baton daemon \
         wrote it"
    )]
    MisnamedMember {
        /// The member record.
        path: PathBuf,
        /// The identity in the record.
        identity: String,
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
        /// `read`, `write` or `remove`.
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
            | FileError::CorruptState { .. }
            | FileError::MisnamedMember { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Unavailable,
        }
    }
}
