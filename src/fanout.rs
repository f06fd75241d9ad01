//! WatchLeadership fan-out, woken connection by connection.
//!
//! Every WatchLeadership stream is its own task, and its connection's task writes the frames
//! the stream tasks hand it (see [`crate::coalesce`]). If the streams wait on the election's
//! `watch` channel directly, a change wakes them in an order that has nothing to do with their
//! connections (tokio spreads a channel's waiters over several lists at random), so each
//! connection's frames trickle in among everyone else's and leave a few per write.
//!
//! [`Fanout`] is the one waiter on the channel. On a change it wakes the streams grouped by the
//! connection they arrived on (the number [`crate::coalesce::Coalesced`] gives it), so a
//! connection's streams mostly run back to back and their frames leave together. The group that
//! goes first is picked at random on each change, so no connection is always last.
//!
//! Each stream leaves its waker in a [`Slot`] of its own, which the relay knows from the
//! stream's opening on and wakes by reference on every change, so the waker stays there. A
//! stream polled by the same task as before (the usual case) waits again without writing
//! anything shared: it keeps a copy of the waker it left, and only a different one is written
//! to the slot. (Waiting in a shared list, locked by each stream after each change, was a tenth
//! of the daemon's CPU at 10,000 streams, most of it the lock's cache line moving between
//! cores; a waker taken by each wake-up and registered again cost half as much.) The shared
//! lock is taken only when a stream opens or closes, and by the relay once per change.
//!
//! Only the order of the wake-ups changes: like a stream over the channel, a [`Watch`] only
//! says "changed", and its user reads the state when it is polled, so it skips states that were
//! replaced before its turn; and when the channel closes, a stream still yields the last change
//! it has not seen before it ends.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use futures::Stream;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;

/// Where a stream's wake-up comes in the order: its connection's number, then the order the
/// streams were opened in.
type Key = (u64, u64);

/// Wakes an election's WatchLeadership streams on each change, grouped by connection.
#[derive(Clone)]
pub struct Fanout {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// What every stream reads as it is polled, written once per change: kept off the cache
    /// line of `streams`' lock.
    news: News,
    streams: Mutex<Streams>,
}

#[derive(Default)]
#[repr(align(128))]
struct News {
    /// Bumped on every change, before the streams are woken.
    version: AtomicU64,
    /// The channel closed (the election has stopped); set without a bump of `version`, so a
    /// stream still yields the change it has not seen before it ends.
    closed: AtomicBool,
}

#[derive(Default)]
struct Streams {
    /// Streams opened so far; the last part of each stream's key.
    opened: u64,
    /// The open streams, in the order they are woken.
    open: BTreeMap<Key, Arc<Slot>>,
    /// A stream opened or closed since the relay last copied `open`.
    reordered: bool,
}

impl Fanout {
    /// Relay `changes` to the streams, from a task that runs until the channel closes or the
    /// returned handle is dropped.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn spawn<T: Send + Sync + 'static>(
        mut changes: watch::Receiver<T>,
    ) -> (Fanout, AbortOnDropHandle<()>) {
        let fanout = Fanout {
            shared: Arc::default(),
        };
        let relay = fanout.clone();
        let task = tokio::spawn(async move {
            // The open streams as of the last opening or closing, in order: copied again only
            // after one. A stream closed since is still woken, which does nothing.
            let mut order: Vec<(u64, Arc<Slot>)> = Vec::new();
            loop {
                let open = changes.changed().await.is_ok();
                let news = &relay.shared.news;
                if open {
                    news.version.fetch_add(1, Ordering::Release);
                } else {
                    news.closed.store(true, Ordering::Release);
                }
                {
                    let mut streams = relay.lock();
                    if std::mem::take(&mut streams.reordered) {
                        order.clear();
                        order.extend(streams.open.iter().map(|(k, s)| (k.0, s.clone())));
                    }
                }
                if !order.is_empty() {
                    let first = order[rand::random_range(0..order.len())].0;
                    let start = order.partition_point(|(connection, _)| *connection < first);
                    let (before, after) = order.split_at(start);
                    after.iter().chain(before).for_each(|(_, slot)| slot.wake());
                }
                if !open {
                    return;
                }
            }
        });
        (fanout, AbortOnDropHandle::new(task))
    }

    /// A stream of "changed" for a client on connection number `connection` (`None`: not
    /// known; such streams form one group): one item at once, then one per wake-up after a
    /// change (changes made before the stream is polled count once). Once the channel has
    /// closed it ends, after the last change it had not seen.
    pub fn watch(&self, connection: Option<u64>) -> Watch {
        let slot = Arc::new(Slot::default());
        let mut streams = self.lock();
        streams.opened += 1;
        let key = (connection.unwrap_or(u64::MAX), streams.opened);
        streams.open.insert(key, slot.clone());
        streams.reordered = true;
        Watch {
            fanout: self.clone(),
            key,
            slot,
            left: None,
            seen: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        // The lock guards plain data; a panic elsewhere cannot leave it half-updated.
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// One WatchLeadership stream's "changed" signals; see [`Fanout::watch`].
pub struct Watch {
    fanout: Fanout,
    key: Key,
    /// Where this stream waits; the relay holds it too.
    slot: Arc<Slot>,
    /// A copy of the waker left in `slot`.
    left: Option<Waker>,
    /// The version this stream last yielded.
    seen: Option<u64>,
}

impl Stream for Watch {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let Watch {
            fanout,
            slot,
            left,
            seen,
            ..
        } = self.get_mut();
        let news = &fanout.shared.news;
        if let ready @ Poll::Ready(_) = news.take(seen) {
            return ready;
        }
        if left.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            // Left there before this stream last looked at `news`: any change since wakes it.
            return Poll::Pending;
        }
        // Leave the waker, then look again: a change made before is seen now, one made after
        // wakes this waker (the relay bumps the version before it wakes).
        *left = Some(cx.waker().clone());
        *slot.lock() = left.clone();
        news.take(seen)
    }
}

