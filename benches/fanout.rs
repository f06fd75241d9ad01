//! Fan-out: how long one leadership change takes to reach 1,000 and 10,000 WatchLeadership
//! subscribers of one daemon, and the daemon's RSS at 0, 1,000 and 10,000 subscribers.
//!
//! ```text
//! cargo bench --bench fanout                      # file store; 10 changes of each kind per N
//! cargo bench --features etcd --bench fanout      # also on a real etcd
//! BATON_BENCH_RUNS=20 BATON_BENCH_STREAMS_PER_CONN=500 cargo bench --bench fanout
//! BATON_BENCH_STORES=etcd cargo bench --features etcd --bench fanout   # file,kubernetes,etcd
//! BATON_BENCH_SUBSCRIBERS=lean cargo bench --bench fanout                # tonic,lean
//! ```
//!
//! Stores: the file store; the Kubernetes store against the Lease API test double
//! (`tests/k8s_api`) with the `kubernetes` feature (on by default); a real etcd with `etcd`.
//!
//! Two release `baton run` daemons, A and B, campaign in one election; A leads. This process
//! opens N plain (observer) WatchLeadership streams on A, spread over HTTP/2 connections of
//! `BATON_BENCH_STREAMS_PER_CONN` streams each (default 100; it must divide 1,000; the server
//! sets no stream limit).
//! One task per connection reads all its streams and stamps every event with the monotonic
//! clock as it is decoded (one stamp for the events decoded at one wake-up): what an
//! aggregator watching many elections would do, and it keeps the subscribers' share of the two
//! cores down. Each store runs twice, with fresh daemons, once per kind of subscriber
//! (`BATON_BENCH_SUBSCRIBERS`, default both):
//!
//! - **tonic**: the streams are tonic clients, as the worker client embeds them. On this
//!   machine they share the daemon's cores and use about as much CPU as the daemon does.
//! - **lean**: the streams are read by [`lean`], HTTP/2 by hand, one pass over each read; the
//!   subscribers then use about a third of the daemon's CPU, and the figure is mostly the
//!   daemon's own, as when the subscribers run elsewhere.
//!
//! Two kinds of change, alternating:
//!
//! - **loss**: `Resign(A, successor B)` is sent; a subscriber has the change when it receives
//!   a state that is not LEADER. A announces the loss before it touches the store, so this is
//!   the daemon's fan-out path alone (RPC -> election task -> watch channel -> N streams),
//!   the same for every store.
//! - **gain**: `Resign(B, successor A)` is sent; a subscriber has the change when it receives
//!   LEADER in A's new term. This adds the hand-off through the store (B releases, A's store
//!   notification, A acquires) to the fan-out.
//!
//! The clock starts just before the Resign RPC is sent. Figures per kind and N:
//! `per subscriber` pools every subscriber's latency over every change (n = N x changes);
//! `all reached` is, per change, the latency of the last subscriber (n = changes); `spread` is,
//! per change, last minus first subscriber. Timings are printed, never asserted. Asserted
//! exactly, per change: every subscriber ends in the state the daemons report (role, leader and
//! the term the new leader reports itself), and no subscriber ever sees a term go down.
//!
//! Under `cargo test --all-targets` (no `--bench` argument) it runs 1 change of each kind at
//! N = 1,000 only, with both kinds of subscriber, as a smoke test of the benchmark itself.

#[path = "../tests/common/mod.rs"]
mod common;
#[cfg(feature = "etcd")]
#[path = "../tests/etcd_server/mod.rs"]
mod etcd_server;
#[cfg(feature = "kubernetes")]
#[path = "../tests/k8s_api/mod.rs"]
mod k8s_api;
#[path = "fanout/lean.rs"]
mod lean;

use std::{sync::Arc, time::Duration};

