//! Baton's test harness, shared by the end-to-end tests and the benchmarks: real `baton`
//! processes on `127.0.0.1:0` (or a Unix socket), real workers, real signals, and waiting on
//! events (log lines, stream events) instead of sleeps. [`etcd`] runs a real etcd,
//! [`k8s_api`] is a test double of the Kubernetes Lease API, [`intervals`] checks that workers
//! never overlap, [`scenario`] holds the hand-off scenarios every store runs, and [`balance`]
//! runs a balanced group of daemons. A dev-dependency only: never built into the image.

pub mod balance;
pub mod etcd;
pub mod health;
pub mod intervals;
pub mod k8s_api;
pub mod pki;
pub mod ports;
pub mod scenario;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::Duration,
};

use baton::{
    client::{Client, LeaderState, Role, WatchEvent},
    store::Timing,
};
use futures::StreamExt;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Generous bound on anything that should happen "soon" on a loaded 2-core machine. Only a
/// liveness bound: latencies are measured by the benchmarks.
pub const SOON: Duration = Duration::from_secs(20);

/// The lines a child process has written, shared with a reader thread.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// Set by the reader thread at end of stream, so a caller can wait for the last lines.
    closed: Arc<(Mutex<bool>, Condvar)>,
}

impl Lines {
    fn follow(&self, stream: impl std::io::Read + Send + 'static, echo: &'static str) {
        let lines = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if std::env::var_os("BATON_TEST_ECHO").is_some() {
                    eprintln!("{echo}{line}");
                }
                let (store, wake) = &*lines.inner;
                store.lock().unwrap().push(line);
                wake.notify_all();
            }
            let (closed, wake) = &*lines.closed;
            *closed.lock().unwrap() = true;
            wake.notify_all();
        });
    }

    /// Wait, at most `SOON`, until the stream has ended: a process that has exited may still
    /// have lines in the pipe that the reader thread has not taken yet.
    fn wait_closed(&self) {
        let (closed, wake) = &*self.closed;
        let guard = closed.lock().unwrap();
        let _ = wake
            .wait_timeout_while(guard, SOON, |closed| !*closed)
            .unwrap();
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.inner.0.lock().unwrap().clone()
    }

    /// The first line so far that contains `text`, without waiting.
    pub fn find(&self, text: &str) -> Option<String> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(text))
            .cloned()
    }

    /// Wait until a line satisfies `pred`; returns it. Panics after `SOON` with the lines.
    pub fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let (store, wake) = &*self.inner;
        let guard = store.lock().unwrap();
        let (guard, timeout) = wake
            .wait_timeout_while(guard, SOON, |lines| !lines.iter().any(|l| pred(l)))
            .unwrap();
        if timeout.timed_out() {
            panic!(
                "no line {what} within {SOON:?}; lines:\n{}",
                guard.join("\n")
            );
        }
        guard.iter().find(|l| pred(l)).unwrap().clone()
    }

    /// Wait until at least `n` lines satisfy `pred`.
    pub fn wait_count(&self, what: &str, n: usize, pred: impl Fn(&str) -> bool) {
        let (store, wake) = &*self.inner;
        let guard = store.lock().unwrap();
        let (guard, timeout) = wake
            .wait_timeout_while(guard, SOON, |lines| {
                lines.iter().filter(|l| pred(l)).count() < n
            })
            .unwrap();
        if timeout.timed_out() {
            panic!(
                "fewer than {n} lines {what} within {SOON:?}; lines:\n{}",
                guard.join("\n")
            );
        }
    }
}

