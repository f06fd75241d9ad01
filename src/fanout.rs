//! WatchLeadership fan-out, woken connection by connection.
//!
//! Every WatchLeadership stream is its own task, and its connection's task writes the frames
//! the stream tasks hand it (see [`crate::coalesce`]). If the streams wait on the election's
//! `watch` channel directly, a change wakes them in an order that has nothing to do with their
//! connections (tokio spreads a channel's waiters over several lists at random), so each
//! connection's frames trickle in among everyone else's and leave a few per write.
//!
//! [`Fanout`] is the one waiter on the channel. On a change it wakes the waiting streams in
//! the order of the connection they arrived on, so a connection's streams run back to back and
//! their frames leave together. Only the order of the wake-ups changes: like a stream over the
//! channel, a [`Watch`] only says "changed", and its user reads the state when it is polled, so
//! it skips states that were replaced before its turn.

use std::{
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
};

use futures::Stream;
use tokio::sync::watch;

/// Where a stream's wake-up comes in the order: a hash of its connection's peer address (the
/// same for all streams of a Unix socket), then the order the streams were opened in.
type Key = (u64, u64);

/// Wakes an election's WatchLeadership streams on each change, grouped by connection.
#[derive(Clone)]
pub struct Fanout {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Bumped on every change, under the `waiters` lock; read without it by a stream that is
    /// not yet up to date.
    version: AtomicU64,
    /// The election's state channel closed (the election has stopped): set before the last
    /// bump of `version`.
    closed: AtomicBool,
    waiters: Mutex<Waiters>,
}

#[derive(Default)]
struct Waiters {
    /// Streams opened so far; the last part of each stream's key.
    opened: u64,
    /// The streams waiting for the next version. A stream that goes away leaves `None`.
    waiting: Vec<(Key, Option<Waker>)>,
}

