//! The daemon: opens the store, runs one elector task per election, and serves them over gRPC
//! until `shutdown` resolves; then it steps down gracefully in every election (announce, wait for
//! workers, release) before it stops serving. `main.rs` calls [`run`] with a signal future;
//! tests call it with a oneshot.
//!
//! ```text
//!  --listen (TCP, TLS or Unix socket)  baton.v1.Leadership, grpc.health.v1, reflection
//!  --health-listen (optional)          grpc.health.v1 alone, for Kubernetes gRPC probes
//!  --metrics-listen (optional)         GET /metrics, Prometheus text
//! ```

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, StoreConfig},
    election::{Election, ElectionConfig},
    listen::Listener,
    metrics::{ElectionMetrics, Metrics, MetricsError},
    server::LeadershipService,
    store::{Store, file::FileStore},
};

mod balancer;
mod health;
mod servers;
mod shutdown;

use health::Health;
pub use health::{HEALTH_LEADERSHIP, HEALTH_LIVE, HEALTH_WORKER_ATTACHED, HEALTH_WORKER_READY};
use servers::{Api, Servers, SideListeners};
use shutdown::{Elections, serve_until};

/// How long the server waits for open calls to finish once the elections have stopped.
const SERVER_GRACE: Duration = Duration::from_secs(2);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The file store's lock directory is unusable.
    #[error("--lock-dir: {0}")]
    LockDir(#[source] crate::store::file::FileError),
    /// The Kubernetes store has no usable configuration (kubeconfig or in-cluster).
    #[cfg(feature = "kubernetes")]
    #[error("--store kubernetes: {0}")]
    Kubernetes(#[source] crate::store::kubernetes::KubernetesError),
    /// The etcd store's configuration is unusable (a TLS or password file cannot be read).
    #[cfg(feature = "etcd")]
    #[error("{0}")]
    EtcdConfig(#[source] crate::store::etcd::EtcdError),
    /// `--store etcd` in a build without the etcd store (normally refused by the config).
    #[error("--store etcd: this baton was built without the etcd store (cargo feature `etcd`)")]
    EtcdNotBuilt,
    /// `--store kubernetes` in a build without the Kubernetes store (normally refused by the
    /// config).
    #[error(
        "--store kubernetes: this baton was built without the Kubernetes store (cargo feature \
         `kubernetes`)"
    )]
    KubernetesNotBuilt,
    /// The metrics endpoint cannot be bound, or failed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The health-only address cannot be bound.
    #[error("--health-listen {addr}: cannot bind: {source}")]
    HealthListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC reflection service could not be built from the descriptors.
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// An election's task ended before shutdown.
    #[error("election {election:?} stopped unexpectedly (see the log)")]
    ElectionFailed {
        /// The election.
        election: String,
    },
    /// The balancer (`--balance`) ended before shutdown.
    #[error("the balancer stopped unexpectedly (see the log)")]
    BalancerFailed,
}

impl DaemonError {
    /// Whether the error is in the configuration (exit status 2), not in running.
    pub fn is_config(&self) -> bool {
        match self {
            DaemonError::LockDir(_)
            | DaemonError::EtcdNotBuilt
            | DaemonError::KubernetesNotBuilt
            | DaemonError::HealthListen { .. }
            | DaemonError::Metrics(MetricsError::Bind { .. }) => true,
            #[cfg(feature = "etcd")]
            DaemonError::EtcdConfig(_) => true,
            // No kubeconfig and no service account: a configuration problem.
            #[cfg(feature = "kubernetes")]
            DaemonError::Kubernetes(_) => true,
            _ => false,
        }
    }
}

