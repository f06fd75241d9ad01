//! [`KubernetesStore`]: the API client (kube's layers over a connector of our own, HTTP/2 with
//! keep-alive pings), the namespace and account it works as, and joining an election.

use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use kube::{Api, Client};

use super::error::KubernetesError;
use super::membership::{LeaseMembership, MemberLease, member_lease_name};
use super::record::LeaseCandidate;
use crate::store::{Candidate, Membership, Store, StoreError};
use crate::timing::Timing;

/// Where a pod finds its own namespace.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Elections as Leases in one namespace: one `coordination.k8s.io/v1` Lease per election,
/// written exactly as client-go's `LeaseLock` writes it, so that `kubectl get lease` shows the
/// holder and a client-go candidate can contend for the same Lease.
///
/// ```text
/// Lease <lease-name | election> in <namespace>
///   spec.holderIdentity        the holder; "" after a release (client-go writes "" too)
///   spec.leaseDurationSeconds  --lease-duration in whole seconds (kept on release)
///   spec.acquireTime           when this holding began (MicroTime, the writer's wall clock)
///   spec.renewTime             the last renewal (MicroTime, the writer's wall clock)
///   spec.leaseTransitions      +1 on every new holding: Baton's term
///   metadata.annotations       baton.dev/successor, baton.dev/successor-term: see below
/// ```
///
/// ## Rules
/// - **Every write is a compare-and-swap.** A take-over, renewal or release replaces the Lease
///   with the `resourceVersion` it last read; `409 Conflict` means someone else wrote first, and
///   the candidate reads again ([`KubernetesError::Conflict`]). A missing Lease is created by the
///   first campaigning candidate; `409 AlreadyExists` is the same lost race.
/// - **Expiry is judged on the local monotonic clock**, as client-go does: a candidate notes the
///   [`tokio::time::Instant`] at which it first saw the current version of the record, and
///   judges the holder gone only when the record has not changed for `leaseDurationSeconds`
///   since. `renewTime` and `acquireTime` are written for people and tools and never compared
///   with the local clock, so a replica whose wall clock is an hour off behaves the same.
/// - **A holder is respected whatever its name**, including a holder string no Baton wrote
///   (client-go, or an earlier incarnation of this very identity): a candidate takes over only a
///   free record (empty holder) or an expired one.
/// - **Terms**: `leaseTransitions` grows by one with every new holding, also when the same
///   identity takes the Lease again after a release, so terms only grow. A Lease created by
///   client-go starts at 0; Baton's first holding is term 1 or more. Deleting the Lease starts
///   the count over for replicas that have not seen the old one: do not delete a live Lease.
/// - **Followers watch** the Lease (a watch on `metadata.name`, resumed from the last
///   `resourceVersion`; on a watch error or `410 Gone` they list again), so a release or a new
///   holder is seen at once. Steady state costs a follower one watch request per server-side
///   watch timeout, and no writes; the leader writes once per retry period and reads nothing.
/// - **Release** writes an empty holder (keeping `leaseDurationSeconds` valid) so a standby takes
///   over at once. A release *for a successor* also writes the annotations
///   `baton.dev/successor: <identity>` and `baton.dev/successor-term: <leaseTransitions>`;
///   Baton candidates other than the successor then treat the free record as reserved for one
///   `leaseDurationSeconds` after they saw it, by the same local-observation rule (no
///   timestamps are compared across clocks). The annotations bind only the record whose
///   `leaseTransitions` they name, so a stale pair left behind by another writer is ignored.
///   client-go ignores annotations: a client-go candidate may take a reserved Lease at once,
///   which steers the hand-over but never breaks exclusivity.
///
/// ## Balancing
/// A daemon with `--balance` also keeps a member Lease of its group, labelled
/// `baton.dev/balance-group` and renewed every retry period; members find each other by a
/// label-selector list and watch of Leases and judge them expired by the observed-time rule
/// above (the `membership` module states its rules).
///
/// ## Access
/// The service account needs `get`, `list`, `watch`, `create` and `update` on
/// `leases.coordination.k8s.io` in the namespace (the Role in `deploy/`); with `--balance`,
/// also `list` and `watch` of the namespace's Leases and `update` and `delete` of its member
/// Lease (the `balanced` overlay). A `403 Forbidden` is
/// reported with the verb, namespace and account ([`KubernetesError::Forbidden`]); the elector
/// reports UNKNOWN (health NOT_SERVING) and retries with back-off.
#[derive(Clone)]
pub struct KubernetesStore {
    client: Client,
    namespace: String,
    lease_name: Option<String>,
    principal: String,
}

impl KubernetesStore {
    /// Connect with the in-cluster service account or `KUBECONFIG` (kube's inference), in
    /// `namespace`, else the pod's namespace, else the kubeconfig context's. With `lease_name`,
    /// every election uses that Lease (the config allows it with a single election only).
    ///
    /// # Errors
    /// No usable configuration, or the client cannot be built from it. Nothing is sent yet.
    pub async fn connect(
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let config = kube::Config::infer()
            .await
            .map_err(|source| KubernetesError::Config {
                source: Box::new(source),
            })?;
        Self::with_config(config, namespace, lease_name)
    }

