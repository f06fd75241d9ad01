//! The Kubernetes store's errors, each naming the call and the Lease it concerns; a `403` names
//! the verb, namespace and account so that the missing RBAC rule can be read off the log.

use kube::core::Status;

use crate::store::{ErrorKind, StoreError};

/// The resource, as RBAC and error messages name it.
const RESOURCE: &str = "leases.coordination.k8s.io";

/// Errors of the Kubernetes store, each naming the call and the Lease it concerns.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    /// Neither a kubeconfig nor the in-cluster service account could be loaded.
    #[error(
        "no Kubernetes configuration: set KUBECONFIG (or ~/.kube/config), or run in a pod \
         with a service account: {source}"
    )]
    Config {
        /// What kube reported for both attempts.
        #[source]
        source: Box<kube::config::InferConfigError>,
    },
    /// The kubeconfig given explicitly could not be used.
    #[error("cannot use kubeconfig: {source}")]
    Kubeconfig {
        /// Why.
        #[source]
        source: Box<kube::config::KubeconfigError>,
    },
    /// The HTTP client could not be built from the configuration (TLS material, proxy).
    #[error("cannot build the Kubernetes client: {source}")]
    Client {
        /// Why.
        #[source]
        source: Box<kube::Error>,
    },
    /// The API server refused the call: the service account lacks an RBAC grant.
    #[error(
        "{principal} may not {verb} {RESOURCE} in namespace {namespace:?} (403 Forbidden: \
         {message}); grant get, list, watch, create and update on leases in that namespace \
         (see the Role and RoleBinding in deploy/; with --balance, also list and watch of all \
         leases and delete: deploy/overlays/balanced)"
    )]
    Forbidden {
        /// The refused verb (`get`, `list`, `watch`, `create`, `update`).
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// Who we are to the API server (the service account, when known).
        principal: String,
        /// The server's message.
        message: String,
    },
    /// The API server did not accept our credentials.
    #[error(
        "the API server rejected the credentials of {principal} for {verb} {RESOURCE} in \
         namespace {namespace:?} (401 Unauthorized: {message})"
    )]
    Unauthorized {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// Who we claimed to be.
        principal: String,
        /// The server's message.
        message: String,
    },
    /// A compare-and-swap lost: the Lease changed since it was read (409 Conflict or
    /// AlreadyExists). The candidate reads again; this never overwrites.
    #[error("lease {namespace}/{lease} changed since it was read ({verb} lost the race): {source}")]
    Conflict {
        /// The write (`create`, `update`).
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// The server's answer.
        #[source]
        source: Box<Status>,
    },
    /// Every compare-and-swap of a write lost, each time to a change that left the Lease ours
    /// (another client keeps editing it): this call gives up, and its caller retries.
    #[error(
        "lease {namespace}/{lease} kept changing under our writes: another client keeps \
         editing it"
    )]
    Contended {
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
    },
    /// Any other failure of an API call (network, server error, bad answer).
    #[error("cannot {verb} lease {namespace}/{lease}: {source}")]
    Api {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// The error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The task that sent a request ended without an answer (it panicked, or the runtime is
    /// stopping).
    #[error("the {verb} request of lease {namespace}/{lease} was aborted: {source}")]
    Aborted {
        /// The verb.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
        /// Why.
        #[source]
        source: tokio::task::JoinError,
    },
    /// Another live member of the balancing group has this identity: its member Lease was
    /// renewed while this daemon waited to see it expire.
    #[error(
        "member lease {namespace}/{lease} of balancing group {group} is renewed by another \
         process with --identity {identity:?}: give each daemon its own --identity"
    )]
    MemberInUse {
        /// The balancing group.
        group: String,
        /// The identity in use.
        identity: String,
        /// The namespace.
        namespace: String,
        /// The member Lease.
        lease: String,
    },
    /// `leaseTransitions` cannot grow any more (it is an int32).
    #[error("lease {namespace}/{lease}: leaseTransitions is at its maximum; delete the Lease")]
    TermExhausted {
        /// The namespace.
        namespace: String,
        /// The Lease.
        lease: String,
    },
}

impl KubernetesError {
    /// Map a kube error of the call `verb` on `lease` to ours: a 403 or 401 names the account,
    /// a 409 is a lost compare-and-swap.
    pub(super) fn of_call(
        verb: &'static str,
        namespace: &str,
        lease: &str,
        principal: &str,
        error: kube::Error,
    ) -> Self {
        match error {
            kube::Error::Api(status) if status.code == 403 => KubernetesError::Forbidden {
                verb,
                namespace: namespace.to_owned(),
                principal: principal.to_owned(),
                message: status.message,
            },
            kube::Error::Api(status) if status.code == 401 => KubernetesError::Unauthorized {
                verb,
                namespace: namespace.to_owned(),
                principal: principal.to_owned(),
                message: status.message,
            },
            kube::Error::Api(status) if status.code == 409 => KubernetesError::Conflict {
                verb,
                namespace: namespace.to_owned(),
                lease: lease.to_owned(),
                source: status,
            },
            source => KubernetesError::Api {
                verb,
                namespace: namespace.to_owned(),
                lease: lease.to_owned(),
                source: Box::new(source),
            },
        }
    }

    /// Refusals and failures may pass (RBAC gets fixed, servers come back); configuration and an
    /// exhausted term need a person.
    pub fn kind(&self) -> ErrorKind {
        match self {
            KubernetesError::Config { .. }
            | KubernetesError::Kubeconfig { .. }
            | KubernetesError::Client { .. }
            | KubernetesError::TermExhausted { .. } => ErrorKind::Invalid,
            KubernetesError::Forbidden { .. }
            | KubernetesError::Unauthorized { .. }
            | KubernetesError::Conflict { .. }
            | KubernetesError::Contended { .. }
            | KubernetesError::Aborted { .. }
            | KubernetesError::MemberInUse { .. }
            | KubernetesError::Api { .. } => ErrorKind::Unavailable,
        }
    }
}

/// Whether a call on a Lease was answered `404 Not Found`.
pub(super) fn is_not_found(error: &StoreError) -> bool {
    matches!(error, StoreError::Kubernetes(KubernetesError::Api { source, .. })
        if matches!(&**source, kube::Error::Api(status) if status.code == 404))
}
