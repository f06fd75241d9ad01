//! The promise Baton exists for, end to end: two replicas, each a `baton run` daemon with a
//! `kafka_bridge` beside it, in front of a feed that sends every record to every connected
//! client, publishing into a real Kafka-protocol broker (tansu). Then at least 30 faults in
//! random order: kill -9 of a daemon or a bridge, SIGTERM of a daemon or a bridge, SIGSTOP of the
//! leading daemon for longer than the lease (its bridge keeps running), Resign. The topic, read
//! back with an rdkafka consumer, must hold no feed record twice, and its terms must never
//! decrease. Each old bridge must have ended its term the right way: by hand-over (flush) when
//! its daemon stepped down and waited, abruptly (purge) when the leadership could be elsewhere.
//!
//! The broker: `tansu` from crates.io (`cargo install tansu --features dynostore`; the test
//! command installs it), with in-memory storage, on a free loopback port. tansu does not support
//! Kafka transactions, so the bridges run without `--transactional-id`: the proof rests on
//! Baton's own guarantees (stop before release, `valid_for` self-demotion, the file store's crash
//! grace).
//!
//! `fenced_bridge_stops_and_standby_takes_over` runs the bridges with `--transactional-id` on
//! librdkafka's mock cluster instead, to check what a bridge does when the broker fences it.

use std::{
    collections::{BTreeMap, HashMap},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use baton::client::{Client, Role};
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    error::KafkaError,
    message::Headers,
    types::RDKafkaErrorCode,
};
use testkit::{
    Daemon, Proc, SOON, example, field, lock_dir, mono_now, percentile,
    ports::{PortTaken, listens_on, on_fresh_ports},
};
use tokio::{io::AsyncWriteExt, net::TcpListener, sync::broadcast};

const TOPIC: &str = "feed";
const ELECTION: &str = "feed";

/// The tansu binary: on PATH or in cargo's bin directory.
fn tansu() -> String {
    let candidates = [
        std::env::var("TANSU").ok(),
        Some("tansu".to_owned()),
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cargo/bin/tansu")),
    ];
    for candidate in candidates.into_iter().flatten() {
        if Command::new(&candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate;
        }
    }
    panic!(
        "the Kafka-protocol broker `tansu` is needed: install it with \
         `cargo install tansu --features dynostore` (scripts/test-all.sh does)"
    );
}

/// A Kafka-protocol broker: tansu with in-memory storage, or librdkafka's mock cluster.
struct Broker {
    proc: Proc,
    addr: String,
}

impl Broker {
    /// tansu with in-memory storage. It must be told its port (it advertises what it is given:
    /// port 0 would be advertised as 0), so it is started on fresh ports until it holds one.
    fn start() -> Broker {
        on_fresh_ports("tansu", 1, |ports| Self::try_start(ports[0]))
    }

    fn try_start(port: u16) -> Result<Broker, PortTaken> {
        let url = format!("tcp://127.0.0.1:{port}");
        let mut command = Command::new(tansu());
        command
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url]);
        let proc = Proc::spawn(command, "tansu: ");
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..2000 {
            // tansu's own socket, not another process's on the same port.
            if listens_on(proc.child.id(), port) {
                return Ok(Broker { proc, addr });
            }
            if let Some(line) = proc.stderr.find("AddrInUse") {
                return Err(PortTaken(line));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "tansu did not listen on {addr}; stderr:\n{}",
            proc.stderr.all().join("\n")
        );
    }

    /// librdkafka's mock cluster (the `kafka_mock_broker` example), with the topic created.
    fn mock() -> Broker {
        let mut command = example("kafka_mock_broker");
        command.args(["--topic", TOPIC]);
        let proc = Proc::spawn(command, "mock broker: ");
        let line = proc
            .stdout
            .wait_for("the mock broker's address", |l| l.starts_with("bootstrap="));
        let addr = field(&line, "bootstrap").expect("bootstrap=").to_owned();
        Broker { proc, addr }
    }

    async fn create_topic(&self) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .expect("admin client");
        let topic = NewTopic::new(TOPIC, 1, TopicReplication::Fixed(1));
        let results = admin
            .create_topics([&topic], &AdminOptions::new().operation_timeout(Some(SOON)))
            .await
            .expect("create topic");
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => panic!("create topic {name}: {code}"),
            }
        }
    }

    /// Every record of the topic: (sequence number from the payload, term from the header).
    fn read_back(&self) -> Vec<(u64, u64)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .set("group.id", "baton-test-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(TOPIC, 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).expect("assign");
        let mut records = Vec::new();
        let mut idle = 0;
        loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(message)) => {
                    idle = 0;
                    let payload = std::str::from_utf8(message.payload().expect("payload")).unwrap();
                    let seq = payload.trim().parse().expect("feed records are numbers");
                    let term = message
                        .headers()
                        .and_then(|h| h.iter().find(|h| h.key == "baton-term"))
                        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                        .expect("every record carries baton-term");
                    records.push((seq, term));
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => panic!("reading the topic back: {e}"),
                None => {
                    idle += 1;
                    assert!(idle < 60, "no partition end after 30 s of silence");
                }
            }
        }
        records
    }
}

