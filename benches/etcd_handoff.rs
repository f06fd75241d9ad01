//! Hand-off and fail-over on a real etcd, side by side with `etcdctl elect` on the same server.
//!
//! ```text
//! cargo bench --features etcd --bench etcd_handoff      # 20 runs of each
//! ```
//!
//! - **baton handoff**: SIGTERM to the leading `baton run` -> the standby's worker has started.
//!   End to end: the old daemon announces the loss, its worker stops and confirms, the daemon
//!   deletes its key, the standby's watch fires, it proves its lease, publishes LEADER, and the
//!   standby's worker (the timer worker's loop, in this process) starts. The SIGTERM is sent
//!   only once etcd's gauges show the standby's watch on the leader's key, synced.
//! - **etcdctl handoff**: SIGINT to a leading `etcdctl elect` -> the waiting `etcdctl elect`
//!   prints that it is elected (stamped when its line is read here): the store-only figure. The
//!   SIGINT is sent only once etcd's gauges show the waiter's watch on its predecessor and no
//!   unsynced watcher: etcd's concurrency package watches from the revision of its read, which
//!   etcd serves from a catch-up loop (every 100 ms) until the watch is synced, so a hand-off in
//!   the waiter's first ~100 ms waits for that loop.
//! - **baton failover minus TTL**: kill -9 of the leading daemon -> the standby's worker has
//!   started, minus the session TTL. The server expires the lease one TTL after the last
//!   keep-alive it received (which the leader sends every retry period) and checks expiries
//!   every 500 ms, so this can be negative.
//!
//! - **requests per minute at steady state**: gRPC messages etcd received (its Prometheus
//!   `grpc_server_msg_received_total`: one per unary call, one per message on a stream), per
//!   method, over a window with one leader alone, then a window with the leader and one
//!   follower; the follower's share is the difference. Daemon defaults (15 s lease, 2 s retry
//!   period). 30 s windows under `--bench`, 3 s otherwise.
//!
//! Without `--bench` in argv (as under `cargo test --all-targets`) it does 3 runs of each;
//! `BATON_BENCH_RUNS=N` sets the count. Figures are printed, never asserted; safety is checked on
//! every hand-off (the old worker stopped before the new one started).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    time::Duration,
};

use baton::client::{Client, Role};
use nix::sys::signal::Signal;
use testkit::etcd::Etcd;
use testkit::{Daemon, Proc, SHORT_TIMING, percentile};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

/// The lease of `testkit::SHORT_TIMING`.
const LEASE_SECS: u64 = 3;

/// A daemon on `etcd` with the short timings, campaigning only with a ready worker: so
/// "campaigning" proves the worker subscribed.
fn daemon(identity: &str, etcd: &Etcd, election: &str) -> Daemon {
    let mut args = SHORT_TIMING.to_vec();
    args.extend(["--campaign", "when-ready"]);
    daemon_with(identity, etcd, election, &args)
}

/// A daemon on `etcd` in `election`, with `args` added.
fn daemon_with(identity: &str, etcd: &Etcd, election: &str, args: &[&str]) -> Daemon {
    let endpoint = etcd.endpoint();
    let mut all = vec![
        "--store",
        "etcd",
        "--etcd-endpoints",
        &endpoint,
        "--election",
        election,
    ];
    all.extend(args);
    Daemon::start(identity, &all)
}

/// A worker's start or stop, stamped.
enum Edge {
    Started(Instant),
    Stopped(Instant),
}

/// The timer worker's loop, in this process: reports when it starts and stops on `edges`. A
/// local task: the future of `run_while_leader` is not `Send`.
fn worker(daemon: &Daemon, election: &str, edges: mpsc::UnboundedSender<Edge>) -> JoinHandle<()> {
    let client = Client::connect_lazy(daemon.addr.clone()).expect("daemon address");
    let election = election.to_owned();
    tokio::task::spawn_local(async move {
        let outcome = client
            .run_while_leader(&election, move |lease| {
                let edges = edges.clone();
                async move {
                    let _ = edges.send(Edge::Started(Instant::now()));
                    let mut ticks = tokio::time::interval(Duration::from_millis(50));
                    loop {
                        tokio::select! {
                            _ = lease.cancelled() => break,
                            _ = ticks.tick() => {}
                        }
                    }
                    let _ = edges.send(Edge::Stopped(Instant::now()));
                }
            })
            .await;
        if let Err(e) = outcome {
            eprintln!("bench worker: {e}");
        }
    })
}

/// A daemon with its worker attached.
struct Replica {
    daemon: Daemon,
    worker: JoinHandle<()>,
    edges: mpsc::UnboundedReceiver<Edge>,
}

