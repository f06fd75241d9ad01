//! Write coalescing for the daemon's gRPC connections.
//!
//! One leadership change becomes one small DATA frame on every WatchLeadership stream. Each
//! stream's frame is produced by its own task, and the connection's task writes the frames. Left
//! alone, the runtime runs the connection's task right after the first stream's task has woken
//! it, so the frames of a connection leave in about one `writev` each: at 10,000 subscribers on
//! 100 connections, about 10,500 write calls per change (PERFORMANCE.md has the figures).
//!
//! [`Coalesced`] lets the other ready tasks run first: the first write after a flush yields to
//! the scheduler once (the task wakes itself, so it only waits its turn), then writes
//! everything queued by then. The wait is the work of the tasks already queued: nothing on an
//! idle daemon, and during a fan-out the very work being batched. What is queued by then is
//! mostly the connection's own streams, because [`crate::fanout`] wakes them back to back.
//!
//! Under TLS, tonic puts rustls above this wrapper; rustls takes the plaintext and writes the
//! records through at its flush, so TLS connections are not coalesced.
//!
//! The wrapper also numbers its connection, for [`crate::fanout`] to group the streams by: the
//! number reaches each request as its connect info, [`ConnectionNumber`]. It replaces the
//! transport's (peer address, credentials), which nothing here reads.

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection whose first write after each flush yields to the scheduler once.
#[derive(Debug)]
pub struct Coalesced<T> {
    inner: T,
    /// Whether the next write yields first: set by a completed flush.
    yield_next: bool,
    /// This connection's number in this process.
    number: u64,
}

/// A connection's number in this process, distinct for every connection the daemon accepts:
/// the connect info tonic puts in each request's extensions (under TLS, inside its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionNumber(pub u64);

impl<T> Coalesced<T> {
    /// Wrap an accepted connection, giving it the next number.
    pub fn new(inner: T) -> Self {
        static ACCEPTED: AtomicU64 = AtomicU64::new(0);
        Coalesced {
            inner,
            yield_next: true,
            number: ACCEPTED.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Pending once, with the task woken, on the first write of a burst.
    fn take_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::take(&mut self.yield_next) {
            cx.waker().wake_by_ref();
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.take_turn(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.take_turn(cx));
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if flushed.is_ready() {
            self.yield_next = true;
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> Connected for Coalesced<T> {
    type ConnectInfo = ConnectionNumber;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnectionNumber(self.number)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_first_write_after_a_flush_yields_once_and_wakes_its_task() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut conn = Coalesced::new(Vec::new());
        let mut conn = Pin::new(&mut conn);

        assert!(conn.as_mut().poll_write(&mut cx, b"one").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "it wakes itself");
        assert!(conn.inner.is_empty(), "nothing written while yielding");

        // Then writes go through until a flush.
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"one"),
            Poll::Ready(Ok(3))
        ));
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"two"),
            Poll::Ready(Ok(3))
        ));
        assert!(conn.as_mut().poll_flush(&mut cx).is_ready());
        assert_eq!(conn.inner, b"onetwo");

        // A flush starts a new burst.
        assert!(conn.as_mut().poll_write(&mut cx, b"three").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            conn.as_mut().poll_write(&mut cx, b"three"),
            Poll::Ready(Ok(5))
        ));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2, "one yield per burst");
    }
}
