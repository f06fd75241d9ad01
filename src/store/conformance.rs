//! The behaviours every store must show, as one suite that each backend runs (after openraft's
//! `Suite::test_all`): the memory and file stores in unit tests, etcd and Kubernetes in
//! integration tests against real (or, for Kubernetes, test-double) servers.
//!
//! Two contracts are checked: elections (`join` and the [`Candidate`]) and balancing groups
//! (`enroll` and the [`Membership`]). Each check uses fresh election or group names, so one
//! store instance can run them all. A failed check panics with a message saying which behaviour
//! broke.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::time::{Instant, sleep, timeout};

use super::{Acquired, Candidate, ErrorKind, Holding, Membership, Observation, Store};
use crate::{balance::Member, timing::Timing};

/// The suite over one store.
pub struct Suite {
    store: Arc<dyn Store>,
    timing: Timing,
    /// Prefix for election names, so that runs against a shared server do not collide.
    prefix: String,
}

/// How long a candidate that should win may take: generous, since this is a liveness check on
/// a possibly loaded machine (latency is measured by the benchmarks, not here).
const PROMPTLY: Duration = Duration::from_secs(10);
/// How long a candidate that must not win is given to (wrongly) win, and a member list that
/// must not change is given to (wrongly) change.
const QUIET: Duration = Duration::from_millis(300);
/// A member lease far longer than [`PROMPTLY`]: a member seen gone within `PROMPTLY` was not
/// gone by expiry.
const LONG_LEASE: Duration = Duration::from_secs(60);

impl Suite {
    /// A suite over `store` with `timing`. Use a short lease: the crash check waits for one.
    pub fn new(store: Arc<dyn Store>, timing: Timing, prefix: &str) -> Self {
        Suite {
            store,
            timing,
            prefix: prefix.to_owned(),
        }
    }

    /// Run every check: elections, then balancing groups.
    pub async fn test_all(&self) {
        self.test_elections().await;
        self.test_membership().await;
    }

    /// Run every check of elections ([`Store::join`], [`Candidate`]).
    pub async fn test_elections(&self) {
        self.one_holder_and_followers_see_it().await;
        self.release_hands_over_with_a_greater_term().await;
        self.terms_only_grow().await;
        self.keep_extends_and_fails_after_release().await;
        self.observers_see_holder_and_release().await;
        self.release_to_successor().await;
        self.cancelled_acquire_holds_nothing().await;
        self.elections_are_independent().await;
        self.crashed_holder_is_replaced().await;
    }

    /// Run every check of balancing groups ([`Store::enroll`], [`Membership`]).
    pub async fn test_membership(&self) {
        self.announced_members_see_each_other_in_order().await;
        self.a_new_announce_is_seen().await;
        self.a_leave_is_seen_promptly().await;
        self.a_dropped_member_drops_out().await;
        self.one_identity_is_one_live_member().await;
        self.cancelled_changed_misses_nothing().await;
    }

    fn election(&self, check: &str) -> String {
        format!("{}{check}", self.prefix)
    }

    /// A fresh group name. Made like an election name (the prefix, lowercase letters, digits
    /// and `-`, as `balance::group_name`'s `b-` and hex digits are), it is valid in every store:
    /// a directory name, an etcd key segment, a Lease name part and a label value.
    fn group(&self, check: &str) -> String {
        self.election(check)
    }

    async fn join(&self, election: &str, identity: &str) -> Box<dyn Candidate> {
        match self.store.join(election, identity, self.timing).await {
            Ok(candidate) => candidate,
            Err(e) => panic!("{identity} cannot join {election}: {e}"),
        }
    }

    async fn enroll(&self, group: &str, identity: &str) -> Box<dyn Membership> {
        self.enroll_with(group, identity, self.timing).await
    }