impl Replica {
    async fn start(identity: &str, etcd: &Etcd, election: &str) -> Replica {
        let daemon = daemon(identity, etcd, election);
        let (tx, edges) = mpsc::unbounded_channel();
        let worker = worker(&daemon, election, tx);
        Replica {
            daemon,
            worker,
            edges,
        }
    }

    /// Wait until the daemon follows and campaigns, which it does only once its worker has
    /// subscribed and declared itself ready.
    async fn ready(&self, election: &str) {
        self.daemon
            .wait_for(election, "a ready standby", |s| {
                s.role == Role::Follower && s.campaigning
            })
            .await;
    }

    async fn next_edge(&mut self) -> Edge {
        tokio::time::timeout(testkit::SOON, self.edges.recv())
            .await
            .expect("the worker starts or stops soon")
            .expect("the worker task lives")
    }

    async fn worker_started(&mut self) -> Instant {
        match self.next_edge().await {
            Edge::Started(at) => at,
            Edge::Stopped(_) => panic!("the worker stopped before it started"),
        }
    }

    async fn worker_stopped(&mut self) -> Instant {
        match self.next_edge().await {
            Edge::Stopped(at) => at,
            Edge::Started(_) => panic!("the worker started twice"),
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.worker.abort();
    }
}

/// SIGTERM to the leader -> the standby's worker started.
async fn baton_handoff(etcd: &Etcd, runs: usize) -> Vec<Duration> {
    let election = "bench-handoff";
    let mut leader = Replica::start("r0", etcd, election).await;
    leader.worker_started().await;
    let mut samples = Vec::new();
    for i in 1..=runs {
        // The leader holds no watch: so the one below is the standby's, on its predecessor.
        wait_watchers(etcd, 0, "no watch").await;
        let mut standby = Replica::start(&format!("r{i}"), etcd, election).await;
        standby.ready(election).await;
        wait_watchers(etcd, 1, "the standby's watch, synced").await;
        let sent = Instant::now();
        leader.daemon.proc.signal(Signal::SIGTERM);
        let started = standby.worker_started().await;
        samples.push(started - sent);
        // Safety on every run: the old worker stopped before the new one started.
        let stopped = leader.worker_stopped().await;
        assert!(
            stopped < started,
            "the new worker started before the old one stopped"
        );
        leader.daemon.proc.wait();
        leader = standby;
    }
    samples
}

/// SIGINT to a leading `etcdctl elect` -> the waiter prints that it is elected.
async fn etcdctl_handoff(etcd: &Etcd, runs: usize) -> Vec<Duration> {
    let name = "bench-etcdctl";
    let queued = Proc::spawn(
        etcd.etcdctl(&["watch", "--prefix", &format!("{name}/")]),
        "watch: ",
    );
    let campaign = |who: &str| Proc::spawn(etcd.etcdctl(&["elect", name, who]), "elect: ");
    let mut leader = campaign("e0");
    leader.stdout.wait_for("e0 elected", |l| l == "e0");
    let mut samples = Vec::new();
    for i in 1..=runs {
        // Only the queued watch (the new leader has dropped its watch on its predecessor): so
        // a second watch below is the waiter's.
        wait_watchers(etcd, 1, "only the queued watch").await;
        let who = format!("e{i}");
        let waiter = campaign(&who);
        queued.stdout.wait_for("the waiter's key", |l| l == who);
        wait_watchers(etcd, 2, "the waiter's watch, synced").await;
        let sent = Instant::now();
        leader.signal(Signal::SIGINT);
        waiter.stdout.wait_for("the waiter elected", |l| l == who);
        samples.push(sent.elapsed());
        leader.wait();
        leader = waiter;
    }
    samples
}

/// kill -9 of the leader -> the standby's worker started, minus the TTL (signed, in ms).
async fn crash_failover(etcd: &Etcd, runs: usize) -> Vec<f64> {
    let election = "bench-crash";
    let mut leader = Replica::start("c0", etcd, election).await;
    leader.worker_started().await;
    let mut samples = Vec::new();
    for i in 1..=runs {
        let mut standby = Replica::start(&format!("c{i}"), etcd, election).await;
        standby.ready(election).await;
        let sent = Instant::now();
        leader.daemon.proc.signal(Signal::SIGKILL);
        let started = standby.worker_started().await;
        leader.daemon.proc.wait();
        let failover = (started - sent).as_secs_f64() * 1e3;
        samples.push(failover - (LEASE_SECS * 1000) as f64);
        leader = standby;
    }
    samples
}

/// etcd's Prometheus page.
fn metrics(etcd: &Etcd) -> String {
    let address = etcd.endpoint().trim_start_matches("http://").to_owned();
    let mut connection = std::net::TcpStream::connect(&address).expect("connect to etcd");
    connection
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .expect("ask for /metrics");
    let mut page = String::new();
    connection.read_to_string(&mut page).expect("read /metrics");
    page
}

/// The value of the unlabelled metric `name` on `page`.
fn gauge(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("etcd's /metrics has no {name}"))
}

