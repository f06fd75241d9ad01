//! # Baton: leader election for hot-warm replicas
//!
//! Several warm replicas of a worker run side by side; exactly one of them is active. The
//! classic case is a bridge that holds the only allowed connection to an outside feed and
//! publishes what it receives into Kafka: two active bridges would publish duplicates, and a
//! cold restart takes minutes, so a warm standby must take over at once.
//!
//! ```text
//!  store (file lock | etcd | Kubernetes Lease)
//!    │  acquire / keep / release / observe
//!    ▼
//!  elector (one task per election, pure state machine + runtime)
//!    │  tokio::sync::watch<Leadership>
//!    ▼
//!  gRPC `baton.v1.Leadership` (WatchLeadership stream, Resign, readiness, drain acks)
//!    │
//!    ▼
//!  baton::client::Client::run_while_leader(election, |lease| async { ... })  ->  worker
//! ```
//!
//! There are two ways to use this crate:
//! - **The daemon** (`baton run`, feature `daemon`, on by default): runs the elections over a
//!   store and serves them over gRPC on loopback TCP, TLS or a Unix socket ([`listen`]),
//!   with Prometheus metrics ([`metrics`]). See [`daemon::run`].
//! - **The client** ([`client`], always built): what a worker embeds to follow its daemon and
//!   work only while it leads. `cargo build --no-default-features` builds it alone, without any
//!   store client.

mod backoff;
pub mod client;
pub mod proto;

#[cfg(feature = "daemon")]
pub mod balance;
#[cfg(feature = "daemon")]
pub mod config;
#[cfg(feature = "daemon")]
pub mod daemon;
#[cfg(feature = "daemon")]
pub mod election;
#[cfg(feature = "daemon")]
mod limits;
#[cfg(feature = "daemon")]
pub mod listen;
#[cfg(feature = "daemon")]
pub mod metrics;
#[cfg(feature = "daemon")]
pub mod server;
#[cfg(feature = "daemon")]
pub mod store;
#[cfg(feature = "daemon")]
pub mod timing;
