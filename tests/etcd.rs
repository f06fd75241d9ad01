//! The etcd store against a real etcd (Debian's `etcd-server` 3.4): the shared conformance
//! suite, interoperation with `etcdctl elect` both ways, crash fail-over, graceful hand-off with
//! workers, an etcd outage under a leader, TLS and user authentication, and the members of a
//! balancing group.
//!
//! Every wait is on an event (a stream event, a log line, a printed line), bounded by
//! `testkit::SOON`; safety (no overlap) is asserted exactly, latency never.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use baton::{
    balance::{Member, group_name},
    client::{Role, WatchEvent},
    store::{
        ErrorKind, Membership, Observation, Store, Timing,
        conformance::Suite,
        etcd::{EtcdConfig, EtcdStore},
    },
};
use futures::StreamExt;
use nix::sys::signal::Signal;
use testkit::{
    Daemon, Proc, assert_stopped_before,
    etcd::{Etcd, ServerTls},
    field,
    health::{self, ServingStatus},
    pki::{ExtendedKeyUsagePurpose, Pki},
    scenario::{Backend, kill_9_of_the_leader, leader_and_follower},
    short_timing, timer_worker,
};

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
    Suite::new(Arc::new(store), short_timing(), "conf-")
        .test_all()
        .await;
}

const LEASE: &str = "3s";

