//! Fan-out, Baton beside etcd: how long one change takes to reach 1,000 and 10,000 streams,
//! and each server's RSS with them.
//!
//! ```text
//! cargo bench --features etcd --bench fanout           # 10 changes of each kind per N
//! BATON_BENCH_RUNS=20 BATON_BENCH_STREAMS_PER_CONN=500 cargo bench --features etcd --bench fanout
//! ```
//!
//! Both servers get subscribers of the same shape: N server streams over N /
//! `BATON_BENCH_STREAMS_PER_CONN` HTTP/2 connections (default 100 streams each; it must divide
//! 1,000), opened with standard clients, one task per connection reading all its streams and
//! stamping each event with the monotonic clock as it is decoded.
//!
//! - **Baton**: two release `baton run` daemons, A and B, on the file store, in one election;
//!   A leads. N WatchLeadership streams (tonic clients, observers) on A. Changes alternate:
//!   *loss*, `Resign(A, successor B)`, reached when a subscriber receives a state that is not
//!   LEADER (A announces the loss before it touches the store: the daemon's path alone,
//!   RPC -> election task -> watch channel -> N streams); *gain*, `Resign(B, successor A)`,
//!   reached at LEADER in A's new term (the hand-off through the store, then the fan-out).
//! - **etcd**: a real etcd (`testkit::etcd`); N Watch streams of one key (the `etcd-client`
//!   crate, one watch per stream); a change is one Put of the key, reached when a watcher
//!   receives its event.
//!
//! The clock starts just before the triggering RPC is sent. Per N: `per subscriber` pools every
//! subscriber's latency over every change; `all reached` is, per change, the last subscriber's.
//! Asserted exactly, per change: every Baton subscriber ends in the state the daemons report
//! and never sees a term go down; every etcd watcher receives the Put's revision.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs 1 change of each kind at
//! N = 1,000 only, as a smoke test of the benchmark itself.

use std::{fmt::Debug, sync::Arc, time::Duration};

use baton::{
    client::Role,
    proto::{LeadershipEvent, WatchLeadershipRequest, leadership_client::LeadershipClient},
};
use futures::{FutureExt, StreamExt, stream::BoxStream};
use testkit::{Daemon, SOON, percentile, status_kib, summary};
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout},
};
use tonic::transport::Endpoint;

const ELECTION: &str = "fanout";
const KEY: &str = "fanout";

/// What a subscriber holds: for Baton (role, leader, term), for etcd the key's revision.
trait State: Clone + PartialEq + Debug + Send + 'static {
    /// What never goes down along one stream.
    fn order(&self) -> u64;
}

#[derive(Clone, PartialEq, Debug)]
struct Leadership {
    role: Role,
    leader: Arc<str>,
    term: u64,
}

impl State for Leadership {
    fn order(&self) -> u64 {
        self.term
    }
}

/// The revision of the key's last Put seen by a watcher; 0 for "watch created".
#[derive(Clone, Copy, PartialEq, Debug)]
struct Revision(i64);

impl State for Revision {
    fn order(&self) -> u64 {
        self.0 as u64
    }
}

/// One event as a subscriber received it.
struct Received<S> {
    subscriber: usize,
    at: Instant,
    state: S,
}

/// A subscriber's state, and what it saw since the current change began.
#[derive(Clone)]
struct Seen<S> {
    last: Option<S>,
    /// When this subscriber first received the change being measured.
    reached: Option<Instant>,
    /// The distinct states received since the trigger, in order.
    history: Vec<S>,
}

impl<S> Default for Seen<S> {
    fn default() -> Self {
        Seen {
            last: None,
            reached: None,
            history: Vec::new(),
        }
    }
}

/// A subscriber's events, tagged with its index; ends when the stream does.
type Events<S> = BoxStream<'static, (usize, S)>;

/// N subscribers of one server.
struct Subscribers<S> {
    tasks: JoinSet<()>,
    events: mpsc::UnboundedReceiver<Vec<Received<S>>>,
    sender: mpsc::UnboundedSender<Vec<Received<S>>>,
    /// Events taken from the last batch and not yet recorded.
    backlog: std::vec::IntoIter<Received<S>>,
    seen: Vec<Seen<S>>,
    /// Events received by all subscribers so far.
    received: u64,
}

impl<S: State> Subscribers<S> {
    fn new() -> Subscribers<S> {
        let (sender, events) = mpsc::unbounded_channel();
        Subscribers {
            tasks: JoinSet::new(),
            events,
            sender,
            backlog: Vec::new().into_iter(),
            seen: Vec::new(),
            received: 0,
        }
    }

    fn len(&self) -> usize {
        self.seen.len()
    }

