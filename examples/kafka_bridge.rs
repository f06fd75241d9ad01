//! The bridge of the hot-warm story: while its replica leads, and only then, it holds the one
//! connection to a line-based TCP feed and publishes every line into a Kafka topic, with the
//! term (Baton's fencing token) in a record header.
//!
//! ```text
//! cargo run --features kafka --example kafka_bridge -- \
//!     --daemon http://127.0.0.1:50051 --election feed --feed 127.0.0.1:7000 \
//!     --brokers 127.0.0.1:9092 --topic feed [--transactional-id feed-bridge]
//! ```
//!
//! - The producer is idempotent (`enable.idempotence`): a retried send is never written twice.
//! - The bridge declares itself ready (warm) only once the brokers answer for the topic, so a
//!   daemon run with `--campaign when-ready` never makes a bridge that cannot publish the leader.
//! - On a hand-over (the daemon steps down and waits: SIGTERM, Resign, readiness lost) it stops
//!   reading, closes the feed connection, flushes the producer (or commits its transaction),
//!   and only then returns, which the client stub confirms to the daemon: the standby's bridge
//!   connects to the feed only after this one let go of it and its records landed.
//! - On an abrupt end (the stream to the daemon broke, `valid_for` ran out: the leadership may
//!   already be elsewhere) it stops reading and purges what is still queued or in flight (or
//!   aborts its transaction) instead of flushing: those records are lost, never late behind the
//!   next term's.
//! - SIGTERM or SIGINT end a running term by hand-over and exit 0.
//! - With `--transactional-id ID` (the same on every replica of the election) it writes in Kafka
//!   transactions, so a new leader's producer fences an old one that is still alive (the broker
//!   bumps the producer epoch). That needs a broker with transactions (Apache Kafka, Redpanda).
//!
//! Lines on stdout, for people and tests: `leading term=T mono=NS`, `first-record term=T
//! mono=NS`, `stopped term=T published=N mono=NS`; `mono` is CLOCK_MONOTONIC.

use std::time::Duration;

use baton::client::{Client, Ending, Lease};
use nix::time::{ClockId, clock_gettime};
use rdkafka::{
    ClientConfig,
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord, Producer, PurgeConfig},
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpStream,
    sync::watch,
};

/// Bound on a flush or commit at the end of a term: well inside the daemon's drain timeout (5 s
/// by default), so that nothing of this term can land after the daemon released. What is not
/// delivered by then is purged (lost, never late).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// A flush looks this often whether its hand-over turned abrupt (the daemon was lost).
const FLUSH_SLICE: Duration = Duration::from_millis(50);

fn mono() -> i128 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or_default()
}

#[derive(Clone)]
struct Args {
    daemon: String,
    election: String,
    feed: String,
    brokers: String,
    topic: String,
    transactional_id: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        daemon: "http://127.0.0.1:50051".into(),
        election: "default".into(),
        feed: String::new(),
        brokers: String::new(),
        topic: String::new(),
        transactional_id: None,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--daemon" => args.daemon = value,
            "--election" => args.election = value,
            "--feed" => args.feed = value,
            "--brokers" => args.brokers = value,
            "--topic" => args.topic = value,
            "--transactional-id" => args.transactional_id = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    for (flag, value) in [
        ("--feed", &args.feed),
        ("--brokers", &args.brokers),
        ("--topic", &args.topic),
    ] {
        if value.is_empty() {
            return Err(format!("{flag} is required"));
        }
    }
    Ok(args)
}

fn producer(args: &Args) -> Result<FutureProducer, KafkaError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .set("message.timeout.ms", "30000");
    if let Some(id) = &args.transactional_id {
        config.set("transactional.id", id);
    }
    config.create()
}