impl Fanout {
    /// Relay `changes` to the streams: a task that runs until the channel closes.
    pub fn spawn<T: Send + Sync + 'static>(mut changes: watch::Receiver<T>) -> Fanout {
        let fanout = Fanout {
            shared: Arc::default(),
        };
        let relay = fanout.clone();
        tokio::spawn(async move {
            loop {
                let open = changes.changed().await.is_ok();
                let mut woken = {
                    let mut waiters = relay.lock();
                    let shared = &relay.shared;
                    shared.closed.store(!open, Ordering::Relaxed);
                    shared.version.fetch_add(1, Ordering::Release);
                    std::mem::take(&mut waiters.waiting)
                };
                // Connection by connection.
                woken.sort_unstable_by_key(|(key, _)| *key);
                woken
                    .into_iter()
                    .filter_map(|(_, w)| w)
                    .for_each(Waker::wake);
                if !open {
                    return;
                }
            }
        });
        fanout
    }

    /// A stream of "changed" for a client on `peer`: one item at once, then one per wake-up
    /// after a change (changes made before the stream is polled count once). It ends when the
    /// channel closes.
    pub fn watch(&self, peer: Option<SocketAddr>) -> Watch {
        let connection = BuildHasherDefault::<DefaultHasher>::default().hash_one(peer);
        let mut waiters = self.lock();
        waiters.opened += 1;
        Watch {
            fanout: self.clone(),
            key: (connection, waiters.opened),
            seen: None,
            slot: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        // The lock guards plain data; a panic elsewhere cannot leave it half-updated.
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// One WatchLeadership stream's "changed" signals; see [`Fanout::watch`].
pub struct Watch {
    fanout: Fanout,
    key: Key,
    /// The version whose state this stream last read.
    seen: Option<u64>,
    /// Its place in `waiting` while it waits for the version after `seen`.
    slot: Option<usize>,
}

impl Stream for Watch {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        let Watch {
            fanout,
            key,
            seen,
            slot,
        } = self.get_mut();
        if let Some(item) = news(&fanout.shared, seen, slot) {
            return Poll::Ready(item);
        }
        let mut waiters = fanout.lock();
        // Again under the lock that the relay bumps the version under: no change can slip
        // between this check and the registration.
        if let Some(item) = news(&fanout.shared, seen, slot) {
            return Poll::Ready(item);
        }
        match *slot {
            Some(at) => match &mut waiters.waiting[at].1 {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                waker => *waker = Some(cx.waker().clone()),
            },
            None => {
                *slot = Some(waiters.waiting.len());
                waiters.waiting.push((*key, Some(cx.waker().clone())));
            }
        }
        Poll::Pending
    }
}

/// What a stream that last saw `seen` yields without waiting, if anything: the end, or a
/// change (then it has seen it, and its old place in the waiting list is gone).
fn news(shared: &Shared, seen: &mut Option<u64>, slot: &mut Option<usize>) -> Option<Option<()>> {
    let version = shared.version.load(Ordering::Acquire);
    if seen.is_some() && shared.closed.load(Ordering::Relaxed) {
        return Some(None);
    }
    if *seen == Some(version) {
        return None;
    }
    *seen = Some(version);
    *slot = None;
    Some(Some(()))
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut waiters = self.fanout.lock();
        let version = self.fanout.shared.version.load(Ordering::Relaxed);
        if let Some(slot) = self.slot
            && self.seen == Some(version)
        {
            waiters.waiting[slot].1 = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{Arc, Mutex},
        task::Wake,
        time::Duration,
    };

    use futures::{FutureExt, StreamExt};

    use super::*;

    /// Records, in a shared log, that stream `index` was woken.
    struct Logged {
        index: usize,
        log: Arc<Mutex<Vec<usize>>>,
    }

    impl Wake for Logged {
        fn wake(self: Arc<Self>) {
            self.log.lock().unwrap().push(self.index);
        }
    }

    /// Poll `watch` once with a waker that logs `index`.
    fn poll(watch: &mut Watch, index: usize, log: &Arc<Mutex<Vec<usize>>>) -> Poll<Option<()>> {
        let waker = Waker::from(Arc::new(Logged {
            index,
            log: log.clone(),
        }));
        Pin::new(watch).poll_next(&mut Context::from_waker(&waker))
    }

    /// Wait until the relay has logged `n` wake-ups.
    async fn woken(log: &Arc<Mutex<Vec<usize>>>, n: usize) -> Vec<usize> {
        tokio::time::timeout(Duration::from_secs(5), async {
            while log.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the relay wakes the waiting streams");
        std::mem::take(&mut *log.lock().unwrap())
    }

    fn peer(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[tokio::test]
    async fn a_change_wakes_the_streams_connection_by_connection() {
        let (tx, rx) = watch::channel(0);
        let fanout = Fanout::spawn(rx);
        // Opened interleaved: connections 1, 2, 3, 1, 2, 3, ...
        let peers: Vec<u16> = (0..12).map(|i| 40_000 + i % 3).collect();
        let mut streams: Vec<Watch> = peers.iter().map(|&p| fanout.watch(peer(p))).collect();
        let log = Arc::default();
        for (i, watch) in streams.iter_mut().enumerate() {
            assert_eq!(poll(watch, i, &log), Poll::Ready(Some(())), "first poll");
            assert_eq!(poll(watch, i, &log), Poll::Pending, "nothing new");
        }

        tx.send(1).unwrap();
        let order = woken(&log, streams.len()).await;
        let connections: Vec<u16> = order.iter().map(|&i| peers[i]).collect();
        let mut runs = connections.clone();
        runs.dedup();
        assert_eq!(runs.len(), 3, "one run per connection: {connections:?}");
        for port in [40_000, 40_001, 40_002] {
            let opened: Vec<usize> = (0..12).filter(|&i| peers[i] == port).collect();
            let within: Vec<usize> = order
                .iter()
                .copied()
                .filter(|&i| peers[i] == port)
                .collect();
            assert_eq!(
                within, opened,
                "in the order opened within connection {port}"
            );
        }
        for (i, watch) in streams.iter_mut().enumerate() {
            assert_eq!(
                poll(watch, i, &log),
                Poll::Ready(Some(())),
                "stream {i} changed"
            );
        }
    }

    #[tokio::test]
    async fn changes_before_a_poll_count_once_and_none_is_lost() {
        let (tx, rx) = watch::channel(0);
        let fanout = Fanout::spawn(rx);
        let mut watch = fanout.watch(None);
        let log = Arc::default();
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        assert_eq!(poll(&mut watch, 0, &log), Poll::Pending);
        // Polled again before the change: one registration, one wake-up.
        assert_eq!(poll(&mut watch, 0, &log), Poll::Pending);
        tx.send(1).unwrap();
        assert_eq!(woken(&log, 1).await, [0]);
        tx.send(2).unwrap();
        tx.send(3).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        assert_eq!(
            poll(&mut watch, 0, &log),
            Poll::Pending,
            "one item for three changes"
        );
        // A change after the registration wakes it.
        tx.send(4).unwrap();
        assert_eq!(woken(&log, 1).await, [0]);
        assert_eq!(poll(&mut watch, 0, &log), Poll::Ready(Some(())));
        assert!(log.lock().unwrap().is_empty(), "no extra wake-ups");
    }

    #[tokio::test]
    async fn a_dropped_stream_is_not_woken_and_closing_ends_the_others() {
        let (tx, rx) = watch::channel(0);
        let fanout = Fanout::spawn(rx);
        let (mut kept, mut dropped) = (fanout.watch(peer(1)), fanout.watch(peer(2)));
        let log = Arc::default();
        for (i, watch) in [&mut kept, &mut dropped].into_iter().enumerate() {
            assert_eq!(poll(watch, i, &log), Poll::Ready(Some(())));
            assert_eq!(poll(watch, i, &log), Poll::Pending);
        }
        drop(dropped);
        drop(tx);
        assert_eq!(woken(&log, 1).await, [0], "only the stream still open");
        assert_eq!(poll(&mut kept, 0, &log), Poll::Ready(None), "ended");
        // A stream opened after the close still gives its first item, then ends.
        let mut late = fanout.watch(peer(3));
        assert_eq!(late.next().now_or_never(), Some(Some(())));
        assert_eq!(late.next().now_or_never(), Some(None));
    }
}