    /// Read one connection's streams (indexed from [`Subscribers::len`] on) from one task.
    /// Every event decoded at one wake-up is stamped and sent to the main task in one batch.
    fn add_connection(&mut self, streams: Vec<Events<S>>) {
        self.seen
            .extend(std::iter::repeat_with(Seen::default).take(streams.len()));
        let sender = self.sender.clone();
        self.tasks.spawn(async move {
            let mut streams = futures::stream::select_all(streams);
            while let Some(first) = streams.next().await {
                let mut batch = vec![first];
                while let Some(Some(more)) = streams.next().now_or_never() {
                    batch.push(more);
                }
                let at = Instant::now();
                let batch = batch
                    .into_iter()
                    .map(|(subscriber, state)| Received {
                        subscriber,
                        at,
                        state,
                    })
                    .collect();
                if sender.send(batch).is_err() {
                    return;
                }
            }
        });
    }

    /// Record one event; an order that goes down is a failure.
    fn record(&mut self, event: Received<S>, since: Instant, reached: &impl Fn(&S) -> bool) {
        self.received += 1;
        let seen = &mut self.seen[event.subscriber];
        if let Some(last) = &seen.last {
            assert!(
                event.state.order() >= last.order(),
                "subscriber {}: went back from {last:?} to {:?}",
                event.subscriber,
                event.state
            );
        }
        if event.at >= since {
            if seen.reached.is_none() && reached(&event.state) {
                seen.reached = Some(event.at);
            }
            if seen.history.last() != Some(&event.state) {
                seen.history.push(event.state.clone());
            }
        }
        seen.last = Some(event.state);
    }

    /// Take events until every subscriber's last state satisfies `done`; panics with what the
    /// subscribers that are not done saw.
    async fn wait(
        &mut self,
        since: Instant,
        reached: &impl Fn(&S) -> bool,
        done: &impl Fn(&Seen<S>) -> bool,
    ) {
        let mut pending = self.seen.iter().filter(|s| !done(s)).count();
        while pending > 0 {
            let Some(event) = self.backlog.next() else {
                let Ok(batch) = timeout(SOON, self.events.recv()).await else {
                    // A reader that failed says why (its stream failed).
                    while let Some(ended) = self.tasks.try_join_next() {
                        if let Err(e) = ended
                            && e.is_panic()
                        {
                            std::panic::resume_unwind(e.into_panic());
                        }
                    }
                    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
                    for s in self.seen.iter().filter(|s| !done(s)) {
                        *kinds.entry(format!("{:?}", s.history)).or_default() += 1;
                    }
                    panic!(
                        "{pending} of {} subscribers not done within {SOON:?}; their states \
                         since the trigger (count): {kinds:#?}",
                        self.len()
                    );
                };
                self.backlog = batch.expect("this holds a sender").into_iter();
                continue;
            };
            let index = event.subscriber;
            let before = done(&self.seen[index]);
            self.record(event, since, reached);
            match (before, done(&self.seen[index])) {
                (false, true) => pending -= 1,
                (true, false) => pending += 1,
                _ => {}
            }
        }
    }

    /// Wait until every subscriber holds a state.
    async fn settle(&mut self) {
        self.wait(Instant::now(), &|_| false, &|s| s.last.is_some())
            .await;
    }

    /// Send `trigger`, then take events until every subscriber satisfies `done`; returns each
    /// subscriber's latency to its first event satisfying `reached`.
    async fn measure(
        &mut self,
        trigger: impl Future<Output = ()>,
        reached: impl Fn(&S) -> bool,
        done: impl Fn(&Seen<S>) -> bool,
    ) -> Vec<Duration> {
        for seen in &mut self.seen {
            seen.reached = None;
            seen.history.clear();
        }
        let sent = Instant::now();
        trigger.await;
        self.wait(sent, &reached, &done).await;
        self.seen
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.reached
                    .unwrap_or_else(|| panic!("subscriber {i} never received the change"))
                    - sent
            })
            .collect()
    }
}

impl Subscribers<Leadership> {
    /// Wait until every subscriber holds exactly the state the daemons report.
    async fn expect(&mut self, role: Role, leader: &str, term: u64) {
        let expected = Leadership {
            role,
            leader: leader.into(),
            term,
        };
        self.wait(Instant::now(), &|_| false, &|s| {
            s.last.as_ref() == Some(&expected)
        })
        .await;
    }
}

/// One HTTP/2 connection to a Baton daemon, with a WatchLeadership stream per index.
async fn baton_streams(addr: &str, indexes: std::ops::Range<usize>) -> Vec<Events<Leadership>> {
    let channel = Endpoint::from_shared(addr.to_owned())
        .expect("daemon address")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to the daemon");
    let request = WatchLeadershipRequest {
        election: ELECTION.to_owned(),
        ..Default::default()
    };
    let mut streams = Vec::with_capacity(indexes.len());
    for index in indexes {
        let stream = LeadershipClient::new(channel.clone())
            .watch_leadership(request.clone())
            .await
            .expect("WatchLeadership")
            .into_inner();
        streams.push(
            stream
                .map(move |event| match event {
                    Ok(event) => (index, leadership(event)),
                    Err(status) => panic!("a WatchLeadership stream failed: {status}"),
                })
                .boxed(),
        );
    }
    streams
}