/// Ready once the brokers answer for the topic: then this replica may win.
async fn warm_up(producer: FutureProducer, topic: String, ready: watch::Sender<bool>) {
    loop {
        let probe = producer.clone();
        let topic = topic.clone();
        let answered = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(5))
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if answered {
            let _ = ready.send(true);
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where one term's records go: the shared idempotent producer, or (with
/// `--transactional-id`) a producer of this term whose open transaction is committed every
/// `COMMIT_EVERY` and at the end. Creating it per term is what fences: its `init_transactions`
/// bumps the epoch, and an older producer of the same id is refused from then on.
struct Sink {
    producer: FutureProducer,
    transactional: bool,
}

const COMMIT_EVERY: Duration = Duration::from_millis(100);

impl Sink {
    fn open(shared: &FutureProducer, args: &Args) -> Result<Sink, KafkaError> {
        if args.transactional_id.is_none() {
            return Ok(Sink {
                producer: shared.clone(),
                transactional: false,
            });
        }
        let producer = producer(args)?;
        // librdkafka's transactional calls block: keep them off the async worker's hot path.
        tokio::task::block_in_place(|| {
            producer.init_transactions(FLUSH_TIMEOUT)?;
            producer.begin_transaction()
        })?;
        Ok(Sink {
            producer,
            transactional: true,
        })
    }

    /// Make everything sent so far durable (and, in a transaction, visible); keep going.
    fn checkpoint(&self) -> Result<(), KafkaError> {
        if !self.transactional {
            return Ok(());
        }
        tokio::task::block_in_place(|| {
            self.producer.commit_transaction(FLUSH_TIMEOUT)?;
            self.producer.begin_transaction()
        })
    }

    /// The end of the term. On a hand-over: flush, or commit the open transaction (abort it if
    /// that fails). On an abrupt end, or when the hand-over turns abrupt while flushing: drop
    /// what is not yet out. Returns how it ended.
    fn finish(self, lease: &Lease) -> (Ending, Result<(), KafkaError>) {
        let abrupt = || lease.ending() != Some(Ending::HandOver);
        tokio::task::block_in_place(|| {
            if abrupt() {
                if self.transactional {
                    return (
                        Ending::Abrupt,
                        self.producer.abort_transaction(FLUSH_TIMEOUT),
                    );
                }
                self.producer
                    .purge(PurgeConfig::default().queue().inflight());
                return (Ending::Abrupt, Ok(()));
            }
            if self.transactional {
                let committed = self.producer.commit_transaction(FLUSH_TIMEOUT);
                if committed.is_err() {
                    let _ = self.producer.abort_transaction(FLUSH_TIMEOUT);
                }
                return (Ending::HandOver, committed);
            }
            // In slices, looking again between them.
            let give_up = tokio::time::Instant::now() + FLUSH_TIMEOUT;
            loop {
                match self.producer.flush(FLUSH_SLICE) {
                    Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut))
                        if !abrupt() && tokio::time::Instant::now() < give_up => {}
                    Ok(()) => return (Ending::HandOver, Ok(())),
                    Err(e) => {
                        self.producer
                            .purge(PurgeConfig::default().queue().inflight());
                        let ending = if abrupt() {
                            Ending::Abrupt
                        } else {
                            Ending::HandOver
                        };
                        return (ending, Err(e));
                    }
                }
            }
        })
    }
}

/// One term of leadership: bridge the feed into the topic until the lease is cancelled.
async fn bridge(lease: Lease, shared: FutureProducer, args: Args) {
    let term = lease.term();
    println!("leading term={term} mono={}", mono());
    let sink = match Sink::open(&shared, &args) {
        Ok(sink) => sink,
        Err(e) => {
            eprintln!("kafka_bridge: cannot open the producer for term {term}: {e}");
            lease.cancelled().await;
            return;
        }
    };
    let term_text = term.to_string();
    let mut published = 0u64;
    let mut commits = tokio::time::interval(COMMIT_EVERY);
    'feed: while !lease.is_cancelled() {
        let connection = tokio::select! {
            _ = lease.cancelled() => break,
            c = TcpStream::connect(&args.feed) => c,
        };
        let stream = match connection {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("kafka_bridge: feed {}: {e}; retrying", args.feed);
                tokio::select! {
                    _ = lease.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let mut lines = BufReader::new(stream).lines();
        loop {
            let line = tokio::select! {
                biased;
                _ = lease.cancelled() => break 'feed,
                _ = commits.tick(), if sink.transactional => {
                    if let Err(e) = sink.checkpoint() {
                        eprintln!("kafka_bridge: commit failed (fenced by a newer leader?): {e}");
                        break 'feed;
                    }
                    continue;
                }
                line = lines.next_line() => line,
            };
            let Ok(Some(line)) = line else {
                eprintln!("kafka_bridge: feed {} closed; reconnecting", args.feed);
                continue 'feed;
            };
            let headers = OwnedHeaders::new().insert(Header {
                key: "baton-term",
                value: Some(&term_text),
            });
            let mut record = FutureRecord::<(), _>::to(&args.topic)
                .payload(&line)
                .headers(headers);
            loop {
                match sink.producer.send_result(record) {
                    Ok(_delivery) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        eprintln!("kafka_bridge: cannot enqueue a record: {e}");
                        break;
                    }
                }
            }
            if published == 0 {
                println!("first-record term={term} mono={}", mono());
            }
            published += 1;
        }
    }
    // The feed connection is closed (dropped above); now make what was read durable, or drop it.
    let (ending, outcome) = sink.finish(&lease);
    if let Err(e) = outcome {
        eprintln!(
            "kafka_bridge: the {ending} end of term {term} failed (what was not out is dropped): {e}"
        );
    }
    println!(
        "stopped term={term} ending={ending} published={published} mono={}",
        mono()
    );
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("kafka_bridge: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let producer = match producer(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("kafka_bridge: --brokers {}: {e}", args.brokers);
            return std::process::ExitCode::from(2);
        }
    };
    let client = match Client::connect_lazy(args.daemon.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka_bridge: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let warming = tokio::spawn(warm_up(producer.clone(), args.topic.clone(), ready_tx));
    let shutdown = match baton::client::terminated() {
        Ok(signal) => {
            async move {
                eprintln!("kafka_bridge: {}: stopping", signal.await);
            }
        }
        Err(e) => {
            eprintln!("kafka_bridge: cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outcome = client
        .worker(&args.election)
        .ready_when(ready_rx)
        .until(shutdown)
        .run(|lease| bridge(lease, producer.clone(), args.clone()))
        .await;
    warming.abort();
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kafka_bridge: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
