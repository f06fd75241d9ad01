//! A candidate in the file store: the exclusive `flock` on `E.lock`, the persisted term, the
//! state record, and waiting on inotify rather than polling.

use std::{
    fs::{File, TryLockError},
    io::{self, Read, Write},
    os::unix::fs::{FileExt, MetadataExt},
    path::{Path, PathBuf},
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::{Instant, sleep_until};

use super::error::FileError;
use super::record::{StateRecord, boot_time};
use super::watch::Wake;
use super::{LOCK_HEADER, STATE_MAX_BYTES, TERM_RECORD, open_private};
use crate::store::{Acquired, Candidate, Holding, Observation, StoreError};
use crate::timing::Timing;

pub(super) struct FileCandidate {
    pub(super) lock_path: PathBuf,
    pub(super) state_path: PathBuf,
    pub(super) identity: String,
    pub(super) timing: Timing,
    pub(super) crash_grace: Duration,
    /// Our open lock file; closed (and so unlocked) on release.
    pub(super) lock: Option<File>,
    /// The term we hold, if we hold the lock.
    pub(super) held: Option<u64>,
    /// After taking over from a dead holder: do not report the holding before this.
    pub(super) announce_at: Option<Instant>,
    /// Whether we created the lock file we have open (it did not exist before).
    pub(super) created_lock: bool,
    /// This boot's id, which binds a successor reservation to the boot it was made on.
    pub(super) boot: Option<String>,
    /// The successor reservation last seen (successor, until) and when we first saw it: it
    /// holds us back for at most one lease from then, whatever its recorded end.
    pub(super) reservation: Option<((String, u64), Instant)>,
    /// Woken by the store's watch of the lock directory when this election's files change.
    pub(super) wake: Wake,
}

impl FileCandidate {
    pub(super) fn lock_error(&self, source: io::Error) -> FileError {
        FileError::Lock {
            path: self.lock_path.clone(),
            source,
        }
    }

    /// Open (creating if needed) the lock file and check that it is Baton's. Also says whether
    /// this call created it (a new inode: a previous holder may still hold a removed one).
    pub(super) fn open_lock(&self) -> Result<(File, bool), FileError> {
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
    pub(super) async fn read_state(&self) -> Result<StateRecord, FileError> {
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
    pub(super) fn read_term(&self, file: &File) -> Result<u64, FileError> {
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
    pub(super) fn write_term(&self, file: &File, term: u64) -> Result<(), FileError> {
        let record = format!("term {term:020}\n");
        file.write_all_at(record.as_bytes(), LOCK_HEADER.len() as u64)
            .and_then(|()| file.sync_data())
            .map_err(|e| self.lock_error(e))
    }

    /// Report the holding of `term`, after the crash grace if one is running. Cancel-safe: the
    /// holding is recorded in `self` before this is awaited.
    pub(super) async fn announce(&mut self, term: u64) -> Acquired {
        if let Some(at) = self.announce_at {
            sleep_until(at).await;
            self.announce_at = None;
        }
        let valid_until = Instant::now() + self.timing.lease_duration;
        Acquired::Held(Holding { term, valid_until })
    }

    /// Just locked: record the next term durably, then tell observers. Returns the term.
    pub(super) fn take_over(&self, state_term: u64) -> Result<u64, FileError> {
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
    pub(super) fn write_state(&self, record: &StateRecord) -> Result<(), FileError> {
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
    pub(super) fn same_file(&self, file: &File) -> Result<bool, FileError> {
        let ours = file.metadata().map_err(|e| self.lock_error(e))?;
        match std::fs::metadata(&self.lock_path) {
            Ok(now) => Ok(now.dev() == ours.dev() && now.ino() == ours.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.lock_error(e)),
        }
    }

    /// Try the lock without blocking. `Ok(true)`: we hold it now (on the file at the path).
    pub(super) fn try_lock(&mut self) -> Result<bool, FileError> {
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

    /// Close our lock file: unlocks it and wakes every follower through the store's inotify watch.
    pub(super) fn close_lock(&mut self) {
        self.lock = None;
        self.held = None;
        self.announce_at = None;
    }

    /// Wait for a change to this election's files since the last look, or `at_most`.
    pub(super) async fn wait(&mut self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.wake.changed()).await;
    }

    /// How long `state` still reserves the election for a successor other than us: at most one
    /// lease (what a release grants) from when we first saw the reservation, which we log.
    pub(super) fn reserved(&mut self, state: &StateRecord) -> Option<Duration> {
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

    pub(super) async fn campaign_or_observe(
        &mut self,
        last_seen: &Observation,
        campaign: bool,
    ) -> Result<Acquired, FileError> {
        loop {
            self.wake.mark_seen();
            let state = self.read_state().await?;
            let reserved = self.reserved(&state);
            // Not campaigning, we still take the lock for an instant when the record names a
            // holder, to learn whether that holder is alive: a dead holder's name is cleared.
            let probe = campaign && reserved.is_none() || !campaign && state.holder.is_some();
            if probe && self.try_lock()? {
                // Until decided, the lock is this future's alone: if the call is cancelled at
                // the read below, dropping `locked` unlocks, rather than leave the election
                // locked by a replica that neither holds it nor knows it has it.
                let locked = self.lock.take();
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
                self.lock = locked;
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