/// The outside feed: numbers its records and sends each to every connected client.
struct Feed {
    addr: String,
    /// When each sequence number was sent (CLOCK_MONOTONIC ns).
    sent: Arc<Mutex<Vec<i128>>>,
    /// Most connections open at once.
    most_connected: Arc<Mutex<(usize, usize)>>,
}

impl Feed {
    async fn start(period: Duration) -> Feed {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, _) = broadcast::channel::<u64>(4096);
        let sent = Arc::new(Mutex::new(Vec::new()));
        let most_connected = Arc::new(Mutex::new((0usize, 0usize)));
        let generator = tx.clone();
        let stamps = sent.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            for seq in 0u64.. {
                ticks.tick().await;
                stamps.lock().unwrap().push(mono_now());
                let _ = generator.send(seq);
            }
        });
        let connected = most_connected.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut records = tx.subscribe();
                let connected = connected.clone();
                {
                    let mut c = connected.lock().unwrap();
                    c.0 += 1;
                    c.1 = c.1.max(c.0);
                }
                tokio::spawn(async move {
                    while let Ok(seq) = records.recv().await {
                        if socket
                            .write_all(format!("{seq}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    connected.lock().unwrap().0 -= 1;
                });
            }
        });
        Feed {
            addr,
            sent,
            most_connected,
        }
    }
}

/// One replica: a daemon on a fixed Unix socket (restarted on the same one, where its bridge
/// expects it; no port to lose meanwhile) and the bridge that follows it.
struct Replica {
    identity: String,
    listen: String,
    daemon: Option<Daemon>,
    bridge: Option<Proc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    KillDaemon,
    KillBridge,
    TermBridge,
    TermDaemon,
    StopDaemon,
    Resign,
}

struct Cluster {
    replicas: Vec<Replica>,
    /// Holds the replicas' sockets.
    _sockets: tempfile::TempDir,
    daemon_args: Vec<String>,
    feed: String,
    brokers: String,
    /// Given to every bridge after the rest (e.g. `--transactional-id`).
    bridge_args: Vec<String>,
}

impl Cluster {
    /// Two replicas `r1`, `r2` on `store_args`, campaigning when ready, not started yet.
    fn new(store_args: &[&str], lease: Duration, feed: &Feed, broker: &Broker) -> Cluster {
        let lease_text = format!("{}ms", lease.as_millis());
        let renew = format!("{}ms", lease.as_millis() * 2 / 3);
        let retry = format!("{}ms", lease.as_millis() / 8);
        let mut daemon_args: Vec<String> = store_args.iter().map(|s| s.to_string()).collect();
        daemon_args.extend(
            [
                "--election",
                ELECTION,
                "--campaign",
                "when-ready",
                "--lease-duration",
                &lease_text,
                "--renew-deadline",
                &renew,
                "--retry-period",
                &retry,
                "--drain-timeout",
                "5s",
            ]
            .map(str::to_owned),
        );
        let sockets = tempfile::tempdir().expect("tempdir");
        Cluster {
            replicas: ["r1", "r2"]
                .iter()
                .map(|id| Replica {
                    identity: id.to_string(),
                    listen: format!("unix:{}", sockets.path().join(id).display()),
                    daemon: None,
                    bridge: None,
                })
                .collect(),
            _sockets: sockets,
            daemon_args,
            feed: feed.addr.clone(),
            brokers: broker.addr.clone(),
            bridge_args: Vec::new(),
        }
    }