use baton::{
    client::Role,
    proto::{LeadershipEvent, WatchLeadershipRequest, leadership_client::LeadershipClient},
};
use common::{Daemon, SOON, proc_number, status_kib, summary};
use futures::{FutureExt, StreamExt};
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, timeout},
};
use tonic::transport::Endpoint;

const ELECTION: &str = "fanout";

/// One event as a subscriber received it.
struct Received {
    subscriber: usize,
    at: Instant,
    role: Role,
    leader: Arc<str>,
    term: u64,
}

/// The last state a subscriber holds, and what it saw since the current change began.
#[derive(Clone, Default)]
struct Seen {
    role: Option<Role>,
    leader: Arc<str>,
    term: u64,
    /// When this subscriber first received the change being measured.
    reached: Option<Instant>,
    /// Events received since the trigger.
    events: u64,
    /// The distinct states (role, leader, term) received since the trigger, in order.
    history: Vec<(Role, Arc<str>, u64)>,
}

/// How the subscribers read their streams.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// tonic's client, as the worker client embeds it.
    Tonic,
    /// HTTP/2 by hand, one pass over each read ([`lean`]).
    Lean,
}

impl Kind {
    const ALL: [Kind; 2] = [Kind::Tonic, Kind::Lean];

    fn name(self) -> &'static str {
        match self {
            Kind::Tonic => "tonic",
            Kind::Lean => "lean",
        }
    }
}

/// N subscribers on one daemon.
struct Subscribers {
    addr: String,
    kind: Kind,
    per_conn: usize,
    tasks: JoinSet<()>,
    events: mpsc::UnboundedReceiver<Vec<Received>>,
    sender: mpsc::UnboundedSender<Vec<Received>>,
    /// Events taken from the last batch and not yet recorded.
    backlog: std::vec::IntoIter<Received>,
    seen: Vec<Seen>,
    /// Events received by all subscribers so far (changes and heartbeats).
    received: u64,
    /// When the change being measured was triggered.
    trigger: Instant,
}

impl Subscribers {
    fn new(addr: &str, kind: Kind, per_conn: usize) -> Subscribers {
        let (sender, events) = mpsc::unbounded_channel();
        Subscribers {
            addr: addr.to_owned(),
            kind,
            per_conn,
            tasks: JoinSet::new(),
            events,
            sender,
            backlog: Vec::new().into_iter(),
            seen: Vec::new(),
            received: 0,
            trigger: Instant::now(),
        }
    }

    fn len(&self) -> usize {
        self.seen.len()
    }

    /// Open streams until there are `n`, and wait until each has its first event. `n` is a
    /// multiple of the streams per connection: each connection's streams are read by one task.
    async fn grow_to(&mut self, n: usize) {
        assert_eq!(
            n % self.per_conn,
            0,
            "N must be a multiple of the streams per connection"
        );
        while self.seen.len() < n {
            let first = self.seen.len();
            let indexes = first..first + self.per_conn;
            self.seen
                .extend((0..self.per_conn).map(|_| Seen::default()));
            // Every event decoded at one wake-up is stamped and sent to the main task in one
            // batch, so the main task's work stays off the stream-reading path.
            let sender = self.sender.clone();
            let mut leaders = Vec::new();
            let mut send = move |batch: Vec<(usize, LeadershipEvent)>| {
                let at = Instant::now();
                let batch = batch
                    .into_iter()
                    .map(|(subscriber, event)| Received {
                        subscriber,
                        at,
                        role: Role::try_from(event.role).unwrap_or(Role::Unknown),
                        leader: intern(&mut leaders, event.leader),
                        term: event.term,
                    })
                    .collect();
                sender.send(batch).is_ok()
            };
            match self.kind {
                Kind::Tonic => {
                    let streams = watch_streams(&self.addr, indexes).await;
                    self.tasks.spawn(async move {
                        let mut streams = futures::stream::select_all(streams);
                        while let Some(first) = streams.next().await {
                            let mut batch = vec![first];
                            while let Some(Some(more)) = streams.next().now_or_never() {
                                batch.push(more);
                            }
                            if !send(batch) {
                                return;
                            }
                        }
                    });
                }
                Kind::Lean => {
                    let host_port = self.addr.strip_prefix("http://").expect("a TCP daemon");
                    let mut connection =
                        lean::Connection::open(host_port, &watch_request(), indexes).await;
                    self.tasks
                        .spawn(async move { while send(connection.next_events().await) {} });
                }
            }
        }
        self.settle(|s| s.role.is_some()).await;
    }

