//! The daemon: opens the store, runs one elector task per election, and serves them over gRPC
//! until `shutdown` resolves; then it steps down gracefully in every election (announce, wait for
//! workers, release) before it stops serving.
//!
//! ```text
//!  --listen (TCP, TLS or Unix socket)  baton.v1.Leadership, grpc.health.v1, reflection
//!  --health-listen (optional)          grpc.health.v1 alone, for Kubernetes gRPC probes
//!  --metrics-listen (optional)         GET /metrics, Prometheus text
//! ```
//!
//! `main.rs` calls [`run`] with a signal future; tests call it with a oneshot.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use futures::{
    StreamExt,
    future::{join_all, select_all},
    stream,
};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::{Config, StoreConfig},
    election::{Election, ElectionConfig, Role},
    limits::{CappedListener, Caps, capped},
    listen::{Listener, Socket},
    metrics::{ElectionMetrics, Metrics, MetricsError},
    proto,
    server::LeadershipService,
    store::{Store, file::FileStore},
};

/// Health service (grpc.health.v1 `service` name) that is SERVING while every election has a
/// subscribed worker: a worker container's liveness probe.
pub const HEALTH_WORKER_ATTACHED: &str = "baton.worker.attached";

/// Health service that is SERVING while every election has a subscribed worker that declared
/// itself ready (warm): a worker container's readiness probe.
pub const HEALTH_WORKER_READY: &str = "baton.worker.ready";

/// Health service of the daemon itself (as `""`): SERVING while every election's store answers.
/// A daemon container's readiness probe.
pub const HEALTH_LEADERSHIP: &str = "baton.v1.Leadership";

/// Health service that is SERVING from the start until the daemon has stepped down: a daemon
/// container's liveness probe (an unreachable store is no reason to restart the daemon).
pub const HEALTH_LIVE: &str = "baton.live";

/// How long the server waits for open calls to finish once the elections have stopped.
const SERVER_GRACE: Duration = Duration::from_secs(2);
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