fn leadership(event: LeadershipEvent) -> Leadership {
    Leadership {
        role: Role::try_from(event.role).unwrap_or(Role::Unknown),
        leader: event.leader.into(),
        term: event.term,
    }
}

/// One etcd client (one HTTP/2 connection), with a Watch stream of [`KEY`] per index.
async fn etcd_streams(endpoint: &str, indexes: std::ops::Range<usize>) -> Vec<Events<Revision>> {
    let client = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("connect to etcd");
    let mut streams = Vec::with_capacity(indexes.len());
    for index in indexes {
        let stream = client.watch_client().watch(KEY, None).await.expect("Watch");
        streams.push(
            stream
                .flat_map(move |response| {
                    let response = response.unwrap_or_else(|e| panic!("an etcd watch failed: {e}"));
                    let states: Vec<(usize, Revision)> = if response.created() {
                        vec![(index, Revision(0))]
                    } else {
                        response
                            .events()
                            .iter()
                            .filter_map(|e| e.kv().map(|kv| (index, Revision(kv.mod_revision()))))
                            .collect()
                    };
                    futures::stream::iter(states)
                })
                .boxed(),
        );
    }
    streams
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: impl std::fmt::Display) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // After the command name (which may hold spaces): utime and stime, the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // /proc reports in USER_HZ, which is 100 on Linux whatever the kernel's HZ.
    Duration::from_millis(ticks * 10)
}

/// "VmRSS=.. KiB VmHWM=.. KiB" of a process.
fn rss(pid: impl std::fmt::Display + Copy) -> String {
    format!(
        "VmRSS={} KiB VmHWM={} KiB",
        status_kib(pid, "VmRSS"),
        status_kib(pid, "VmHWM")
    )
}

/// Latencies of one kind of change at one N.
#[derive(Default)]
struct Figures {
    per_subscriber: Vec<Duration>,
    all_reached: Vec<Duration>,
}

impl Figures {
    fn add(&mut self, latencies: Vec<Duration>) {
        self.all_reached
            .push(*latencies.iter().max().expect("subscribers"));
        self.per_subscriber.extend(latencies);
    }

    fn print(&self, what: &str, n: usize) {
        let changes = self.all_reached.len();
        println!(
            "{what} N={n}: per subscriber (pooled over {changes} changes) {}",
            summary(self.per_subscriber.clone())
        );
        println!(
            "{what} N={n}: all reached (per change) {}",
            summary(self.all_reached.clone())
        );
    }

    fn p99(&self) -> Duration {
        let mut sorted = self.per_subscriber.clone();
        sorted.sort();
        percentile(&sorted, 99.0)
    }
}

/// What to run.
struct Plan {
    sizes: &'static [usize],
    /// Changes of each kind at each N.
    changes: usize,
    per_conn: usize,
}

impl Plan {
    /// The connections to open to grow from `from` to `to` subscribers.
    fn connections(&self, from: usize, to: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        assert_eq!(
            to % self.per_conn,
            0,
            "N must be a multiple of the streams per connection"
        );
        let per_conn = self.per_conn;
        (from..to).step_by(per_conn).map(move |i| i..i + per_conn)
    }
}

/// Per N: Baton's loss and gain, and etcd's Put.
#[derive(Default)]
struct Results {
    loss: Vec<Figures>,
    gain: Vec<Figures>,
    put: Vec<Figures>,
}

