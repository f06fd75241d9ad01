//! The daemon: opens the store, runs one elector task per election, and serves them over gRPC
//! until `shutdown` resolves; then it steps down gracefully in every election (announce, wait for
//! workers, release) before it stops serving.
//!
//! `main.rs` calls [`run`] with a signal future; tests call it with a oneshot.

use std::{future::Future, sync::Arc, time::Duration};

use futures::{StreamExt, stream::select_all};
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
    /// The gRPC reflection service could not be built from the descriptors.
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
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

    shutdown.await;
    tracing::info!("stopping: stepping down in every election");
    // The server keeps serving while the elections step down, so that workers hear of the loss
    // and can confirm their stop.
    stop_elections.cancel();
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "an election task failed");
        }
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
    Ok(())
}

/// Keep grpc.health.v1 in step with the elections: SERVING while every election's store answers
/// (no election in role UNKNOWN), NOT_SERVING otherwise and after `stop`.
async fn report_health(
    reporter: HealthReporter,
    elections: Vec<Election>,
    stop: CancellationToken,
) {
    let service = "baton.v1.Leadership";
    let mut changes = select_all(elections.iter().map(|e| WatchStream::new(e.changes())));
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