    /// Connect with the kubeconfig file at `path` (its current context).
    ///
    /// # Errors
    /// The file cannot be read or used, or the client cannot be built.
    pub async fn from_kubeconfig(
        path: &std::path::Path,
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
            KubernetesError::Kubeconfig {
                source: Box::new(source),
            }
        })?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .map_err(|source| KubernetesError::Kubeconfig {
                source: Box::new(source),
            })?;
        Self::with_config(config, namespace, lease_name)
    }

    /// Connect with a ready configuration.
    ///
    /// # Errors
    /// The client cannot be built from `config`.
    pub fn with_config(
        config: kube::Config,
        namespace: Option<String>,
        lease_name: Option<String>,
    ) -> Result<Self, KubernetesError> {
        let namespace = namespace
            .or_else(|| {
                std::fs::read_to_string(POD_NAMESPACE_FILE)
                    .ok()
                    .map(|ns| ns.trim().to_owned())
                    .filter(|ns| !ns.is_empty())
            })
            .unwrap_or_else(|| config.default_namespace.clone());
        let principal = principal(&config);
        let client = http_client(config).map_err(|source| KubernetesError::Client {
            source: Box::new(source),
        })?;
        Ok(KubernetesStore {
            client,
            namespace,
            lease_name,
            principal,
        })
    }

    /// The namespace of the Leases.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
}

/// What Baton sends as `User-Agent`, as client-go sends its own name and version.
pub const USER_AGENT: &str = concat!("baton/", env!("CARGO_PKG_VERSION"));

/// HTTP/2 pings on an idle connection, so that a dead one is noticed and replaced although a
/// watch keeps it busy.
pub(super) const KEEPALIVE: Duration = Duration::from_secs(10);

/// The API client: kube's own layers (base URL, credentials, extra headers) over a connector of
/// our own, with `TCP_NODELAY` on (a small request is not held back for the server's delayed
/// ACK) and HTTP/2 offered, as client-go does, so calls share the watch's warm connection. kube's
/// tracing layer is left out: the elector reports every failure once. A kubeconfig with a proxy
/// keeps kube's default stack (with `User-Agent`).
pub(super) fn http_client(mut config: kube::Config) -> Result<Client, kube::Error> {
    use http::{HeaderValue, header};
    use hyper_util::{
        client::legacy::{Builder, connect::HttpConnector},
        rt::{TokioExecutor, TokioTimer},
    };
    use kube::client::ConfigExt as _;

    config
        .headers
        .push((header::USER_AGENT, HeaderValue::from_static(USER_AGENT)));
    if config.proxy_url.is_some() {
        return Client::try_from(config);
    }
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(config.connect_timeout);
    let mut tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config.rustls_client_config()?)
        .https_or_http();
    if let Some(name) = &config.tls_server_name {
        let name = name.clone().try_into().map_err(|e| {
            kube::Error::RustlsTls(kube::client::RustlsTlsError::InvalidServerName(e))
        })?;
        tls = tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
    }
    let connector = tls.enable_http1().enable_http2().wrap_connector(tcp);
    let http = Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEPALIVE)
        .http2_keep_alive_timeout(KEEPALIVE)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = tower::ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        // The auth layer's errors are boxed: box the client's too.
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace))
}

/// `leaseDurationSeconds` for `timing`: whole seconds, rounded up, so that others wait at least
/// as long as the writer may hold.
fn lease_seconds(timing: Timing) -> i32 {
    timing
        .lease_duration
        .as_millis()
        .div_ceil(1000)
        .clamp(1, i32::MAX as u128) as i32
}

/// Who the credentials of `config` name, for error messages: the `sub` claim of a service
/// account token (`system:serviceaccount:NS:NAME`), decoded without verification.
pub(super) fn principal(config: &kube::Config) -> String {
    use secrecy::ExposeSecret as _;
    let token = config
        .auth_info
        .token
        .as_ref()
        .map(|t| t.expose_secret().to_owned())
        .or_else(|| {
            let file = config.auth_info.token_file.as_deref()?;
            std::fs::read_to_string(file).ok()
        });
    let subject = token.as_deref().and_then(|t| jwt_subject(t.trim()));
    match subject {
        Some(sub) => match sub.strip_prefix("system:serviceaccount:") {
            Some(account) => format!("service account {} ({sub})", account.replacen(':', "/", 1)),
            None => format!("user {sub:?}"),
        },
        None => "this replica's Kubernetes user".to_owned(),
    }
}

/// The `sub` claim of a JWT, if `token` is one.
pub(super) fn jwt_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_owned)
}

#[async_trait]
impl Store for KubernetesStore {
    async fn join(
        &self,
        election: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Candidate>, StoreError> {
        let lease_seconds = lease_seconds(timing);
        Ok(Box::new(LeaseCandidate {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            name: self
                .lease_name
                .clone()
                .unwrap_or_else(|| election.to_owned()),
            identity: identity.to_owned(),
            principal: self.principal.clone(),
            timing,
            lease_seconds,
            seen: None,
            resume_from: None,
            stale: true,
            watch: None,
            held: None,
            attempt: None,
            highest_term: 0,
            in_flight: None,
        }))
    }

    async fn enroll(
        &self,
        group: &str,
        identity: &str,
        timing: Timing,
    ) -> Result<Box<dyn Membership>, StoreError> {
        let lease = MemberLease {
            api: Api::namespaced(self.client.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            principal: self.principal.clone(),
            group: group.to_owned(),
            identity: identity.to_owned(),
            name: member_lease_name(group, identity),
            timing,
            lease_seconds: lease_seconds(timing),
        };
        Ok(Box::new(LeaseMembership::enroll(lease).await?))
    }

    fn describe(&self) -> String {
        format!("kubernetes store (leases in namespace {})", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_tokens_name_the_account() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(br#"{"sub":"system:serviceaccount:prod:baton"}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_subject(&token).as_deref(),
            Some("system:serviceaccount:prod:baton")
        );
        assert_eq!(jwt_subject("opaque-token"), None);
    }
}