    /// Record one event; a term that goes down is a failure.
    fn record(&mut self, event: Received, since: Instant, reached: &impl Fn(&Received) -> bool) {
        self.received += 1;
        let seen = &mut self.seen[event.subscriber];
        assert!(
            event.term >= seen.term,
            "subscriber {}: term went down from {} to {}",
            event.subscriber,
            seen.term,
            event.term
        );
        if event.at >= since {
            seen.events += 1;
            if seen.reached.is_none() && reached(&event) {
                seen.reached = Some(event.at);
            }
            let state = (event.role, event.leader.clone(), event.term);
            if seen.history.last() != Some(&state) {
                seen.history.push(state);
            }
        }
        seen.role = Some(event.role);
        seen.leader = event.leader;
        seen.term = event.term;
    }

    /// Take events until every subscriber ends in exactly (role, leader, term), the state the
    /// daemons report; panics with what the subscribers saw if they do not. Returns how many
    /// passed through another state naming a leader in a term other than the last one before
    /// the change and the final one (printed: an observer's transient view).
    async fn expect_final(&mut self, role: Role, leader: &str, term: u64, before: u64) -> usize {
        let is_final = |s: &Seen| s.role == Some(role) && *s.leader == *leader && s.term == term;
        let settled = timeout(SOON, async {
            let never = |_: &Received| false;
            self.wait(self.trigger, &never, &is_final).await;
        })
        .await;
        if settled.is_err() {
            let mut kinds = std::collections::BTreeMap::<String, usize>::new();
            for s in self.seen.iter().filter(|s| !is_final(s)) {
                *kinds.entry(format!("{:?}", s.history)).or_default() += 1;
            }
            panic!(
                "subscribers did not all end in {role:?} leader={leader} term={term}; \
                 histories of those that did not (count: states since the trigger): {kinds:#?}"
            );
        }
        self.seen
            .iter()
            .filter(|s| {
                s.history
                    .iter()
                    .any(|(_, l, t)| !l.is_empty() && *t != term && *t != before)
            })
            .count()
    }

    /// Take events until every subscriber's last state satisfies `done`.
    async fn settle(&mut self, done: impl Fn(&Seen) -> bool) {
        let never = |_: &Received| false;
        let since = Instant::now();
        self.wait(since, &never, &done).await;
    }