/// Open the configured store.
///
/// # Errors
/// The store's configuration is unusable (e.g. an unwritable lock directory, no kubeconfig).
pub async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, DaemonError> {
    match config {
        StoreConfig::File {
            lock_dir,
            crash_grace,
        } => Ok(Arc::new(
            FileStore::new(lock_dir)
                .map_err(DaemonError::LockDir)?
                .with_crash_grace(*crash_grace),
        )),
        #[cfg(feature = "kubernetes")]
        StoreConfig::Kubernetes {
            namespace,
            lease_name,
        } => Ok(Arc::new(
            crate::store::kubernetes::KubernetesStore::connect(
                namespace.clone(),
                lease_name.clone(),
            )
            .await
            .map_err(DaemonError::Kubernetes)?,
        )),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(etcd) => Ok(Arc::new(
            crate::store::etcd::EtcdStore::new(etcd).map_err(DaemonError::EtcdConfig)?,
        )),
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => Err(DaemonError::EtcdNotBuilt),
        #[cfg(not(feature = "kubernetes"))]
        StoreConfig::Kubernetes { .. } => Err(DaemonError::KubernetesNotBuilt),
    }
}

/// Run the daemon on an already bound `listener` (a [`Listener`] from [`Listener::bind`], or a
/// plain `TcpListener`) until `shutdown` resolves, then step down in every election and return.
///
/// # Errors
/// The store cannot be opened, the metrics or health address cannot be bound, or a server
/// fails.
pub async fn run(
    config: Config,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    let store = open_store(&config.store).await?;
    run_with_store(config, store, listener, shutdown).await
}

/// [`run`] over a store already opened with [`open_store`] (so that `main` checks the store's
/// configuration before it binds the port).
///
/// # Errors
/// The metrics or health address cannot be bound, a server fails, or an election's task ends
/// before `shutdown`.
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    listener: impl Into<Listener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    // Everything that can be refused is refused before any election starts.
    let side = SideListeners::bind(&config).await?;
    // What can still fail is built before any election starts: an error leaves no task behind.
    let api = Api::build(listener.into())?;
    let metrics = side.metrics_registry();
    let mut elections = spawn_elections(&config, &store, metrics.as_deref());
    let health = Health::start(elections.handles.clone());
    let mut leadership = LeadershipService::new(elections.handles.clone());
    if config.balance {
        let group = crate::balance::group_name(config.elections.iter().map(String::as_str));
        let balancer = balancer::Balancer::start(
            store.clone(),
            &config,
            group.clone(),
            elections.handles.clone(),
            metrics
                .as_ref()
                .map(|m| m.balance(&group))
                .unwrap_or_default(),
        );
        leadership = leadership.with_group(balancer.view.clone());
        elections.running.balancer = Some(balancer);
    }
    let (local, tls) = (api.local.clone(), api.tls);
    let servers = Servers::start(
        api,
        side,
        leadership,
        &health.service,
        metrics,
        store
            .descriptors_per_election()
            .saturating_mul(config.elections.len() as u64),
    );
    let off = |addr: Option<SocketAddr>| addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        listen = %local,
        tls,
        health = %off(servers.health_addr),
        metrics = %off(servers.metrics_addr),
        identity = %config.identity,
        elections = ?config.elections,
        store = %store.describe(),
        "baton serving"
    );
    serve_until(shutdown, &config, elections.running, health, servers).await
}

/// The elections' handles and their running tasks.
struct Spawned {
    handles: Vec<Election>,
    running: Elections,
}