/// Baton on the file store: A leads, B follows; subscribers on A.
async fn bench_baton(plan: &Plan, results: &mut Results) {
    let dir = testkit::lock_dir();
    let lock = dir.path().to_str().expect("utf-8 path");
    let start = |id| Daemon::start(id, &["--lock-dir", lock, "--election", ELECTION]);
    let a = start("a");
    let mut term = a.wait_role(ELECTION, Role::Leader).await.term;
    let b = start("b");
    b.wait_for(ELECTION, "following a", |s| {
        s.role == Role::Follower && s.leader.as_deref() == Some("a")
    })
    .await;
    let (ca, cb) = (a.client().await, b.client().await);
    let pid = a.proc.pid();
    let mut subscribers = Subscribers::new();
    for &n in plan.sizes {
        for indexes in plan.connections(subscribers.len(), n) {
            subscribers.add_connection(baton_streams(&a.addr, indexes).await);
        }
        subscribers.settle().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("Baton daemon RSS with {n} subscribers: {}", rss(pid));
        let (mut loss, mut gain) = (Figures::default(), Figures::default());
        let (cpu, received) = (cpu_time(pid), subscribers.received);
        for _ in 0..plan.changes {
            let latencies = subscribers
                .measure(
                    async {
                        ca.resign(ELECTION, Some("b")).await.expect("resign a");
                    },
                    |s| s.role != Role::Leader,
                    |s| {
                        s.last
                            .as_ref()
                            .is_some_and(|l| l.term > term && &*l.leader == "b")
                    },
                )
                .await;
            let b_term = b.wait_role(ELECTION, Role::Leader).await.term;
            assert!(b_term > term, "b's term {b_term} is not above {term}");
            term = b_term;
            subscribers.expect(Role::Follower, "b", term).await;
            loss.add(latencies);
            let latencies = subscribers
                .measure(
                    async {
                        cb.resign(ELECTION, Some("a")).await.expect("resign b");
                    },
                    |s| s.role == Role::Leader && s.term > term,
                    |s| {
                        s.last
                            .as_ref()
                            .is_some_and(|l| l.role == Role::Leader && l.term > term)
                    },
                )
                .await;
            let a_term = a.wait_role(ELECTION, Role::Leader).await.term;
            assert!(a_term > term, "a's term {a_term} is not above {term}");
            term = a_term;
            subscribers.expect(Role::Leader, "a", term).await;
            gain.add(latencies);
        }
        println!(
            "Baton daemon CPU per change at N={n}: {:.1} ms; {:.2} events per subscriber per \
             change (heartbeats included)",
            (cpu_time(pid) - cpu).as_secs_f64() * 1e3 / (2 * plan.changes) as f64,
            (subscribers.received - received) as f64 / (n * 2 * plan.changes) as f64
        );
        println!(
            "Baton daemon RSS with {n} subscribers after the changes: {}",
            rss(pid)
        );
        loss.print("Baton loss (Resign -> not LEADER)", n);
        gain.print("Baton gain via the file store (Resign of B -> A LEADER)", n);
        results.loss.push(loss);
        results.gain.push(gain);
    }
}

/// etcd: N watchers of one key; a change is a Put.
async fn bench_etcd(plan: &Plan, results: &mut Results) {
    let etcd = testkit::etcd::Etcd::start();
    let endpoint = etcd.endpoint();
    let pid = etcd.pid().expect("etcd runs");
    let mut kv = etcd_client::Client::connect([&endpoint], None)
        .await
        .expect("connect to etcd");
    let mut subscribers = Subscribers::new();
    for &n in plan.sizes {
        for indexes in plan.connections(subscribers.len(), n) {
            subscribers.add_connection(etcd_streams(&endpoint, indexes).await);
        }
        subscribers.settle().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("etcd RSS with {n} watchers: {}", rss(pid));
        let mut put = Figures::default();
        let cpu = cpu_time(pid);
        for change in 0..2 * plan.changes {
            let mut revision = 0;
            let latencies = subscribers
                .measure(
                    async {
                        let response = kv.put(KEY, change.to_string(), None).await.expect("put");
                        revision = response.header().expect("a header").revision();
                    },
                    |s| s.0 > 0,
                    |s| s.reached.is_some(),
                )
                .await;
            for (i, s) in subscribers.seen.iter().enumerate() {
                assert_eq!(s.history, [Revision(revision)], "watcher {i}");
            }
            put.add(latencies);
        }
        println!(
            "etcd CPU per change at N={n}: {:.1} ms",
            (cpu_time(pid) - cpu).as_secs_f64() * 1e3 / (2 * plan.changes) as f64
        );
        println!("etcd RSS with {n} watchers after the changes: {}", rss(pid));
        put.print("etcd Put -> watch event", n);
        results.put.push(put);
    }
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let plan = Plan {
        sizes: if full { &[1_000, 10_000] } else { &[1_000] },
        changes: env("BATON_BENCH_RUNS").unwrap_or(if full { 10 } else { 1 }),
        per_conn: env("BATON_BENCH_STREAMS_PER_CONN").unwrap_or(100),
    };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "fan-out benchmark: {} changes of each kind per N, {} streams per connection read by \
         one task, {profile} build, {} cores (servers and subscribers share them)",
        plan.changes,
        plan.per_conn,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut results = Results::default();
    bench_baton(&plan, &mut results).await;
    bench_etcd(&plan, &mut results).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (i, &n) in plan.sizes.iter().enumerate() {
        let etcd = results.put[i].p99();
        for (kind, baton) in [("loss", &results.loss[i]), ("gain", &results.gain[i])] {
            println!(
                "N={n}: p99 Baton {kind} {:.2} ms / etcd Put {:.2} ms = {:.2}",
                ms(baton.p99()),
                ms(etcd),
                baton.p99().as_secs_f64() / etcd.as_secs_f64()
            );
        }
    }
}