    fn start_daemon(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let args: Vec<&str> = self.daemon_args.iter().map(String::as_str).collect();
        r.daemon = Some(Daemon::start_on(&r.identity, &r.listen, &args));
    }

    fn start_bridge(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let mut command = example("kafka_bridge");
        command
            .args(["--daemon", &r.listen, "--election", ELECTION])
            .args([
                "--feed",
                &self.feed,
                "--brokers",
                &self.brokers,
                "--topic",
                TOPIC,
            ])
            .args(&self.bridge_args);
        r.bridge = Some(Proc::spawn(command, "bridge: "));
    }

    /// Stop every daemon gracefully, so the leading bridge flushes (or commits) its last
    /// records, and wait for that; the bridges go to `retired`.
    fn stop_all(&mut self, retired: &mut Vec<Proc>) {
        for r in &mut self.replicas {
            if let Some(mut d) = r.daemon.take() {
                d.proc.signal(Signal::SIGTERM);
                d.proc.wait();
            }
        }
        for r in &mut self.replicas {
            if let Some(b) = r.bridge.take() {
                // A bridge that was leading flushes and says so when its daemon stops.
                let count = |p: &str| b.stdout.all().iter().filter(|l| l.starts_with(p)).count();
                if count("leading") > count("stopped") {
                    b.stdout
                        .wait_count("the bridge's last stop", count("leading"), |l| {
                            l.starts_with("stopped")
                        });
                }
                retired.push(b);
            }
        }
    }

