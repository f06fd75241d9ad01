//! The behaviours every store must show, as one suite that each backend runs (after openraft's
//! `Suite::test_all`): the memory and file stores in unit tests, etcd and Kubernetes in
//! integration tests against real (or, for Kubernetes, test-double) servers.
//!
//! Each check uses fresh election names, so one store instance can run them all. A failed check
//! panics with a message saying which behaviour broke.

use std::{sync::Arc, time::Duration};

use tokio::time::{Instant, timeout};

use super::{Acquired, Candidate, ErrorKind, Holding, Observation, Store};
use crate::timing::Timing;

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
/// How long a candidate that must not win is given to (wrongly) win.
const QUIET: Duration = Duration::from_millis(300);

impl Suite {
    /// A suite over `store` with `timing`. Use a short lease: the crash check waits for one.
    pub fn new(store: Arc<dyn Store>, timing: Timing, prefix: &str) -> Self {
        Suite {
            store,
            timing,
            prefix: prefix.to_owned(),
        }
    }

    /// Run every check.
    pub async fn test_all(&self) {
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

    fn election(&self, check: &str) -> String {
        format!("{}{check}", self.prefix)
    }

    async fn join(&self, election: &str, identity: &str) -> Box<dyn Candidate> {
        match self.store.join(election, identity, self.timing).await {
            Ok(candidate) => candidate,
            Err(e) => panic!("{identity} cannot join {election}: {e}"),
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
