//! The command line: clap arguments (every flag also a `BATON_*` environment variable, durations
//! typed) and their validation into a [`Config`], before any port is bound.
//!
//! Every validation error names the flag at fault; `main` prints it and exits with status 2.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    election::CampaignMode,
    listen::{ListenAddr, ListenAddrError, TlsFiles},
    store::Timing,
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

/// Where and how to reach etcd. Files are named here and read when the store opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, each with its scheme (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// Key prefix: election E is the key range `<prefix>E/`.
    pub prefix: String,
    /// TLS, when any TLS flag is given.
    pub tls: Option<EtcdTls>,
    /// User and password file, when authentication is used.
    pub auth: Option<EtcdAuth>,
}

/// TLS files of the etcd store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed the servers' certificates.
    pub ca_file: PathBuf,
    /// Client certificate and key, for servers that require one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// etcd user authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    /// The user name.
    pub username: String,
    /// The file holding the password.
    pub password_file: PathBuf,
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
    /// The store.
    pub store: StoreConfig,
}

/// A flag or variable with a bad value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An election name Baton cannot use as a file, key and Lease name.
    #[error(
        "--election {name:?}: must be 1-63 characters of a-z, 0-9, '-' and '.', \
         starting and ending with a letter or digit"
    )]
    ElectionName {
        /// The rejected name.
        name: String,
    },
    /// The same election given twice.
    #[error("--election {name:?} is given more than once")]
    DuplicateElection {
        /// The repeated name.
        name: String,
    },
    /// An identity that cannot be stored and shown.
    #[error(
        "--identity {identity:?}: must be 1-128 printable characters without whitespace or format characters"
    )]
    Identity {
        /// The rejected identity.
        identity: String,
    },
    /// A duration beyond [`MAX_DURATION`]: deadlines computed from it would overflow the clock.
    #[error("{flag} ({value:?}) must be at most {max:?}", max = MAX_DURATION)]
    TooLong {
        /// The flag.
        flag: &'static str,
        /// The rejected duration.
        value: Duration,
    },
    /// Durations in the wrong order.
    #[error(
        "--renew-deadline ({renew_deadline:?}) must be shorter than --lease-duration \
         ({lease_duration:?}), so a leader steps down before its lease can expire"
    )]
    RenewDeadline {
        /// The lease.
        lease_duration: Duration,
        /// The renew deadline.
        renew_deadline: Duration,
    },
    /// Durations in the wrong order.
    #[error(
        "--retry-period ({retry_period:?}) must be shorter than --renew-deadline \
         ({renew_deadline:?}) and above zero, so a leader retries before its deadline"
    )]
    RetryPeriod {
        /// The renew deadline.
        renew_deadline: Duration,
        /// The retry period.
        retry_period: Duration,
    },
    /// A Lease duration Kubernetes cannot express.
    #[error(
        "--lease-duration ({lease_duration:?}): the Kubernetes store needs whole seconds, \
         at least 1s (leaseDurationSeconds is an integer)"
    )]
    LeaseSeconds {
        /// The rejected duration.
        lease_duration: Duration,
    },
    /// `--lease-name` with more than one election.
    #[error(
        "--lease-name {lease_name:?} is valid only with a single --election (given {count}); \
         without it each election uses a Lease of its own name"
    )]
    LeaseNameWithElections {
        /// The Lease name.
        lease_name: String,
        /// How many elections were given.
        count: usize,
    },
    /// A Lease or namespace name Kubernetes would refuse.
    #[error(
        "{flag} {name:?}: must be a DNS-1123 name (1-{max} characters of a-z, 0-9, '-'{dots}, \
         starting and ending with a letter or digit)"
    )]
    KubernetesName {
        /// The flag.
        flag: &'static str,
        /// The rejected name.
        name: String,
        /// The longest allowed name.
        max: usize,
        /// Whether dots are allowed, for the message.
        dots: &'static str,
    },
    /// `--store kubernetes` in a build without the Kubernetes store.
    #[error(
        "--store kubernetes: this baton was built without the Kubernetes store; \
         rebuild with `cargo build --features kubernetes`"
    )]
    KubernetesNotBuilt,
    /// `--store etcd` in a build without the etcd store.
    #[error(
        "--store etcd: this baton was built without the etcd store; \
         rebuild with `cargo build --features etcd`"
    )]
    EtcdNotBuilt,
    /// The etcd session TTL is whole seconds, and etcd refuses less than its minimum.
    #[error(
        "--lease-duration ({lease_duration:?}): with --store etcd it is the session TTL and must be \
         whole seconds, at least {min}s (etcd's minimum TTL)"
    )]
    EtcdLeaseDuration {
        /// The rejected lease duration.
        lease_duration: Duration,
        /// etcd's minimum TTL in seconds.
        min: u64,
    },
    /// An etcd endpoint that is not a client URL.
    #[error("--etcd-endpoints {value:?}: {problem}")]
    EtcdEndpoint {
        /// The rejected endpoint.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// etcd flags that only make sense together, or not at all.
    #[error("{flag}: {problem}")]
    EtcdFlags {
        /// The flag at fault.
        flag: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// A listen address that does not parse.
    #[error("--listen {value:?}: {source}")]
    Listen {
        /// The rejected value.
        value: String,
        /// The parse error.
        #[source]
        source: ListenAddrError,
    },
    /// A `HOST:PORT` flag (--metrics-listen, --health-listen) that does not parse.
    #[error("{flag} {value:?}: expected HOST:PORT with an IP address, e.g. 0.0.0.0:9090")]
    Address {
        /// The flag.
        flag: &'static str,
        /// The rejected value.
        value: String,
        /// The parse error.
        #[source]
        source: std::net::AddrParseError,
    },
    /// TLS flags that only make sense together, or not with a Unix socket.
    #[error("{flag}: {problem}")]
    TlsFlags {
        /// The flag at fault.
        flag: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Whether `name` can be an election: a DNS-1123 label with dots (a valid Lease name, etcd key
/// segment and file name).
pub fn valid_election_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes.iter().all(|b| edge(b) || *b == b'-' || *b == b'.')
}

/// Whether `name` is a DNS-1123 subdomain (`dots`, at most 253 characters: a Lease name) or
/// label (no dots, at most 63: a namespace).
fn valid_dns_name(name: &str, dots: bool) -> bool {
    let bytes = name.as_bytes();
    let max = if dots { 253 } else { 63 };
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=max).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| edge(b) || *b == b'-' || (dots && *b == b'.'))
}

/// The longest value any duration flag takes. Every deadline is `now + duration`; far longer
/// values parse but overflow the monotonic clock when the daemon adds them.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Whether `identity` can be stored and shown as it is: 1-128 characters, no whitespace, no
/// control characters and no format characters (Unicode category Cf: bidirectional overrides,
/// zero-width spaces), which would make a log line read other than it is.
pub fn valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.chars().count() <= 128
        && !identity
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_format_char(c))
}

