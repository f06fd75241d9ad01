//! The etcd store's errors, each naming the operation that failed and where, and the one-line
//! explanation (cause chain plus a hint for common misconfigurations) that the log shows.

use crate::store::ErrorKind;

/// Errors of the etcd store, each naming the operation that failed and where.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A file named by a flag could not be read when the store was opened.
    #[error("{flag} {}: cannot read: {source}", path.display())]
    ReadFile {
        /// The flag that names the file.
        flag: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Connecting (and, with a user, authenticating) failed.
    #[error(
        "cannot connect to etcd at {endpoints}: {}",
        explain_at(endpoints, source)
    )]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The session lease could not be granted.
    #[error(
        "cannot create an etcd session (lease grant) at {endpoints}: {}",
        explain_at(endpoints, source)
    )]
    GrantLease {
        /// The endpoints tried.
        endpoints: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A keep-alive of the session lease failed.
    #[error("cannot keep etcd lease {lease:x} alive: {}", explain(source))]
    KeepAlive {
        /// The lease.
        lease: i64,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The keep-alive stream of the session lease ended without an error: etcd (or a proxy
    /// before it) closed it. The next renewal opens a new one.
    #[error("the keep-alive stream of etcd lease {lease:x} ended: the server closed it")]
    KeepAliveEnded {
        /// The lease.
        lease: i64,
    },
    /// The candidate key could not be created.
    #[error("cannot create candidate key {key}: {}", explain(source))]
    Campaign {
        /// The candidate key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The election's keys could not be read.
    #[error("cannot read election keys {range}: {}", explain(source))]
    ReadElection {
        /// The key range of the election.
        range: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A watch on the election's keys failed or broke.
    #[error("watch on {key} failed: {}", explain(source))]
    Watch {
        /// The watched key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A watch stream ended without an error: etcd (or a proxy before it) closed it. The
    /// caller reads again and watches anew.
    #[error("watch on {key} ended: the server closed the stream")]
    WatchEnded {
        /// The watched key or range.
        key: String,
    },
    /// The candidate key could not be deleted (resign, release, stepping aside).
    #[error("cannot delete candidate key {key}: {}", explain(source))]
    Resign {
        /// The candidate key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The successor reservation could not be written or cleared.
    #[error("cannot write successor reservation {key}: {}", explain(source))]
    Reserve {
        /// The reservation key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// The member key of a balancing group could not be written (enroll, announce).
    #[error("cannot write member key {key}: {}", explain(source))]
    WriteMember {
        /// The member key.
        key: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// Another live daemon is a member of the group under this identity.
    #[error(
        "member key {key} is held by another daemon (lease {lease:x}): another daemon runs with \
         this --identity in the group; give each daemon its own identity (a crashed daemon's \
         key goes when its lease expires)"
    )]
    MemberInUse {
        /// The member key.
        key: String,
        /// The lease the key is bound to.
        lease: i64,
    },
    /// The members of a balancing group could not be read.
    #[error("cannot read member keys {range}: {}", explain(source))]
    ReadMembers {
        /// The key range of the group.
        range: String,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
    /// A member key holds something other than a member record.
    #[error(
        "member key {key} does not hold a member record (JSON with identity and eligible): \
         {source}; delete it if no Baton daemon wrote it"
    )]
    CorruptMember {
        /// The member key.
        key: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// A member key holds the record of another identity than the one it is named after.
    #[error(
        "member key {key} holds the record of {identity:?}; delete it if no Baton daemon wrote it"
    )]
    MisnamedMember {
        /// The member key.
        key: String,
        /// The identity in the record.
        identity: String,
    },
    /// The member's session lease could not be revoked when leaving the group.
    #[error(
        "cannot revoke member lease {lease:x} (leaving the group): {}",
        explain(source)
    )]
    Leave {
        /// The lease.
        lease: i64,
        /// Why.
        #[source]
        source: etcd_client::Error,
    },
}

impl EtcdError {
    /// Unreadable files and records Baton cannot read need a person; everything else
    /// (unreachable, slow, refused, TLS, bad password, an identity in use) is retried with
    /// back-off and reported as the reason.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EtcdError::ReadFile { .. }
            | EtcdError::CorruptMember { .. }
            | EtcdError::MisnamedMember { .. } => ErrorKind::Invalid,
            _ => ErrorKind::Unavailable,
        }
    }
}

/// One line for people: the whole chain of causes, and a hint for the common misconfigurations.
pub(super) fn explain(error: &etcd_client::Error) -> String {
    let mut text = match error {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    // etcd_client::Error keeps its cause inside the variant and does not expose it as a source.
    let root: Option<&dyn std::error::Error> = match error {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(e) => Some(e),
        etcd_client::Error::IoError(e) => Some(e),
        _ => None,
    };
    let mut source = root.and_then(std::error::Error::source);
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    let hint = [
        (
            &["UnknownIssuer", "BadSignature"][..],
            "the server's certificate is not signed by --etcd-ca-file",
        ),
        (
            &["NotValidForName"],
            "the server's certificate does not name this endpoint's host",
        ),
        (
            &["CertificateRequired", "certificate required"],
            "etcd requires a client certificate: give --etcd-cert-file and --etcd-key-file",
        ),
        (
            &[
                "BadCertificate",
                "bad certificate",
                "UnknownCA",
                "unknown ca",
            ],
            "etcd rejected the client certificate (--etcd-cert-file, --etcd-key-file)",
        ),
        (
            &["authentication failed", "invalid user ID or password"],
            "wrong --etcd-username or password in --etcd-password-file",
        ),
        (
            &["user name is empty", "user name not found"],
            "etcd has authentication enabled: give --etcd-username and --etcd-password-file",
        ),
        (
            &["permission denied"],
            "the etcd user may not use this key prefix",
        ),
        (
            &[
                "InvalidContentType",
                "CorruptMessage",
                "wrong version number",
            ],
            "TLS and plain text mixed: check http:// versus https:// in --etcd-endpoints",
        ),
        (
            &["Connection refused", "connection refused"],
            "is etcd running there?",
        ),
    ]
    .into_iter()
    .find(|(needles, _)| needles.iter().any(|n| text.contains(n)));
    if let Some((_, hint)) = hint {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// [`explain`] for a call that may be the first on a connection to `endpoints`: over TLS, a
/// server that refuses the client certificate after a TLS 1.3 handshake often shows only as a
/// closed connection, so say so.
pub(super) fn explain_at(endpoints: &str, error: &etcd_client::Error) -> String {
    let mut text = explain(error);
    if endpoints.contains("https://") && !text.ends_with(')') && text.contains("connection closed")
    {
        text.push_str(
            " (etcd closed the TLS connection: it may have refused the client certificate; \
             check --etcd-cert-file and --etcd-key-file)",
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explain_names_the_cause_and_a_hint() {
        let error = etcd_client::Error::GRpcStatus(tonic::Status::invalid_argument(
            "etcdserver: authentication failed, invalid user ID or password",
        ));
        let text = explain(&error);
        assert!(text.contains("authentication failed"), "{text}");
        assert!(text.contains("--etcd-password-file"), "{text}");
    }
}
