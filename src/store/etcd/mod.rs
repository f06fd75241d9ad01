//! The etcd v3 store: the election recipe of etcd's own `concurrency` package (a key per
//! candidate bound to its session lease; the lowest create revision leads), so that Baton and
//! `etcdctl elect` share elections both ways. [`EtcdStore`] describes the recipe.
//!
//! Its configuration and flag rules ([`EtcdConfig`], [`check_lease_duration`]) are built in every
//! daemon so the command line can check them; the store itself needs the `etcd` feature.

mod config;

#[cfg(feature = "etcd")]
mod candidate;
#[cfg(feature = "etcd")]
mod client;
#[cfg(feature = "etcd")]
mod error;
#[cfg(feature = "etcd")]
mod membership;
#[cfg(feature = "etcd")]
mod queue;
#[cfg(feature = "etcd")]
mod revoke;
#[cfg(feature = "etcd")]
mod session;

#[cfg(feature = "etcd")]
pub use client::EtcdStore;
pub use config::{
    ETCD_MIN_TTL_SECS, EtcdAuth, EtcdConfig, EtcdConfigError, EtcdFlags, EtcdTls,
    check_lease_duration,
};
#[cfg(feature = "etcd")]
pub use error::EtcdError;
