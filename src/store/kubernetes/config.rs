//! The Kubernetes store's own rules on its flags: a Lease duration Kubernetes can express, and
//! Lease and namespace names it accepts. Built in every daemon (also without the `kubernetes`
//! feature) so that the command line can check and name them before anything connects.

use std::time::Duration;

/// A Kubernetes flag with a bad value; the message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesConfigError {
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
    Name {
        /// The flag.
        flag: &'static str,
        /// The rejected name.
        name: String,
        /// The longest allowed name.
        max: usize,
        /// Whether dots are allowed, for the message.
        dots: &'static str,
    },
}

/// `leaseDurationSeconds` is a positive `int32`: the lease duration must be whole seconds.
///
/// # Errors
/// [`KubernetesConfigError::LeaseSeconds`] otherwise.
pub fn check_lease_duration(lease_duration: Duration) -> Result<(), KubernetesConfigError> {
    if lease_duration.subsec_nanos() != 0
        || lease_duration.as_secs() == 0
        || lease_duration.as_secs() > i32::MAX as u64
    {
        return Err(KubernetesConfigError::LeaseSeconds { lease_duration });
    }
    Ok(())
}

/// A `--lease-name` only with a single election, and names the API server accepts.
///
/// # Errors
/// The first bad flag, named in the error.
pub fn check_names(
    lease_name: Option<&str>,
    namespace: Option<&str>,
    elections: usize,
) -> Result<(), KubernetesConfigError> {
    if let Some(name) = lease_name {
        if elections != 1 {
            return Err(KubernetesConfigError::LeaseNameWithElections {
                lease_name: name.to_owned(),
                count: elections,
            });
        }
        if !valid_dns_name(name, true) {
            return Err(KubernetesConfigError::Name {
                flag: "--lease-name",
                name: name.to_owned(),
                max: 253,
                dots: ", '.'",
            });
        }
    }
    if let Some(namespace) = namespace
        && !valid_dns_name(namespace, false)
    {
        return Err(KubernetesConfigError::Name {
            flag: "--namespace",
            name: namespace.to_owned(),
            max: 63,
            dots: "",
        });
    }
    Ok(())
}

/// Whether `name` is a DNS-1123 subdomain (`dots`, at most 253 characters: a Lease name) or
/// label (no dots, at most 63: a namespace).
pub(super) fn valid_dns_name(name: &str, dots: bool) -> bool {
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
