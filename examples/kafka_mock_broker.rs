//! A test harness: librdkafka's mock Kafka cluster (one broker, on a loopback port) in a process
//! of its own, so that separate `kafka_bridge` processes can reach it.
//!
//! ```text
//! cargo run --features kafka --example kafka_mock_broker -- --topic feed
//! ```
//!
//! Prints `bootstrap=HOST:PORT` once the topic (one partition) exists, then serves until killed.
//! On SIGUSR1 it makes the next EndTxn (a transaction commit or abort) fail with
//! `PRODUCER_FENCED`, as a broker answers a producer whose epoch a newer one of the same
//! transactional id has bumped. The mock does not fence by itself: it gives every new producer of
//! a transactional id a new producer id rather than bumping the epoch, and it hides no aborted
//! records from `read_committed` consumers (see README, the Kafka bridge).

use rdkafka::{
    mocking::MockCluster,
    types::{RDKafkaApiKey, RDKafkaRespErr},
};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let mut argv = std::env::args().skip(1);
    let topic = match (argv.next().as_deref(), argv.next(), argv.next()) {
        (Some("--topic"), Some(topic), None) => topic,
        _ => {
            eprintln!("kafka_mock_broker: usage: kafka_mock_broker --topic NAME");
            return std::process::ExitCode::from(2);
        }
    };
    let cluster = match MockCluster::new(1) {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("kafka_mock_broker: cannot start the mock cluster: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if let Err(e) = cluster.create_topic(&topic, 1, 1) {
        eprintln!("kafka_mock_broker: --topic {topic}: {e}");
        return std::process::ExitCode::from(2);
    }
    let mut fence = match signal(SignalKind::user_defined1()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kafka_mock_broker: cannot install the SIGUSR1 handler: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("bootstrap={}", cluster.bootstrap_servers());
    while fence.recv().await.is_some() {
        cluster.request_errors(
            RDKafkaApiKey::EndTxn,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
        );
        println!("fence-armed");
    }
    std::process::ExitCode::SUCCESS
}
