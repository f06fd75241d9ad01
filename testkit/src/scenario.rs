//! The hand-off and take-over scenarios, written once and run for every store (file, etcd,
//! Kubernetes through the Lease API double) by `tests/scenarios.rs`, and timed by the
//! benchmarks. A [`Backend`] says how to start `baton run` on its store; a scenario runs real
//! daemons and timer workers on it and asserts what must hold on every store exactly (no
//! overlap, terms grow, a clean drain); it returns what it ran, so a store's own test can add
//! what only that store can show.

use std::{collections::BTreeMap, process::Command, sync::Mutex};

use baton::client::Role;
use nix::sys::signal::Signal;

use crate::{
    Daemon, Proc, SHORT_TIMING, assert_stopped_before, baton, etcd::Etcd, field,
    k8s_api::ApiServer, stamps, timer_worker,
};

/// The namespace of the Kubernetes backend's Leases.
pub const NAMESPACE: &str = "team-a";

/// A store that the daemons of one scenario share.
pub enum Backend {
    /// A scratch lock directory, daemons on the default timings.
    File { dir: tempfile::TempDir },
    /// A real etcd, daemons on [`SHORT_TIMING`] (etcd leases are whole seconds, at least 2).
    Etcd { etcd: Etcd },
    /// The Lease API double, each daemon with a service account of its own (granted
    /// [`NAMESPACE`]) and its kubeconfig, on [`SHORT_TIMING`].
    Kubernetes {
        api: ApiServer,
        dir: tempfile::TempDir,
        /// Each daemon's latest token, by identity.
        tokens: Mutex<BTreeMap<String, String>>,
    },
}

impl Backend {
    pub fn file() -> Backend {
        Backend::File {
            dir: crate::lock_dir(),
        }
    }

    pub fn etcd() -> Backend {
        Backend::Etcd {
            etcd: Etcd::start(),
        }
    }

