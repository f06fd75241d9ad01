//! The daemon: opens the store, runs one elector task per election, and serves them over gRPC
//! until `shutdown` resolves; then it steps down gracefully in every election (announce, wait for
//! workers, release) before it stops serving.
//!
//! `main.rs` calls [`run`] with a signal future; tests call it with a oneshot.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{
    StreamExt,
    future::{join_all, select_all},
    stream,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::{Config, StoreConfig},
    election::{Election, ElectionConfig, Role},
    proto,
    server::LeadershipService,
    store::{Store, file::FileStore},
};

/// How long the server waits for open calls to finish once the elections have stopped.
const SERVER_GRACE: Duration = Duration::from_secs(2);

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
            | DaemonError::KubernetesNotBuilt => true,
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
        StoreConfig::File { lock_dir } => Ok(Arc::new(
            FileStore::new(lock_dir).map_err(DaemonError::LockDir)?,
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

/// Run the daemon on an already bound `listener` until `shutdown` resolves, then step down in
/// every election and return.
///
/// # Errors
/// The store cannot be opened, or the gRPC server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let store = open_store(&config.store).await?;
    run_with_store(config, store, listener, shutdown).await
}

/// [`run`] over a store already opened with [`open_store`] (so that `main` checks the store's
/// configuration before it binds the port).
///
/// # Errors
/// The gRPC server fails, or an election's task ends before `shutdown`.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // With `--listen 127.0.0.1:0` the kernel picks the port; log the real one.
    let local = listener.local_addr().map_or(config.listen, |a| a);
    let stop_elections = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut elections = Vec::new();
    for name in &config.elections {
        let (election, task) = Election::spawn(
            store.clone(),
            ElectionConfig {
                name: name.clone(),
                identity: config.identity.clone(),
                timing: config.timing,
                drain_timeout: config.drain_timeout,
                campaign: config.campaign,
            },
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

    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let stop_server = CancellationToken::new();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(LeadershipService::new(elections).into_server())
        .serve_with_incoming_shutdown(
            // Small frames must leave at once: Nagle + delayed ACK would add ~40 ms per event.
            TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(30))),
            stop_server.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    tracing::info!(
        listen = %local,
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
            Some(election)
        }
    };
    tracing::info!("stopping: stepping down in every election");
    // The server keeps serving while the elections step down, so that workers hear of the loss
    // and can confirm their stop. Bounded: drain, then a release that may time out.
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
    match tokio::time::timeout(SERVER_GRACE, server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => tracing::error!(error = %e, "the gRPC server task failed"),
        Err(_) => tracing::warn!("gRPC calls still open after {SERVER_GRACE:?}; closing them"),
    }
    tracing::info!("stopped");
    match failed {
        Some(election) => Err(DaemonError::ElectionFailed { election }),
        None => Ok(()),
    }
}

/// Keep grpc.health.v1 in step with the elections: SERVING while every election's store answers
/// (no election in role UNKNOWN), NOT_SERVING otherwise and after `stop`.
async fn report_health(
    reporter: HealthReporter,
    elections: Vec<Election>,
    stop: CancellationToken,
) {
    let service = "baton.v1.Leadership";
    let mut changes = stream::select_all(elections.iter().map(|e| WatchStream::new(e.changes())));
    let mut last = None;
    loop {
        let serving = elections
            .iter()
            .all(|e| e.current().view.role != Role::Unknown);
        if last != Some(serving) {
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter.set_service_status(service, status).await;
            last = Some(serving);
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            next = changes.next() => if next.is_none() { break },
        }
    }
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status(service, ServingStatus::NotServing)
        .await;
}
