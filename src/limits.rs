//! Connection caps for the daemon's listeners. Every accepted connection holds a permit of its
//! listener's semaphore until it closes; past the cap a new connection is closed at once. The
//! caps are sized from the descriptor limit, so that a flood of connections (the probe port is
//! reachable from any pod) cannot take the descriptors the elections need for their store
//! connections and lock files, and bound the memory that idle connections hold.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tonic::transport::server::Connected;

/// Descriptors kept for everything but the listeners' connections and what the elections hold
/// open themselves: store connections, inotify, logs, the runtime.
const RESERVED: u64 = 128;
/// The most connections on the gRPC listener (workers, `baton status`, port-forwards).
const API_MAX: usize = 4096;
/// The most connections on the health and the metrics listener (probes, scrapers).
const PROBE_MAX: usize = 64;

/// How many connections each listener may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// `--listen`.
    pub api: usize,
    /// `--health-listen`.
    pub health: usize,
    /// `--metrics-listen`.
    pub metrics: usize,
}

impl Caps {
    /// Caps that fit under this process's soft `RLIMIT_NOFILE`, leaving `for_elections`
    /// descriptors to the elections (see [`crate::store::Store::descriptors_per_election`]).
    pub fn from_descriptor_limit(for_elections: u64) -> Caps {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Caps::for_limit(soft, for_elections)
    }

    /// Caps for a descriptor limit of `soft`, `for_elections` of them held by the elections:
    /// half of what is not reserved for the gRPC listener, an eighth each for the probe
    /// listeners, at least one each.
    pub fn for_limit(soft: u64, for_elections: u64) -> Caps {
        let reserved = RESERVED.saturating_add(for_elections);
        let spare = usize::try_from(soft.saturating_sub(reserved)).unwrap_or(usize::MAX);
        Caps {
            api: (spare / 2).clamp(1, API_MAX),
            health: (spare / 8).clamp(1, PROBE_MAX),
            metrics: (spare / 8).clamp(1, PROBE_MAX),
        }
    }
}

/// The permits of one listener, and whether it is refusing connections now (for one log line
/// per episode rather than one per connection).
#[derive(Clone)]
struct Gate {
    permits: Arc<Semaphore>,
    full: Arc<AtomicBool>,
    cap: usize,
    listener: &'static str,
}

impl Gate {
    fn new(cap: usize, listener: &'static str) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(cap)),
            full: Arc::default(),
            cap,
            listener,
        }
    }

    /// Admit `io`, or close it (drop) when the listener is at its cap.
    fn admit<IO>(&self, io: IO) -> Option<Capped<IO>> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                if self.full.swap(false, Ordering::Relaxed) {
                    tracing::info!(listener = self.listener, "accepting connections again");
                }
                Some(Capped {
                    io,
                    _permit: permit,
                })
            }
            Err(_) => {
                if !self.full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        listener = self.listener,
                        cap = self.cap,
                        "connection cap reached; closing new connections until some close"
                    );
                }
                None
            }
        }
    }
}

/// `incoming` with at most `cap` connections open at once.
pub fn capped<S, IO, E>(
    incoming: S,
    cap: usize,
    listener: &'static str,
) -> impl Stream<Item = Result<Capped<IO>, E>>
where
    S: Stream<Item = Result<IO, E>>,
{
    let gate = Gate::new(cap, listener);
    incoming.filter_map(move |accepted| {
        let admitted = match accepted {
            Ok(io) => gate.admit(io).map(Ok),
            Err(e) => Some(Err(e)),
        };
        std::future::ready(admitted)
    })
}

/// A TCP listener with a cap, for axum (the metrics endpoint).
pub struct CappedListener {
    listener: TcpListener,
    gate: Gate,
}

impl CappedListener {
    /// `listener` with at most `cap` connections open at once.
    pub fn new(listener: TcpListener, cap: usize, name: &'static str) -> Self {
        CappedListener {
            listener,
            gate: Gate::new(cap, name),
        }
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = Capped<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (io, addr) = axum::serve::Listener::accept(&mut self.listener).await;
            if let Some(io) = self.gate.admit(io) {
                return (io, addr);
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A connection holding its listener's permit until it is dropped.
pub struct Capped<IO> {
    io: IO,
    _permit: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Capped<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Capped<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Capped<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_stay_under_the_descriptor_limit() {
        let low = Caps::for_limit(256, 0);
        assert_eq!((low.api, low.health, low.metrics), (64, 16, 16));
        assert!(((low.api + low.health + low.metrics) as u64) < 256 - RESERVED);
        let high = Caps::for_limit(1 << 20, 0);
        assert_eq!((high.api, high.health, high.metrics), (4096, 64, 64));
        let none = Caps::for_limit(64, 0);
        assert_eq!((none.api, none.health, none.metrics), (1, 1, 1));
        // 300 file-store elections under the common default of 1024: their files are left room.
        let many = Caps::for_limit(1024, 600);
        assert_eq!((many.api, many.health, many.metrics), (148, 37, 37));
        let used = (many.api + many.health + many.metrics) as u64;
        assert!(used + RESERVED + 600 <= 1024);
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_is_closed_and_a_freed_place_is_reused() {
        let accepted = futures::stream::iter([Ok::<_, io::Error>(1), Ok(2), Ok(3)]);
        let gate = Gate::new(2, "test");
        let first = gate.admit(1).expect("first");
        assert!(gate.admit(2).is_some_and(|c| c.io == 2), "second");
        // The second was dropped above: its place is free again.
        assert!(gate.admit(3).is_some());
        let _held = gate.admit(4).expect("two open: 1 and 4");
        assert!(gate.admit(5).is_none(), "a third is refused");
        drop(first);
        assert!(gate.admit(6).is_some());
        let admitted: Vec<_> = capped(accepted, 2, "test").collect().await;
        assert_eq!(
            admitted.len(),
            2,
            "the third of three held at once is closed"
        );
    }
}