/// Unicode general category Cf (format), as of Unicode 15.1: a short, stable list, so kept here
/// rather than as a dependency.
fn is_format_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0xAD | 0x600..=0x605
            | 0x61C
            | 0x6DD
            | 0x70F
            | 0x890..=0x891
            | 0x8E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// The default identity: `POD_NAME`, else the host name and process id.
pub fn default_identity() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "baton".to_owned());
    format!("{host}-{}", std::process::id())
}

/// etcd's minimum lease TTL with its default heartbeat and election timeout (1.5 election
/// timeouts of 1 s, rounded up): a shorter TTL would be raised by the server.
pub const ETCD_MIN_TTL_SECS: u64 = 2;

impl RunArgs {
    /// The TLS flags, checked: certificate and key together, a client CA only with them, and
    /// TLS only on TCP. The files are read when the listener is bound.
    fn tls_files(&self, listen: &ListenAddr) -> Result<Option<TlsFiles>, ConfigError> {
        let problem = |flag, problem| Err(ConfigError::TlsFlags { flag, problem });
        let files = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => TlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: self.tls_client_ca_file.clone(),
            },
            (Some(_), None) => return problem("--tls-key-file", "needed with --tls-cert-file"),
            (None, Some(_)) => return problem("--tls-cert-file", "needed with --tls-key-file"),
            (None, None) if self.tls_client_ca_file.is_some() => {
                return problem(
                    "--tls-client-ca-file",
                    "needs --tls-cert-file and --tls-key-file (the server's own certificate)",
                );
            }
            (None, None) => return Ok(None),
        };
        if let ListenAddr::Unix(_) = listen {
            return problem(
                "--tls-cert-file",
                "TLS is for a TCP --listen; a Unix socket is guarded by its file permissions",
            );
        }
        Ok(Some(files))
    }

    /// The etcd flags, checked: endpoints, TLS files that go together, user and password file.
    fn etcd_config(&self) -> Result<EtcdConfig, ConfigError> {
        let tls_wanted = self.etcd_ca_file.is_some()
            || self.etcd_cert_file.is_some()
            || self.etcd_key_file.is_some();
        if self.etcd_endpoints.is_empty() {
            return Err(ConfigError::EtcdEndpoint {
                value: String::new(),
                problem: "at least one endpoint is needed",
            });
        }
        let mut endpoints = Vec::new();
        for value in &self.etcd_endpoints {
            let value = value.trim();
            let (scheme, rest) = match value.split_once("://") {
                Some((scheme, rest)) => (scheme, rest),
                None if tls_wanted => ("https", value),
                None => ("http", value),
            };
            let problem = match (scheme, rest.trim_end_matches('/').rsplit_once(':')) {
                ("http" | "https", Some((host, port)))
                    if !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok() =>
                {
                    None
                }
                ("http" | "https", _) => Some("expected [http://|https://]HOST:PORT"),
                _ => Some("the scheme must be http:// or https://"),
            };
            if let Some(problem) = problem {
                return Err(ConfigError::EtcdEndpoint {
                    value: value.to_owned(),
                    problem,
                });
            }
            if scheme == "http" && tls_wanted {
                return Err(ConfigError::EtcdEndpoint {
                    value: value.to_owned(),
                    problem: "an http:// endpoint with TLS flags; use https://",
                });
            }
            if scheme == "https" && self.etcd_ca_file.is_none() {
                return Err(ConfigError::EtcdFlags {
                    flag: "--etcd-ca-file",
                    problem: "https:// endpoints need the CA that signed the servers' certificates",
                });
            }
            endpoints.push(format!("{scheme}://{rest}"));
        }
        let identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::EtcdFlags {
                    flag: "--etcd-key-file",
                    problem: "needed with --etcd-cert-file",
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::EtcdFlags {
                    flag: "--etcd-cert-file",
                    problem: "needed with --etcd-key-file",
                });
            }
        };
        let tls = self
            .etcd_ca_file
            .clone()
            .map(|ca_file| EtcdTls { ca_file, identity });
        let auth = match (&self.etcd_username, &self.etcd_password_file) {
            (Some(username), Some(password_file)) if !username.is_empty() => Some(EtcdAuth {
                username: username.clone(),
                password_file: password_file.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::EtcdFlags {
                    flag: "--etcd-password-file",
                    problem: "needed with --etcd-username",
                });
            }
            _ => {
                return Err(ConfigError::EtcdFlags {
                    flag: "--etcd-username",
                    problem: "a non-empty user name is needed with --etcd-password-file",
                });
            }
        };
        Ok(EtcdConfig {
            endpoints,
            prefix: self.etcd_prefix.clone(),
            tls,
            auth,
        })
    }

    /// Check every value and build the daemon's configuration.
    ///
    /// # Errors
    /// The first bad flag, named in the error.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut elections: Vec<String> = Vec::new();
        for name in self.elections.clone() {
            if !valid_election_name(&name) {
                return Err(ConfigError::ElectionName { name });
            }
            if elections.contains(&name) {
                return Err(ConfigError::DuplicateElection { name });
            }
            elections.push(name);
        }
        let identity = self.identity.clone().unwrap_or_else(default_identity);
        if !valid_identity(&identity) {
            return Err(ConfigError::Identity { identity });
        }
        for (flag, value) in [
            ("--lease-duration", self.lease_duration),
            ("--renew-deadline", self.renew_deadline),
            ("--retry-period", self.retry_period),
            ("--drain-timeout", self.drain_timeout),
            ("--crash-grace", self.crash_grace),
        ] {
            if value > MAX_DURATION {
                return Err(ConfigError::TooLong { flag, value });
            }
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::RenewDeadline {
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
            });
        }
        if self.retry_period >= self.renew_deadline || self.retry_period.is_zero() {
            return Err(ConfigError::RetryPeriod {
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
            });
        }
        let listen: ListenAddr = self.listen.parse().map_err(|source| ConfigError::Listen {
            value: self.listen.clone(),
            source,
        })?;
        let tls = self.tls_files(&listen)?;
        let address = |flag, value: Option<&String>| {
            value
                .map(|v| {
                    v.parse().map_err(|source| ConfigError::Address {
                        flag,
                        value: v.clone(),
                        source,
                    })
                })
                .transpose()
        };
        let metrics_listen = address("--metrics-listen", self.metrics_listen.as_ref())?;
        let health_listen = address("--health-listen", self.health_listen.as_ref())?;
        let store = match self.store {
            StoreKind::File => StoreConfig::File {
                lock_dir: self
                    .lock_dir
                    .unwrap_or_else(|| std::env::temp_dir().join("baton")),
                crash_grace: self.crash_grace,
            },
            StoreKind::Kubernetes => {
                if !cfg!(feature = "kubernetes") {
                    return Err(ConfigError::KubernetesNotBuilt);
                }
                let lease = self.lease_duration;
                if lease.subsec_nanos() != 0
                    || lease.as_secs() == 0
                    || lease.as_secs() > i32::MAX as u64
                {
                    return Err(ConfigError::LeaseSeconds {
                        lease_duration: lease,
                    });
                }
                if let Some(name) = &self.lease_name {
                    if elections.len() != 1 {
                        return Err(ConfigError::LeaseNameWithElections {
                            lease_name: name.clone(),
                            count: elections.len(),
                        });
                    }
                    if !valid_dns_name(name, true) {
                        return Err(ConfigError::KubernetesName {
                            flag: "--lease-name",
                            name: name.clone(),
                            max: 253,
                            dots: ", '.'",
                        });
                    }
                }
                if let Some(namespace) = &self.namespace
                    && !valid_dns_name(namespace, false)
                {
                    return Err(ConfigError::KubernetesName {
                        flag: "--namespace",
                        name: namespace.clone(),
                        max: 63,
                        dots: "",
                    });
                }
                StoreConfig::Kubernetes {
                    namespace: self.namespace,
                    lease_name: self.lease_name,
                }
            }
            StoreKind::Etcd => {
                if !cfg!(feature = "etcd") {
                    return Err(ConfigError::EtcdNotBuilt);
                }
                if self.lease_duration.subsec_nanos() != 0
                    || self.lease_duration.as_secs() < ETCD_MIN_TTL_SECS
                {
                    return Err(ConfigError::EtcdLeaseDuration {
                        lease_duration: self.lease_duration,
                        min: ETCD_MIN_TTL_SECS,
                    });
                }
                StoreConfig::Etcd(self.etcd_config()?)
            }
        };
        Ok(Config {
            elections,
            identity,
            listen,
            tls,
            socket_mode: if self.socket_group_access {
                0o660
            } else {
                0o600
            },
            metrics_listen,
            health_listen,
            timing: Timing {
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
            },
            drain_timeout: self.drain_timeout,
            campaign: match self.campaign {
                CampaignArg::Always => CampaignMode::Always,
                CampaignArg::WhenReady => CampaignMode::WhenReady,
            },
            store,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["baton", "run"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        let Command::Run(run) = cli.command else {
            unreachable!("parsed `run`");
        };
        run.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn no_flags_is_a_working_laptop_config() {
        let config = run(&[]).unwrap();
        assert_eq!(config.elections, ["default"]);
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.timing, Timing::default());
        assert!(!config.identity.is_empty());
        assert!(matches!(
            config.store,
            StoreConfig::File { crash_grace, .. } if crash_grace == Duration::from_millis(25)
        ));
    }

    #[test]
    fn crash_grace_is_a_duration_flag() {
        let config = run(&["--crash-grace", "200ms"]).unwrap();
        assert!(matches!(
            config.store,
            StoreConfig::File { crash_grace, .. } if crash_grace == Duration::from_millis(200)
        ));
        assert!(
            run(&["--crash-grace", "soon"])
                .unwrap_err()
                .contains("--crash-grace")
        );
    }

    #[test]
    fn several_elections_by_repeat_or_comma() {
        let config = run(&["--election", "a", "--election", "b,c"]).unwrap();
        assert_eq!(config.elections, ["a", "b", "c"]);
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--election", "Bad_Name"], "--election"),
            (&["--election", "a,a"], "--election"),
            (&["--identity", "has space"], "--identity"),
            (&["--identity", "a\u{202E}b"], "--identity"),
            (&["--identity", "a\u{200B}b"], "--identity"),
            (&["--renew-deadline", "15s"], "--renew-deadline"),
            (&["--retry-period", "10s"], "--retry-period"),
            (&["--lease-duration", "soon"], "--lease-duration"),
            (
                &["--lease-duration", "300000000000years"],
                "--lease-duration",
            ),
            (&["--drain-timeout", "300000000000years"], "--drain-timeout"),
            (&["--crash-grace", "300000000000years"], "--crash-grace"),
            (&["--listen", "localhost"], "--listen"),
            (&["--listen", "unix:"], "--listen"),
            (&["--tls-cert-file", "c.pem"], "--tls-key-file"),
            (&["--tls-key-file", "k.pem"], "--tls-cert-file"),
            (&["--tls-client-ca-file", "ca.pem"], "--tls-client-ca-file"),
            (
                &[
                    "--listen",
                    "unix:/run/b.sock",
                    "--tls-cert-file",
                    "c.pem",
                    "--tls-key-file",
                    "k.pem",
                ],
                "--tls-cert-file",
            ),
            (&["--metrics-listen", "nowhere"], "--metrics-listen"),
            (&["--health-listen", ":50052"], "--health-listen"),
            (&["--log-format", "xml"], "--log-format"),
        ];
        for (args, flag) in cases {
            let error = run(args).unwrap_err();
            assert!(error.contains(flag), "{args:?}: {error}");
        }
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn store_etcd_without_the_feature_names_it() {
        let error = run(&["--store", "etcd"]).unwrap_err();
        assert!(
            error.contains("--store etcd") && error.contains("--features etcd"),
            "{error}"
        );
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_flags_become_a_store_config() {
        let config = run(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "127.0.0.1:2379,http://h2:2379",
            "--etcd-endpoints",
            "http://h3:2379/",
            "--etcd-prefix",
            "team/",
        ])
        .unwrap();
        let StoreConfig::Etcd(etcd) = config.store else {
            panic!("an etcd store");
        };
        assert_eq!(
            etcd.endpoints,
            ["http://127.0.0.1:2379", "http://h2:2379", "http://h3:2379/"]
        );
        assert_eq!(etcd.prefix, "team/");
        assert_eq!((etcd.tls, etcd.auth), (None, None));

        let config = run(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "h:2379",
            "--etcd-ca-file",
            "ca.pem",
            "--etcd-cert-file",
            "c.pem",
            "--etcd-key-file",
            "k.pem",
            "--etcd-username",
            "u",
            "--etcd-password-file",
            "pw",
        ])
        .unwrap();
        let StoreConfig::Etcd(etcd) = config.store else {
            panic!("an etcd store");
        };
        assert_eq!(etcd.endpoints, ["https://h:2379"], "TLS flags mean https");
        let tls = etcd.tls.expect("tls");
        assert_eq!(tls.ca_file, PathBuf::from("ca.pem"));
        assert_eq!(tls.identity, Some(("c.pem".into(), "k.pem".into())));
        assert_eq!(etcd.auth.expect("auth").username, "u");
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--lease-duration", "2500ms"], "--lease-duration"),
            (
                &[
                    "--lease-duration",
                    "1s",
                    "--renew-deadline",
                    "500ms",
                    "--retry-period",
                    "100ms",
                ],
                "--lease-duration",
            ),
            (&["--etcd-endpoints", "ftp://h:2379"], "--etcd-endpoints"),
            (&["--etcd-endpoints", "h"], "--etcd-endpoints"),
            (&["--etcd-endpoints", "http://h:port"], "--etcd-endpoints"),
            (&["--etcd-endpoints", "https://h:2379"], "--etcd-ca-file"),
            (
                &["--etcd-endpoints", "http://h:2379", "--etcd-ca-file", "ca"],
                "--etcd-endpoints",
            ),
            (
                &["--etcd-ca-file", "ca", "--etcd-cert-file", "c"],
                "--etcd-key-file",
            ),
            (
                &["--etcd-ca-file", "ca", "--etcd-key-file", "k"],
                "--etcd-cert-file",
            ),
            (&["--etcd-username", "u"], "--etcd-password-file"),
            (&["--etcd-password-file", "pw"], "--etcd-username"),
        ];
        for (args, flag) in cases {
            let mut argv = vec!["--store", "etcd"];
            argv.extend_from_slice(args);
            let error = run(&argv).unwrap_err();
            assert!(error.contains(flag), "{args:?}: {error}");
        }
    }

    #[cfg(feature = "kubernetes")]
    #[test]
    fn kubernetes_flags() {
        let config = run(&[
            "--store",
            "kubernetes",
            "--namespace",
            "prod",
            "--lease-name",
            "x.y",
        ])
        .unwrap();
        assert_eq!(
            config.store,
            StoreConfig::Kubernetes {
                namespace: Some("prod".into()),
                lease_name: Some("x.y".into()),
            }
        );
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "--lease-duration",
                    "1500ms",
                    "--renew-deadline",
                    "1s",
                    "--retry-period",
                    "100ms",
                ],
                "--lease-duration",
            ),
            (&["--lease-duration", "0s"], "--lease-duration"),
            (&["--election", "a,b", "--lease-name", "x"], "--lease-name"),
            (&["--lease-name", "Bad_Name"], "--lease-name"),
            (&["--namespace", "a.b"], "--namespace"),
        ];
        for (args, flag) in cases {
            let mut argv = vec!["--store", "kubernetes"];
            argv.extend_from_slice(args);
            let error = run(&argv).unwrap_err();
            assert!(error.contains(flag), "{args:?}: {error}");
        }
        // Sub-second renew deadline and retry period are local timers: allowed.
        run(&[
            "--store",
            "kubernetes",
            "--lease-duration",
            "2s",
            "--renew-deadline",
            "1500ms",
            "--retry-period",
            "200ms",
        ])
        .unwrap();
    }

    #[cfg(not(feature = "kubernetes"))]
    #[test]
    fn store_kubernetes_without_the_feature_names_it() {
        let error = run(&["--store", "kubernetes"]).unwrap_err();
        assert!(
            error.contains("--store kubernetes") && error.contains("--features kubernetes"),
            "{error}"
        );
    }

    #[test]
    fn listeners_metrics_and_tls() {
        let config = run(&[]).unwrap();
        assert_eq!((config.tls, config.metrics_listen), (None, None));
        assert_eq!(config.health_listen, None);

        let config = run(&["--listen", "unix:/run/baton/baton.sock"]).unwrap();
        assert_eq!(
            config.listen,
            ListenAddr::Unix("/run/baton/baton.sock".into())
        );

        let config = run(&[
            "--listen",
            "0.0.0.0:50051",
            "--tls-cert-file",
            "c.pem",
            "--tls-key-file",
            "k.pem",
            "--tls-client-ca-file",
            "ca.pem",
            "--metrics-listen",
            "0.0.0.0:9090",
            "--health-listen",
            "0.0.0.0:50052",
        ])
        .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:50051");
        let tls = config.tls.expect("tls");
        assert_eq!(tls.cert_file, PathBuf::from("c.pem"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(config.metrics_listen, Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(config.health_listen, Some("0.0.0.0:50052".parse().unwrap()));
    }

    #[test]
    fn log_format_is_global() {
        for argv in [
            &["baton", "--log-format", "json", "run"][..],
            &["baton", "run", "--log-format", "json"],
            &["baton", "status", "--log-format", "json"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(cli.log_format, LogFormat::Json, "{argv:?}");
        }
        let cli = Cli::try_parse_from(["baton", "run"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Text);
    }

    #[test]
    fn election_names() {
        for ok in ["a", "orders", "feed-1.eu", "0"] {
            assert!(valid_election_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"x".repeat(64)] {
            assert!(!valid_election_name(bad), "{bad}");
        }
    }
}