/// The limits every gRPC server of the daemon keeps (see `crate::limits` for the connection
/// caps).
fn limited(builder: Server, streams: u32) -> Server {
    builder
        .max_concurrent_streams(streams)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The file store's lock directory is unusable.
    #[error("--lock-dir: {0}")]
    LockDir(#[source] crate::store::file::FileError),
    /// The Kubernetes store has no usable configuration (kubeconfig or in-cluster).
    #[cfg(feature = "kubernetes")]
    #[error("--store kubernetes: {0}")]
    Kubernetes(#[source] crate::store::kubernetes::KubernetesError),
    /// The etcd store's configuration is unusable (a TLS or password file cannot be read).
    #[cfg(feature = "etcd")]
    #[error("{0}")]
    EtcdConfig(#[source] crate::store::etcd::EtcdError),
    /// `--store etcd` in a build without the etcd store (normally refused by the config).
    #[error("--store etcd: this baton was built without the etcd store (cargo feature `etcd`)")]
    EtcdNotBuilt,
    /// `--store kubernetes` in a build without the Kubernetes store (normally refused by the
    /// config).
    #[error(
        "--store kubernetes: this baton was built without the Kubernetes store (cargo feature \
         `kubernetes`)"
    )]
    KubernetesNotBuilt,
    /// The metrics endpoint cannot be bound, or failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The health-only address cannot be bound.
    #[error("--health-listen {addr}: cannot bind: {source}")]
    HealthListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC reflection service could not be built from the descriptors.
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// An election's task ended before shutdown.
    #[error("election {election:?} stopped unexpectedly (see the log)")]
    ElectionFailed {
        /// The election.
        election: String,
    },
}

impl DaemonError {
    /// Whether the error is in the configuration (exit status 2), not in running.
    pub fn is_config(&self) -> bool {
        match self {
            DaemonError::LockDir(_)
            | DaemonError::EtcdNotBuilt
            | DaemonError::KubernetesNotBuilt
            | DaemonError::HealthListen { .. }
            | DaemonError::Metrics(MetricsError::Bind { .. }) => true,
            #[cfg(feature = "etcd")]
            DaemonError::EtcdConfig(_) => true,
            // No kubeconfig and no service account: a configuration problem.
            #[cfg(feature = "kubernetes")]
            DaemonError::Kubernetes(_) => true,
            _ => false,
        }
    }
}

/// Open the configured store.
///
/// # Errors
/// The store's configuration is unusable (e.g. an unwritable lock directory, no kubeconfig).
pub async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, DaemonError> {
    match config {
        StoreConfig::File {
            lock_dir,
            crash_grace,
        } => Ok(Arc::new(
            FileStore::new(lock_dir)
                .map_err(DaemonError::LockDir)?
                .with_crash_grace(*crash_grace),
        )),
        #[cfg(feature = "kubernetes")]
        StoreConfig::Kubernetes {
            namespace,
            lease_name,
        } => Ok(Arc::new(
            crate::store::kubernetes::KubernetesStore::connect(
                namespace.clone(),
                lease_name.clone(),
            )
            .await
            .map_err(DaemonError::Kubernetes)?,
        )),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => Ok(Arc::new(
            crate::store::etcd::EtcdStore::new(etcd).map_err(DaemonError::EtcdConfig)?,
        )),
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => Err(DaemonError::EtcdNotBuilt),
        #[cfg(not(feature = "kubernetes"))]
        StoreConfig::Kubernetes { .. } => Err(DaemonError::KubernetesNotBuilt),
    }
}

/// Run the daemon on an already bound `listener` (a [`Listener`] from [`Listener::bind`], or a
/// plain `TcpListener`) until `shutdown` resolves, then step down in every election and return.
///
/// # Errors
/// The store cannot be opened, the metrics or health address cannot be bound, or a server
/// fails.
pub async fn run(
    config: Config,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let store = open_store(&config.store).await?;
    run_with_store(config, store, listener, shutdown).await
}

/// [`run`] over a store already opened with [`open_store`] (so that `main` checks the store's
/// configuration before it binds the port).
///
/// # Errors
/// The metrics or health address cannot be bound, a server fails, or an election's task ends
/// before `shutdown`.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let listener = listener.into();
    // Everything that can be refused is refused before any election starts.
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(Metrics::bind(addr).await?),
        None => None,
    };
    let health_listener = match config.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::HealthListen { addr, source })?,
        ),
        None => None,
    };
    let local = listener.local_addr();
    // What can still fail is built before any election starts: an error leaves no task behind.
    let tls = listener.is_tls();
    if listener.is_remote() && !tls {
        tracing::warn!(listen = %local,
            "serving plaintext gRPC beyond loopback: whoever reaches it can resign this replica; \
             consider --tls-cert-file and --tls-client-ca-file");
    }
    let Listener {
        socket,
        tls: tls_config,
    } = listener;
    let caps = Caps::from_descriptor_limit();
    let mut builder = limited(Server::builder(), MAX_STREAMS_PER_CONNECTION);
    if let Some(tls_config) = tls_config {
        builder = builder.tls_config(tls_config)?;
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let metrics = metrics_listener.as_ref().map(|_| Arc::new(Metrics::new()));
    let stop_elections = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut elections = Vec::new();
    for name in &config.elections {
        let election_metrics = metrics
            .as_ref()
            .map_or_else(ElectionMetrics::default, |m| m.election(name));
        let (election, task) = Election::spawn_with_metrics(
            store.clone(),
            ElectionConfig {
                name: name.clone(),
                identity: config.identity.clone(),
                timing: config.timing,
                drain_timeout: config.drain_timeout,
                campaign: config.campaign,
            },
            election_metrics,
            stop_elections.child_token(),
        );
        elections.push(election);
        tasks.push(task);
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    let stop_health = CancellationToken::new();
    let health_task = tokio::spawn(report_health(
        health,
        elections.clone(),
        stop_health.clone(),
    ));

    let stop_server = CancellationToken::new();
    let leadership = LeadershipService::new(elections.clone());
    let router = builder
        .add_service(health_service.clone())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(leadership.into_server());
    let stopped = || stop_server.clone().cancelled_owned();
    // Held until the end: dropping it removes the socket file.
    let mut socket_file = None;
    let server: JoinHandle<Result<(), tonic::transport::Error>> = match socket {
        Socket::Tcp(listener) => tokio::spawn(
            router.serve_with_incoming_shutdown(
                // No Nagle: with delayed ACKs it would hold a small frame ~40 ms.
                capped(
                    TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(TCP_KEEPALIVE)),
                    caps.api,
                    "listen",
                ),
                stopped(),
            ),
        ),
        Socket::Unix(listener, file) => {
            socket_file = Some(file);
            tokio::spawn(router.serve_with_incoming_shutdown(
                capped(UnixListenerStream::new(listener), caps.api, "listen"),
                stopped(),
            ))
        }
    };
    let mut health_addr = None;
    let health_server = health_listener.map(|listener| {
        health_addr = listener.local_addr().ok();
        tokio::spawn(
            limited(Server::builder(), MAX_STREAMS_PER_PROBE)
                .timeout(PROBE_TIMEOUT)
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    capped(
                        TcpIncoming::from(listener).with_keepalive(Some(TCP_KEEPALIVE)),
                        caps.health,
                        "health-listen",
                    ),
                    stopped(),
                ),
        )
    });
    let stop_metrics = CancellationToken::new();
    let mut metrics_addr = None;
    let metrics_server = match (metrics, metrics_listener) {
        (Some(metrics), Some(listener)) => {
            metrics_addr = listener.local_addr().ok();
            let listener = CappedListener::new(listener, caps.metrics, "metrics-listen");
            Some(tokio::spawn(metrics.serve(listener, stop_metrics.clone())))
        }
        _ => None,
    };
    let off = |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        listen = %local,
        tls,
        health = %off(health_addr),
        metrics = %off(metrics_addr),
        identity = %config.identity,
        elections = ?config.elections,
        store = %store.describe(),
        "baton serving"
    );

    // An election task never ends by itself: if one does (a bug, a panic), its last state could
    // be a stale LEADER. Stop everything rather than serve that.
    tokio::pin!(shutdown);
    let failed = tokio::select! {
        _ = &mut shutdown => None,
        (outcome, index, _) = select_all(tasks.iter_mut()), if !tasks.is_empty() => {
            let election = config.elections[index].clone();
            tracing::error!(%election, outcome = ?outcome, "an election task ended unexpectedly; stopping");
            Some((index, election))
        }
    };
    // The ended task is done: polling its handle again would panic, and the others must still
    // step down.
    let failed = failed.map(|(index, election)| {
        drop(tasks.remove(index));
        election
    });
    tracing::info!("stopping: stepping down in every election");
    // The servers keep serving while the elections step down, so that workers hear of the loss
    // and can confirm their stop, and a scrape sees the step-down. Bounded: drain, then a
    // release that may time out.
    stop_elections.cancel();
    let bound = config.drain_timeout + config.timing.renew_deadline + SERVER_GRACE;
    if tokio::time::timeout(bound, join_all(tasks)).await.is_err() {
        tracing::error!(
            ?bound,
            "elections did not stop in time; exiting without them"
        );
    }
    stop_health.cancel();
    let _ = health_task.await;
    stop_server.cancel();
    stop_metrics.cancel();
    let grace = tokio::time::Instant::now() + SERVER_GRACE;
    if let Some(health_server) = health_server {
        match tokio::time::timeout_at(grace, health_server).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the health server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the health server task failed"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }
    if let Some(metrics_server) = metrics_server {
        match tokio::time::timeout_at(grace, metrics_server).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the metrics server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the metrics server task failed"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }
    let outcome = match tokio::time::timeout_at(grace, server).await {
        Ok(Ok(result)) => result.map_err(DaemonError::from),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "the gRPC server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("gRPC calls still open after {SERVER_GRACE:?}; closing them");
            Ok(())
        }
    };
    drop(socket_file);
    tracing::info!("stopped");
    outcome?;
    match failed {
        Some(election) => Err(DaemonError::ElectionFailed { election }),
        None => Ok(()),
    }
}

