//! A real etcd for tests and benchmarks: Debian's `etcd` on fresh loopback ports (started
//! again on others if it lost them: [`crate::ports`]) with a scratch data dir, killed on drop,
//! and able to stop and start again on the same ports and data (an outage). `etcdctl` is run
//! against it with the same TLS and user settings.
//!
//! Missing binaries fail the test with the command that installs them: never a silent skip.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    Proc,
    ports::{PortTaken, on_fresh_ports},
};

/// How to install what this harness needs.
pub const INSTALL: &str = "apt-get install etcd-server etcd-client";

/// Panic with the install command if `etcd` or `etcdctl` is missing.
pub fn require_binaries() {
    for binary in ["etcd", "etcdctl"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
            .unwrap_or(false);
        assert!(
            found,
            "`{binary}` is not on PATH: the etcd tests need a real etcd; run `{INSTALL}` \
             (scripts/test-all.sh does)"
        );
    }
}

/// Server TLS files, and whether clients must present a certificate.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub client_cert_auth: bool,
}

/// A running (or stopped) etcd.
pub struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    proc: Option<Proc>,
    /// The network namespace etcd (and etcdctl) run in (`ip netns exec`), if not the test's.
    netns: Option<String>,
    /// The client address's host: `127.0.0.1`, or an address inside `netns`.
    host: String,
    /// Extra etcdctl flags (TLS files, user) used by [`Etcd::etcdctl`].
    ctl_flags: Vec<String>,
    /// This member's name and `--initial-cluster` (every member's `name=peer URL`).
    name: String,
    initial_cluster: Option<String>,
    /// More `etcd` flags (timing), for [`Etcd::start_with_flags`].
    flags: Vec<String>,
}

impl Etcd {
    /// Start a plain-text etcd and wait until it serves.
    pub fn start() -> Etcd {
        Self::start_with(None)
    }

    /// Start an etcd, with TLS on the client port if given, and wait until it serves.
    pub fn start_with(tls: Option<ServerTls>) -> Etcd {
        require_binaries();
        on_fresh_ports("etcd", 2, |ports| {
            Self::try_start_at(ports[0], ports[1], tls.clone(), Vec::new())
        })
    }

    /// Start a plain-text etcd with more `etcd` flags (e.g. `--election-timeout=500`) and wait
    /// until it serves.
    pub fn start_with_flags(flags: &[&str]) -> Etcd {
        require_binaries();
        let flags: Vec<String> = flags.iter().map(|f| (*f).to_owned()).collect();
        on_fresh_ports("etcd", 2, |ports| {
            Self::try_start_at(ports[0], ports[1], None, flags.clone())
        })
    }

    /// Start an etcd on the given client and peer ports and wait until it serves.
    fn try_start_at(
        client_port: u16,
        peer_port: u16,
        tls: Option<ServerTls>,
        flags: Vec<String>,
    ) -> Result<Etcd, PortTaken> {
        let mut etcd = Etcd {
            dir: tempfile::tempdir().expect("scratch dir"),
            client_port,
            peer_port,
            tls,
            proc: None,
            netns: None,
            host: "127.0.0.1".to_owned(),
            ctl_flags: Vec::new(),
            name: "baton-test".to_owned(),
            initial_cluster: None,
            flags,
        };
        if let Some(tls) = &etcd.tls {
            etcd.ctl_flags = vec![
                format!("--cacert={}", tls.ca.display()),
                format!("--cert={}", tls.cert.display()),
                format!("--key={}", tls.key.display()),
            ];
        }
        etcd.spawn();
        etcd.wait_ready()?;
        Ok(etcd)
    }

    /// Start a plain-text etcd inside network namespace `netns` (as root, `ip netns exec`),
    /// serving clients on `host:2379` (an address of that namespace), and wait until it serves.
    /// etcdctl runs in the same namespace.
    pub fn start_in_netns(netns: &str, host: &str) -> Etcd {
        require_binaries();
        let mut etcd = Etcd {
            dir: tempfile::tempdir().expect("scratch dir"),
            client_port: 2379,
            peer_port: 2380,
            tls: None,
            proc: None,
            netns: Some(netns.to_owned()),
            host: host.to_owned(),
            ctl_flags: Vec::new(),
            name: "baton-test".to_owned(),
            initial_cluster: None,
            flags: Vec::new(),
        };
        etcd.run();
        etcd
    }