    pub fn kubernetes() -> Backend {
        Backend::Kubernetes {
            api: ApiServer::start(),
            dir: tempfile::tempdir().expect("tempdir"),
            tokens: Mutex::default(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::File { .. } => "file",
            Backend::Etcd { .. } => "etcd",
            Backend::Kubernetes { .. } => "kubernetes",
        }
    }

    /// Start daemon `identity` of `election` on this store, with `extra` flags, and wait until
    /// it serves.
    pub fn daemon(&self, identity: &str, election: &str, extra: &[&str]) -> Daemon {
        self.daemon_on(identity, "127.0.0.1:0", election, extra)
    }

    /// [`Backend::daemon`] on a given `listen` address (to restart one where its workers
    /// expect it).
    pub fn daemon_on(
        &self,
        identity: &str,
        listen: &str,
        election: &str,
        extra: &[&str],
    ) -> Daemon {
        let mut args: Vec<String> = Vec::new();
        let mut command: Command = baton();
        match self {
            Backend::File { dir } => {
                args.extend(["--lock-dir".into(), dir.path().display().to_string()]);
            }
            Backend::Etcd { etcd } => {
                args.extend(["--store", "etcd", "--etcd-endpoints"].map(String::from));
                args.push(etcd.endpoint());
                args.extend(SHORT_TIMING.map(String::from));
            }
            Backend::Kubernetes { api, dir, tokens } => {
                let token = api.service_account(NAMESPACE, identity, &[NAMESPACE]);
                let kubeconfig = api.write_kubeconfig(
                    dir.path(),
                    &format!("{identity}.kubeconfig"),
                    &token,
                    NAMESPACE,
                );
                command.env("KUBECONFIG", kubeconfig);
                tokens.lock().unwrap().insert(identity.to_owned(), token);
                args.extend(["--store", "kubernetes"].map(String::from));
                args.extend(SHORT_TIMING.map(String::from));
            }
        }
        args.extend(["--election".into(), election.into()]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Daemon::start_command_on(identity, command, listen, &args)
    }

    /// The Kubernetes service account token daemon `identity` was last started with.
    pub fn token(&self, identity: &str) -> Option<String> {
        match self {
            Backend::Kubernetes { tokens, .. } => tokens.lock().unwrap().get(identity).cloned(),
            _ => None,
        }
    }
}

/// The term a worker's `started`/`stopped` line carries.
pub fn term_of(line: &str) -> u64 {
    field(line, "term")
        .expect("term=")
        .parse()
        .expect("term is a number")
}

/// Two daemons of `election`: `a` leads, `b` follows `a`. Returns them and `a`'s first term.
pub async fn leader_and_follower(backend: &Backend, election: &str) -> (Daemon, Daemon, u64) {
    let a = backend.daemon("a", election, &[]);
    let first = a.wait_role(election, Role::Leader).await;
    let b = backend.daemon("b", election, &[]);
    let seen = b
        .wait_for(election, "following a", |s| {
            s.role == Role::Follower && s.leader.is_some()
        })
        .await;
    assert_eq!(seen.leader.as_deref(), Some("a"));
    // Exactly one leader.
    assert_eq!(
        b.client().await.get(election).await.unwrap().role,
        Role::Follower
    );
    assert_eq!(
        a.client().await.get(election).await.unwrap().role,
        Role::Leader
    );
    (a, b, first.term)
}

/// What [`sigterm_hand_off`] ran, for a store's own checks.
pub struct HandOff {
    /// The daemon that stepped down (exited), the one that took over.
    pub old: Daemon,
    pub new: Daemon,
    /// Their timer workers.
    pub old_worker: Proc,
    pub new_worker: Proc,
    /// The old worker's term and the new worker's.
    pub old_term: u64,
    pub new_term: u64,
    /// CLOCK_MONOTONIC when the old daemon was signalled, and when the new worker started.
    pub signalled: i128,
    pub new_started: i128,
}

/// SIGTERM of the leader, with a timer worker on each daemon: the leader's daemon tells its
/// worker to stop, waits for it, releases, and exits cleanly; the follower takes over and only
/// then starts its worker, in a greater term. Asserted exactly: the follower's worker never ran
/// before, the old worker stopped once and before the new one started (no tick after), the
/// daemon logged the drain.
pub async fn sigterm_hand_off(backend: &Backend, election: &str) -> HandOff {
    let (mut a, b, _) = leader_and_follower(backend, election).await;
    let wa = timer_worker(&a, election, "50ms");
    let wb = timer_worker(&b, election, "50ms");
    wa.stdout.wait_count("of a's ticks", 3, |l| {
        l.starts_with("Clustered route (timer)")
    });
    assert!(
        stamps(&wb, "started").is_empty(),
        "the follower's worker must not start"
    );

    let signalled = crate::mono_now();
    a.proc.signal(Signal::SIGTERM);
    let started = wb
        .stdout
        .wait_for("'started' from b's worker", |l| l.starts_with("started"));
    let status = a.proc.wait();
    assert!(status.success(), "SIGTERM is a clean stop: {status:?}");

    // Every old tick before the new start, so before every new tick too.
    let new_started = stamps(&wb, "started")[0];
    assert_stopped_before(&wa, new_started);
    let old_term = term_of(
        &wa.stdout
            .wait_for("a's start", |l| l.starts_with("started")),
    );
    let new_term = term_of(&started);
    assert!(new_term > old_term, "term {new_term} after {old_term}");
    // The daemon logged the drain: the worker confirmed before the release.
    a.proc.stderr.wait_for("'workers stopped; releasing'", |l| {
        l.contains("workers stopped; releasing")
    });
    HandOff {
        old: a,
        new: b,
        old_worker: wa,
        new_worker: wb,
        old_term,
        new_term,
        signalled,
        new_started,
    }
}

/// What [`kill_9_take_over`] ran.
pub struct TakeOver {
    pub old: Daemon,
    pub new: Daemon,
    /// The killed leader's term, the new leader's.
    pub old_term: u64,
    pub new_term: u64,
}

/// kill -9 of the leader (no release): the follower takes over, in a greater term, naming
/// itself the leader.
pub async fn kill_9_take_over(backend: &Backend, election: &str) -> TakeOver {
    let (a, b, old_term) = leader_and_follower(backend, election).await;
    kill_9_of_the_leader(a, b, election, old_term).await
}

/// The second half of [`kill_9_take_over`], for a store's test that looks at the store between
/// the two: kill -9 of leader `a` (of `old_term`), and `b` takes over.
pub async fn kill_9_of_the_leader(
    mut a: Daemon,
    b: Daemon,
    election: &str,
    old_term: u64,
) -> TakeOver {
    a.proc.signal(Signal::SIGKILL);
    a.proc.wait();
    let now = b.wait_role(election, Role::Leader).await;
    assert!(now.term > old_term, "term {} after {old_term}", now.term);
    assert_eq!(now.leader.as_deref(), Some("b"));
    TakeOver {
        old: a,
        new: b,
        old_term,
        new_term: now.term,
    }
}