/// Keep grpc.health.v1 in step with the elections, until `stop` (then everything is
/// NOT_SERVING):
/// - `""` and [`HEALTH_LEADERSHIP`]: SERVING while every election's store answers (no election
///   in role UNKNOWN);
/// - [`HEALTH_LIVE`]: SERVING until `stop`;
/// - [`HEALTH_WORKER_ATTACHED`]: SERVING while every election has a subscribed worker;
/// - [`HEALTH_WORKER_READY`]: SERVING while every election has a subscribed, ready worker.
async fn report_health(
    reporter: HealthReporter,
    elections: Vec<Election>,
    stop: CancellationToken,
) {
    let leadership = elections
        .iter()
        .map(|e| WatchStream::new(e.changes()).map(|_| ()).boxed());
    let workers = elections
        .iter()
        .map(|e| WatchStream::new(e.workers()).map(|_| ()).boxed());
    let mut changes = stream::select_all(leadership.chain(workers));
    let status = |serving| {
        if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    reporter
        .set_service_status(HEALTH_LIVE, ServingStatus::Serving)
        .await;
    let mut last: Option<[bool; 3]> = None;
    loop {
        let now = [
            elections
                .iter()
                .all(|e| e.current().view.role != Role::Unknown),
            elections
                .iter()
                .all(|e| e.workers().borrow().subscribed() > 0),
            elections.iter().all(|e| e.workers().borrow().any_ready()),
        ];
        if last != Some(now) {
            let [store, attached, ready] = now;
            reporter.set_service_status("", status(store)).await;
            reporter
                .set_service_status(HEALTH_LEADERSHIP, status(store))
                .await;
            reporter
                .set_service_status(HEALTH_WORKER_ATTACHED, status(attached))
                .await;
            reporter
                .set_service_status(HEALTH_WORKER_READY, status(ready))
                .await;
            last = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            next = changes.next() => if next.is_none() { break },
        }
    }
    for service in [
        "",
        HEALTH_LEADERSHIP,
        HEALTH_LIVE,
        HEALTH_WORKER_ATTACHED,
        HEALTH_WORKER_READY,
    ] {
        reporter
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{
        config::{Cli, Command},
        store::memory::MemoryStore,
    };

    #[tokio::test]
    async fn a_panicking_election_does_not_stop_the_others_stepping_down() {
        let cli =
            Cli::try_parse_from(["baton", "run", "--election", "ok,boom", "--identity", "me"])
                .unwrap();
        let Command::Run(args) = cli.command else {
            unreachable!("parsed `run`");
        };
        let store = MemoryStore::new();
        store.panic_once_held("boom", "ok");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outcome = tokio::spawn(run_with_store(
            args.validate().unwrap(),
            Arc::new(store.clone()),
            listener,
            std::future::pending::<()>(),
        ))
        .await
        .expect("the daemon returns instead of panicking");
        assert!(
            matches!(&outcome, Err(DaemonError::ElectionFailed { election }) if election == "boom"),
            "{outcome:?}"
        );
        // `ok` led until the panic; its 15 s lease has not run out, so only a release frees it.
        assert_eq!(store.holder("ok"), None, "ok released its holding");
    }
}
