//! The command line: clap arguments (every flag also a `BATON_*` environment variable, durations
//! typed) and their validation into a [`Config`], before any port is bound.
//!
//! Every validation error names the flag at fault; `main` prints it and exits with status 2.
//! Each store's own rules live with the store (`store::etcd::config`,
//! `store::kubernetes::config`); [`validate`](RunArgs::validate) calls them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    election::CampaignMode,
    listen::{ListenAddr, TlsFiles},
    store::etcd::EtcdConfig,
    timing::Timing,
};

mod validate;

pub use validate::{
    ConfigError, MAX_DURATION, default_identity, valid_election_name, valid_identity,
};

/// Exit status for bad arguments or configuration (as clap uses for usage errors).
pub const EXIT_USAGE: i32 = 2;

/// Leader election for hot-warm replicas: exactly one active worker.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,

    /// Log lines on stderr as text (for people) or JSON objects, one a line (for collectors).
    #[arg(
        long,
        env = "BATON_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL target: message key=value ...`
    Text,
    /// One JSON object a line: timestamp, level, target, message and the fields.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: campaign in the elections and serve their state over gRPC.
    Run(Box<RunArgs>),
    /// Follow one election: a line per event until interrupted.
    Watch(WatchArgs),
    /// Print the current state of every election of a daemon, then exit.
    Status(AddrArgs),
    /// Ask a daemon to step down from an election now.
    Resign(ResignArgs),
}

/// The stores Baton can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// An flock(2)-held file in --lock-dir: one host, no server.
    File,
    /// A coordination.k8s.io/v1 Lease per election in --namespace, as client-go writes it
    /// (needs the `kubernetes` cargo feature, on by default).
    Kubernetes,
    /// etcd v3 at --etcd-endpoints, with the election recipe of `etcdctl elect` (needs the
    /// `etcd` cargo feature).
    Etcd,
}

/// When to campaign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CampaignArg {
    /// Always (a bare daemon leads with no worker attached).
    Always,
    /// Only while a subscribed worker has declared itself ready.
    WhenReady,
}

fn duration(text: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(text)
}

/// `baton run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where elections are kept.
    #[arg(long, env = "BATON_STORE", value_enum, default_value_t = StoreKind::File)]
    pub store: StoreKind,

    /// An election to run; repeat (or separate with commas) for several.
    #[arg(
        long = "election",
        env = "BATON_ELECTION",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub elections: Vec<String>,

    /// This replica's identity [default: POD_NAME, else HOSTNAME-PID].
    #[arg(long, env = "BATON_IDENTITY")]
    pub identity: Option<String>,

    /// gRPC listen address: HOST:PORT, or unix:PATH for a Unix socket (shared with workers
    /// through a volume). Loopback by default: a sidecar serves its own pod.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

    /// With a unix:PATH --listen: make the socket 0660 (the daemon's group may connect) instead
    /// of 0600 (only the daemon's user).
    #[arg(long, env = "BATON_SOCKET_GROUP_ACCESS")]
    pub socket_group_access: bool,

    /// TLS for a TCP --listen: PEM certificate chain of the server (with --tls-key-file).
    #[arg(long, env = "BATON_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,

    /// TLS: PEM private key of --tls-cert-file.
    #[arg(long, env = "BATON_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,

    /// Mutual TLS: PEM certificates of the CAs that sign client certificates; a client without
    /// one is refused.
    #[arg(long, env = "BATON_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP at /metrics on this HOST:PORT [default: off].
    #[arg(long, env = "BATON_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Serve grpc.health.v1 alone (no other service) on this HOST:PORT, for Kubernetes gRPC
    /// probes when --listen is loopback or a Unix socket [default: off].
    #[arg(long, env = "BATON_HEALTH_LISTEN")]
    pub health_listen: Option<String>,

    /// How long a holding lasts in the store without renewal.
    #[arg(long, env = "BATON_LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,

    /// A leader that could not renew for this long steps down (must be < --lease-duration).
    #[arg(long, env = "BATON_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    pub renew_deadline: Duration,

    /// Pause between renewals and base of the retry back-off (must be < --renew-deadline).
    #[arg(long, env = "BATON_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub retry_period: Duration,

    /// On step-down, how long to wait for workers to confirm they stopped before releasing.
    #[arg(long, env = "BATON_DRAIN_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub drain_timeout: Duration,

    /// Campaign always, or only while a subscribed worker is ready (warm).
    #[arg(long, env = "BATON_CAMPAIGN", value_enum, default_value_t = CampaignArg::Always)]
    pub campaign: CampaignArg,

    /// Spread the elections evenly over the daemons that run the same elections on the same
    /// store: each leads its fair share, and hands the rest over to the others.
    #[arg(long, env = "BATON_BALANCE")]
    pub balance: bool,

    /// File store: the lock directory, shared by the replicas on this host
    /// [default: $TMPDIR/baton].
    #[arg(long, env = "BATON_LOCK_DIR")]
    pub lock_dir: Option<PathBuf>,

    /// File store: after a holder died without releasing, how long the new holder waits before
    /// it reports leadership, so that the dead daemon's workers (which see their streams close
    /// as the kernel frees the lock) stop first. Raise it on a host where workers may take
    /// longer to stop after losing their daemon.
    #[arg(long, env = "BATON_CRASH_GRACE", default_value = "25ms", value_parser = duration)]
    pub crash_grace: Duration,

    /// Kubernetes store: the namespace of the Leases [default: the pod's namespace, else the
    /// kubeconfig context's].
    #[arg(long, env = "BATON_NAMESPACE")]
    pub namespace: Option<String>,

    /// Kubernetes store: the Lease to use instead of one named after the election (only with a
    /// single --election).
    #[arg(long, env = "BATON_LEASE_NAME")]
    pub lease_name: Option<String>,

    /// etcd store: client URLs of the cluster; repeat or separate with commas. `https://` with
    /// --etcd-ca-file; a bare HOST:PORT is `http://`, or `https://` when a TLS flag is given.
    #[arg(
        long,
        env = "BATON_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd store: key prefix. Election E lives under `<prefix>E/`, which is what
    /// `etcdctl elect <prefix>E` uses: with the default, `etcdctl elect baton/E`.
    #[arg(long, env = "BATON_ETCD_PREFIX", default_value = "baton/")]
    pub etcd_prefix: String,

    /// etcd store: PEM file of the CA that signed the servers' certificates (enables TLS).
    #[arg(long, env = "BATON_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// etcd store: PEM client certificate, for servers that require one (with --etcd-key-file).
    #[arg(long, env = "BATON_ETCD_CERT_FILE")]
    pub etcd_cert_file: Option<PathBuf>,

    /// etcd store: PEM private key of --etcd-cert-file.
    #[arg(long, env = "BATON_ETCD_KEY_FILE")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd store: user name, for clusters with authentication enabled
    /// (with --etcd-password-file).
    #[arg(long, env = "BATON_ETCD_USERNAME")]
    pub etcd_username: Option<String>,

    /// etcd store: file holding the password of --etcd-username (one trailing newline is
    /// ignored). A file, not a flag, so that the password shows in no process listing.
    #[arg(long, env = "BATON_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

