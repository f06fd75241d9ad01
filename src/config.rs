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
}

/// The daemon address, for the client subcommands.
#[derive(Debug, Args)]
pub struct AddrArgs {
    /// The daemon's gRPC address.
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
    },
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
    #[error("--identity {identity:?}: must be 1-128 printable characters without whitespace")]
    Identity {
        /// The rejected identity.
        identity: String,
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
        if identity.is_empty()
            || identity.chars().count() > 128
            || identity
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::Identity { identity });
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
            },
        };
        Ok(Config {
            elections,
            identity,
            listen,
            tls,
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
        assert!(matches!(config.store, StoreConfig::File { .. }));
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
            (&["--renew-deadline", "15s"], "--renew-deadline"),
            (&["--retry-period", "10s"], "--retry-period"),
            (&["--lease-duration", "soon"], "--lease-duration"),
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
