//! The daemon's shutdown sequence: wait for the shutdown signal (or an election task that ended
//! by itself), step down in every election while the servers still serve, then stop the health
//! reporter and the servers, each wait bounded.

use std::{fmt, future::Future};

use futures::future::{join_all, select_all};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{DaemonError, SERVER_GRACE, balancer::Balancer, health::Health, servers::Servers};
use crate::config::Config;

/// The running elections: their tasks, and what stops them.
pub(super) struct Elections {
    pub(super) tasks: Vec<JoinHandle<()>>,
    pub(super) stop: CancellationToken,
    /// With `--balance`: the balancer, which leaves the group before the elections step down.
    pub(super) balancer: Option<Balancer>,
}

/// Serve until `shutdown` resolves, then stop everything in order.
///
/// # Errors
/// The API server failed, or an election's task ended before `shutdown`.
pub(super) async fn serve_until(
    shutdown: impl Future<Output = ()>,
    config: &Config,
    elections: Elections,
    health: Health,
    servers: Servers,
) -> Result<(), DaemonError> {
    let Elections {
        mut tasks,
        stop,
        mut balancer,
    } = elections;
    let failed = wait(config, shutdown, &mut tasks, balancer.as_mut()).await;
    // Leaving first lets the others plan without this member, so that each of its elections
    // is awaited by the one member that should take it when it is released below.
    match (balancer, &failed) {
        (Some(balancer), None | Some(Failed::Election(_))) => {
            balancer.leave(config.timing.renew_deadline).await;
        }
        // Its task is over; dropping the handle is all that is left.
        (Some(_), Some(Failed::Balancer)) | (None, _) => {}
    }
    tracing::info!("stopping: stepping down in every election");
    // The servers keep serving while the elections step down, so that workers hear of the loss
    // and can confirm their stop, and a scrape sees the step-down. Bounded: drain, then a
    // release that may time out.
    stop.cancel();
    let bound = config.drain_timeout + config.timing.renew_deadline + SERVER_GRACE;
    if tokio::time::timeout(bound, join_all(tasks)).await.is_err() {
        tracing::error!(
            ?bound,
            "elections did not stop in time; exiting without them"
        );
    }
    health.stop().await;
    let outcome = stop_servers(servers).await;
    tracing::info!("stopped");
    outcome?;
    match failed {
        Some(Failed::Election(election)) => Err(DaemonError::ElectionFailed { election }),
        Some(Failed::Balancer) => Err(DaemonError::BalancerFailed),
        None => Ok(()),
    }
}

/// What ended before the shutdown signal.
enum Failed {
    Election(String),
    Balancer,
}

/// Wait for `shutdown`, or for an election task or the balancer to end.
async fn wait(
    config: &Config,
    shutdown: impl Future<Output = ()>,
    tasks: &mut Vec<JoinHandle<()>>,
    balancer: Option<&mut Balancer>,
) -> Option<Failed> {
    // An election task never ends by itself: if one does (a bug, a panic), its last state could
    // be a stale LEADER. Stop everything rather than serve that. Nor does the balancer: without
    // it, elections it stood by would never be campaigned for again.
    tokio::pin!(shutdown);
    let balancer_ended = async {
        match balancer {
            Some(balancer) => balancer.ended().await,
            None => std::future::pending().await,
        }
    };
    let failed = tokio::select! {
        _ = &mut shutdown => None,
        (outcome, index, _) = select_all(tasks.iter_mut()), if !tasks.is_empty() => {
            let election = config.elections[index].clone();
            tracing::error!(%election, outcome = ?outcome, "an election task ended unexpectedly; stopping");
            Some((index, election))
        }
        outcome = balancer_ended => {
            tracing::error!(?outcome, "the balancer ended unexpectedly; stopping");
            return Some(Failed::Balancer);
        }
    };
    // The ended task is done: polling its handle again would panic, and the others must still
    // step down.
    failed.map(|(index, election)| {
        drop(tasks.remove(index));
        Failed::Election(election)
    })
}

/// Stop the servers, giving open calls [`SERVER_GRACE`]; returns the API server's outcome.
async fn stop_servers(servers: Servers) -> Result<(), DaemonError> {
    servers.stop.cancel();
    servers.stop_metrics.cancel();
    let grace = Instant::now() + SERVER_GRACE;
    join_side("health", servers.health, grace).await;
    join_side("metrics", servers.metrics, grace).await;
    let outcome = match tokio::time::timeout_at(grace, servers.api).await {
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
    drop(servers.socket_file);
    outcome
}

/// Wait until `grace` for a side server to stop, logging how it failed.
async fn join_side<E: fmt::Display>(
    server: &str,
    task: Option<JoinHandle<Result<(), E>>>,
    grace: Instant,
) {
    let Some(task) = task else {
        return;
    };
    match tokio::time::timeout_at(grace, task).await {
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "the {server} server failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "the {server} server task failed"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
}