    /// Start a plain-text etcd cluster, member `i` inside network namespace `members[i].0`
    /// serving clients on `members[i].1:2379` and peers on port 2380 of the same address, and
    /// wait until every member serves (which needs a quorum: all are started first).
    pub fn start_cluster_in_netns(members: &[(&str, &str)]) -> Vec<Etcd> {
        require_binaries();
        let initial_cluster = members
            .iter()
            .enumerate()
            .map(|(i, (_, host))| format!("m{i}=http://{host}:2380"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster: Vec<Etcd> = members
            .iter()
            .enumerate()
            .map(|(i, (netns, host))| Etcd {
                dir: tempfile::tempdir().expect("scratch dir"),
                client_port: 2379,
                peer_port: 2380,
                tls: None,
                proc: None,
                netns: Some((*netns).to_owned()),
                host: (*host).to_owned(),
                ctl_flags: Vec::new(),
                name: format!("m{i}"),
                initial_cluster: Some(initial_cluster.clone()),
                flags: Vec::new(),
            })
            .collect();
        for member in &mut cluster {
            member.spawn();
        }
        for member in &cluster {
            member.ready();
        }
        cluster
    }

    /// `program`, run in this etcd's network namespace if it has one.
    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, program]);
                command
            }
            None => Command::new(program),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("{}://{}:{}", self.scheme(), self.host, self.client_port)
    }

    /// The etcd process's id, while it runs.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The scratch directory (data and anything a test wants to put beside it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start etcd on its ports (which it held before, or which are fixed in a namespace of its
    /// own) and wait until it serves.
    fn run(&mut self) {
        self.spawn();
        self.ready();
    }

    /// [`Etcd::wait_ready`], where losing the ports fails the test: the clients expect etcd
    /// on these.
    fn ready(&self) {
        if let Err(PortTaken(why)) = self.wait_ready() {
            panic!("etcd cannot bind its own ports again: another process took one ({why})");
        }
    }

    /// Start the etcd process, without waiting for it to serve.
    fn spawn(&mut self) {
        let client = self.endpoint();
        let peer_host = if self.initial_cluster.is_some() {
            self.host.as_str()
        } else {
            "127.0.0.1"
        };
        let peer = format!("http://{peer_host}:{}", self.peer_port);
        let initial_cluster = self
            .initial_cluster
            .clone()
            .unwrap_or_else(|| format!("{}={peer}", self.name));
        let mut command = self.command("etcd");
        command
            .arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--log-level=warn")
            .arg("--logger=zap")
            .args(&self.flags);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()));
            if tls.client_cert_auth {
                command.arg("--client-cert-auth");
            }
        }
        let proc = Proc::spawn(command, "etcd: ");
        self.proc = Some(proc);
    }

    /// Wait until `etcdctl endpoint health` answers, or etcd exits for want of its ports.
    fn wait_ready(&self) -> Result<(), PortTaken> {
        let deadline = tokio::time::Instant::now() + crate::SOON;
        loop {
            let out = self
                .etcdctl(&["endpoint", "health", "--command-timeout=1s"])
                .output()
                .expect("run etcdctl");
            if out.status.success() {
                return Ok(());
            }
            if let Some(proc) = &self.proc {
                let stderr = proc.stderr.all().join("\n");
                if let Some(line) = proc.stderr.find("address already in use") {
                    return Err(PortTaken(line));
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "etcd did not become healthy within {:?}:\n{stderr}\netcdctl: {}",
                    crate::SOON,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Stop etcd (SIGKILL, as an outage), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }

    /// Start etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }

    /// `etcdctl` against this etcd (API v3, its endpoint, TLS and user flags).
    pub fn etcdctl(&self, args: &[&str]) -> Command {
        let mut command = self.command("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(&self.ctl_flags)
            .args(args);
        command
    }

    /// Run `etcdctl` to completion; panics on failure; returns its stdout.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args).output().expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether this member is its cluster's raft leader now (`etcdctl endpoint status`);
    /// `None` if it does not answer.
    pub fn is_leader(&self) -> Option<bool> {
        let out = self
            .etcdctl(&["endpoint", "status", "-w", "json", "--command-timeout=1s"])
            .output()
            .expect("run etcdctl");
        if !out.status.success() {
            return None;
        }
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = &status.get(0)?["Status"];
        let member = status["header"]["member_id"].as_u64()?;
        Some(status["leader"].as_u64()? == member)
    }

    /// Whether the process runs.
    pub fn running(&self) -> bool {
        self.proc.is_some()
    }

    /// Use these flags for every later etcdctl call (e.g. `--user=root:pw` once auth is on).
    pub fn set_ctl_flags(&mut self, flags: Vec<String>) {
        self.ctl_flags = flags;
    }

    /// The etcdctl flags in use.
    pub fn ctl_flags(&self) -> &[String] {
        &self.ctl_flags
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etcd_whose_client_port_is_taken_says_so() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap().port();
        let peer = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        require_binaries();
        match Etcd::try_start_at(taken, peer, None, Vec::new()) {
            Err(PortTaken(why)) => assert!(why.contains("address already in use"), "{why}"),
            Ok(_) => panic!("etcd started on port {taken}, which another socket holds"),
        }
    }
}
