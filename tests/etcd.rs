//! The etcd store against a real etcd (Debian's `etcd-server` 3.4): the shared conformance
//! suite, interoperation with `etcdctl elect` both ways, crash fail-over, graceful hand-off with
//! workers, an etcd outage under a leader, TLS and user authentication.
//!
//! Every wait is on an event (a stream event, a log line, a printed line), bounded by
//! `common::SOON`; safety (no overlap) is asserted exactly, latency never.

mod common;
mod etcd_server;

use std::{sync::Arc, time::Duration};

use baton::{
    config::EtcdConfig,
    store::{Timing, conformance::Suite, etcd::EtcdStore},
};
use etcd_server::Etcd;

/// Short enough that the crash checks wait little, long enough above etcd's 2 s minimum TTL.
fn timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    }
}

fn plain_config(etcd: &Etcd, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: prefix.to_owned(),
        tls: None,
        auth: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let etcd = Etcd::start();
    let store = EtcdStore::new(&plain_config(&etcd, "baton/")).expect("store");
    Suite::new(Arc::new(store), timing(), "conf-")
        .test_all()
        .await;
}