    /// The replica whose daemon leads now (waiting for one).
    async fn leader(&self) -> usize {
        for _ in 0..(SOON.as_millis() / 20) {
            for (i, r) in self.replicas.iter().enumerate() {
                let Some(d) = &r.daemon else { continue };
                if let Ok(client) = Client::connect(d.addr.clone()).await
                    && let Ok(state) = client.get(ELECTION).await
                    && state.role == Role::Leader
                {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no leader within {SOON:?}");
    }

    /// The term `bridge` is working in now: its last `leading` line without a `stopped` line of
    /// the same term.
    fn working_term(bridge: &Proc) -> Option<u64> {
        let lines = bridge.stdout.all();
        let term_of = |l: &String| field(l, "term").and_then(|t| t.parse::<u64>().ok());
        let term = lines
            .iter()
            .filter(|l| l.starts_with("leading"))
            .filter_map(term_of)
            .max()?;
        let stopped = lines
            .iter()
            .any(|l| l.starts_with("stopped") && term_of(l) == Some(term));
        (!stopped).then_some(term)
    }

    /// The `ending=` of `bridge`'s stop of `term`.
    fn ending_of_stop(bridge: &Proc, term: u64) -> String {
        let stop = format!("stopped term={term} ");
        let line = bridge
            .stdout
            .wait_for("the old bridge's stop", |l| l.starts_with(&stop));
        field(&line, "ending").expect("ending=").to_owned()
    }

    /// Lines `first-record term=T mono=NS` of every bridge ever started.
    fn first_records(&self, all: &[Proc]) -> Vec<(u64, i128)> {
        self.replicas
            .iter()
            .filter_map(|r| r.bridge.as_ref())
            .chain(all)
            .flat_map(|b| b.stdout.all())
            .filter(|l| l.starts_with("first-record"))
            .map(|l| {
                (
                    field(&l, "term").unwrap().parse().unwrap(),
                    field(&l, "mono").unwrap().parse().unwrap(),
                )
            })
            .collect()
    }
}

/// Exactly: no feed record twice in the topic, and terms never decrease along it.
fn assert_no_duplicate_no_term_back(records: &[(u64, u64)]) {
    assert!(!records.is_empty(), "the bridges published nothing");
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for (offset, (seq, _)) in records.iter().enumerate() {
        if let Some(first) = seen.insert(*seq, offset) {
            panic!("record {seq} published twice: offsets {first} and {offset}");
        }
    }
    for pair in records.windows(2) {
        assert!(
            pair[1].1 >= pair[0].1,
            "term went back from {} to {} (records {} -> {})",
            pair[0].1,
            pair[1].1,
            pair[0].0,
            pair[1].0
        );
    }
}

/// Run the fault sequence against replicas started with `store_args`; assert no duplicate.
async fn no_duplicates_under_faults(store_args: &[&str], lease: Duration) {
    let broker = Broker::start();
    broker.create_topic().await;
    let feed = Feed::start(Duration::from_millis(2)).await;
    let faults_wanted: usize = std::env::var("BATON_FAULTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("BATON_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("fault sequence seed {seed} (rerun with BATON_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut cluster = Cluster::new(store_args, lease, &feed, &broker);
    for i in 0..2 {
        cluster.start_daemon(i);
        cluster.start_bridge(i);
    }
    let mut retired: Vec<Proc> = Vec::new();
    let mut faults: Vec<(Fault, i128)> = Vec::new();
    cluster.leader().await;
    let kinds = [
        Fault::KillDaemon,
        Fault::KillBridge,
        Fault::TermBridge,
        Fault::TermDaemon,
        Fault::StopDaemon,
        Fault::Resign,
    ];

    for n in 0..faults_wanted {
        // Each kind at least once in the first five, then at random.
        let kind = if n < kinds.len() {
            kinds[(n + seed as usize) % kinds.len()]
        } else {
            *kinds.choose(&mut rng).unwrap()
        };
        let i = cluster.leader().await;
        // Let records flow for a moment in this term.
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        // The term the leader's bridge works in (none if it stepped down on its own meanwhile).
        let working = Cluster::working_term(cluster.replicas[i].bridge.as_ref().unwrap());
        let mut old_bridge = None;
        let at = mono_now();
        println!("fault {n}: {kind:?} on {}", cluster.replicas[i].identity);
        match kind {
            Fault::KillDaemon => {
                let mut d = cluster.replicas[i].daemon.take().unwrap();
                d.proc.signal(Signal::SIGKILL);
                d.proc.wait();
                cluster.start_daemon(i);
            }
            Fault::KillBridge => {
                let mut b = cluster.replicas[i].bridge.take().unwrap();
                b.signal(Signal::SIGKILL);
                b.wait();
                retired.push(b);
                cluster.start_bridge(i);
            }
            Fault::TermBridge => {
                let mut b = cluster.replicas[i].bridge.take().unwrap();
                b.signal(Signal::SIGTERM);
                let status = b.wait();
                assert!(status.success(), "a bridge exits 0 on SIGTERM: {status:?}");
                old_bridge = Some(retired.len());
                retired.push(b);
                cluster.start_bridge(i);
            }
            Fault::TermDaemon => {
                let mut d = cluster.replicas[i].daemon.take().unwrap();
                d.proc.signal(Signal::SIGTERM);
                let status = d.proc.wait();
                assert!(status.success(), "SIGTERM exits 0: {status:?}");
                cluster.start_daemon(i);
            }
            Fault::StopDaemon => {
                let d = cluster.replicas[i].daemon.as_ref().unwrap();
                d.proc.signal(Signal::SIGSTOP);
                tokio::time::sleep(lease + lease / 2).await;
                d.proc.signal(Signal::SIGCONT);
            }
            Fault::Resign => {
                let d = cluster.replicas[i].daemon.as_ref().unwrap();
                let client = d.client().await;
                // The daemon may have just stepped down by itself; then there is nothing to do.
                let _ = client.resign(ELECTION, None).await;
            }
        }
        faults.push((kind, at));
        // Recovered when some bridge publishes its first record after the fault.
        let mut waited = Duration::ZERO;
        while !cluster
            .first_records(&retired)
            .iter()
            .any(|(_, mono)| *mono > at)
        {
            assert!(
                waited < SOON * 3,
                "no record published within {:?} after {kind:?}",
                SOON * 3
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        // How the old bridge ended its term: flush only where the daemon still held the
        // leadership for it.
        let expected = match kind {
            Fault::KillBridge => None,
            Fault::KillDaemon | Fault::StopDaemon => Some("abrupt"),
            Fault::TermBridge | Fault::TermDaemon | Fault::Resign => Some("hand-over"),
        };
        if let (Some(expected), Some(term)) = (expected, working) {
            let bridge = match old_bridge {
                Some(k) => &retired[k],
                None => cluster.replicas[i].bridge.as_ref().unwrap(),
            };
            let ending = Cluster::ending_of_stop(bridge, term);
            assert_eq!(
                ending, expected,
                "how the bridge ended term {term} after {kind:?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.stop_all(&mut retired);
    let records = broker.read_back();
    assert_no_duplicate_no_term_back(&records);
    let fail_overs = records.windows(2).filter(|p| p[1].1 != p[0].1).count();
    // Gaps: runs of feed records missing between the first and last published.
    let mut seqs: Vec<u64> = records.iter().map(|r| r.0).collect();
    seqs.sort_unstable();
    let gaps: Vec<(u64, u64)> = seqs
        .windows(2)
        .filter(|w| w[1] > w[0] + 1)
        .map(|w| (w[0] + 1, w[1] - w[0] - 1))
        .collect();
    assert!(
        gaps.len() <= faults.len() + 1,
        "{} gaps for {} faults: gaps away from fail-overs",
        gaps.len(),
        faults.len()
    );

    // Figures: per fault kind, records lost (gap starting after it) and fault -> first record.
    let sent = feed.sent.lock().unwrap().clone();
    let firsts = cluster.first_records(&retired);
    let mut lost: BTreeMap<Fault, Vec<f64>> = BTreeMap::new();
    let mut recovery: BTreeMap<Fault, Vec<f64>> = BTreeMap::new();
    for (k, (kind, at)) in faults.iter().enumerate() {
        let until = faults.get(k + 1).map_or(i128::MAX, |f| f.1);
        let gap: u64 = gaps
            .iter()
            .filter(|(start, _)| {
                sent.get(*start as usize)
                    .is_some_and(|t| *t >= *at - 50_000_000 && *t < until)
            })
            .map(|(_, len)| *len)
            .sum();
        lost.entry(*kind).or_default().push(gap as f64);
        if let Some(first) = firsts
            .iter()
            .filter(|(_, m)| *m > *at)
            .map(|(_, m)| *m)
            .min()
        {
            recovery
                .entry(*kind)
                .or_default()
                .push((first - at) as f64 / 1e6);
        }
    }
    let most = feed.most_connected.lock().unwrap().1;
    println!(
        "kafka bridge: published={} duplicates=0 gaps={} records-lost={} fail-overs={} faults={} most-feed-connections-at-once={most}",
        records.len(),
        gaps.len(),
        gaps.iter().map(|g| g.1).sum::<u64>(),
        fail_overs,
        faults.len()
    );
    for (kind, mut samples) in recovery {
        samples.sort_by(f64::total_cmp);
        let mut gap = lost.remove(&kind).unwrap_or_default();
        gap.sort_by(f64::total_cmp);
        println!(
            "  {kind:?}: n={} fault->first record p50={:.1}ms p99={:.1}ms; records lost p50={} p99={}",
            samples.len(),
            percentile(&samples, 50.0),
            percentile(&samples, 99.0),
            percentile(&gap, 50.0),
            percentile(&gap, 99.0)
        );
    }
}

/// The tests of this file run one at a time (the test harness would run them side by side).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Both stores in one test, one after the other: two runs side by side on two cores would
/// measure the machine, not Baton.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_record_twice_under_faults() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap().to_owned();
    println!("== file store");
    no_duplicates_under_faults(
        &["--store", "file", "--lock-dir", &lock],
        Duration::from_secs(2),
    )
    .await;
    #[cfg(feature = "etcd")]
    {
        testkit::etcd::require_binaries();
        let etcd = testkit::etcd::Etcd::start();
        let endpoint = etcd.endpoint();
        println!("== etcd");
        // etcd leases are whole seconds, at least 2.
        no_duplicates_under_faults(
            &["--store", "etcd", "--etcd-endpoints", &endpoint],
            Duration::from_secs(2),
        )
        .await;
    }
}

/// `--transactional-id`: a bridge whose transaction commit the broker refuses as fenced
/// (`PRODUCER_FENCED`, what a broker answers a producer whose epoch a newer producer of the same
/// transactional id has bumped) logs it, ends its term abruptly (aborts, drops what is queued)
/// and returns, so its replica resigns and the standby's bridge takes over the feed. Read back,
/// the topic holds no feed record twice and its terms never decrease.
///
/// On librdkafka's mock cluster (the `kafka_mock_broker` example), on the file store, then on
/// etcd (one after the other, as in the fault sequence above). The refusal is
/// injected (the mock's SIGUSR1): the mock does not fence by itself, since it gives each new
/// producer of a transactional id a new producer id instead of bumping the epoch, and it does not
/// hide aborted records from `read_committed` consumers. So this proves the bridge's and the
/// client's side of fencing, not the broker's: that a paused old bridge's late writes are
/// refused needs a broker with transactions (README, the Kafka bridge).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_bridge_stops_and_standby_takes_over() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap().to_owned();
    println!("== file store");
    fenced_commit(&["--store", "file", "--lock-dir", &lock]).await;
    #[cfg(feature = "etcd")]
    {
        testkit::etcd::require_binaries();
        let etcd = testkit::etcd::Etcd::start();
        let endpoint = etcd.endpoint();
        println!("== etcd");
        fenced_commit(&["--store", "etcd", "--etcd-endpoints", &endpoint]).await;
    }
}

/// One run of the fenced-commit test against replicas started with `store_args`.
async fn fenced_commit(store_args: &[&str]) {
    let broker = Broker::mock();
    let feed = Feed::start(Duration::from_millis(2)).await;
    let mut cluster = Cluster::new(store_args, Duration::from_secs(2), &feed, &broker);
    cluster.bridge_args = ["--transactional-id", "feed-bridge"]
        .map(str::to_owned)
        .into();
    for i in 0..2 {
        cluster.start_daemon(i);
        cluster.start_bridge(i);
    }
    let i = cluster.leader().await;
    let old = cluster.replicas[i].bridge.as_ref().unwrap();
    old.stdout.wait_for("the leader's first record", |l| {
        l.starts_with("first-record")
    });
    // A few commits of this term land first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let term = Cluster::working_term(old).expect("the leader's bridge works in a term");

    let at = mono_now();
    broker.proc.signal(Signal::SIGUSR1);
    broker
        .proc
        .stdout
        .wait_for("the injected fence", |l| l == "fence-armed");
    let ending = Cluster::ending_of_stop(old, term);
    assert_eq!(ending, "abrupt", "a fenced bridge ends its term abruptly");
    let refused = old
        .stderr
        .all()
        .iter()
        .filter(|l| l.contains("commit failed"))
        .count();
    assert_eq!(refused, 1, "the bridge logs the refused commit once");

    // The next term's first record, from whichever bridge leads now.
    let mut waited = Duration::ZERO;
    let (new_term, first) = loop {
        if let Some(next) = cluster
            .first_records(&[])
            .into_iter()
            .filter(|(t, _)| *t > term)
            .min()
        {
            break next;
        }
        assert!(
            waited < SOON * 3,
            "no record of a later term within {:?} after the fence",
            SOON * 3
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += Duration::from_millis(10);
    };
    let stopped_at: i128 = old
        .stdout
        .all()
        .iter()
        .find(|l| l.starts_with(&format!("stopped term={term} ")))
        .and_then(|l| field(l, "mono")?.parse().ok())
        .expect("stopped mono=");
    // Records flow in the new term for a moment, then everything stops gracefully.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut retired = Vec::new();
    cluster.stop_all(&mut retired);
    let records = broker.read_back();
    assert_no_duplicate_no_term_back(&records);
    assert!(
        records.iter().any(|r| r.1 == new_term),
        "term {new_term} published nothing"
    );
    println!(
        "kafka bridge, fenced commit: refused={refused} duplicates=0 records={} \
         fence->old bridge stopped={:.1}ms fence->first record of term {new_term}={:.1}ms",
        records.len(),
        (stopped_at - at) as f64 / 1e6,
        (first - at) as f64 / 1e6
    );
}
