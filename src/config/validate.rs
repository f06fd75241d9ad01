//! Validation of `baton run`'s flags into a [`Config`], in named steps: elections and identity,
//! durations, listeners, then the store (whose own rules live with the store). Each error names
//! the flag at fault.

use std::{net::SocketAddr, time::Duration};

use super::{CampaignArg, Config, RunArgs, StoreConfig, StoreKind};
use crate::{
    election::CampaignMode,
    listen::{ListenAddr, ListenAddrError, TlsFiles},
    store::{
        etcd::{self, EtcdConfig, EtcdConfigError, EtcdFlags},
        file,
        kubernetes::{self, KubernetesConfigError},
    },
    timing::Timing,
};

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
    /// An etcd flag with a bad value (the etcd store's rules).
    #[error(transparent)]
    Etcd(#[from] EtcdConfigError),
    /// A Kubernetes flag with a bad value (the Kubernetes store's rules).
    #[error(transparent)]
    Kubernetes(#[from] KubernetesConfigError),
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

/// The listeners, checked: gRPC (with its TLS), metrics and health.
struct Listeners {
    listen: ListenAddr,
    tls: Option<TlsFiles>,
    metrics_listen: Option<SocketAddr>,
    health_listen: Option<SocketAddr>,
}

/// A `HOST:PORT` flag, if given.
fn address(flag: &'static str, value: Option<&String>) -> Result<Option<SocketAddr>, ConfigError> {
    value
        .map(|v| {
            v.parse().map_err(|source| ConfigError::Address {
                flag,
                value: v.clone(),
                source,
            })
        })
        .transpose()
}

impl RunArgs {
    /// Check every value and build the daemon's configuration.
    ///
    /// # Errors
    /// The first bad flag, named in the error.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let elections = self.elections()?;
        let identity = self.identity()?;
        let timing = self.timing()?;
        let listeners = self.listeners()?;
        let store = self.store_config(&elections)?;
        Ok(Config {
            elections,
            identity,
            listen: listeners.listen,
            tls: listeners.tls,
            socket_mode: if self.socket_group_access {
                0o660
            } else {
                0o600
            },
            metrics_listen: listeners.metrics_listen,
            health_listen: listeners.health_listen,
            timing,
            drain_timeout: self.drain_timeout,
            campaign: match self.campaign {
                CampaignArg::Always => CampaignMode::Always,
                CampaignArg::WhenReady => CampaignMode::WhenReady,
            },
            balance: self.balance,
            store,
        })
    }

    /// The elections, in flag order: valid names, none twice.
    fn elections(&self) -> Result<Vec<String>, ConfigError> {
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
        Ok(elections)
    }

    /// `--identity`, or the default one, checked.
    fn identity(&self) -> Result<String, ConfigError> {
        let identity = self.identity.clone().unwrap_or_else(default_identity);
        if !valid_identity(&identity) {
            return Err(ConfigError::Identity { identity });
        }
        Ok(identity)
    }

    /// Every duration at most [`MAX_DURATION`], and lease > renew deadline > retry period > 0.
    fn timing(&self) -> Result<Timing, ConfigError> {
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
        Ok(Timing {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        })
    }

    /// `--listen` with its TLS flags, `--metrics-listen` and `--health-listen`.
    fn listeners(&self) -> Result<Listeners, ConfigError> {
        let listen: ListenAddr = self.listen.parse().map_err(|source| ConfigError::Listen {
            value: self.listen.clone(),
            source,
        })?;
        let tls = self.tls_files(&listen)?;
        Ok(Listeners {
            listen,
            tls,
            metrics_listen: address("--metrics-listen", self.metrics_listen.as_ref())?,
            health_listen: address("--health-listen", self.health_listen.as_ref())?,
        })
    }

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

    /// The store's configuration, checked by the store's own rules.
    fn store_config(&self, elections: &[String]) -> Result<StoreConfig, ConfigError> {
        match self.store {
            StoreKind::File => Ok(StoreConfig::File {
                lock_dir: self.lock_dir.clone().unwrap_or_else(file::default_lock_dir),
                crash_grace: self.crash_grace,
            }),
            StoreKind::Kubernetes => {
                if !cfg!(feature = "kubernetes") {
                    return Err(ConfigError::KubernetesNotBuilt);
                }
                kubernetes::check_lease_duration(self.lease_duration)?;
                kubernetes::check_names(
                    self.lease_name.as_deref(),
                    self.namespace.as_deref(),
                    elections.len(),
                )?;
                Ok(StoreConfig::Kubernetes {
                    namespace: self.namespace.clone(),
                    lease_name: self.lease_name.clone(),
                })
            }
            StoreKind::Etcd => {
                if !cfg!(feature = "etcd") {
                    return Err(ConfigError::EtcdNotBuilt);
                }
                etcd::check_lease_duration(self.lease_duration)?;
                Ok(StoreConfig::Etcd(EtcdConfig::from_flags(&EtcdFlags {
                    endpoints: &self.etcd_endpoints,
                    prefix: &self.etcd_prefix,
                    ca_file: self.etcd_ca_file.as_deref(),
                    cert_file: self.etcd_cert_file.as_deref(),
                    key_file: self.etcd_key_file.as_deref(),
                    username: self.etcd_username.as_deref(),
                    password_file: self.etcd_password_file.as_deref(),
                })?))
            }
        }
    }
}