/// Wait until etcd has exactly `watchers` watchers, none of them unsynced (still catching up
/// from an old revision, so told of a change only by the next 100 ms pass of the catch-up loop).
async fn wait_watchers(etcd: &Etcd, watchers: u32, what: &str) {
    let deadline = Instant::now() + testkit::SOON;
    loop {
        let page = metrics(etcd);
        let total = gauge(&page, "etcd_debugging_mvcc_watcher_total");
        let unsynced = gauge(&page, "etcd_debugging_mvcc_slow_watcher_total");
        if total == f64::from(watchers) && unsynced == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "etcd: no {what} within {:?} ({total} watchers, {unsynced} unsynced)",
            testkit::SOON
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// etcd's `grpc_server_msg_received_total`, summed per `service/method`.
fn received_messages(etcd: &Etcd) -> BTreeMap<String, f64> {
    let page = metrics(etcd);
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let end = start + line[start..].find('"')?;
        Some(line[start..end].to_owned())
    };
    let mut counts = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_msg_received_total{") else {
            continue;
        };
        let (Some(service), Some(method)) =
            (label(rest, "grpc_service"), label(rest, "grpc_method"))
        else {
            continue;
        };
        let value: f64 = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a counter value");
        let service = service.rsplit('.').next().unwrap_or_default().to_owned();
        *counts.entry(format!("{service}/{method}")).or_default() += value;
    }
    assert!(
        !counts.is_empty(),
        "etcd's /metrics has no grpc_server_msg_received_total"
    );
    counts
}

/// The per-minute rate of each method between two readings, and the total.
fn per_minute(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    window: Duration,
) -> (f64, BTreeMap<String, f64>) {
    let mut rates = BTreeMap::new();
    for (method, n) in after {
        let d = n - before.get(method).copied().unwrap_or(0.0);
        if d > 0.0 {
            rates.insert(method.clone(), d * 60.0 / window.as_secs_f64());
        }
    }
    (rates.values().sum(), rates)
}

fn show(rates: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = rates.iter().map(|(m, n)| format!("{m} {n:.1}")).collect();
    parts.join(", ")
}

/// A leader alone for `window`, then with a follower; etcd's received messages per minute.
async fn steady_state(etcd: &Etcd, window: Duration) {
    let election = "bench-steady";
    // The default timings: the steady cost as deployed.
    let start = |identity: &str| daemon_with(identity, etcd, election, &[]);
    let leader = start("s0");
    leader.wait_role(election, Role::Leader).await;
    let before = received_messages(etcd);
    tokio::time::sleep(window).await;
    let alone = received_messages(etcd);
    let follower = start("s1");
    follower
        .wait_for(election, "following", |s| {
            s.role == Role::Follower && s.leader.as_deref() == Some("s0")
        })
        .await;
    // The follower's start-up calls are not steady state.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_follower = received_messages(etcd);
    tokio::time::sleep(window).await;
    let after = received_messages(etcd);
    let (leader_total, leader_rates) = per_minute(&before, &alone, window);
    let (both_total, both_rates) = per_minute(&with_follower, &after, window);
    let secs = window.as_secs();
    println!(
        "etcd requests at steady state (gRPC messages received by etcd, retry period 2 s), \
         {secs} s windows: leader alone {leader_total:.1}/min ({}); leader + follower \
         {both_total:.1}/min ({}); so the follower ~{:.1}/min",
        show(&leader_rates),
        show(&both_rates),
        both_total - leader_total
    );
    drop(follower);
    drop(leader);
}

fn report(what: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "etcd {what} p50={:.1}ms p99={:.1}ms min={:.1}ms max={:.1}ms n={}",
        percentile(&ms, 50.0),
        percentile(&ms, 99.0),
        ms.first().copied().unwrap_or_default(),
        ms.last().copied().unwrap_or_default(),
        ms.len()
    );
}

fn millis(samples: Vec<Duration>) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let runs = std::env::var("BATON_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if full { 20 } else { 3 });
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let etcd = Etcd::start();
    let ctl = runtime.block_on(etcdctl_handoff(&etcd, runs));
    let local = tokio::task::LocalSet::new();
    let window = Duration::from_secs(if full { 30 } else { 3 });
    let (baton, crash) = runtime.block_on(local.run_until(async {
        let baton = baton_handoff(&etcd, runs).await;
        let crash = crash_failover(&etcd, runs).await;
        steady_state(&etcd, window).await;
        (baton, crash)
    }));
    report(
        "handoff baton (SIGTERM -> new worker started)",
        millis(baton),
    );
    report("handoff etcdctl (SIGINT -> waiter elected)", millis(ctl));
    report(
        &format!("failover baton minus ttl={LEASE_SECS}s (kill -9 -> new worker started)"),
        crash,
    );
}