/// A child process with its output captured.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(mut command: Command, name: &'static str) -> Proc {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (stdout, stderr) = (Lines::default(), Lines::default());
        stdout.follow(child.stdout.take().unwrap(), name);
        stderr.follow(child.stderr.take().unwrap(), name);
        Proc {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("kill {signal}: {e}"));
    }

    /// Wait for the process to exit, at most `SOON`, and for the readers to take its last lines.
    pub fn wait(&mut self) -> ExitStatus {
        let step = Duration::from_millis(10);
        for _ in 0..SOON.as_millis() / step.as_millis() {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.stdout.wait_closed();
                self.stderr.wait_closed();
                return status;
            }
            thread::sleep(step);
        }
        let _ = self.child.kill();
        panic!(
            "process did not exit within {SOON:?}; stderr:\n{}",
            self.stderr.all().join("\n")
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = kill(self.pid(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The build directory of the running test or benchmark (`target/PROFILE`): cargo puts it in
/// `target/PROFILE/deps`, beside which it builds the package's binaries (as assert_cmd finds
/// them). `CARGO_BIN_EXE_baton` is set only while compiling the tests, not this crate.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let dir = exe.parent().expect("the test's directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target/PROFILE").to_owned()
    } else {
        dir.to_owned()
    }
}

/// The `baton` binary under test.
pub fn baton_exe() -> PathBuf {
    let exe = profile_dir().join("baton");
    assert!(
        exe.is_file(),
        "the baton binary is not built at {}: run the tests with cargo, which builds it",
        exe.display()
    );
    exe
}

/// libfaketime's preload library (Debian's multiarch path), or a failure saying how to install
/// it. Tests preload it into the process they start (`LD_PRELOAD`, `FAKETIME`) rather than run
/// the `faketime` wrapper: the wrapper keeps files in /dev/shm named by its pid, which a killed
/// wrapper leaves behind, and a later wrapper that gets the same pid then fails to start.
pub fn faketime_lib() -> PathBuf {
    let under = |dir: &Path| dir.join("faketime").join("libfaketime.so.1");
    let multiarch = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|entry| under(&entry.path()));
    std::iter::once(under(Path::new("/usr/lib")))
        .chain(multiarch)
        .find(|lib| lib.is_file())
        .expect(
            "this test needs libfaketime (Debian: apt-get install faketime; scripts/test-all.sh \
             installs it)",
        )
}

/// The `baton` binary under test, as a command.
pub fn baton() -> Command {
    Command::new(baton_exe())
}

/// A built example. `cargo test --all-targets` builds examples only as test harnesses, so the
/// test command (`scripts/test-all.sh`) runs `cargo build --all-features --examples` first.
pub fn example(name: &str) -> Command {
    let exe = profile_dir().join("examples").join(name);
    assert!(
        exe.is_file(),
        "example {name} is not built at {}: run `cargo build --all-features --examples` \
         (scripts/test-all.sh does) before the tests",
        exe.display()
    );
    Command::new(exe)
}

/// A running `baton run` daemon.
pub struct Daemon {
    pub proc: Proc,
    pub addr: String,
    pub identity: String,
}

impl Daemon {
    /// Start `baton run --identity ID --listen 127.0.0.1:0 ARGS...` and wait until it serves.
    pub fn start(identity: &str, args: &[&str]) -> Daemon {
        Self::start_on(identity, "127.0.0.1:0", args)
    }

    /// Start a daemon on a given `listen` address (to restart one where its workers expect it).
    pub fn start_on(identity: &str, listen: &str, args: &[&str]) -> Daemon {
        Self::start_command_on(identity, baton(), listen, args)
    }

    /// Like [`Daemon::start`], from a prepared `command`: the `baton` binary with its
    /// environment set, or a wrapper (e.g. `faketime`) whose last argument is the binary.
    pub fn start_command(identity: &str, command: Command, args: &[&str]) -> Daemon {
        Self::start_command_on(identity, command, "127.0.0.1:0", args)
    }

    /// [`Daemon::start_command`] on a given `listen` address.
    pub fn start_command_on(
        identity: &str,
        mut command: Command,
        listen: &str,
        args: &[&str],
    ) -> Daemon {
        command
            .args(["run", "--identity", identity, "--listen", listen])
            .args(args);
        // `info` unless the caller chose.
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let proc = Proc::spawn(command, "daemon: ");
        let line = proc
            .stderr
            .wait_for("'baton serving'", |l| l.contains("baton serving"));
        let listen = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .unwrap_or_else(|| panic!("no listen= in {line:?}"));
        // A Unix socket is its own client address (`unix:PATH`).
        let addr = if listen.starts_with("unix:") {
            listen.to_owned()
        } else {
            format!("http://{listen}")
        };
        Daemon {
            proc,
            addr,
            identity: identity.to_owned(),
        }
    }

    /// Like [`Daemon::start_on`], logging also each WatchLeadership stream it opens (`watch
    /// opened`, with the peer tonic saw: see [`Daemon::watch_peers`]).
    pub fn start_logging_watches(identity: &str, listen: &str, args: &[&str]) -> Daemon {
        let mut command = baton();
        command.env("RUST_LOG", "info,baton::server=debug");
        Self::start_command_on(identity, command, listen, args)
    }

    /// The `peer=` of the first `n` `watch opened` lines, once there are `n`: `tcp:ADDR` for
    /// a TCP client (with or without TLS), `unix:pid=PID,uid=UID` on a Unix socket.
    pub fn watch_peers(&self, n: usize) -> Vec<String> {
        let opened = |l: &str| l.contains("watch opened");
        self.proc
            .stderr
            .wait_count("'watch opened' lines", n, opened);
        self.proc
            .stderr
            .all()
            .iter()
            .filter(|l| opened(l))
            .take(n)
            .map(|l| field(l, "peer").unwrap_or("(none)").to_owned())
            .collect()
    }