    async fn enroll_with(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Box<dyn Membership> {
        match timeout(PROMPTLY, self.store.enroll(group, identity, timing)).await {
            Ok(Ok(membership)) => membership,
            Ok(Err(e)) => panic!("{identity} cannot enroll in {group}: {e}"),
            Err(_) => panic!("{identity} not enrolled in {group} within {PROMPTLY:?}"),
        }
    }

    /// Campaign until held; panics if that takes longer than `within`.
    async fn win(&self, candidate: &mut dyn Candidate, within: Duration, what: &str) -> Holding {
        let mut seen = Observation::default();
        let outcome = timeout(within, async {
            loop {
                match candidate.acquire(&seen).await {
                    Ok(Acquired::Held(holding)) => return holding,
                    Ok(Acquired::Observed(now)) => seen = now,
                    Err(e) => panic!("{what}: acquire failed: {e}"),
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| panic!("{what}: not acquired within {within:?}"))
    }

    /// Campaign for `QUIET` and return what was last seen; panics if it wins.
    async fn must_not_win(&self, candidate: &mut dyn Candidate, what: &str) -> Observation {
        let mut seen = Observation::default();
        let _ = timeout(QUIET, async {
            loop {
                match candidate.acquire(&seen).await {
                    Ok(Acquired::Held(h)) => {
                        panic!("{what}: acquired term {} but must not", h.term)
                    }
                    Ok(Acquired::Observed(now)) => seen = now,
                    Err(e) => panic!("{what}: acquire failed: {e}"),
                }
            }
        })
        .await;
        seen
    }

    /// One candidate holds; the others see it as the holder and do not win.
    pub async fn one_holder_and_followers_see_it(&self) {
        let e = self.election("one-holder");
        let mut a = self.join(&e, "a").await;
        let mut b = self.join(&e, "b").await;
        let held = self.win(&mut *a, PROMPTLY, "a on a free election").await;
        assert!(held.term > 0, "terms start above zero");
        assert!(
            held.valid_until > Instant::now(),
            "a new holding is valid now"
        );
        let seen = self.must_not_win(&mut *b, "b while a holds").await;
        assert_eq!(seen.holder.as_deref(), Some("a"), "b sees a as the holder");
        assert_eq!(seen.term, held.term, "b sees a's term");
        a.release(None).await.expect("release");
    }

    /// A release lets a waiting candidate take over, with a greater term.
    pub async fn release_hands_over_with_a_greater_term(&self) {
        let e = self.election("hand-over");
        let mut a = self.join(&e, "a").await;
        let mut b = self.join(&e, "b").await;
        let first = self.win(&mut *a, PROMPTLY, "a").await;
        let (second, released) =
            tokio::join!(self.win(&mut *b, PROMPTLY, "b after a's release"), async {
                tokio::time::sleep(QUIET).await;
                a.release(None).await
            });
        released.expect("a releases");
        assert!(
            second.term > first.term,
            "term {} after {}",
            second.term,
            first.term
        );
        b.release(None).await.expect("release");
    }

    /// Across many holdings by several candidates, every term is greater than the one before.
    pub async fn terms_only_grow(&self) {
        let e = self.election("terms");
        let mut candidates = Vec::new();
        for id in ["a", "b", "c"] {
            candidates.push(self.join(&e, id).await);
        }
        let mut last = 0;
        for round in 0..6 {
            let candidate = &mut candidates[round % 3];
            let held = self.win(&mut **candidate, PROMPTLY, "next holder").await;
            assert!(
                held.term > last,
                "round {round}: term {} after {last}",
                held.term
            );
            last = held.term;
            candidate.release(None).await.expect("release");
        }
    }

    /// `keep` extends a holding; after a release it reports the holding lost.
    pub async fn keep_extends_and_fails_after_release(&self) {
        let e = self.election("keep");
        let mut a = self.join(&e, "a").await;
        self.win(&mut *a, PROMPTLY, "a").await;
        for _ in 0..3 {
            let before = Instant::now();
            let until = a.keep().await.expect("keep while holding");
            assert!(until > before, "keep returns a deadline in the future");
        }
        a.release(None).await.expect("release");
        match a.keep().await {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Lost, "keep after release: {e}"),
            Ok(_) => panic!("keep after release must fail"),
        }
        // Releasing twice is harmless.
        a.release(None).await.expect("second release is a no-op");
    }

    /// A non-campaigning observer sees the holder, then the release, and never takes it.
    pub async fn observers_see_holder_and_release(&self) {
        let e = self.election("observe");
        let mut a = self.join(&e, "a").await;
        let mut watcher = self.join(&e, "watcher").await;
        let held = self.win(&mut *a, PROMPTLY, "a").await;
        let seen = timeout(PROMPTLY, watcher.observe(&Observation::default()))
            .await
            .expect("observe answers at once when the holder differs")
            .expect("observe");
        assert_eq!(seen.holder.as_deref(), Some("a"));
        assert_eq!(seen.term, held.term);
        let (after, released) = tokio::join!(timeout(PROMPTLY, watcher.observe(&seen)), async {
            tokio::time::sleep(QUIET).await;
            a.release(None).await
        });
        released.expect("release");
        let after = after.expect("observe sees the release").expect("observe");
        assert_eq!(after.holder, None, "after a release nobody leads");
        // The observer never campaigned: a fresh candidate wins at once.
        let mut b = self.join(&e, "b").await;
        let next = self
            .win(&mut *b, PROMPTLY, "b after the observer watched")
            .await;
        assert!(next.term > held.term);
        b.release(None).await.expect("release");
    }

    /// A release for a named successor: only the successor takes over.
    pub async fn release_to_successor(&self) {
        let e = self.election("successor");
        let mut a = self.join(&e, "a").await;
        let mut b = self.join(&e, "b").await;
        let mut c = self.join(&e, "c").await;
        let first = self.win(&mut *a, PROMPTLY, "a").await;
        a.release(Some("c")).await.expect("release to c");
        self.must_not_win(&mut *b, "b while the election is reserved for c")
            .await;
        let next = self.win(&mut *c, PROMPTLY, "the successor c").await;
        assert!(next.term > first.term);
        c.release(None).await.expect("release");
        self.win(&mut *b, PROMPTLY, "b once c released without a successor")
            .await;
        b.release(None).await.expect("release");
    }

    /// An acquire that is cancelled (its future dropped) leaves nothing held in secret.
    pub async fn cancelled_acquire_holds_nothing(&self) {
        let e = self.election("cancel");
        let mut a = self.join(&e, "a").await;
        let mut b = self.join(&e, "b").await;
        let mut c = self.join(&e, "c").await;
        self.win(&mut *a, PROMPTLY, "a").await;
        let seen = self.must_not_win(&mut *b, "b while a holds").await;
        // b campaigns, and gives up (drops the future) before a releases.
        let _ = timeout(QUIET, b.acquire(&seen)).await;
        a.release(None).await.expect("release");
        drop(b);
        self.win(&mut *c, PROMPTLY, "c after a released and b gave up")
            .await;
        c.release(None).await.expect("release");
    }

    /// Holding one election says nothing about another.
    pub async fn elections_are_independent(&self) {
        let (e1, e2) = (
            self.election("independent-1"),
            self.election("independent-2"),
        );
        let mut a1 = self.join(&e1, "a").await;
        let mut b2 = self.join(&e2, "b").await;
        self.win(&mut *a1, PROMPTLY, "a in e1").await;
        self.win(&mut *b2, PROMPTLY, "b in e2 while a holds e1")
            .await;
        a1.release(None).await.expect("release");
        b2.release(None).await.expect("release");
    }

    /// A holder that vanishes without releasing (its candidate dropped, as when the process
    /// dies) is replaced: at once where the store sees the death (a file lock), else after the
    /// lease expires. Never before the old holding is gone: while it lives, nobody else wins.
    pub async fn crashed_holder_is_replaced(&self) {
        let e = self.election("crash");
        let mut a = self.join(&e, "a").await;
        let mut b = self.join(&e, "b").await;
        let first = self.win(&mut *a, PROMPTLY, "a").await;
        self.must_not_win(&mut *b, "b while a lives").await;
        drop(a);
        let within = self.timing.lease_duration + PROMPTLY;
        let next = self.win(&mut *b, within, "b after a vanished").await;
        assert!(next.term > first.term);
        b.release(None).await.expect("release");
    }

    /// One member lists the others (itself included) and what each announced; an unannounced
    /// member is not listed. Enrolled out of identity order, so a listing in enrollment order
    /// shows.
    pub async fn announced_members_see_each_other_in_order(&self) {
        let g = self.group("members");
        let mut b = self.enroll(&g, "b").await;
        let mut c = self.enroll(&g, "c").await;
        let mut a = self.enroll(&g, "a").await;
        let none = timeout(PROMPTLY, c.changed(&[member("nobody", &[])]))
            .await
            .expect("changed answers at once when the members differ")
            .expect("changed");
        assert_eq!(
            none,
            [],
            "enrolled members that did not announce are listed"
        );
        announce(&mut *b, &["e2"]).await;
        announce(&mut *a, &["e1", "e2"]).await;
        let both = [member("a", &["e1", "e2"]), member("b", &["e2"])];
        until_members(&mut *a, &both, PROMPTLY, "a").await;
        until_members(&mut *b, &both, PROMPTLY, "b").await;
        until_members(&mut *c, &both, PROMPTLY, "c, which did not announce").await;
        members_stay(&mut *c, &both, "c, which did not announce").await;
        for mut m in [a, b, c] {
            m.leave().await.expect("leave");
        }
    }

    /// An announce replaces the member's record, down to an empty set (a member that may lead
    /// nothing now is still a member); the others see each one.
    pub async fn a_new_announce_is_seen(&self) {
        let g = self.group("members-announce");
        let mut a = self.enroll(&g, "a").await;
        let mut b = self.enroll(&g, "b").await;
        announce(&mut *b, &["e1"]).await;
        for names in [&["e1"][..], &["e1", "e2"], &["e2"], &[]] {
            announce(&mut *a, names).await;
            let want = [member("a", names), member("b", &["e1"])];
            until_members(&mut *b, &want, PROMPTLY, "b after a announced again").await;
        }
        a.leave().await.expect("leave");
        b.leave().await.expect("leave");
    }

    /// A member that leaves is seen gone by a member waiting for a change, long before its
    /// lease could have expired, and stays gone.
    pub async fn a_leave_is_seen_promptly(&self) {
        let g = self.group("members-leave");
        let timing = Timing {
            lease_duration: LONG_LEASE,
            ..self.timing
        };
        let mut a = self.enroll_with(&g, "a", timing).await;
        let mut b = self.enroll_with(&g, "b", timing).await;
        announce(&mut *a, &["e1"]).await;
        announce(&mut *b, &["e1"]).await;
        let both = [member("a", &["e1"]), member("b", &["e1"])];
        until_members(&mut *b, &both, PROMPTLY, "b").await;
        let alone = [member("b", &["e1"])];
        let ((), left) = tokio::join!(
            until_members(&mut *b, &alone, PROMPTLY, "b after a left"),
            async {
                sleep(QUIET).await;
                a.leave().await
            }
        );
        left.expect("a leaves");
        // Left for good: a late announce of the left membership writes nothing.
        announce(&mut *a, &["e2"]).await;
        let back = timeout(QUIET, b.changed(&alone)).await;
        assert!(
            back.is_err(),
            "a member that left is listed again: {back:?}"
        );
        b.leave().await.expect("leave");
    }

    /// A member dropped without `leave` (as when its process dies) stays listed while it lives,
    /// through a whole lease, and drops out after: at once where the store sees the death (a
    /// file lock), else once its lease expires. Enrolled again (a restart), it is listed only
    /// once it announces.
    pub async fn a_dropped_member_drops_out(&self) {
        let g = self.group("members-crash");
        let mut a = self.enroll(&g, "a").await;
        let mut b = self.enroll(&g, "b").await;
        announce(&mut *a, &["e1"]).await;
        announce(&mut *b, &["e1"]).await;
        let both = [member("a", &["e1"]), member("b", &["e1"])];
        until_members(&mut *b, &both, PROMPTLY, "b").await;
        let alive = self.timing.lease_duration + QUIET;
        let stayed = timeout(alive, b.changed(&both)).await;
        assert!(
            stayed.is_err(),
            "a live member must stay listed through {alive:?}, kept alive by the store: {stayed:?}"
        );
        drop(a);
        let within = self.timing.lease_duration + PROMPTLY;
        let alone = [member("b", &["e1"])];
        until_members(&mut *b, &alone, within, "b after a vanished").await;
        // a restarts: enrolled again, it is not listed with what it announced before.
        let mut again = self.enroll(&g, "a").await;
        let now = timeout(PROMPTLY, again.changed(&[member("nobody", &[])]))
            .await
            .expect("changed answers at once when the members differ")
            .expect("changed");
        assert_eq!(
            now, alone,
            "a restarted member is listed before it announced"
        );
        announce(&mut *again, &["e2"]).await;
        let back = [member("a", &["e2"]), member("b", &["e1"])];
        until_members(&mut *b, &back, PROMPTLY, "b after a restarted").await;
        again.leave().await.expect("leave");
        b.leave().await.expect("leave");
    }

    /// A second live enrollment of one identity in one group is refused, with an error naming
    /// both, and leaves the first as it was. Once the first left, the identity enrolls again,
    /// and the first's late drop does not touch the new membership.
    pub async fn one_identity_is_one_live_member(&self) {
        let g = self.group("members-twin");
        let mut twin = self.enroll(&g, "twin").await;
        let mut other = self.enroll(&g, "other").await;
        announce(&mut *twin, &["e1"]).await;
        announce(&mut *other, &["e1"]).await;
        let both = [member("other", &["e1"]), member("twin", &["e1"])];
        until_members(&mut *other, &both, PROMPTLY, "other").await;
        let second = timeout(PROMPTLY, self.store.enroll(&g, "twin", self.timing))
            .await
            .expect("a second enrollment of a live identity is answered within PROMPTLY");
        match second {
            Ok(_) => panic!("a second live enrollment of twin in {g} must be refused"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("twin") && text.contains(&g),
                    "the refusal names the identity and the group: {text}"
                );
            }
        }
        members_stay(&mut *other, &both, "other after twin was refused").await;

        twin.leave().await.expect("twin leaves");
        let mut again = self.enroll(&g, "twin").await;
        let alone = [member("other", &["e1"])];
        until_members(
            &mut *other,
            &alone,
            PROMPTLY,
            "other before twin announced again",
        )
        .await;
        announce(&mut *again, &["e2"]).await;
        let back = [member("other", &["e1"]), member("twin", &["e2"])];
        until_members(
            &mut *other,
            &back,
            PROMPTLY,
            "other after twin enrolled again",
        )
        .await;
        drop(twin);
        members_stay(&mut *other, &back, "other after the first twin was dropped").await;
        again.leave().await.expect("leave");
        other.leave().await.expect("leave");
    }

    /// `changed` calls dropped while they wait cost nothing: the next call still reports a
    /// change. Some calls are dropped while a change lands (woken, their notification taken,
    /// their read cut off); when that happens depends on the scheduler, so it is tried in
    /// several rounds.
    pub async fn cancelled_changed_misses_nothing(&self) {
        let g = self.group("members-cancel");
        let mut a = self.enroll(&g, "a").await;
        let mut b = self.enroll(&g, "b").await;
        announce(&mut *a, &["e1"]).await;
        announce(&mut *b, &["e1"]).await;
        let mut seen = vec![member("a", &["e1"]), member("b", &["e1"])];
        until_members(&mut *b, &seen, PROMPTLY, "b").await;
        members_stay(&mut *b, &seen, "b, its call dropped").await;
        for names in [&["e2"][..], &["e1", "e2"], &["e1"]] {
            let later = eligible(names);
            let mut pending = b.changed(&seen);
            if let Ok(early) = timeout(QUIET, &mut pending).await {
                panic!("changed reported {early:?} though nothing changed");
            }
            // Drop the waiting call as soon as a's announce returns.
            let raced = tokio::select! {
                biased;
                announced = a.announce(&later) => Some(announced),
                _ = &mut pending => None,
            };
            drop(pending);
            match raced {
                Some(announced) => announced.expect("announce"),
                // The call finished first and cut the announce off: announce again.
                None => a.announce(&later).await.expect("announce"),
            }
            seen = vec![member("a", names), member("b", &["e1"])];
            let what =
                format!("b after its call waiting for a's announce of {names:?} was dropped");
            until_members(&mut *b, &seen, PROMPTLY, &what).await;
        }
        a.leave().await.expect("leave");
        b.leave().await.expect("leave");
    }

    /// With the election's last term at the largest the store can record (`max_out` forges it,
    /// as only the store's own tests know how), a candidate is refused as invalid data instead
    /// of being handed a term that is not greater. Not in [`Suite::test_all`] for that reason.
    pub async fn refuses_a_term_past_the_maximum(&self, max_out: impl FnOnce(&str)) {
        let e = self.election("term-max");
        let mut a = self.join(&e, "a").await;
        max_out(&e);
        let mut seen = Observation::default();
        let refused = timeout(PROMPTLY, async {
            loop {
                match a.acquire(&seen).await {
                    Ok(Acquired::Held(h)) => panic!("acquired term {} past the maximum", h.term),
                    Ok(Acquired::Observed(now)) => seen = now,
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("a campaign on an exhausted term is refused promptly");
        assert_eq!(refused.kind(), ErrorKind::Invalid, "{refused}");
    }
}

fn eligible(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn member(identity: &str, names: &[&str]) -> Member {
    Member {
        identity: identity.to_owned(),
        eligible: eligible(names),
    }
}

async fn announce(m: &mut dyn Membership, names: &[&str]) {
    let set = eligible(names);
    if let Err(e) = timeout(PROMPTLY, m.announce(&set))
        .await
        .expect("announce answers within PROMPTLY")
    {
        panic!("announce {names:?}: {e}");
    }
}

/// Call `changed` until it reports `want`; panics, with what it last saw, if that takes longer
/// than `within`.
async fn until_members(m: &mut dyn Membership, want: &[Member], within: Duration, what: &str) {
    let mut seen = Vec::new();
    let reached = timeout(within, async {
        while seen != want {
            match m.changed(&seen).await {
                Ok(now) => seen = now,
                Err(e) => panic!("{what}: changed failed: {e}"),
            }
        }
    })
    .await;
    if reached.is_err() {
        panic!("{what}: members not {want:?} within {within:?}; last saw {seen:?}");
    }
}

/// Call `changed` for `QUIET`; panics if it reports anything but `seen`.
async fn members_stay(m: &mut dyn Membership, seen: &[Member], what: &str) {
    match timeout(QUIET, m.changed(seen)).await {
        Err(_) => {}
        Ok(Ok(now)) => panic!("{what}: members changed from {seen:?} to {now:?}"),
        Ok(Err(e)) => panic!("{what}: changed failed: {e}"),
    }
}