/// Start one elector task per configured election over `store`.
fn spawn_elections(config: &Config, store: &Arc<dyn Store>, metrics: Option<&Metrics>) -> Spawned {
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    let mut handles = Vec::new();
    for name in &config.elections {
        let election_metrics = metrics.map_or_else(ElectionMetrics::default, |m| m.election(name));
        let (election, task) = Election::spawn_with_metrics(
            store.clone(),
            ElectionConfig {
                name: name.clone(),
                identity: config.identity.clone(),
                timing: config.timing,
                drain_timeout: config.drain_timeout,
                campaign: config.campaign,
                balanced: config.balance,
            },
            election_metrics,
            stop.child_token(),
        );
        handles.push(election);
        tasks.push(task);
    }
    Spawned {
        handles,
        running: Elections {
            tasks,
            stop,
            balancer: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use tokio::net::TcpListener;

    use std::collections::BTreeSet;

    use async_trait::async_trait;

    use super::*;
    use crate::{
        balance::Member,
        config::{Cli, Command},
        store::{Candidate, Membership, StoreError, Timing, memory::MemoryStore},
    };

    fn run_args(args: &[&str]) -> Config {
        let cli = Cli::try_parse_from(args).unwrap();
        let Command::Run(args) = cli.command else {
            unreachable!("parsed `run`");
        };
        args.validate().unwrap()
    }

    /// The memory store, but once this member leads, its next read of the group panics: a bug
    /// in the balancer's path, as the daemon would meet it.
    struct PanickingGroups(MemoryStore);

    struct PanickingMembership {
        store: MemoryStore,
        eligible: BTreeSet<String>,
        reads: usize,
    }

    #[async_trait]
    impl Membership for PanickingMembership {
        async fn announce(&mut self, eligible: &BTreeSet<String>) -> Result<(), StoreError> {
            self.eligible = eligible.clone();
            Ok(())
        }

        async fn changed(&mut self, _: &[Member]) -> Result<Vec<Member>, StoreError> {
            self.reads += 1;
            if self.reads == 1 {
                let me = Member {
                    identity: "me".to_owned(),
                    eligible: self.eligible.clone(),
                };
                return Ok(vec![me]);
            }
            while self.store.holder("e").is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("a bug in reading the group");
        }

        async fn leave(&mut self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    #[async_trait]
    impl Store for PanickingGroups {
        async fn join(
            &self,
            election: &str,
            identity: &str,
            timing: Timing,
        ) -> Result<Box<dyn Candidate>, StoreError> {
            self.0.join(election, identity, timing).await
        }

        async fn enroll(
            &self,
            _: &str,
            _: &str,
            _: Timing,
        ) -> Result<Box<dyn Membership>, StoreError> {
            Ok(Box::new(PanickingMembership {
                store: self.0.clone(),
                eligible: BTreeSet::new(),
                reads: 0,
            }))
        }

        fn describe(&self) -> String {
            "memory store whose groups panic".to_owned()
        }
    }

    #[tokio::test]
    async fn a_panicking_balancer_stops_the_daemon_and_its_elections_step_down() {
        let store = MemoryStore::new();
        let config = run_args(&[
            "baton",
            "run",
            "--election",
            "e",
            "--identity",
            "me",
            "--balance",
        ]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let daemon = tokio::spawn(run_with_store(
            config,
            Arc::new(PanickingGroups(store.clone())),
            listener,
            std::future::pending::<()>(),
        ));
        // A liveness bound only: without the shutdown signal, a daemon that missed the panic
        // serves forever.
        let outcome = tokio::time::timeout(Duration::from_secs(20), daemon)
            .await
            .expect("the daemon stops when its balancer fails")
            .expect("the daemon returns instead of panicking");
        assert!(
            matches!(&outcome, Err(DaemonError::BalancerFailed)),
            "{outcome:?}"
        );
        // It led `e` when the balancer failed (the membership waited for that); its 15 s lease
        // has not run out, so only a release frees it.
        assert_eq!(store.holder("e"), None, "e was released");
    }

    #[tokio::test]
    async fn a_panicking_election_does_not_stop_the_others_stepping_down() {
        let config = run_args(&["baton", "run", "--election", "ok,boom", "--identity", "me"]);
        let store = MemoryStore::new();
        store.panic_once_held("boom", "ok");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outcome = tokio::spawn(run_with_store(
            config,
            Arc::new(store.clone()),
            listener,
            std::future::pending::<()>(),
        ))
        .await
        .expect("the daemon returns instead of panicking");
        assert!(
            matches!(&outcome, Err(DaemonError::ElectionFailed { election }) if election == "boom"),
            "{outcome:?}"
        );
        // `ok` led until the panic; its 15 s lease has not run out, so only a release frees it.
        assert_eq!(store.holder("ok"), None, "ok released its holding");
    }
}
