//! The command line: clap arguments (every flag also a `BATON_*` environment variable, durations
//! typed) and their validation into a [`Config`], before any port is bound.
//!
//! Every validation error names the flag at fault; `main` prints it and exits with status 2.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{election::CampaignMode, store::Timing};

/// Exit status for bad arguments or configuration (as clap uses for usage errors).
pub const EXIT_USAGE: i32 = 2;

/// Leader election for hot-warm replicas: exactly one active worker.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: campaign in the elections and serve their state over gRPC.
    Run(RunArgs),
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
    /// A coordination.k8s.io/v1 Lease per election in --namespace, as client-go writes it.
    #[cfg(feature = "kubernetes")]
    Kubernetes,
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

    /// gRPC listen address. Loopback by default: a sidecar serves its own pod.
    #[arg(long, env = "BATON_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: String,

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

    /// Kubernetes store: the namespace of the Leases [default: the pod's namespace, else the
    /// kubeconfig context's].
    #[cfg(feature = "kubernetes")]
    #[arg(long, env = "BATON_NAMESPACE")]
    pub namespace: Option<String>,

    /// Kubernetes store: the Lease to use instead of one named after the election (only with a
    /// single --election).
    #[cfg(feature = "kubernetes")]
    #[arg(long, env = "BATON_LEASE_NAME")]
    pub lease_name: Option<String>,
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
    /// The Kubernetes Lease store.
    #[cfg(feature = "kubernetes")]
    Kubernetes {
        /// The namespace; `None`: the pod's, else the kubeconfig context's.
        namespace: Option<String>,
        /// One Lease for the single election instead of one named after it.
        lease_name: Option<String>,
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
    pub listen: SocketAddr,
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
    /// A listen address that does not parse.
    #[error("--listen {value:?}: expected HOST:PORT with an IP address, e.g. 127.0.0.1:50051")]
    Listen {
        /// The rejected value.
        value: String,
        /// The parse error.
        #[source]
        source: std::net::AddrParseError,
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
    /// Check every value and build the daemon's configuration.
    ///
    /// # Errors
    /// The first bad flag, named in the error.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut elections: Vec<String> = Vec::new();
        for name in self.elections {
            if !valid_election_name(&name) {
                return Err(ConfigError::ElectionName { name });
            }
            if elections.contains(&name) {
                return Err(ConfigError::DuplicateElection { name });
            }
            elections.push(name);
        }
        let identity = self.identity.unwrap_or_else(default_identity);
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
        let listen = self.listen.parse().map_err(|source| ConfigError::Listen {
            value: self.listen.clone(),
            source,
        })?;
        let store = match self.store {
            StoreKind::File => StoreConfig::File {
                lock_dir: self
                    .lock_dir
                    .unwrap_or_else(|| std::env::temp_dir().join("baton")),
            },
            #[cfg(feature = "kubernetes")]
            StoreKind::Kubernetes => {
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
        };
        Ok(Config {
            elections,
            identity,
            listen,
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
        ];
        for (args, flag) in cases {
            let error = run(args).unwrap_err();
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
        let k8s = |extra: &[&str]| {
            let mut args = vec!["--store", "kubernetes"];
            args.extend_from_slice(extra);
            run(&args).unwrap_err()
        };
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
            let error = k8s(args);
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
