//! Observability end to end: Prometheus metrics scraped from real daemons over HTTP during
//! hand-offs (a Resign, then SIGTERM of the leader), store errors counted by kind, and JSON log
//! lines. Every scrape follows an event (a state on the watch stream, a health change, a log
//! line): each value is recorded before the state it reflects is published.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::TcpStream,
};

use baton::{client::Role, daemon::HEALTH_WORKER_ATTACHED};
use nix::sys::signal::Signal;
use testkit::{
    Daemon, Proc, SOON, baton, field,
    health::{self, ServingStatus},
    lock_dir, timer_worker,
};

/// Scraped samples: `name{labels}` -> value.
struct Scrape {
    samples: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{}", self.text))
    }
}

/// `GET /metrics` over plain HTTP/1.1.
fn scrape(addr: &str) -> Scrape {
    let mut stream = TcpStream::connect(addr).expect("connect to --metrics-listen");
    stream.set_read_timeout(Some(SOON)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP response: {response}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("NAME VALUE");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect();
    Scrape {
        samples,
        text: body.to_owned(),
    }
}

fn metrics_addr(d: &Daemon) -> String {
    field(&d.serving(), "metrics")
        .filter(|a| *a != "off")
        .unwrap_or_else(|| panic!("metrics= in {}", d.serving()))
        .to_owned()
}

const E: &str = "{election=\"default\"}";

fn series(name: &str) -> String {
    format!("{name}{E}")
}

/// Wait until a worker is subscribed to `d` (its health listener's `baton.worker.attached`).
async fn wait_attached(d: &Daemon) {
    let addr = field(&d.serving(), "health").expect("health=").to_owned();
    health::wait_for(&addr, HEALTH_WORKER_ATTACHED, ServingStatus::Serving).await;
}

fn start(identity: &str, lock: &str) -> Daemon {
    Daemon::start(
        identity,
        &[
            "--lock-dir",
            lock,
            "--metrics-listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--lease-duration",
            "3s",
            "--renew-deadline",
            "2s",
            "--retry-period",
            "100ms",
        ],
    )
}

#[tokio::test]
async fn metrics_follow_the_hand_offs() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let a = start("a", lock);
    let first = a.wait_role("default", Role::Leader).await;
    let mut b = start("b", lock);
    b.wait_role("default", Role::Follower).await;
    let (ma, mb) = (metrics_addr(&a), metrics_addr(&b));
    let _wa = timer_worker(&a, "default", "100ms");
    let _wb = timer_worker(&b, "default", "100ms");
    wait_attached(&a).await;
    wait_attached(&b).await;

    // Three renewals seen as heartbeats on the leader's stream: three observed latencies.
    let client = a.client().await;
    let mut events = Box::pin(client.watch("default"));
    let mut heartbeats = 0;
    tokio::time::timeout(SOON, async {
        use futures::StreamExt;
        while heartbeats < 4 {
            if let Some(baton::client::WatchEvent::State(s)) = events.next().await
                && s.role == Role::Leader
            {
                heartbeats += 1;
            }
        }
    })
    .await
    .expect("heartbeats");

    let sa = scrape(&ma);
    let sb = scrape(&mb);
    assert_eq!(sa.get(&series("baton_is_leader")), 1.0);
    assert_eq!(sb.get(&series("baton_is_leader")), 0.0);
    let t1 = first.term as f64;
    assert_eq!(sa.get(&series("baton_term")), t1);
    assert_eq!(sb.get(&series("baton_term")), t1);
    assert_eq!(sa.get(&series("baton_leader_transitions_total")), 1.0);
    assert_eq!(sb.get(&series("baton_leader_transitions_total")), 1.0);
    assert_eq!(sa.get(&series("baton_subscribers")), 1.0);
    assert_eq!(sb.get(&series("baton_subscribers")), 1.0);
    let renewals = sa.get(&series("baton_renew_duration_seconds_count"));
    assert!(renewals >= 3.0, "{renewals} renewals after 3 heartbeats");
    assert!(sa.get(&series("baton_renew_duration_seconds_sum")) > 0.0);
    let inf = "baton_renew_duration_seconds_bucket{le=\"+Inf\",election=\"default\"}";
    assert_eq!(sa.get(inf), renewals, "every renewal falls in a bucket");
    assert_eq!(sb.get(&series("baton_renew_duration_seconds_count")), 0.0);
    for kind in ["lost", "unavailable", "invalid"] {
        let errors = format!("baton_store_errors_total{{election=\"default\",kind=\"{kind}\"}}");
        assert_eq!(sa.get(&errors), 0.0, "{kind}");
    }

    // Hand-off 1: a resigns for b; b leads in a new term, both count one more leadership.
    client.resign("default", Some("b")).await.expect("resign");
    let second = b.wait_role("default", Role::Leader).await;
    a.wait_for("default", "following b", |s| {
        s.role == Role::Follower && s.term == second.term
    })
    .await;
    let sa = scrape(&ma);
    let sb = scrape(&mb);
    assert!(second.term > first.term);
    assert_eq!(sa.get(&series("baton_is_leader")), 0.0);
    assert_eq!(sb.get(&series("baton_is_leader")), 1.0);
    assert_eq!(sa.get(&series("baton_term")), second.term as f64);
    assert_eq!(sb.get(&series("baton_term")), second.term as f64);
    assert_eq!(sa.get(&series("baton_leader_transitions_total")), 2.0);
    assert_eq!(sb.get(&series("baton_leader_transitions_total")), 2.0);
    assert!(sa.get(&series("baton_renew_duration_seconds_count")) >= renewals);

    // Hand-off 2: SIGTERM to the leader b; a takes over.
    b.proc.signal(Signal::SIGTERM);
    let third = a.wait_role("default", Role::Leader).await;
    assert!(b.proc.wait().success());
    let sa = scrape(&ma);
    assert!(third.term > second.term);
    assert_eq!(sa.get(&series("baton_is_leader")), 1.0);
    assert_eq!(sa.get(&series("baton_term")), third.term as f64);
    assert_eq!(sa.get(&series("baton_leader_transitions_total")), 3.0);
    assert_eq!(sa.get(&series("baton_subscribers")), 1.0);
    assert!(sa.get(&series("baton_renew_duration_seconds_count")) >= renewals);
}

