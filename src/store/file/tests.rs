//! Unit tests of the file store: the conformance suite, and the faults a lock directory can
//! hold (foreign, corrupt or replaced files, a maxed-out term, unsafe permissions).

use std::sync::Arc;

use tokio::time::Instant;

use super::{
    record::{StateRecord, boot_time},
    *,
};
use crate::store::conformance::Suite;
use crate::store::{Acquired, ErrorKind, Observation};

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

fn eligible(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn identities(members: &[crate::balance::Member]) -> Vec<&str> {
    members.iter().map(|m| m.identity.as_str()).collect()
}

#[tokio::test]
async fn members_see_each_other_and_what_each_may_lead() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.enroll_member("g", "a", timing()).unwrap();
    let mut b = store.enroll_member("g", "b", timing()).unwrap();
    a.write_record(&eligible(&["e1", "e2"])).unwrap();
    b.write_record(&eligible(&["e2"])).unwrap();
    let seen = a.members().unwrap();
    assert_eq!(identities(&seen), ["a", "b"]);
    assert_eq!(seen[1].eligible, eligible(&["e2"]));
    assert_eq!(b.members().unwrap(), seen);
}

#[tokio::test]
async fn members_announce_see_each_other_and_leave_through_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.enroll("g", "a", timing()).await.unwrap();
    let mut b = store.enroll("g", "b", timing()).await.unwrap();
    a.announce(&eligible(&["e1", "e2"])).await.unwrap();
    b.announce(&eligible(&["e1"])).await.unwrap();
    b.announce(&eligible(&["e2"])).await.unwrap();
    let mut seen = Vec::new();
    while identities(&seen) != ["a", "b"] {
        seen = tokio::time::timeout(Duration::from_secs(10), a.changed(&seen))
            .await
            .expect("both are seen")
            .unwrap();
    }
    assert_eq!(seen[1].eligible, eligible(&["e2"]), "the last announce");
    b.leave().await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(10), a.changed(&seen))
        .await
        .expect("the leave is seen")
        .unwrap();
    assert_eq!(identities(&after), ["a"]);
}

#[tokio::test]
async fn a_member_that_leaves_or_whose_lock_is_closed_is_gone_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.enroll_member("g", "a", timing()).unwrap();
    let mut b = store.enroll_member("g", "b", timing()).unwrap();
    let mut c = store.enroll_member("g", "c", timing()).unwrap();
    for m in [&mut a, &mut b, &mut c] {
        m.write_record(&eligible(&["e1"])).unwrap();
    }
    let all = a.members().unwrap();
    assert_eq!(identities(&all), ["a", "b", "c"]);
    b.drop_out();
    // c's record stays behind, but its lock goes with its file, as when its process dies.
    drop(c);
    let seen = tokio::time::timeout(Duration::from_secs(10), a.next_change(&all))
        .await
        .expect("the change is seen")
        .unwrap();
    assert_eq!(identities(&seen), ["a"]);
}

#[tokio::test]
async fn a_join_wakes_a_member_waiting_for_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.enroll_member("g", "a", timing()).unwrap();
    a.write_record(&eligible(&["e1"])).unwrap();
    let alone = a.members().unwrap();
    let waiting = tokio::spawn(async move { a.next_change(&alone).await });
    let mut b = store.enroll_member("g", "b", timing()).unwrap();
    b.write_record(&eligible(&["e1"])).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the join is seen")
        .unwrap()
        .unwrap();
    assert_eq!(identities(&seen), ["a", "b"]);
}

#[tokio::test]
async fn one_identity_is_one_member() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let _a = store.enroll_member("g", "a", timing()).unwrap();
    let again = store
        .enroll_member("g", "a", timing())
        .err()
        .expect("refused");
    assert!(matches!(again, FileError::MemberInUse { .. }), "{again}");
    assert!(again.to_string().contains("--identity"), "{again}");
}