/// The daemon address, for the client subcommands.
#[derive(Debug, Args)]
pub struct AddrArgs {
    /// The daemon's gRPC address: HOST:PORT (as --listen takes it), http://HOST:PORT, or
    /// unix:PATH.
    #[arg(long, env = "BATON_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
}

/// `baton watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    /// The election to follow.
    #[arg(long, env = "BATON_ELECTION", default_value = "default")]
    pub election: String,
}

/// `baton resign`.
#[derive(Debug, Args)]
pub struct ResignArgs {
    #[command(flatten)]
    pub addr: AddrArgs,
    /// The election to step down from.
    #[arg(long, env = "BATON_ELECTION", default_value = "default")]
    pub election: String,
    /// The identity of the standby that should take over.
    #[arg(long, env = "BATON_SUCCESSOR")]
    pub successor: Option<String>,
}

/// Where the elections are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// The file store.
    File {
        /// The lock directory.
        lock_dir: PathBuf,
        /// The wait after a holder died without releasing.
        crash_grace: Duration,
    },
    /// The Kubernetes Lease store.
    Kubernetes {
        /// The namespace; `None`: the pod's, else the kubeconfig context's.
        namespace: Option<String>,
        /// One Lease for the single election instead of one named after it.
        lease_name: Option<String>,
    },
    /// The etcd store.
    Etcd(EtcdConfig),
}

/// A validated daemon configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The elections, in flag order, without duplicates.
    pub elections: Vec<String>,
    /// This replica's identity.
    pub identity: String,
    /// The gRPC listen address.
    pub listen: ListenAddr,
    /// TLS of a TCP listener.
    pub tls: Option<TlsFiles>,
    /// A Unix socket's file mode: 0o600, or 0o660 with `--socket-group-access`.
    pub socket_mode: u32,
    /// Where to serve Prometheus metrics, if at all.
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve grpc.health.v1 alone, if at all.
    pub health_listen: Option<SocketAddr>,
    /// Lease, renew deadline, retry period.
    pub timing: Timing,
    /// Bound on waiting for workers when stepping down.
    pub drain_timeout: Duration,
    /// When to campaign.
    pub campaign: CampaignMode,
    /// Spread the elections over the group of daemons that run them (`--balance`).
    pub balance: bool,
    /// The store.
    pub store: StoreConfig,
}

#[cfg(test)]
mod tests;
