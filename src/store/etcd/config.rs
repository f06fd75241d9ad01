//! Where and how to reach etcd, and the etcd store's own rules on its flags. Built in every
//! daemon (also without the `etcd` feature) so that the command line can check and name them;
//! the files named here are read only when the store opens.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

/// etcd's minimum lease TTL with its default heartbeat and election timeout (1.5 election
/// timeouts of 1 s, rounded up): a shorter TTL would be raised by the server.
pub const ETCD_MIN_TTL_SECS: u64 = 2;

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

/// The etcd flags as given (`--etcd-*`), before they are checked.
#[derive(Debug, Clone, Copy)]
pub struct EtcdFlags<'a> {
    /// `--etcd-endpoints`.
    pub endpoints: &'a [String],
    /// `--etcd-prefix`.
    pub prefix: &'a str,
    /// `--etcd-ca-file`.
    pub ca_file: Option<&'a Path>,
    /// `--etcd-cert-file`.
    pub cert_file: Option<&'a Path>,
    /// `--etcd-key-file`.
    pub key_file: Option<&'a Path>,
    /// `--etcd-username`.
    pub username: Option<&'a str>,
    /// `--etcd-password-file`.
    pub password_file: Option<&'a Path>,
}

/// An etcd flag with a bad value; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    /// The etcd session TTL is whole seconds, and etcd refuses less than its minimum.
    #[error(
        "--lease-duration ({lease_duration:?}): with --store etcd it is the session TTL and must be \
         whole seconds, at least {min}s (etcd's minimum TTL)"
    )]
    LeaseDuration {
        /// The rejected lease duration.
        lease_duration: Duration,
        /// etcd's minimum TTL in seconds.
        min: u64,
    },
    /// An etcd endpoint that is not a client URL.
    #[error("--etcd-endpoints {value:?}: {problem}")]
    Endpoint {
        /// The rejected endpoint.
        value: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// etcd flags that only make sense together, or not at all.
    #[error("{flag}: {problem}")]
    Flags {
        /// The flag at fault.
        flag: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

/// The lease duration is the session TTL: whole seconds, at least [`ETCD_MIN_TTL_SECS`].
///
/// # Errors
/// [`EtcdConfigError::LeaseDuration`] otherwise.
pub fn check_lease_duration(lease_duration: Duration) -> Result<(), EtcdConfigError> {
    if lease_duration.subsec_nanos() != 0 || lease_duration.as_secs() < ETCD_MIN_TTL_SECS {
        return Err(EtcdConfigError::LeaseDuration {
            lease_duration,
            min: ETCD_MIN_TTL_SECS,
        });
    }
    Ok(())
}

impl EtcdConfig {
    /// Check the etcd flags: endpoints, TLS files that go together, user and password file.
    ///
    /// # Errors
    /// The first bad flag, named in the error.
    pub fn from_flags(flags: &EtcdFlags<'_>) -> Result<Self, EtcdConfigError> {
        let tls_wanted =
            flags.ca_file.is_some() || flags.cert_file.is_some() || flags.key_file.is_some();
        if flags.endpoints.is_empty() {
            return Err(EtcdConfigError::Endpoint {
                value: String::new(),
                problem: "at least one endpoint is needed",
            });
        }
        let endpoints = flags
            .endpoints
            .iter()
            .map(|value| endpoint(value, tls_wanted, flags.ca_file.is_some()))
            .collect::<Result<_, _>>()?;
        let identity = client_identity(flags)?;
        let tls = flags.ca_file.map(|ca_file| EtcdTls {
            ca_file: ca_file.to_owned(),
            identity,
        });
        Ok(EtcdConfig {
            endpoints,
            prefix: flags.prefix.to_owned(),
            tls,
            auth: auth(flags)?,
        })
    }
}

/// One endpoint as a client URL: the scheme added if missing (`https://` when TLS flags are
/// given), checked against the TLS flags.
fn endpoint(value: &str, tls_wanted: bool, has_ca: bool) -> Result<String, EtcdConfigError> {
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
        return Err(EtcdConfigError::Endpoint {
            value: value.to_owned(),
            problem,
        });
    }
    if scheme == "http" && tls_wanted {
        return Err(EtcdConfigError::Endpoint {
            value: value.to_owned(),
            problem: "an http:// endpoint with TLS flags; use https://",
        });
    }
    if scheme == "https" && !has_ca {
        return Err(EtcdConfigError::Flags {
            flag: "--etcd-ca-file",
            problem: "https:// endpoints need the CA that signed the servers' certificates",
        });
    }
    Ok(format!("{scheme}://{rest}"))
}

/// The client certificate and key: both or neither.
fn client_identity(flags: &EtcdFlags<'_>) -> Result<Option<(PathBuf, PathBuf)>, EtcdConfigError> {
    match (flags.cert_file, flags.key_file) {
        (Some(cert), Some(key)) => Ok(Some((cert.to_owned(), key.to_owned()))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(EtcdConfigError::Flags {
            flag: "--etcd-key-file",
            problem: "needed with --etcd-cert-file",
        }),
        (None, Some(_)) => Err(EtcdConfigError::Flags {
            flag: "--etcd-cert-file",
            problem: "needed with --etcd-key-file",
        }),
    }
}

/// The user and password file: both (with a non-empty user) or neither.
fn auth(flags: &EtcdFlags<'_>) -> Result<Option<EtcdAuth>, EtcdConfigError> {
    match (flags.username, flags.password_file) {
        (Some(username), Some(password_file)) if !username.is_empty() => Ok(Some(EtcdAuth {
            username: username.to_owned(),
            password_file: password_file.to_owned(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(EtcdConfigError::Flags {
            flag: "--etcd-password-file",
            problem: "needed with --etcd-username",
        }),
        _ => Err(EtcdConfigError::Flags {
            flag: "--etcd-username",
            problem: "a non-empty user name is needed with --etcd-password-file",
        }),
    }
}
