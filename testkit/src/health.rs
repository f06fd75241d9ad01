//! grpc.health.v1 as a probe sees it: one `Check`, or a `Watch` until a status, against a
//! daemon's main listener or its `--health-listen` (addresses as `HOST:PORT` or a client URL).

use tonic::transport::Channel;
pub use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::SOON;

/// `HOST:PORT` as `http://HOST:PORT`; a URL (`http://`, `unix:`) as it is.
fn url(addr: &str) -> String {
    if addr.contains("://") || addr.starts_with("unix:") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn client(addr: &str) -> HealthClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url(addr))
        .expect("an address")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the health service at {addr}: {e}"));
    HealthClient::new(channel)
}

/// The status of `service` ("" for the whole server) now.
pub async fn check(addr: &str, service: &str) -> ServingStatus {
    let response = client(addr)
        .await
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("Check");
    response.into_inner().status()
}

/// Wait until the status of `service` is `want` (the Watch stream, not a poll).
pub async fn wait_for(addr: &str, service: &str, want: ServingStatus) {
    let mut stream = client(addr)
        .await
        .watch(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("Watch")
        .into_inner();
    tokio::time::timeout(SOON, async {
        while let Some(answer) = stream.message().await.expect("a health event") {
            if answer.status() == want {
                return;
            }
        }
        panic!("the health stream of {service:?} ended");
    })
    .await
    .unwrap_or_else(|_| panic!("{service:?} not {want:?} within {SOON:?}"));
}
