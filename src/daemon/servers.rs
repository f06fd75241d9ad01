//! The daemon's listeners and servers: the gRPC API on `--listen` (Leadership, health and
//! reflection behind one router), the probe server on `--health-listen` and the metrics
//! endpoint on `--metrics-listen`, each under its connection cap (see `crate::limits`).
//! Everything that can be refused is bound or built before any election starts.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{
    Server,
    server::{Router, TcpIncoming},
};

use super::{DaemonError, health::HealthGrpc};
use crate::{
    config::Config,
    limits::{CappedListener, Caps, capped},
    listen::{Listener, Socket, SocketFile},
    metrics::{Metrics, MetricsError},
    proto,
    server::LeadershipService,
};

/// Streams one connection may open on `--listen`: a worker process follows a few elections, a
/// fan-out test puts 100 on a connection.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Streams one connection may open on `--health-listen` (a probe makes one call at a time).
const MAX_STREAMS_PER_PROBE: u32 = 16;
/// A health check answers at once; one that does not is cut off.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on idle connections: a peer that does not answer within the timeout is gone,
/// and its connection (and its place under the cap) is freed.
const HTTP2_KEEPALIVE: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keep-alive probes after this much silence find peers that vanished without a FIN.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The limits every gRPC server of the daemon keeps.
fn limited(builder: Server, streams: u32) -> Server {
    builder
        .max_concurrent_streams(streams)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

/// The optional listeners, bound before anything starts so that a bad address is refused first.
pub(super) struct SideListeners {
    metrics: Option<TcpListener>,
    health: Option<TcpListener>,
}

impl SideListeners {
    /// Bind `--metrics-listen` and `--health-listen` if set.
    ///
    /// # Errors
    /// An address cannot be bound (the error names its flag).
    pub(super) async fn bind(config: &Config) -> Result<SideListeners, DaemonError> {
        let metrics = match config.metrics_listen {
            Some(addr) => Some(Metrics::bind(addr).await?),
            None => None,
        };
        let health = match config.health_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| DaemonError::HealthListen { addr, source })?,
            ),
            None => None,
        };
        Ok(SideListeners { metrics, health })
    }

    /// The metrics registry, if metrics are served.
    pub(super) fn metrics_registry(&self) -> Option<Arc<Metrics>> {
        self.metrics.as_ref().map(|_| Arc::new(Metrics::new()))
    }
}

/// The API server, built (TLS and reflection) but not serving yet.
pub(super) struct Api {
    router: Router,
    socket: Socket,
    /// The `--listen` address, for the log.
    pub(super) local: String,
    /// Whether it serves TLS.
    pub(super) tls: bool,
}

impl Api {
    /// Build the API server for `listener`.
    ///
    /// # Errors
    /// The TLS configuration or the reflection descriptors are unusable.
    pub(super) fn build(listener: Listener) -> Result<Api, DaemonError> {
        let local = listener.local_addr();
        let tls = listener.is_tls();
        if listener.is_remote() && !tls {
            tracing::warn!(listen = %local,
                "serving plaintext gRPC beyond loopback: whoever reaches it can resign this \
                 replica; consider --tls-cert-file and --tls-client-ca-file");
        }
        let Listener {
            socket,
            tls: tls_config,
        } = listener;
        let mut builder = limited(Server::builder(), MAX_STREAMS_PER_CONNECTION);
        if let Some(tls_config) = tls_config {
            builder = builder.tls_config(tls_config)?;
        }
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let router = builder
            .add_service(reflection().build_v1()?)
            .add_service(reflection().build_v1alpha()?);
        Ok(Api {
            router,
            socket,
            local,
            tls,
        })
    }
}

/// The running servers, and what stops them.
pub(super) struct Servers {
    pub(super) api: JoinHandle<Result<(), tonic::transport::Error>>,
    pub(super) health: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    pub(super) metrics: Option<JoinHandle<Result<(), MetricsError>>>,
    /// Stops the gRPC servers.
    pub(super) stop: CancellationToken,
    /// Stops the metrics endpoint.
    pub(super) stop_metrics: CancellationToken,
    /// Held until the end: dropping it removes the socket file.
    pub(super) socket_file: Option<SocketFile>,
    /// The bound `--health-listen` and `--metrics-listen` addresses, for the log.
    pub(super) health_addr: Option<SocketAddr>,
    pub(super) metrics_addr: Option<SocketAddr>,
}

impl Servers {
    /// Start serving `leadership` and `health` on the API listener, the probe server and the
    /// metrics endpoint, with connection caps that leave `for_elections` descriptors to the
    /// elections.
    pub(super) fn start(
        api: Api,
        side: SideListeners,
        leadership: LeadershipService,
        health: &HealthGrpc,
        metrics: Option<Arc<Metrics>>,
        for_elections: u64,
    ) -> Servers {
        let caps = Caps::from_descriptor_limit(for_elections);
        let stop = CancellationToken::new();
        let router = api
            .router
            .add_service(health.clone())
            .add_service(leadership.into_server());
        let (api_task, socket_file) = serve_api(router, api.socket, caps.api, stopped(&stop));
        let health_addr = side.health.as_ref().and_then(|l| l.local_addr().ok());
        let health_task = side
            .health
            .map(|listener| serve_probes(listener, health.clone(), caps.health, stopped(&stop)));
        let stop_metrics = CancellationToken::new();
        let metrics_addr = side.metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_task = match (metrics, side.metrics) {
            (Some(metrics), Some(listener)) => {
                let listener = CappedListener::new(listener, caps.metrics, "metrics-listen");
                Some(tokio::spawn(metrics.serve(listener, stop_metrics.clone())))
            }
            _ => None,
        };
        Servers {
            api: api_task,
            health: health_task,
            metrics: metrics_task,
            stop,
            stop_metrics,
            socket_file,
            health_addr,
            metrics_addr,
        }
    }
}

/// Serve grpc.health.v1 alone on `listener` (`--health-listen`) until `stopped` resolves.
fn serve_probes(
    listener: TcpListener,
    service: HealthGrpc,
    cap: usize,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    tokio::spawn(
        limited(Server::builder(), MAX_STREAMS_PER_PROBE)
            .timeout(PROBE_TIMEOUT)
            .add_service(service)
            .serve_with_incoming_shutdown(
                capped(
                    TcpIncoming::from(listener).with_keepalive(Some(TCP_KEEPALIVE)),
                    cap,
                    "health-listen",
                ),
                stopped,
            ),
    )
}

fn stopped(stop: &CancellationToken) -> impl Future<Output = ()> + Send + 'static {
    stop.clone().cancelled_owned()
}

/// Serve `router` on the API socket; returns the task and the socket file to keep.
fn serve_api(
    router: Router,
    socket: Socket,
    cap: usize,
    stopped: impl Future<Output = ()> + Send + 'static,
) -> (
    JoinHandle<Result<(), tonic::transport::Error>>,
    Option<SocketFile>,
) {
    match socket {
        Socket::Tcp(listener) => {
            // No Nagle: with delayed ACKs it would hold a small frame ~40 ms.
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(TCP_KEEPALIVE));
            let task =
                router.serve_with_incoming_shutdown(capped(incoming, cap, "listen"), stopped);
            (tokio::spawn(task), None)
        }
        Socket::Unix(listener, file) => {
            let incoming = capped(UnixListenerStream::new(listener), cap, "listen");
            let task = router.serve_with_incoming_shutdown(incoming, stopped);
            (tokio::spawn(task), Some(file))
        }
    }
}
