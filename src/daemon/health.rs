//! grpc.health.v1 for the daemon: the service names, and a reporter task that keeps them in step
//! with the elections. The servers (`servers.rs`) serve it on `--listen` and, for Kubernetes
//! gRPC probes apart from the API's connection cap, alone on `--health-listen`.

use futures::{StreamExt, stream};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::election::{Election, Role};

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

/// The health service as the servers add it.
pub(super) type HealthGrpc = HealthServer<HealthService>;

/// The running reporter and the service it feeds.
pub(super) struct Health {
    /// The grpc.health.v1 service, for the API server and the probe server.
    pub(super) service: HealthGrpc,
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl Health {
    /// Start reporting the health of `elections`.
    pub(super) fn start(elections: Vec<Election>) -> Health {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(report_health(reporter, elections, stop.clone()));
        Health {
            service,
            task,
            stop,
        }
    }

    /// Set every service NOT_SERVING and end the reporter.
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
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

fn status(serving: bool) -> ServingStatus {
    if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}