/// Where one stream's waker is left for the relay.
#[derive(Default)]
struct Slot {
    waker: Mutex<Option<Waker>>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Option<Waker>> {
        // A plain value; a panic elsewhere cannot leave it half-updated.
        self.waker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake the stream, leaving its waker in place.
    fn wake(&self) {
        if let Some(waker) = &*self.lock() {
            waker.wake_by_ref();
        }
    }
}

impl News {
    /// What a stream that last yielded `seen` yields now without waiting: a change it has not
    /// seen (it has then), the end once the channel has closed, or `Pending`.
    fn take(&self, seen: &mut Option<u64>) -> Poll<Option<()>> {
        // `closed` first: it is set after the last bump, so once it reads true, `version`
        // reads the last change (read the other way round, a close between the two reads
        // would end the stream before the last change).
        let closed = self.closed.load(Ordering::Acquire);
        let version = self.version.load(Ordering::Acquire);
        if *seen != Some(version) {
            *seen = Some(version);
            Poll::Ready(Some(()))
        } else if closed {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The relay's copy of the order may keep the slot until the next change, but not the
        // task it would wake.
        drop(self.slot.lock().take());
        let mut streams = self.fanout.lock();
        streams.open.remove(&self.key);
        streams.reordered = true;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::Arc,
        task::{Wake, Waker},
        time::Duration,
    };

    use futures::{FutureExt, StreamExt};
    use tokio::sync::mpsc;

    use super::*;

    /// Sends `index` down `log` when woken.
    struct Logged {
        index: usize,
        log: mpsc::UnboundedSender<usize>,
    }

    impl Wake for Logged {
        fn wake(self: Arc<Self>) {
            let _ = self.log.send(self.index);
        }
    }

    type Log = (mpsc::UnboundedSender<usize>, mpsc::UnboundedReceiver<usize>);

    /// A waker that logs `index`.
    fn logged(index: usize, log: &Log) -> Waker {
        Waker::from(Arc::new(Logged {
            index,
            log: log.0.clone(),
        }))
    }

    fn poll_with(watch: &mut Watch, waker: &Waker) -> Poll<Option<()>> {
        Pin::new(watch).poll_next(&mut Context::from_waker(waker))
    }

    /// Poll `watch` once with a new waker that logs `index` (another task, as far as the
    /// stream can tell).
    fn poll(watch: &mut Watch, index: usize, log: &Log) -> Poll<Option<()>> {
        poll_with(watch, &logged(index, log))
    }

    /// The next `n` wake-ups, in order.
    async fn woken(log: &mut Log, n: usize) -> Vec<usize> {
        let mut indexes = Vec::new();
        while indexes.len() < n {
            let next = tokio::time::timeout(Duration::from_secs(5), log.1.recv()).await;
            indexes.push(
                next.expect("the relay wakes the waiting streams")
                    .expect("open"),
            );
        }
        indexes
    }

    /// Let the relay run whatever it has to (the tests run on one thread).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_change_wakes_the_streams_connection_by_connection() {
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx);
        // Opened interleaved: connections 1, 2, 3, 1, 2, 3, ...
        let connections: Vec<u64> = (0..12).map(|i| 1 + i % 3).collect();
        let mut streams: Vec<Watch> = connections.iter().map(|&c| fanout.watch(Some(c))).collect();
        let mut log = mpsc::unbounded_channel();
        for (i, watch) in streams.iter_mut().enumerate() {
            assert_eq!(poll(watch, i, &log), Poll::Ready(Some(())), "first poll");
            assert_eq!(poll(watch, i, &log), Poll::Pending, "nothing new");
        }
        let mut firsts = std::collections::BTreeSet::new();
        for change in 1..=30 {
            tx.send(change).unwrap();
            let order = woken(&mut log, streams.len()).await;
            let mut runs: Vec<u64> = order.iter().map(|&i| connections[i]).collect();
            runs.dedup();
            assert_eq!(runs.len(), 3, "one run per connection: {order:?}");
            firsts.insert(runs[0]);
            for connection in 1..=3 {
                let opened: Vec<usize> =
                    (0..12).filter(|&i| connections[i] == connection).collect();
                let within: Vec<usize> = order
                    .iter()
                    .copied()
                    .filter(|&i| connections[i] == connection)
                    .collect();
                assert_eq!(
                    within, opened,
                    "in the order opened on connection {connection}"
                );
            }
            for (i, watch) in streams.iter_mut().enumerate() {
                assert_eq!(
                    poll(watch, i, &log),
                    Poll::Ready(Some(())),
                    "stream {i} changed"
                );
                assert_eq!(poll(watch, i, &log), Poll::Pending);
            }
        }
        // Each connection has a 1 in 3 chance to go first; in 30 changes, all three do but
        // for a chance of about 1 in 10^5.
        assert_eq!(firsts.len(), 3, "the first connection varies: {firsts:?}");
    }

