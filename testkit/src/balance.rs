//! A balanced group of real `baton run --balance` daemons on one store, for `tests/balance.rs`
//! and `benches/balance.rs`: members join, die (`kill -9`) and stop (SIGTERM); each has one timer
//! worker following every election, which outlives its daemon's incarnations (the daemon comes
//! back on the same Unix socket). [`Group::settle`] waits until every live daemon shows the
//! same settled plan, and [`Group::check_safety`] checks every election's worker intervals.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use baton::client::{Client, DaemonStatus};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::{
    Daemon, Proc, example, field,
    intervals::{Interval, check_intervals, of_election, parse_intervals},
    scenario::Backend,
};

/// How long a change may take to settle before a test fails: a liveness bound only; the
/// settle times are printed, and measured by the benchmark.
pub const SETTLE_BOUND: Duration = Duration::from_secs(60);
/// How often [`Group::settle`] asks every daemon for its status: the benches' settle figures
/// are rounded up to it.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// The timer workers' tick period: ticks only show the work runs; the intervals come from the
/// `started`/`stopped` lines.
const TICK: &str = "2s";

/// One identity of the group, across its daemon's incarnations.
struct Member {
    /// `unix:PATH`, the same for every incarnation, so its worker reconnects.
    listen: String,
    daemon: Option<Daemon>,
    /// Earlier incarnations, kept for their logs.
    past: Vec<Daemon>,
    worker: Proc,
}

/// Each election's holder, as the daemons agree once settled.
pub type Holders = BTreeMap<String, String>;

/// What [`Group::settle`] saw.
pub struct Settled {
    /// How long until the daemons agreed on the settled plan.
    pub agreed: Duration,
    /// How long until each election's work ran on its holder's worker only: `agreed` plus the
    /// hand-offs' last steps, and a worker's reconnection to a daemon that (re)started (the
    /// client's back-off reaches 5 s while its daemon is down).
    pub working: Duration,
    pub holders: Holders,
}

impl std::fmt::Display for Settled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "daemons agreed in {:.2?}, work running in {:.2?}",
            self.agreed, self.working
        )
    }
}

/// A balanced group on `backend`.
pub struct Group<'a> {
    // Field order is drop order: processes first, then their sockets' directory.
    members: BTreeMap<String, Member>,
    backend: &'a Backend,
    elections: Vec<String>,
    /// Flags of every daemon beyond the store's, the elections and `--balance`.
    extra: Vec<String>,
    /// Elections whose worker is not ready, by identity.
    unready: BTreeMap<String, Vec<String>>,
    sockets: tempfile::TempDir,
}