    async fn wait(
        &mut self,
        since: Instant,
        reached: &impl Fn(&Received) -> bool,
        done: &impl Fn(&Seen) -> bool,
    ) {
        let mut pending = self.seen.iter().filter(|s| !done(s)).count();
        while pending > 0 {
            let event = match self.backlog.next() {
                Some(event) => event,
                None => {
                    let Ok(batch) = timeout(SOON, self.events.recv()).await else {
                        // A reader that failed says why (its stream failed), not only that
                        // its subscribers fell silent.
                        while let Some(ended) = self.tasks.try_join_next() {
                            if let Err(e) = ended
                                && e.is_panic()
                            {
                                std::panic::resume_unwind(e.into_panic());
                            }
                        }
                        panic!(
                            "{pending} of {} subscribers not done within {SOON:?}",
                            self.len()
                        );
                    };
                    let batch = batch.expect("this holds a sender");
                    self.backlog = batch.into_iter();
                    continue;
                }
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

    /// Send `trigger`, then take events until every subscriber's state satisfies `done`;
    /// returns each subscriber's latency to its first event satisfying `reached`.
    async fn measure(
        &mut self,
        trigger: impl Future<Output = ()>,
        reached: impl Fn(&Received) -> bool,
        done: impl Fn(&Seen) -> bool,
    ) -> Vec<Duration> {
        for seen in &mut self.seen {
            seen.reached = None;
            seen.events = 0;
            seen.history.clear();
        }
        let sent = Instant::now();
        self.trigger = sent;
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

/// The same `Arc` for the same name: there are few leaders, and the main task then clones a
/// pointer per event, not a string.
fn intern(known: &mut Vec<Arc<str>>, name: String) -> Arc<str> {
    if let Some(same) = known.iter().find(|k| k.as_ref() == name) {
        return same.clone();
    }
    let name = Arc::<str>::from(name);
    known.push(name.clone());
    name
}

/// A subscriber's events, tagged with its index; ends when the stream does.
type Events = futures::stream::BoxStream<'static, (usize, LeadershipEvent)>;

/// One HTTP/2 connection with a WatchLeadership stream per index.
async fn watch_streams(addr: &str, indexes: std::ops::Range<usize>) -> Vec<Events> {
    let channel = Endpoint::from_shared(addr.to_owned())
        .expect("daemon address")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect to the daemon");
    let mut streams = Vec::with_capacity(indexes.len());
    for index in indexes {
        let stream = LeadershipClient::new(channel.clone())
            .watch_leadership(watch_request())
            .await
            .expect("WatchLeadership")
            .into_inner();
        streams.push(
            stream
                .map(move |event| match event {
                    Ok(event) => (index, event),
                    Err(status) => panic!("a WatchLeadership stream failed: {status}"),
                })
                .boxed(),
        );
    }
    streams
}

fn watch_request() -> WatchLeadershipRequest {
    WatchLeadershipRequest {
        election: ELECTION.to_owned(),
        ..Default::default()
    }
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_kib(daemon: &Daemon) -> (u64, u64) {
    let pid = daemon.proc.pid();
    (status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM"))
}

/// CPU time (user + system) a process has used so far; `None` for this process.
fn cpu_time(daemon: Option<&Daemon>) -> Duration {
    let path = daemon.map_or_else(
        || "/proc/self/stat".to_owned(),
        |d| format!("/proc/{}/stat", d.proc.pid()),
    );
    let stat = std::fs::read_to_string(path).expect("/proc/PID/stat");
    // After the command name (which may hold spaces): utime and stime, the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // /proc reports in USER_HZ, which is 100 on Linux whatever the kernel's HZ.
    Duration::from_millis(ticks * 10)
}

/// Write-family system calls a daemon has made so far (`syscw` of `/proc/PID/io`): socket
/// writes, and the few others (the runtime's eventfd wake-ups, logs, the store's writes).
fn write_calls(daemon: &Daemon) -> u64 {
    proc_number(daemon.proc.pid(), "io", "syscw")
}

/// Latencies of one kind of change over the changes made.
#[derive(Default)]
struct Figures {
    per_subscriber: Vec<Duration>,
    all_reached: Vec<Duration>,
    spread: Vec<Duration>,
}

impl Figures {
    fn add(&mut self, latencies: Vec<Duration>) {
        let first = *latencies.iter().min().expect("subscribers");
        let last = *latencies.iter().max().expect("subscribers");
        self.all_reached.push(last);
        self.spread.push(last - first);
        self.per_subscriber.extend(latencies);
    }

    fn print(self, store: &str, kind: &str, n: usize) {
        let changes = self.all_reached.len();
        println!(
            "{store} fan-out {kind} N={n}: per subscriber (pooled over {changes} changes) {}",
            summary(self.per_subscriber)
        );
        println!(
            "{store} fan-out {kind} N={n}: all reached (per change) {}",
            summary(self.all_reached)
        );
        println!(
            "{store} fan-out {kind} N={n}: spread first->last subscriber (per change) {}",
            summary(self.spread)
        );
    }
}

/// What to run for each store.
struct Plan {
    sizes: &'static [usize],
    /// Loss/gain pairs at each N.
    changes: usize,
    per_conn: usize,
    kinds: Vec<Kind>,
}

/// For each kind of subscriber: A leads, B follows; subscribers on A. Runs `changes`
/// loss/gain pairs at each N.
async fn bench_store(store: &str, start: impl Fn(&str) -> Daemon, plan: &Plan) {
    for &kind in &plan.kinds {
        let label = format!("{store} ({} subscribers)", kind.name());
        bench_kind(&label, &start, plan, kind).await;
    }
}

/// One kind of subscriber; `store` labels the figures.
async fn bench_kind(store: &str, start: &impl Fn(&str) -> Daemon, plan: &Plan, kind: Kind) {
    let &Plan {
        sizes,
        changes,
        per_conn,
        ..
    } = plan;
    let a = start("a");
    let a_state = a.wait_role(ELECTION, Role::Leader).await;
    let b = start("b");
    b.wait_for(ELECTION, "following a", |s| {
        s.role == Role::Follower && s.leader.as_deref() == Some("a")
    })
    .await;
    let (ca, cb) = (a.client().await, b.client().await);
    let mut term = a_state.term;
    // Let the start-up settle before the first reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss, hwm) = rss_kib(&a);
    println!("{store} daemon RSS with 0 subscribers: VmRSS={rss} KiB VmHWM={hwm} KiB");

    let mut subscribers = Subscribers::new(&a.addr, kind, per_conn);
    for &n in sizes {
        let opened = Instant::now();
        subscribers.grow_to(n).await;
        let opening = opened.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (rss, hwm) = rss_kib(&a);
        println!(
            "{store} daemon RSS with {n} subscribers ({} connections): VmRSS={rss} KiB \
             VmHWM={hwm} KiB (opening them took {:.0} ms)",
            n / per_conn,
            opening.as_secs_f64() * 1e3
        );
        let (mut loss, mut gain) = (Figures::default(), Figures::default());
        let cpu_before = (cpu_time(Some(&a)), cpu_time(None));
        let writes_before = write_calls(&a);
        let received_before = subscribers.received;
        let mut transient = 0;
        for _ in 0..changes {
            // Loss: A steps down for B.
            let latencies = subscribers
                .measure(
                    async {
                        ca.resign(ELECTION, Some("b")).await.expect("resign a");
                    },
                    |e| e.role != Role::Leader,
                    |s| s.role == Some(Role::Follower) && &*s.leader == "b" && s.term > term,
                )
                .await;
            let b_term = b.wait_role(ELECTION, Role::Leader).await.term;
            assert!(b_term > term, "b's term {b_term} is not above {term}");
            transient += subscribers
                .expect_final(Role::Follower, "b", b_term, term)
                .await;
            term = b_term;
            loss.add(latencies);
            // Gain: B steps down for A.
            let latencies = subscribers
                .measure(
                    async {
                        cb.resign(ELECTION, Some("a")).await.expect("resign b");
                    },
                    |e| e.role == Role::Leader && e.term > term,
                    |s| s.role == Some(Role::Leader) && &*s.leader == "a" && s.term > term,
                )
                .await;
            let a_term = a.wait_role(ELECTION, Role::Leader).await.term;
            assert!(a_term > term, "a's term {a_term} is not above {term}");
            transient += subscribers
                .expect_final(Role::Leader, "a", a_term, term)
                .await;
            term = a_term;
            gain.add(latencies);
        }
        let cpu = (
            cpu_time(Some(&a)) - cpu_before.0,
            cpu_time(None) - cpu_before.1,
        );
        let events = subscribers.received - received_before;
        let writes = write_calls(&a) - writes_before;
        println!(
            "{store} CPU per change at N={n}: daemon A {:.1} ms, this process (subscribers) \
             {:.1} ms; {:.2} events per subscriber per change (intermediate states and \
             heartbeats included); daemon CPU {:.1} us per event sent; daemon write-family \
             system calls {:.0} per change, {:.1} events per call (over {} changes)",
            cpu.0.as_secs_f64() * 1e3 / (2 * changes) as f64,
            cpu.1.as_secs_f64() * 1e3 / (2 * changes) as f64,
            events as f64 / (n * 2 * changes) as f64,
            cpu.0.as_secs_f64() * 1e6 / events as f64,
            writes as f64 / (2 * changes) as f64,
            events as f64 / writes.max(1) as f64,
            2 * changes
        );
        let (rss, hwm) = rss_kib(&a);
        println!(
            "{store} daemon RSS with {n} subscribers after {} changes: VmRSS={rss} KiB VmHWM={hwm} KiB",
            2 * changes
        );
        if transient > 0 {
            println!(
                "{store} N={n}: {transient} subscriber-changes passed through a state naming a \
                 leader in a term that is neither the old nor the new one (all ended in the \
                 daemons' final state)"
            );
        }
        loss.print(store, "loss (Resign -> not LEADER)", n);
        gain.print(store, "gain via store (Resign of B -> A LEADER)", n);
    }
    drop(subscribers);
    drop(b);
    drop(a);
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let changes = env("BATON_BENCH_RUNS").unwrap_or(if full { 10 } else { 1 });
    let per_conn = env("BATON_BENCH_STREAMS_PER_CONN").unwrap_or(100);
    let sizes: &[usize] = if full { &[1_000, 10_000] } else { &[1_000] };
    let kinds = std::env::var("BATON_BENCH_SUBSCRIBERS").unwrap_or_default();
    let kinds = Some(kinds.as_str())
        .filter(|k| !k.is_empty())
        .unwrap_or("tonic,lean")
        .split(',')
        .map(|name| {
            Kind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .unwrap_or_else(|| {
                    panic!("BATON_BENCH_SUBSCRIBERS: {name:?} is neither tonic nor lean")
                })
        })
        .collect();
    let plan = Plan {
        sizes,
        changes,
        per_conn,
        kinds,
    };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "fan-out benchmark: {changes} changes of each kind per N, {per_conn} streams per \
         connection read by one task, {profile} build, {} cores (daemons and subscribers share \
         them)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let stores = std::env::var("BATON_BENCH_STORES").unwrap_or_default();
    let wanted = |store: &str| stores.is_empty() || stores.split(',').any(|s| s == store);

    let dir = common::lock_dir();
    let lock = dir.path().to_str().expect("utf-8 path").to_owned();
    if wanted("file") {
        bench_store(
            "file",
            |id| Daemon::start(id, &["--lock-dir", &lock, "--election", ELECTION]),
            &plan,
        )
        .await;
    }

    #[cfg(feature = "kubernetes")]
    if wanted("kubernetes") {
        let api = k8s_api::ApiServer::start();
        let dir = common::lock_dir();
        bench_store(
            "kubernetes",
            |id| {
                let token = api.service_account("bench", id, &["bench"]);
                let kubeconfig =
                    api.write_kubeconfig(dir.path(), &format!("{id}.kubeconfig"), &token, "bench");
                let mut command = common::baton();
                command.env("KUBECONFIG", kubeconfig);
                Daemon::start_command(
                    id,
                    command,
                    &["--store", "kubernetes", "--election", ELECTION],
                )
            },
            &plan,
        )
        .await;
    }

    #[cfg(feature = "etcd")]
    if wanted("etcd") {
        let etcd = etcd_server::Etcd::start();
        let endpoint = etcd.endpoint();
        bench_store(
            "etcd",
            |id| {
                Daemon::start(
                    id,
                    &[
                        "--store",
                        "etcd",
                        "--etcd-endpoints",
                        &endpoint,
                        "--election",
                        ELECTION,
                    ],
                )
            },
            &plan,
        )
        .await;
    }
}