    /// The daemon's `baton serving` log line (its addresses: `listen=`, `tls=`, `health=`,
    /// `metrics=`).
    pub fn serving(&self) -> String {
        self.proc
            .stderr
            .wait_for("'baton serving'", |l| l.contains("baton serving"))
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr.clone())
            .await
            .expect("connect to daemon")
    }

    /// Wait (on the event stream) until `pred` holds for `election`; returns that state.
    pub async fn wait_for(
        &self,
        election: &str,
        what: &str,
        pred: impl Fn(&LeaderState) -> bool,
    ) -> LeaderState {
        let client = self.client().await;
        let mut events = Box::pin(client.watch(election));
        let found = tokio::time::timeout(SOON, async {
            while let Some(event) = events.next().await {
                if let WatchEvent::State(state) = event
                    && pred(&state)
                {
                    return state;
                }
            }
            unreachable!("the watch stream never ends")
        })
        .await;
        found
            .unwrap_or_else(|_| panic!("{}: {election}: not {what} within {SOON:?}", self.identity))
    }

    pub async fn wait_role(&self, election: &str, role: Role) -> LeaderState {
        self.wait_for(election, &format!("{role:?}"), |s| s.role == role)
            .await
    }
}

/// A scratch lock directory.
pub fn lock_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Find `key=value` in a line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock the timer worker stamps its lines with.
pub fn mono_now() -> i128 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock_gettime");
    t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128
}

/// A timer worker (`examples/timer_worker.rs`) following `daemon` in `election`, ticking every
/// `period` (e.g. "50ms"); its lines carry CLOCK_MONOTONIC stamps (`mono=`).
pub fn timer_worker(daemon: &Daemon, election: &str, period: &str) -> Proc {
    let mut command = example("timer_worker");
    command.args([
        "--daemon",
        &daemon.addr,
        "--election",
        election,
        "--period",
        period,
    ]);
    Proc::spawn(command, "worker: ")
}

/// The CLOCK_MONOTONIC stamps of a worker's lines that start with `prefix`.
pub fn stamps(worker: &Proc, prefix: &str) -> Vec<i128> {
    worker
        .stdout
        .all()
        .iter()
        .filter(|l| l.starts_with(prefix))
        .map(|l| {
            field(l, "mono")
                .expect("mono=")
                .parse()
                .expect("mono is a number")
        })
        .collect()
}

/// Assert that the `old` worker stopped exactly once, and before `new_start` (the new worker's
/// CLOCK_MONOTONIC start), and that none of its ticks came after that start.
pub fn assert_stopped_before(old: &Proc, new_start: i128) {
    let stops = stamps(old, "stopped");
    assert_eq!(
        stops.len(),
        1,
        "the old worker stopped once: {:?}",
        old.stdout.all()
    );
    assert!(
        stops[0] < new_start,
        "the old worker stopped at {} but the new one started at {new_start}",
        stops[0]
    );
    assert!(
        stamps(old, "Clustered route")
            .iter()
            .all(|t| *t < new_start),
        "a tick of the old worker after the new one started"
    );
}

/// The nearest-rank `p`-th percentile (0-100) of sorted samples.
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// How many rounds a bench runs: `BATON_BENCH_RUNS`, else `full` under `cargo bench` (which
/// passes `--bench`) and `quick` when the bench runs as a test.
pub fn bench_runs(quick: usize, full: usize) -> usize {
    let bench = std::env::args().any(|a| a == "--bench");
    std::env::var("BATON_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if bench { full } else { quick })
}

/// "p50=.. p99=.. min=.. max=.. n=.." of durations, in milliseconds.
pub fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| format!("{:.2}ms", d.as_secs_f64() * 1e3);
    format!(
        "p50={} p99={} min={} max={} n={}",
        ms(percentile(&samples, 50.0)),
        ms(percentile(&samples, 99.0)),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: impl std::fmt::Display, name: &str) -> u64 {
    proc_number(pid, "status", name)
}

/// The number of a `NAME: VALUE [kB]` line of `/proc/PID/FILE` (`status`, `io`).
pub fn proc_number(pid: impl std::fmt::Display, file: &str, name: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{file}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/{file}"))
}

/// Short `baton run` timings for end-to-end tests: a 3 s lease (whole seconds, as etcd and
/// Kubernetes need), a 2 s renew deadline, a 500 ms retry period.
pub const SHORT_TIMING: [&str; 6] = [
    "--lease-duration",
    "3s",
    "--renew-deadline",
    "2s",
    "--retry-period",
    "500ms",
];

/// [`SHORT_TIMING`] as the library's [`Timing`], for tests that drive a store in process.
pub fn short_timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(500),
    }
}