impl<'a> Group<'a> {
    /// A group of `elections` elections (`e01`, `e02`, ...) on `backend`, no member yet; every
    /// daemon gets `extra` flags (on the file store also [`crate::SHORT_TIMING`], which the
    /// other stores' daemons get anyway).
    pub fn new(backend: &'a Backend, elections: usize, extra: &[&str]) -> Group<'a> {
        let mut flags: Vec<String> = extra.iter().map(|f| (*f).to_owned()).collect();
        if let Backend::File { .. } = backend {
            flags.extend(crate::SHORT_TIMING.map(String::from));
        }
        Group {
            members: BTreeMap::new(),
            backend,
            elections: (1..=elections).map(|i| format!("e{i:02}")).collect(),
            extra: flags,
            unready: BTreeMap::new(),
            sockets: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn elections(&self) -> &[String] {
        &self.elections
    }

    /// Make `identity`'s worker not ready for `elections` (before it first joins).
    pub fn unready(&mut self, identity: &str, elections: &[&str]) {
        self.unready.insert(
            identity.to_owned(),
            elections.iter().map(|e| (*e).to_owned()).collect(),
        );
    }

    /// Start `identity`'s daemon (again), and its worker the first time.
    pub fn join(&mut self, identity: &str) {
        let listen = format!(
            "unix:{}",
            self.sockets
                .path()
                .join(format!("{identity}.sock"))
                .display()
        );
        let mut extra = vec!["--balance"];
        extra.extend(self.extra.iter().map(String::as_str));
        let daemon = self
            .backend
            .daemon_on(identity, &listen, &self.elections.join(","), &extra);
        match self.members.get_mut(identity) {
            Some(member) => {
                assert!(member.daemon.is_none(), "{identity} runs already");
                member.daemon = Some(daemon);
            }
            None => {
                let worker = self.worker(&listen, identity);
                self.members.insert(
                    identity.to_owned(),
                    Member {
                        listen,
                        daemon: Some(daemon),
                        past: Vec::new(),
                        worker,
                    },
                );
            }
        }
    }

    fn worker(&self, listen: &str, identity: &str) -> Proc {
        let mut command = example("timer_worker");
        command.args([
            "--daemon",
            listen,
            "--election",
            &self.elections.join(","),
            "--period",
            TICK,
        ]);
        if let Some(unready) = self.unready.get(identity) {
            command.args(["--unready", &unready.join(",")]);
        }
        Proc::spawn(command, "worker: ")
    }

    /// `kill -9` of `identity`'s daemon; its worker runs on.
    pub fn kill_9(&mut self, identity: &str) {
        let mut daemon = self.take(identity);
        daemon.proc.signal(Signal::SIGKILL);
        daemon.proc.wait();
        self.retire(identity, daemon);
    }

    /// SIGTERM of `identity`'s daemon; it must exit cleanly (its worker runs on).
    pub fn sigterm(&mut self, identity: &str) {
        let mut daemon = self.take(identity);
        daemon.proc.signal(Signal::SIGTERM);
        let status = daemon.proc.wait();
        assert!(
            status.success(),
            "{identity}: SIGTERM is a clean stop: {status:?}"
        );
        self.retire(identity, daemon);
    }

    fn take(&mut self, identity: &str) -> Daemon {
        self.members
            .get_mut(identity)
            .and_then(|m| m.daemon.take())
            .unwrap_or_else(|| panic!("{identity} is not running"))
    }

    fn retire(&mut self, identity: &str, daemon: Daemon) {
        self.members.get_mut(identity).unwrap().past.push(daemon);
    }

    /// The identities whose daemon runs.
    pub fn live(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.daemon.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Wait until the group has settled: every live daemon shows the same holder of every
    /// election, a live member, and the live members, each leading its planned share; then
    /// until each election's work runs on its holder's worker, and no other. Panics after
    /// [`SETTLE_BOUND`], with what each daemon shows.
    pub async fn settle(&self, since: Instant, what: &str) -> Settled {
        let mut last = String::new();
        let mut agreed_at: Option<Duration> = None;
        while since.elapsed() < SETTLE_BOUND {
            match self.agreed().await {
                Ok(holders) => {
                    let agreed = *agreed_at.get_or_insert(since.elapsed());
                    match self.working(&holders) {
                        Ok(()) => {
                            return Settled {
                                agreed,
                                working: since.elapsed(),
                                holders,
                            };
                        }
                        Err(why) => last = why,
                    }
                }
                Err(why) => {
                    agreed_at = None;
                    last = why;
                }
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
        let shown = self.statuses().await;
        self.fail(&format!(
            "{what}: not settled within {SETTLE_BOUND:?}: {last}\n{shown}"
        ));
    }

    /// The holders once the daemons agree, or why not.
    async fn agreed(&self) -> Result<Holders, String> {
        let live = self.live();
        let mut agreed: Option<Holders> = None;
        for id in &live {
            let status = self.status(id).await?;
            let holders = self.holders(id, &status, &live)?;
            match &agreed {
                Some(first) if *first != holders => {
                    return Err(format!("{id} sees other holders than {}", live[0]));
                }
                _ => agreed = Some(holders),
            }
        }
        agreed.ok_or_else(|| "no live member".to_owned())
    }

    /// Whether each election's work runs on its holder's worker, and no other.
    fn working(&self, holders: &Holders) -> Result<(), String> {
        let running: BTreeMap<&String, BTreeSet<String>> = self
            .members
            .iter()
            .map(|(id, m)| (id, running_work(&m.worker)))
            .collect();
        for (election, holder) in holders {
            let on: Vec<&&String> = running
                .iter()
                .filter(|(_, open)| open.contains(election))
                .map(|(id, _)| id)
                .collect();
            if on != [&holder] {
                return Err(format!(
                    "{election}: held by {holder}, the work runs on {on:?}"
                ));
            }
        }
        Ok(())
    }

    /// What daemon `id` shows in `baton status`.
    pub async fn status(&self, id: &str) -> Result<DaemonStatus, String> {
        let daemon = self.members[id].daemon.as_ref().expect("live");
        let client = Client::connect(daemon.addr.clone())
            .await
            .map_err(|e| format!("{id}: {e}"))?;
        client.status().await.map_err(|e| format!("{id}: {e}"))
    }

    /// What daemon `id` shows, if it is settled.
    fn holders(&self, id: &str, status: &DaemonStatus, live: &[String]) -> Result<Holders, String> {
        let group = status.balance.as_ref().ok_or(format!("{id}: no group"))?;
        let members: Vec<&String> = group.members.iter().map(|m| &m.identity).collect();
        if members.iter().copied().ne(live.iter()) {
            return Err(format!("{id} sees members {members:?}, live are {live:?}"));
        }
        if let Some(m) = group.members.iter().find(|m| m.leads != m.share) {
            return Err(format!(
                "{id} sees {} lead {}, share {}",
                m.identity, m.leads, m.share
            ));
        }
        let mut holders = Holders::new();
        for state in &status.elections {
            match &state.leader {
                Some(leader) if live.contains(leader) => {
                    holders.insert(state.election.clone(), leader.clone());
                }
                other => return Err(format!("{id} sees {} held by {other:?}", state.election)),
            }
        }
        Ok(holders)
    }

    /// What every live daemon shows in `baton status`, for a failure's message.
    async fn statuses(&self) -> String {
        let mut out = String::new();
        for id in self.live() {
            match self.status(&id).await {
                Ok(status) => out.push_str(&format!("{id}: {:?}\n", status.balance)),
                Err(e) => out.push_str(&format!("{id}: {e}\n")),
            }
        }
        out
    }

    /// Panic with `message` and the daemons' balance log lines.
    fn fail(&self, message: &str) -> ! {
        let mut logs = String::new();
        for (id, member) in &self.members {
            for daemon in member.past.iter().chain(&member.daemon) {
                for line in daemon.proc.stderr.all() {
                    if line.contains("balance") || line.contains("ERROR") {
                        logs.push_str(&format!("[{id}] {line}\n"));
                    }
                }
            }
        }
        panic!("{message}\nbalance log lines:\n{logs}");
    }

    /// How many elections each live member leads, by identity.
    pub fn counts(&self, holders: &Holders) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            self.live().into_iter().map(|id| (id, 0)).collect();
        for holder in holders.values() {
            *counts.get_mut(holder).expect("a live holder") += 1;
        }
        counts
    }

    /// Every election's worker intervals, across all workers, in order of start; replicas are
    /// numbered as [`Group::identities`] lists them.
    pub fn intervals(&self, election: &str) -> Vec<Interval> {
        let mut all = Vec::new();
        for (i, (id, member)) in self.members.iter().enumerate() {
            let lines = of_election(&member.worker.stdout.all(), election);
            match parse_intervals(i, &lines) {
                Ok(intervals) => all.extend(intervals),
                Err(e) => self.fail(&format!("{id}'s worker, {election}: {e}")),
            }
        }
        all.sort_by_key(|interval| interval.start);
        all
    }

    /// Every identity that ever joined, in order.
    pub fn identities(&self) -> Vec<&str> {
        self.members.keys().map(String::as_str).collect()
    }

    /// The safety invariant on every election, exactly: its workers' intervals never overlap,
    /// and terms grow from one holder to the next.
    pub fn check_safety(&self) {
        let ids = self.identities();
        for election in &self.elections {
            if let Err(e) = check_intervals(&self.intervals(election), &ids) {
                self.fail(&format!("SAFETY, {election}: {e}"));
            }
        }
    }

    /// The `stopped` lines of every worker after CLOCK_MONOTONIC `t0`, as (identity, line).
    pub fn stops_after(&self, t0: i128) -> Vec<(String, String)> {
        self.lines_after("stopped", t0)
    }

    /// The `started` lines of every worker after `t0`, as (identity, line).
    pub fn starts_after(&self, t0: i128) -> Vec<(String, String)> {
        self.lines_after("started", t0)
    }

    fn lines_after(&self, prefix: &str, t0: i128) -> Vec<(String, String)> {
        let mut found = Vec::new();
        for (id, member) in &self.members {
            for line in member.worker.stdout.all() {
                let mono: Option<i128> = field(&line, "mono").and_then(|m| m.parse().ok());
                if line.starts_with(prefix) && mono.is_some_and(|m| m > t0) {
                    found.push((id.clone(), line));
                }
            }
        }
        found
    }

    /// The log lines of `identity`'s daemons (every incarnation) that contain `text`.
    pub fn log_lines(&self, identity: &str, text: &str) -> Vec<String> {
        let member = &self.members[identity];
        member
            .past
            .iter()
            .chain(&member.daemon)
            .flat_map(|d| d.proc.stderr.all())
            .filter(|l| l.contains(text))
            .collect()
    }

    /// The log lines of `identity`'s running daemon that contain `text`.
    pub fn log_lines_of_current(&self, identity: &str, text: &str) -> Vec<String> {
        let daemon = self.members[identity].daemon.as_ref().expect("running");
        daemon
            .proc
            .stderr
            .all()
            .into_iter()
            .filter(|l| l.contains(text))
            .collect()
    }

    /// The `unix:PATH` daemon `identity` serves on.
    pub fn addr(&self, identity: &str) -> &str {
        &self.members[identity].listen
    }
}

/// The elections whose work runs on `worker` now: its last `started` without a `stopped`.
fn running_work(worker: &Proc) -> BTreeSet<String> {
    let mut open = BTreeSet::new();
    for line in worker.stdout.all() {
        let Some(election) = field(&line, "election") else {
            continue;
        };
        if line.starts_with("started ") {
            open.insert(election.to_owned());
        } else if line.starts_with("stopped ") {
            open.remove(election);
        }
    }
    open
}