/// Every file under `root`, recursively.
fn files_under(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn identities_with_slashes_and_dots_stay_in_the_group_directory() {
    let root = tempfile::tempdir().unwrap();
    let store = FileStore::new(root.path().join("locks")).unwrap();
    let odd = ["../../escape", "a/b", "..", ".hidden"];
    let mut members = Vec::new();
    for identity in odd.iter().copied().chain(["baton-0"]) {
        let mut m = store
            .enroll_member("g", identity, timing())
            .unwrap_or_else(|e| panic!("enroll {identity:?}: {e}"));
        m.write_record(&eligible(&["e1"])).unwrap();
        members.push(m);
    }
    let mut want = odd.to_vec();
    want.push("baton-0");
    want.sort_unstable();
    assert_eq!(identities(&members[0].members().unwrap()), want);
    let group = root.path().join("locks").join("g.group");
    let files = files_under(root.path());
    for file in &files {
        assert_eq!(file.parent(), Some(group.as_path()), "{files:?}");
    }
    // A plain identity keeps its readable name.
    assert!(group.join("baton-0.lock").exists(), "{files:?}");
}

#[tokio::test]
async fn an_identity_of_128_wide_characters_enrolls() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    // 512 bytes: as a file name, twice NAME_MAX.
    let long = "\u{1F980}".repeat(128);
    let mut m = store.enroll_member("g", &long, timing()).unwrap();
    m.write_record(&eligible(&["e1"])).unwrap();
    let seen = m.members().unwrap();
    assert_eq!(identities(&seen), [long.as_str()]);
    let again = store.enroll_member("g", &long, timing()).err();
    assert!(
        matches!(again, Some(FileError::MemberInUse { .. })),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_record_of_another_identity_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let a = store.enroll_member("g", "a", timing()).unwrap();
    let mut x = store.enroll_member("g", "x", timing()).unwrap();
    x.write_record(&eligible(&["e1"])).unwrap();
    // x's lock is live; its record names y, whose lock it is not.
    let record = dir.path().join("g.group").join("x.member");
    std::fs::write(&record, r#"{"identity":"y","eligible":["e1"]}"#).unwrap();
    let error = a.members().expect_err("a misnamed record");
    assert!(matches!(error, FileError::MisnamedMember { .. }), "{error}");
    assert_eq!(error.kind(), ErrorKind::Invalid);
    assert!(error.to_string().contains("x.member"), "{error}");
}

#[test]
fn a_member_waiting_for_a_change_does_not_wake_itself() {
    use nix::sys::{
        resource::{UsageWho, getrusage},
        time::TimeValLike,
    };
    let cpu = || {
        let usage = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
        let micros = usage.user_time().num_microseconds() + usage.system_time().num_microseconds();
        Duration::from_micros(micros.unsigned_abs())
    };
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (timed_out, used) = runtime.block_on(async {
        let mut a = store.enroll_member("g", "a", timing()).unwrap();
        let mut b = store.enroll_member("g", "b", timing()).unwrap();
        a.write_record(&eligible(&["e1"])).unwrap();
        b.write_record(&eligible(&["e1"])).unwrap();
        let both = a.members().unwrap();
        let before = cpu();
        let wait = tokio::time::timeout(Duration::from_millis(400), a.next_change(&both)).await;
        (wait.is_err(), cpu() - before)
    });
    assert!(timed_out, "nothing changed, so the wait timed out");
    // Its own reads of the group must not wake it: then it would re-read the group in a loop,
    // burning this thread for the whole wait. Waiting costs CPU time only to set it up.
    assert!(
        used < Duration::from_millis(100),
        "{used:?} of CPU time in a 400 ms wait"
    );
}

#[tokio::test]
async fn a_campaign_cancelled_while_it_locks_leaves_the_lock_free() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.join("e", "a", timing()).await.unwrap();
    let lock_path = dir.path().join("e.lock");
    let locked_elsewhere = || {
        let probe = File::open(&lock_path).unwrap();
        matches!(probe.try_lock(), Err(std::fs::TryLockError::WouldBlock))
    };
    // Drive a's campaign only until it has taken the lock and reads the record under it, then
    // drop it there, as the elector drops a campaign when balancing says stand by. A campaign
    // may also run to the end within one poll (the read done before it is awaited): then it
    // gives the election back and tries again.
    let mut caught = false;
    for _ in 0..200 {
        let unseen = Observation::unseen();
        let mut campaign = a.acquire(&unseen);
        let outcome = loop {
            match futures::poll!(&mut campaign) {
                std::task::Poll::Ready(outcome) => break Some(outcome),
                std::task::Poll::Pending if locked_elsewhere() => break None,
                std::task::Poll::Pending => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        drop(campaign);
        match outcome {
            None => {
                caught = true;
                break;
            }
            Some(won) => {
                assert!(matches!(won, Ok(Acquired::Held(_))), "{won:?}");
                a.release(None).await.unwrap();
            }
        }
    }
    assert!(caught, "the campaign never paused while it held the lock");
    assert!(!locked_elsewhere(), "the cancelled campaign left e locked");
    let mut b = store.join("e", "b", timing()).await.unwrap();
    let won = tokio::time::timeout(Duration::from_secs(10), b.acquire(&Observation::unseen()))
        .await
        .expect("b is not shut out")
        .unwrap();
    assert!(matches!(won, Acquired::Held(_)), "{won:?}");
}

/// More elections than the user may have inotify instances (`fs.inotify.max_user_instances`,
/// 128 by default, for all of the user's processes): the store shares one watch among them.
#[tokio::test]
async fn one_inotify_watch_serves_more_elections_than_the_user_may_watch_and_ends_with_them() {
    let instances: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("read fs.inotify.max_user_instances")
        .trim()
        .parse()
        .expect("a number");
    let elections = (instances + 10).max(300);
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut candidates = Vec::new();
    for i in 0..elections {
        let joined = store.join(&format!("e{i}"), "a", timing()).await;
        candidates.push(joined.unwrap_or_else(|e| panic!("join of election {i}: {e}")));
    }
    for (i, candidate) in candidates.iter_mut().enumerate() {
        let acquired = candidate.acquire(&Observation::default()).await.unwrap();
        assert!(matches!(acquired, Acquired::Held(_)), "election e{i}");
    }
    assert!(store.watch.is_live());
    let clone = store.clone();
    drop(candidates);
    assert!(
        !store.watch.is_live() && !clone.watch.is_live(),
        "the watch outlived the store's last election"
    );
    // A later join starts a new watch, which wakes it.
    let mut again = clone.join("e0", "b", timing()).await.unwrap();
    assert!(store.watch.is_live());
    let mut wake = store.watch.wake(dir.path(), "e0").unwrap();
    wake.mark_seen();
    assert!(matches!(
        again.acquire(&Observation::default()).await.unwrap(),
        Acquired::Held(_)
    ));
    tokio::time::timeout(Duration::from_secs(10), wake.changed())
        .await
        .expect("the new watch saw the new holder's record");
}

/// Rename a record onto `dir/E.state`: an event for election `E`.
fn touch_state(dir: &std::path::Path, election: &str) {
    let record = dir.join(format!(".{election}.state.new"));
    std::fs::write(&record, b"{}").unwrap();
    std::fs::rename(&record, dir.join(format!("{election}.state"))).unwrap();
}

/// Until the store's watch has handed out every event made so far: inotify keeps their order,
/// so once an event made now arrives, all earlier ones have.
async fn drain_watch(store: &FileStore) {
    let mut sync = store.watch.wake(store.dir(), "sync").unwrap();
    sync.mark_seen();
    touch_state(store.dir(), "sync");
    tokio::time::timeout(Duration::from_secs(10), sync.changed())
        .await
        .expect("the watch delivers an event");
}

/// An event about an election wakes every waiter on it in the process, and no waiter on
/// another election.
#[tokio::test]
async fn a_release_wakes_every_waiter_on_its_election_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStore::new(dir.path()).unwrap();
    let mut a = store.join("e", "a", timing()).await.unwrap();
    assert!(matches!(
        a.acquire(&Observation::default()).await.unwrap(),
        Acquired::Held(_)
    ));
    let mut waiters: Vec<_> = (0..3)
        .map(|_| store.watch.wake(dir.path(), "e").unwrap())
        .collect();
    let mut other = store.watch.wake(dir.path(), "f").unwrap();
    // The join's and the acquisition's own events must not count as the release's.
    drain_watch(&store).await;
    for waiter in waiters.iter_mut().chain([&mut other]) {
        waiter.mark_seen();
    }
    a.release(None).await.unwrap();
    for waiter in &mut waiters {
        tokio::time::timeout(Duration::from_secs(10), waiter.changed())
            .await
            .expect("a waiter on the released election was not woken");
    }
    // The events that woke them were routed by name: none reached the other election.
    assert!(
        !other.has_changed(),
        "a waiter on another election was woken"
    );
}

/// A watch that ends (here: the lock directory was removed and made again) is replaced, and
/// its waiters move to the new one.
#[tokio::test]
async fn waiters_move_to_a_new_watch_when_theirs_ends() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("locks");
    let store = FileStore::new(&dir).unwrap();
    create_private_dir(&dir).unwrap();
    let mut waiter = store.watch.wake(&dir, "e").unwrap();
    waiter.mark_seen();
    std::fs::remove_dir_all(&dir).unwrap();
    create_private_dir(&dir).unwrap();
    let woken = tokio::spawn(async move { waiter.changed().await });
    // Until the waiter has moved to a new watch, a record written now is not seen: keep
    // writing one until it is.
    let wrote = async {
        loop {
            touch_state(&dir, "e");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        woken = tokio::time::timeout(Duration::from_secs(10), woken) => {
            woken.expect("the waiter never saw the new directory's events").unwrap();
        }
        () = wrote => unreachable!(),
    }
}