    #[tokio::test]
    async fn changes_before_a_poll_count_once_and_none_is_lost() {
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx);
        let mut watch = fanout.watch(None);
        let mut log = mpsc::unbounded_channel();
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        assert_eq!(poll(&mut watch, 0, &log), Poll::Pending);
        // Polled again with another waker before the change: that one is woken, once.
        assert_eq!(poll(&mut watch, 1, &log), Poll::Pending);
        tx.send(1).unwrap();
        assert_eq!(woken(&mut log, 1).await, [1]);
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        // Two changes while the relay has not run (one thread): one wake-up, one item.
        assert_eq!(poll(&mut watch, 0, &log), Poll::Pending);
        tx.send(2).unwrap();
        tx.send(3).unwrap();
        assert_eq!(woken(&mut log, 1).await, [0]);
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        assert_eq!(
            poll(&mut watch, 0, &log),
            Poll::Pending,
            "one item for two changes"
        );
        settle().await;
        assert!(log.1.try_recv().is_err(), "no extra wake-ups");
    }

    #[tokio::test]
    async fn a_stream_polled_by_the_same_task_waits_once_and_is_woken_by_the_last_waker() {
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx);
        let mut log = mpsc::unbounded_channel();
        let (task, other) = (logged(0, &log), logged(1, &log));
        let mut watch = fanout.watch(Some(1));
        assert_eq!(poll_with(&mut watch, &task), Poll::Ready(Some(())));
        assert_eq!(poll_with(&mut watch, &task), Poll::Pending);
        assert_eq!(poll_with(&mut watch, &task), Poll::Pending, "again");
        for change in 1..=3 {
            tx.send(change).unwrap();
            assert_eq!(woken(&mut log, 1).await, [0], "change {change}");
            assert_eq!(poll_with(&mut watch, &task), Poll::Ready(Some(())));
            assert_eq!(poll_with(&mut watch, &task), Poll::Pending);
        }
        settle().await;
        assert!(log.1.try_recv().is_err(), "once per change");
        // Polled by another task, then by the first again: the first is woken, once.
        assert_eq!(poll_with(&mut watch, &other), Poll::Pending);
        assert_eq!(poll_with(&mut watch, &task), Poll::Pending);
        tx.send(4).unwrap();
        assert_eq!(woken(&mut log, 1).await, [0]);
        settle().await;
        assert!(log.1.try_recv().is_err(), "the other task is not woken");
    }

    #[tokio::test]
    async fn a_stream_yields_the_last_change_before_it_ends() {
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx);
        let (mut waiting, mut behind) = (fanout.watch(Some(1)), fanout.watch(Some(2)));
        let mut log = mpsc::unbounded_channel();
        for (i, watch) in [&mut waiting, &mut behind].into_iter().enumerate() {
            assert_eq!(poll(watch, i, &log), Poll::Ready(Some(())));
        }
        assert_eq!(poll(&mut waiting, 0, &log), Poll::Pending);
        // The election's last state, then it stops: the relay sees both before `waiting`
        // runs again.
        tx.send(1).unwrap();
        drop(tx);
        assert_eq!(woken(&mut log, 1).await, [0]);
        settle().await;
        for (i, watch) in [&mut waiting, &mut behind].into_iter().enumerate() {
            assert_eq!(
                poll(watch, i, &log),
                Poll::Ready(Some(())),
                "stream {i}: last change"
            );
            assert_eq!(
                poll(watch, i, &log),
                Poll::Ready(None),
                "stream {i}: then the end"
            );
        }
        // A stream opened after the close still gives its first item, then ends.
        let mut late = fanout.watch(Some(3));
        assert_eq!(late.next().now_or_never(), Some(Some(())));
        assert_eq!(late.next().now_or_never(), Some(None));
    }

    #[tokio::test]
    async fn a_closed_stream_leaves_nothing_behind() {
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx);
        let mut log = mpsc::unbounded_channel();
        let mut kept = fanout.watch(Some(1));
        assert_eq!(poll(&mut kept, 0, &log), Poll::Ready(Some(())));
        assert_eq!(poll(&mut kept, 0, &log), Poll::Pending);
        // Streams that wait and go away, while nothing changes, leave nothing behind.
        for i in 1..1_000 {
            let mut gone = fanout.watch(Some(2));
            assert_eq!(poll(&mut gone, i, &log), Poll::Ready(Some(())));
            assert_eq!(poll(&mut gone, i, &log), Poll::Pending);
        }
        assert_eq!(fanout.lock().open.len(), 1, "only the kept stream");

        // A stream that closes after a change is not woken by the next one, and the waker it
        // registered is let go at once.
        let mut late = fanout.watch(Some(2));
        assert_eq!(poll(&mut late, 1, &log), Poll::Ready(Some(())));
        assert_eq!(poll(&mut late, 1, &log), Poll::Pending);
        tx.send(1).unwrap();
        let mut both = woken(&mut log, 2).await;
        both.sort();
        assert_eq!(both, [0, 1]);
        for (i, watch) in [&mut kept, &mut late].into_iter().enumerate() {
            assert_eq!(poll(watch, i, &log), Poll::Ready(Some(())));
            assert_eq!(poll(watch, i, &log), Poll::Pending);
        }
        let slot = late.slot.clone();
        drop(late);
        assert!(
            slot.lock().is_none(),
            "the closed stream's waker is dropped"
        );
        tx.send(2).unwrap();
        assert_eq!(woken(&mut log, 1).await, [0], "the kept stream is woken");
        settle().await;
        assert!(log.1.try_recv().is_err(), "and no one else");
        assert_eq!(fanout.lock().open.len(), 1);
    }

    /// Many streams on a multi-threaded runtime, each reading the channel as it goes: each
    /// ends, after reading the last value sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn under_load_every_stream_reads_the_last_value_then_ends() {
        const STREAMS: u64 = 200;
        const CHANGES: u64 = 2_000;
        let (tx, rx) = watch::channel(0);
        let (fanout, _relay) = Fanout::spawn(rx.clone());
        let mut readers = tokio::task::JoinSet::new();
        for i in 0..STREAMS {
            let mut watch = fanout.watch(Some(i % 7));
            let rx = rx.clone();
            readers.spawn(async move {
                let mut last = 0;
                while watch.next().await.is_some() {
                    last = *rx.borrow();
                }
                last
            });
        }
        for value in 1..=CHANGES {
            tx.send(value).unwrap();
            if value % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        drop(tx);
        let all = tokio::time::timeout(Duration::from_secs(30), readers.join_all())
            .await
            .expect("every stream ends once the channel closes");
        assert_eq!(all, vec![CHANGES; STREAMS as usize]);
    }
}