#[tokio::test]
async fn store_errors_are_counted_by_kind() {
    let dir = lock_dir();
    std::fs::write(dir.path().join("default.lock"), b"\x00\x01garbage").unwrap();
    let d = start("a", dir.path().to_str().unwrap());
    d.wait_for("default", "reporting the lock file", |s| {
        s.role == Role::Unknown && s.reason.contains("default.lock")
    })
    .await;
    let s = scrape(&metrics_addr(&d));
    let invalid = "baton_store_errors_total{election=\"default\",kind=\"invalid\"}";
    assert!(s.get(invalid) >= 1.0, "{}", s.text);
    assert_eq!(
        s.get("baton_store_errors_total{election=\"default\",kind=\"lost\"}"),
        0.0
    );
    assert_eq!(s.get(&series("baton_is_leader")), 0.0);
    assert_eq!(s.get(&series("baton_leader_transitions_total")), 0.0);

    // Repaired, the election proceeds; the count stays.
    std::fs::remove_file(dir.path().join("default.lock")).unwrap();
    let state = d.wait_role("default", Role::Leader).await;
    let after = scrape(&metrics_addr(&d));
    assert!(after.get(invalid) >= s.get(invalid));
    assert_eq!(after.get(&series("baton_is_leader")), 1.0);
    assert_eq!(after.get(&series("baton_term")), state.term as f64);
}

#[test]
fn metrics_are_off_by_default() {
    let dir = lock_dir();
    let d = Daemon::start("a", &["--lock-dir", dir.path().to_str().unwrap()]);
    assert_eq!(
        field(&d.serving(), "metrics"),
        Some("off"),
        "{}",
        d.serving()
    );
}

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = lock_dir();
    let mut command = baton();
    command
        .args([
            "--log-format",
            "json",
            "run",
            "--identity",
            "j",
            "--listen",
            "127.0.0.1:0",
            "--lock-dir",
            dir.path().to_str().unwrap(),
        ])
        .env("RUST_LOG", "info");
    let mut daemon = Proc::spawn(command, "json daemon: ");
    let serving = daemon
        .stderr
        .wait_for("'baton serving'", |l| l.contains("baton serving"));
    let serving: serde_json::Value = serde_json::from_str(&serving).expect("a JSON line");
    assert_eq!(serving["message"], "baton serving");
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["target"], "baton::daemon");
    assert_eq!(serving["identity"], "j");
    let listen: std::net::SocketAddr = serving["listen"]
        .as_str()
        .expect("listen is a string field at the top level")
        .parse()
        .expect("an address");
    assert_ne!(listen.port(), 0);
    assert!(serving["timestamp"].is_string());
    let leading = daemon.stderr.wait_for("the leadership change", |l| {
        l.contains("leadership changed") && l.contains("Leader")
    });
    let leading: serde_json::Value = serde_json::from_str(&leading).expect("a JSON line");
    assert_eq!(leading["election"], "default");
    assert_eq!(leading["leader"], "j");
    assert!(leading["term"].as_u64().is_some_and(|t| t > 0), "{leading}");

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait().success());
    daemon
        .stderr
        .wait_for("the last line", |l| l.contains("\"stopped\""));
    for line in daemon.stderr.all() {
        let object: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: not JSON: {line}"));
        assert!(object.is_object(), "{line}");
    }
}