/// `baton run` flags for the etcd store at `etcd`, election `election`, short timings.
fn daemon_args(endpoint: &str, election: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoint,
        "--election",
        election,
        "--lease-duration",
        LEASE,
        "--renew-deadline",
        "2s",
        "--retry-period",
        "500ms",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

fn start(identity: &str, etcd: &Etcd, election: &str) -> Daemon {
    let args = daemon_args(&etcd.endpoint(), election, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::start(identity, &args)
}

/// A direct etcd client for looking at keys and leases from the test.
async fn etcd_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .expect("connect to etcd")
}

/// The election's keys, oldest first: (key, value, lease, create revision).
async fn queue(client: &mut etcd_client::Client, prefix: &str) -> Vec<(String, String, i64, i64)> {
    let options = etcd_client::GetOptions::new().with_prefix().with_sort(
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let response = client.get(prefix, Some(options)).await.expect("get");
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_owned(),
                kv.value_str().unwrap().to_owned(),
                kv.lease(),
                kv.create_revision(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_elect_and_baton_share_an_election_both_ways() {
    let etcd = Etcd::start();
    let a = start("baton-a", &etcd, "interop");
    let first = a.wait_role("interop", Role::Leader).await;

    // `etcdctl elect -l` names Baton's leader.
    let observer = Proc::spawn(
        etcd.etcdctl(&["elect", "-l", "baton/interop"]),
        "elect -l: ",
    );
    observer
        .stdout
        .wait_for("'baton-a' from etcdctl elect -l", |l| l == "baton-a");

    // `etcdctl elect NAME x` queues behind Baton and waits. The watch starts after the current
    // revision, so it sees x's key even if x writes it before the watch is set up.
    let revision = etcd_client(&etcd)
        .await
        .get("baton/interop/", None)
        .await
        .expect("get")
        .header()
        .expect("a response header")
        .revision();
    let watch = Proc::spawn(
        etcd.etcdctl(&[
            "watch",
            "--prefix",
            &format!("--rev={}", revision + 1),
            "baton/interop/",
        ]),
        "watch: ",
    );
    let mut x = Proc::spawn(etcd.etcdctl(&["elect", "baton/interop", "x"]), "elect x: ");
    watch.stdout.wait_for("x's candidate key", |l| l == "x");
    let still = a.client().await.get("interop").await.expect("get");
    assert_eq!(still.role, Role::Leader, "Baton still leads after x queued");
    assert_eq!(still.term, first.term);
    assert!(
        x.stdout.all().is_empty(),
        "etcdctl must wait while Baton leads: {:?}",
        x.stdout.all()
    );

    // Baton leaves; etcdctl is elected.
    let mut a = a;
    a.proc.signal(Signal::SIGTERM);
    assert!(a.proc.wait().success());
    x.stdout.wait_for("x elected", |l| l == "x");
    observer
        .stdout
        .wait_for("'x' from etcdctl elect -l", |l| l == "x");

    // While etcdctl leads, Baton follows and names it.
    let b = start("baton-b", &etcd, "interop");
    let following = b
        .wait_for("interop", "following x", |s| {
            s.role == Role::Follower && s.leader.as_deref() == Some("x")
        })
        .await;
    assert!(following.term > first.term);

    // etcdctl resigns on SIGINT; Baton leads.
    x.signal(Signal::SIGINT);
    x.wait();
    let led = b.wait_role("interop", Role::Leader).await;
    assert!(
        led.term > following.term,
        "term {} after {}",
        led.term,
        following.term
    );
    observer
        .stdout
        .wait_for("'baton-b' from etcdctl elect -l", |l| l == "baton-b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_hands_over_only_after_its_lease_is_gone() {
    let backend = Backend::etcd();
    let Backend::Etcd { etcd } = &backend else {
        unreachable!("an etcd backend")
    };
    let mut client = etcd_client(etcd).await;
    let (a, b, first_term) = leader_and_follower(&backend, "crash").await;
    let keys = queue(&mut client, "baton/crash/").await;
    let (old_key, holder, old_lease, created) = keys.first().cloned().expect("a's key");
    assert_eq!(holder, "a");
    assert_eq!(
        created as u64, first_term,
        "the term is the key's create revision"
    );

    // b leads, in a greater term (asserted there) ...
    kill_9_of_the_leader(a, b, "crash", first_term).await;
    // ... only once a's session lease is gone, and with it a's key.
    let ttl = client
        .lease_time_to_live(old_lease, None)
        .await
        .expect("lease time to live");
    assert!(
        ttl.ttl() <= 0,
        "b leads while a's lease {old_lease:x} still has {} s",
        ttl.ttl()
    );
    let keys = queue(&mut client, "baton/crash/").await;
    assert!(
        keys.iter().all(|(k, ..)| *k != old_key),
        "a's key {old_key} outlived its lease: {keys:?}"
    );
    assert_eq!(keys.first().map(|k| k.1.as_str()), Some("b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_longer_than_the_lease_steps_the_leader_down_in_time() {
    let mut etcd = Etcd::start();
    let a = start("a", &etcd, "outage");
    let first = a.wait_role("outage", Role::Leader).await;
    let b = start("b", &etcd, "outage");
    b.wait_role("outage", Role::Follower).await;
    let lease = humantime::parse_duration(LEASE).expect("lease");

    // Follow a's events from before the outage.
    let client = a.client().await;
    let mut events = Box::pin(client.watch("outage"));
    let stopped_at = tokio::time::Instant::now();
    etcd.stop();
    let stepped_down = tokio::time::timeout(testkit::SOON, async {
        while let Some(event) = events.next().await {
            if let WatchEvent::State(state) = event
                && state.role != Role::Leader
            {
                return (tokio::time::Instant::now(), state);
            }
        }
        unreachable!("the watch stream never ends")
    })
    .await
    .expect("a steps down while etcd is away");
    // Safety, not latency: the leader's last keep-alive was sent before etcd stopped, so its
    // lease runs out no earlier than one lease duration after the stop.
    assert!(
        stepped_down.0 < stopped_at + lease,
        "a still led {:?} after etcd stopped (lease {lease:?})",
        stepped_down.0 - stopped_at
    );
    a.proc.stderr.wait_for("the step-down in a's log", |l| {
        l.contains("leadership changed") && l.contains("could not renew within the renew deadline")
    });
    a.wait_role("outage", Role::Unknown).await;
    b.wait_role("outage", Role::Unknown).await;
    // Keep etcd away for longer than the lease.
    tokio::time::sleep(lease + Duration::from_secs(1)).await;
    etcd.restart();

    // Exactly one leader afterwards, with a greater term; the other follows it.
    let (leader, follower) = tokio::select! {
        _ = a.wait_role("outage", Role::Leader) => (&a, &b),
        _ = b.wait_role("outage", Role::Leader) => (&b, &a),
    };
    let follows = follower
        .wait_for("outage", "following the new leader", |s| {
            s.role == Role::Follower && s.leader.as_deref() == Some(leader.identity.as_str())
        })
        .await;
    let led = leader.client().await.get("outage").await.expect("get");
    assert_eq!(led.role, Role::Leader);
    assert_eq!(follows.term, led.term);
    assert!(
        led.term > first.term,
        "term {} after {}",
        led.term,
        first.term
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_serves_not_serving_then_leads_when_etcd_comes() {
    // An etcd that is down when the daemon starts: started (for its ports) and stopped.
    let mut etcd = Etcd::start();
    etcd.stop();
    let endpoint = etcd.endpoint();
    let args = daemon_args(&endpoint, "late", &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Daemon::start("a", &args);
    let waiting = a
        .wait_for("late", "UNKNOWN naming the store failure", |s| {
            s.role == Role::Unknown && s.reason.contains("store unavailable")
        })
        .await;
    assert!(waiting.reason.contains(&endpoint), "{}", waiting.reason);
    a.proc
        .stderr
        .wait_for("a log line naming the endpoint and reason", |l| {
            l.contains("store call failed")
                && l.contains(&endpoint)
                && l.contains("is etcd running")
        });
    assert_eq!(health::check(&a.addr, "").await, ServingStatus::NotServing);

    etcd.restart();
    a.wait_role("late", Role::Leader).await;
    assert_eq!(health::check(&a.addr, "").await, ServingStatus::Serving);
}

/// Server and client: etcd's certificates serve both sides.
const BOTH: &[ExtendedKeyUsagePurpose] = &[
    ExtendedKeyUsagePurpose::ServerAuth,
    ExtendedKeyUsagePurpose::ClientAuth,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_works_and_a_wrong_ca_is_named() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf("server", &ca, BOTH);
    pki.leaf("client", &ca, BOTH);
    let other = pki.ca("other-ca");
    pki.leaf("stranger", &other, BOTH);
    let etcd = Etcd::start_with(Some(ServerTls {
        cert: pki.path("server.pem"),
        key: pki.path("server-key.pem"),
        ca: pki.path("ca.pem"),
        client_cert_auth: true,
    }));
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));
    let file = |name: &str| pki.arg(name);
    let tls_args = |ca: &str, cert: &str| {
        let extra = [
            "--etcd-ca-file".to_owned(),
            file(ca),
            "--etcd-cert-file".to_owned(),
            file(&format!("{cert}.pem")),
            "--etcd-key-file".to_owned(),
            file(&format!("{cert}-key.pem")),
        ];
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        daemon_args(&endpoint, "tls", &extra)
    };
    let run = |identity: &str, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(identity, &args)
    };

    let good = run("good", tls_args("ca.pem", "client"));
    good.wait_role("tls", Role::Leader).await;

    let wrong_ca = run("wrong-ca", tls_args("other-ca.pem", "client"));
    let refused = wrong_ca
        .wait_for("tls", "refusing the server's certificate", |s| {
            s.role == Role::Unknown && s.reason.contains("not signed by --etcd-ca-file")
        })
        .await;
    assert!(refused.reason.contains(&endpoint), "{}", refused.reason);

    let stranger = run("stranger", tls_args("ca.pem", "stranger"));
    stranger
        .wait_for("tls", "refused by etcd for its client certificate", |s| {
            s.role == Role::Unknown && s.reason.contains("client certificate")
        })
        .await;
    assert_eq!(
        good.client().await.get("tls").await.expect("get").role,
        Role::Leader,
        "the refused daemons never disturbed the leader"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_authentication_right_password_works_wrong_password_is_named() {
    let mut etcd = Etcd::start();
    etcd.ctl(&["user", "add", "root", "--new-user-password=root-pw"]);
    etcd.ctl(&["user", "add", "baton", "--new-user-password=baton-pw"]);
    etcd.ctl(&["role", "add", "baton-rw"]);
    etcd.ctl(&[
        "role",
        "grant-permission",
        "baton-rw",
        "readwrite",
        "--prefix=true",
        "baton/",
    ]);
    etcd.ctl(&["user", "grant-role", "baton", "baton-rw"]);
    etcd.ctl(&["auth", "enable"]);
    etcd.set_ctl_flags(vec!["--user=root:root-pw".to_owned()]);

    let scratch = tempfile::tempdir().expect("tempdir");
    let right = scratch.path().join("right");
    let wrong = scratch.path().join("wrong");
    std::fs::write(&right, "baton-pw\n").expect("write");
    std::fs::write(&wrong, "not-the-password\n").expect("write");
    let run = |identity: &str, password_file: &std::path::Path| {
        let extra = [
            "--etcd-username",
            "baton",
            "--etcd-password-file",
            password_file.to_str().expect("utf-8 path"),
        ];
        let args = daemon_args(&etcd.endpoint(), "auth", &extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start(identity, &args)
    };

    let good = run("good", &right);
    good.wait_role("auth", Role::Leader).await;
    let keys = etcd.ctl(&["get", "--prefix", "--keys-only", "baton/auth/"]);
    assert!(
        keys.contains("baton/auth/"),
        "the key is written as user baton: {keys}"
    );

    let bad = run("bad", &wrong);
    bad.wait_for("auth", "refused for its password", |s| {
        s.role == Role::Unknown && s.reason.contains("wrong --etcd-username or password")
    })
    .await;
    bad.proc.stderr.wait_for("the refusal in the log", |l| {
        l.contains("store call failed") && l.contains("authentication failed")
    });
}

#[test]
fn bad_etcd_flags_and_unreadable_files_exit_2_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--etcd-endpoints", "ftp://127.0.0.1:2379"],
            "--etcd-endpoints",
        ),
        (&["--lease-duration", "2500ms"], "--lease-duration"),
        (
            &[
                "--etcd-endpoints",
                "https://127.0.0.1:2379",
                "--etcd-ca-file",
                "/no/such/ca.pem",
            ],
            "--etcd-ca-file",
        ),
        (
            &[
                "--etcd-username",
                "u",
                "--etcd-password-file",
                "/no/such/password",
            ],
            "--etcd-password-file",
        ),
    ];
    for (args, flag) in cases {
        let output = testkit::baton()
            .args(["run", "--store", "etcd", "--listen", "127.0.0.1:0"])
            .args(*args)
            .output()
            .expect("run baton");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?} names {flag}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_key_is_deleted_by_hand_steps_down_at_once() {
    let etcd = Etcd::start();
    let mut client = etcd_client(&etcd).await;
    let a = start("a", &etcd, "vanish");
    let first = a.wait_role("vanish", Role::Leader).await;
    let b = start("b", &etcd, "vanish");
    b.wait_role("vanish", Role::Follower).await;
    let keys = queue(&mut client, "baton/vanish/").await;
    let (key, holder, ..) = keys.first().cloned().expect("a's key");
    assert_eq!(holder, "a");

    etcd.ctl(&["del", &key]);
    let lost = a
        .wait_for("vanish", "stepped down for the lost key", |s| {
            s.role != Role::Leader && s.reason.contains("vanished")
        })
        .await;
    assert!(lost.reason.contains(&key), "{}", lost.reason);
    let led = b.wait_role("vanish", Role::Leader).await;
    assert!(led.term > first.term);
    // a campaigns again with a new session, behind b.
    a.wait_for("vanish", "following b", |s| {
        s.role == Role::Follower && s.leader.as_deref() == Some("b")
    })
    .await;
}

/// Renew `keeper`'s lease once: its send time if the lease was still alive, `None` if it had
/// expired (late on a loaded machine).
async fn renew_once(
    keeper: &mut etcd_client::LeaseKeeper,
    answers: &mut etcd_client::LeaseKeepAliveStream,
) -> Option<tokio::time::Instant> {
    let sent = tokio::time::Instant::now();
    keeper.keep_alive().await.expect("send a renewal");
    let answer = answers
        .message()
        .await
        .expect("renewal answer")
        .expect("an answer");
    (answer.ttl() > 0).then_some(sent)
}

/// A holder of `election` that is not Baton (as `etcdctl elect` holds one): a key under the
/// election, prefix `baton/`, bound to a fresh lease of `ttl_secs`. Returns the lease and the
/// time just before its grant.
async fn foreign_holder(
    client: &mut etcd_client::Client,
    election: &str,
    ttl_secs: i64,
) -> (i64, tokio::time::Instant) {
    let granted_at = tokio::time::Instant::now();
    let lease = client.lease_grant(ttl_secs, None).await.expect("grant");
    assert_eq!(lease.ttl(), ttl_secs, "etcd granted the TTL asked for");
    let lease = lease.id();
    client
        .put(
            format!("baton/{election}/{lease:x}"),
            "holder",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .expect("put the holder's key");
    (lease, granted_at)
}

/// The waiter that revokes its predecessor's expired lease (instead of waiting for etcd's lazy
/// lessor) must never take a live one. The test holds the election itself, as `etcdctl elect`
/// would (a key under the election bound to its lease, TTL 3 s), and renews the lease only when
/// 0.6 s are left, so that the waiter sees it in its last second every time. Whenever the
/// waiter leads, etcd must have had the chance to expire the lease: at least the TTL since the
/// send time of the last renewal that succeeded. After four renewals the test stops renewing;
/// the waiter then leads, by the same rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_never_revokes_a_lease_renewed_in_time() {
    const TTL: Duration = Duration::from_secs(3);
    let etcd = Etcd::start();
    let mut client = etcd_client(&etcd).await;
    let (lease, mut renewed_at) = foreign_holder(&mut client, "expiry", TTL.as_secs() as i64).await;
    let b = start("b", &etcd, "expiry");
    let seen = b.wait_role("expiry", Role::Follower).await;
    assert_eq!(seen.leader.as_deref(), Some("holder"));

    let watcher = b.client().await;
    let mut events = Box::pin(watcher.watch("expiry"));
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive");
    let mut renewals = 0;
    let led_at = loop {
        let renew_at = renewed_at + TTL - Duration::from_millis(600);
        let event = tokio::select! {
            event = events.next() => event,
            _ = tokio::time::sleep_until(renew_at), if renewals < 4 => {
                match renew_once(&mut keeper, &mut answers).await {
                    Some(sent) => {
                        renewed_at = sent;
                        renewals += 1;
                    }
                    // Late on a loaded machine: the lease expired for real; the waiter may lead.
                    None => renewals = 4,
                }
                continue;
            }
        };
        match event {
            Some(WatchEvent::State(state)) if state.role == Role::Leader => {
                break tokio::time::Instant::now();
            }
            Some(_) => {}
            None => panic!("b's event stream ended"),
        }
    };
    assert!(
        led_at - renewed_at >= TTL,
        "b led {:?} after the last renewal of a {TTL:?} lease that etcd could not have expired",
        led_at - renewed_at
    );
    assert_eq!(renewals, 4, "b led while the holder still renewed in time");
}

/// A replica that only observes (under `--balance`, a member standing by) revokes a dead
/// leader's lease once etcd's clock shows it expired, as a waiting candidate does, and must
/// never take a live one: the same holder as above, renewed in its last 0.6 s four times, then
/// left to expire. The observer may see the key go only a full TTL after the last renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_never_revokes_a_lease_renewed_in_time() {
    const TTL: Duration = Duration::from_secs(3);
    let etcd = Etcd::start();
    let mut client = etcd_client(&etcd).await;
    let (lease, mut renewed_at) =
        foreign_holder(&mut client, "observed", TTL.as_secs() as i64).await;
    let store = EtcdStore::new(&plain_config(&etcd, "baton/")).expect("store");
    let mut observer = soon("join", store.join("observed", "o", short_timing())).await;
    let seen = soon("first look", observer.observe(&Observation::unseen())).await;
    assert_eq!(seen.holder.as_deref(), Some("holder"));

    let mut next = observer.observe(&seen);
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive");
    let mut renewals = 0;
    let (gone_at, after) = loop {
        let renew_at = renewed_at + TTL - Duration::from_millis(600);
        tokio::select! {
            after = &mut next => break (tokio::time::Instant::now(), after.expect("observe")),
            _ = tokio::time::sleep_until(renew_at), if renewals < 4 => {
                match renew_once(&mut keeper, &mut answers).await {
                    Some(sent) => {
                        renewed_at = sent;
                        renewals += 1;
                    }
                    // Late on a loaded machine: the lease expired for real.
                    None => renewals = 4,
                }
            }
        }
    };
    assert_eq!(after.holder, None, "the holder's key went");
    assert!(
        gone_at - renewed_at >= TTL,
        "the key went {:?} after the last renewal of a {TTL:?} lease that etcd could not have \
         expired",
        gone_at - renewed_at
    );
    assert_eq!(
        renewals, 4,
        "the key went while the holder still renewed in time"
    );
    println!(
        "the observer saw the key go {:?} after the last renewal (TTL {TTL:?})",
        gone_at - renewed_at
    );
}

/// A standby that observed a dead leader and then campaigns (under `--balance`, once the
/// leader's member key is gone) keeps the proof of expiry its observation built: it leads a
/// full TTL after the holder's last renewal, never before, and without starting the proof anew
/// in the lease's last second, which would end up to a second later (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_starts_campaigning_keeps_its_proof_of_expiry() {
    const TTL: Duration = Duration::from_secs(3);
    let etcd = Etcd::start();
    let mut client = etcd_client(&etcd).await;
    let (_, granted_at) = foreign_holder(&mut client, "switch", TTL.as_secs() as i64).await;
    let store = EtcdStore::new(&plain_config(&etcd, "baton/")).expect("store");
    let mut standby = soon("join", store.join("switch", "o", short_timing())).await;
    let seen = soon("first look", standby.observe(&Observation::unseen())).await;
    assert_eq!(seen.holder.as_deref(), Some("holder"));
    // Observe into the lease's last second (nobody renews it), then campaign, as the balancer
    // makes a standby do when the dead holder's member key goes.
    let observing = standby.observe(&seen);
    let until = granted_at + TTL - Duration::from_millis(700);
    let early = tokio::time::timeout_at(until, observing).await;
    assert!(early.is_err(), "the holder's key went early: {early:?}");
    let acquired = soon("the standby leads", standby.acquire(&seen)).await;
    let led_after = granted_at.elapsed();
    assert!(
        matches!(acquired, baton::store::Acquired::Held(_)),
        "{acquired:?}"
    );
    assert!(
        led_after >= TTL,
        "led {led_after:?} after the grant of a {TTL:?} lease nobody renewed"
    );
    println!("the standby led {led_after:?} after the holder's lease was granted (TTL {TTL:?})");
}

/// A holder whose lease is granted 1 s (etcd allows it under a short election timeout: its
/// minimum TTL is 1.5 election timeouts, rounded up to a second) shows a remaining TTL of 0
/// all the time, and a renewal restores only 1 s: no run of zeros proves it expired. An
/// observer must leave it alone while it is renewed, and see it go once it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_one_second_renewed_in_time_is_never_revoked() {
    let etcd = Etcd::start_with_flags(&["--heartbeat-interval=50", "--election-timeout=500"]);
    let mut client = etcd_client(&etcd).await;
    let (lease, _) = foreign_holder(&mut client, "short", 1).await;
    let store = EtcdStore::new(&plain_config(&etcd, "baton/")).expect("store");
    let mut observer = soon("join", store.join("short", "o", short_timing())).await;
    let seen = soon("first look", observer.observe(&Observation::unseen())).await;
    assert_eq!(seen.holder.as_deref(), Some("holder"));

    // Renew every 200 ms for 5 s: each renewal leaves the lease alive for 1 s more.
    let mut next = observer.observe(&seen);
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await.expect("keep-alive");
    let renewing_until = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut renewed_at = tokio::time::Instant::now();
    while tokio::time::Instant::now() < renewing_until {
        tokio::select! {
            after = &mut next => {
                let after = after.expect("observe");
                assert!(
                    renewed_at.elapsed() >= Duration::from_secs(1),
                    "the key went ({after:?}) {:?} after a renewal of its 1 s lease",
                    renewed_at.elapsed()
                );
                panic!("the lease expired between renewals 200 ms apart: the machine is too \
                        loaded for this test");
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                renewed_at = renew_once(&mut keeper, &mut answers)
                    .await
                    .expect("a renewal 200 ms after the last found the lease gone");
            }
        }
    }
    drop((keeper, answers));
    let after = soon("the key goes once not renewed", next).await;
    assert_eq!(after.holder, None);
}

/// A leader paused (SIGSTOP) past its lease: the standby revokes the expired lease and leads,
/// and the paused leader's worker stopped (its `valid_for` ran out) before the new one started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leaders_worker_stops_before_the_standby_takes_over() {
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoint.as_str(),
        "--election",
        "paused",
        "--lease-duration",
        "2s",
        "--renew-deadline",
        "1500ms",
        "--retry-period",
        "300ms",
    ];
    let a = Daemon::start("a", &args);
    let first = a.wait_role("paused", Role::Leader).await;
    let b = Daemon::start("b", &args);
    b.wait_role("paused", Role::Follower).await;
    let wa = timer_worker(&a, "paused", "50ms");
    let wb = timer_worker(&b, "paused", "50ms");
    wa.stdout
        .wait_for("a's worker started", |l| l.starts_with("started"));

    a.proc.signal(Signal::SIGSTOP);
    let led = b.wait_role("paused", Role::Leader).await;
    assert!(led.term > first.term);
    let new_start = wb
        .stdout
        .wait_for("b's worker started", |l| l.starts_with("started"));
    let new_start: i128 = field(&new_start, "mono").unwrap().parse().unwrap();
    assert_stopped_before(&wa, new_start);
    a.proc.signal(Signal::SIGCONT);
}

// Balancing groups (`--balance`): a member key per identity on the member's own session lease.

/// A lease far longer than any wait below, so that only a leave (or a revoke) can explain a
/// member seen gone within `testkit::SOON`, never its expiry.
fn long_timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(60),
        renew_deadline: Duration::from_secs(40),
        retry_period: Duration::from_secs(1),
    }
}

fn eligible(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn identities(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.identity.as_str()).collect()
}

/// `what` within `testkit::SOON`, or the test fails naming it.
async fn soon<T, E: std::fmt::Display>(what: &str, call: impl Future<Output = Result<T, E>>) -> T {
    match tokio::time::timeout(testkit::SOON, call).await {
        Ok(Ok(value)) => value,
        Ok(Err(error)) => panic!("{what}: {error}"),
        Err(_) => panic!("{what}: not within {:?}", testkit::SOON),
    }
}

async fn enroll(
    store: &EtcdStore,
    group: &str,
    identity: &str,
    timing: Timing,
) -> Box<dyn Membership> {
    soon(
        &format!("{identity} enrolls"),
        store.enroll(group, identity, timing),
    )
    .await
}

/// A fresh etcd, a store on it (prefix `baton/`), and the group of daemons that run `elections`.
fn balancing_on_etcd(elections: &[&str]) -> (Etcd, EtcdStore, String) {
    let etcd = Etcd::start();
    let store = EtcdStore::new(&plain_config(&etcd, "baton/")).expect("store");
    let group = group_name(elections.iter().copied());
    (etcd, store, group)
}

/// `identity` enrolled in `group` and announced as eligible for `names`.
async fn member(
    store: &EtcdStore,
    group: &str,
    identity: &str,
    names: &[&str],
    timing: Timing,
) -> Box<dyn Membership> {
    let mut member = enroll(store, group, identity, timing).await;
    soon(
        &format!("{identity} announces"),
        member.announce(&eligible(names)),
    )
    .await;
    member
}

/// The lease of `identity`'s member key in `group`.
async fn member_lease(client: &mut etcd_client::Client, group: &str, identity: &str) -> i64 {
    let keys = queue(client, &format!("baton/_members/{group}/{identity}")).await;
    keys.first()
        .unwrap_or_else(|| panic!("{identity}'s member key"))
        .2
}

/// The remaining TTL of `lease`: -1 once it is gone.
async fn lease_ttl(client: &mut etcd_client::Client, lease: i64) -> i64 {
    client
        .lease_time_to_live(lease, None)
        .await
        .expect("time to live")
        .ttl()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_members_see_each_other_and_what_each_may_lead() {
    let (etcd, store, group) = balancing_on_etcd(&["e1", "e2"]);
    let mut a = member(&store, &group, "a", &["e1", "e2"], short_timing()).await;
    let mut b = member(&store, &group, "b", &["e2"], short_timing()).await;
    // Enrolled, but not announced: not a member the plan may count on yet.
    let _c = enroll(&store, &group, "c", short_timing()).await;

    let seen = soon("a reads the group", a.changed(&[])).await;
    assert_eq!(identities(&seen), ["a", "b"]);
    assert_eq!(seen[0].eligible, eligible(&["e1", "e2"]));
    assert_eq!(seen[1].eligible, eligible(&["e2"]));
    assert_eq!(soon("b reads the group", b.changed(&[])).await, seen);

    // One key per member under the prefix, on a lease, holding its record.
    let mut client = etcd_client(&etcd).await;
    let keys = queue(&mut client, &format!("baton/_members/{group}/")).await;
    let (key, value, lease, _) = &keys[1];
    assert_eq!(key, &format!("baton/_members/{group}/b"));
    assert_ne!(*lease, 0, "b's key is not on a lease");
    let record: serde_json::Value = serde_json::from_str(value).expect("b's record is JSON");
    assert_eq!(
        record,
        serde_json::json!({"identity": "b", "eligible": ["e2"]})
    );
    // An election named like the group (a group name is a valid election name) sees no
    // member key as a candidate.
    let mut seat = store.join(&group, "x", short_timing()).await.expect("join");
    let observed = soon("observe", seat.observe(&Observation::unseen())).await;
    assert_eq!(observed.holder, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_wake_a_waiting_member_at_once() {
    let (etcd, store, group) = balancing_on_etcd(&["e1"]);
    let mut a = member(&store, &group, "a", &["e1"], long_timing()).await;
    let alone = soon("a reads the group", a.changed(&[])).await;
    assert_eq!(identities(&alone), ["a"]);

    // a waits (it read, saw nothing new, and watches) before b joins.
    let mut waiting = Box::pin(a.changed(&alone));
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(early.is_err(), "a saw a change before any: {early:?}");
    let mut b = member(&store, &group, "b", &["e1"], long_timing()).await;
    let both = soon("a sees b join", waiting).await;
    assert_eq!(identities(&both), ["a", "b"]);

    let mut client = etcd_client(&etcd).await;
    let b_lease = member_lease(&mut client, &group, "b").await;
    let mut waiting = Box::pin(a.changed(&both));
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(early.is_err(), "a saw a change before any: {early:?}");
    soon("b leaves", b.leave()).await;
    let left = soon("a sees b leave", waiting).await;
    assert_eq!(identities(&left), ["a"]);
    // Gone by the leave, with its lease, not by expiry (60 s).
    let ttl = lease_ttl(&mut client, b_lease).await;
    assert_eq!(ttl, -1, "b's member lease outlived its leave");
}

/// A member whose process dies stops renewing: it drops out when its lease expires (printed),
/// and not before, however long its process lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_dies_drops_out_within_one_lease_and_a_live_one_stays() {
    let (etcd, store, group) = balancing_on_etcd(&["e1"]);
    let timing = short_timing();
    let mut a = member(&store, &group, "a", &["e1"], timing).await;
    let b = member(&store, &group, "b", &["e1"], timing).await;
    let both = soon("a reads the group", a.changed(&[])).await;
    assert_eq!(identities(&both), ["a", "b"]);

    // Twice the lease and more: the membership is kept alive on its own.
    let mut waiting = Box::pin(a.changed(&both));
    let stayed = timing.lease_duration * 2 + Duration::from_secs(1);
    let early = tokio::time::timeout(stayed, &mut waiting).await;
    assert!(early.is_err(), "a live member dropped out: {early:?}");

    let mut client = etcd_client(&etcd).await;
    let b_lease = member_lease(&mut client, &group, "b").await;
    // Dropped without leaving, as a process that dies: nothing renews its lease any more.
    let died = tokio::time::Instant::now();
    drop(b);
    let seen = soon("a sees b drop out", waiting).await;
    println!(
        "b dropped out {:?} after it died (lease {:?})",
        died.elapsed(),
        timing.lease_duration
    );
    assert_eq!(identities(&seen), ["a"]);
    let ttl = lease_ttl(&mut client, b_lease).await;
    assert_eq!(ttl, -1, "b went while its lease lived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_identity_is_one_member_while_it_lives() {
    let (_etcd, store, group) = balancing_on_etcd(&["e1"]);
    let mut a = member(&store, &group, "a", &["e1"], long_timing()).await;

    let again = store.enroll(&group, "a", long_timing()).await;
    let error = again.err().expect("a second member as a is refused");
    let text = error.to_string();
    assert!(text.contains("--identity"), "{text}");
    assert!(
        text.contains(&format!("baton/_members/{group}/a")),
        "{text}"
    );
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    // The refused one took nothing from the live one.
    let seen = soon("a reads the group", a.changed(&[])).await;
    assert_eq!(identities(&seen), ["a"]);
    assert_eq!(seen[0].eligible, eligible(&["e1"]));

    // Once a left, its identity is free at once (its lease lasts 60 s).
    soon("a leaves", a.leave()).await;
    let _again = enroll(&store, &group, "a", long_timing()).await;
}

/// A member whose key vanished while it lives (its lease revoked by hand, as when etcd expired
/// it during a partition) puts it back on a new session, and the others see it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_lease_was_revoked_enrolls_again_on_a_new_one() {
    let (etcd, store, group) = balancing_on_etcd(&["e1"]);
    let mut a = member(&store, &group, "a", &["e1"], long_timing()).await;
    let mut b = member(&store, &group, "b", &["e2"], long_timing()).await;
    let both = soon("b reads the group", b.changed(&[])).await;
    assert_eq!(identities(&both), ["a", "b"]);

    let mut client = etcd_client(&etcd).await;
    let old_lease = member_lease(&mut client, &group, "a").await;
    etcd.ctl(&["lease", "revoke", &format!("{old_lease:x}")]);
    let alone = soon("b sees a gone", b.changed(&both)).await;
    assert_eq!(identities(&alone), ["b"]);

    // a, reading the group, finds its key gone and writes it again; it then waits, as nothing
    // changed from where it stands.
    let back = tokio::select! {
        seen = a.changed(&both) => panic!("a saw a change of its own group: {seen:?}"),
        back = soon("b sees a back", b.changed(&alone)) => back,
    };
    assert_eq!(back, both);
    assert_ne!(member_lease(&mut client, &group, "a").await, old_lease);
}
