//! The Kubernetes store: one `coordination.k8s.io/v1` Lease per election, written as client-go's
//! `LeaseLock` writes it, so that `kubectl get lease` shows the holder and a client-go candidate
//! can contend for the same Lease. [`KubernetesStore`] states its rules.
//!
//! Its flag rules ([`check_lease_duration`], [`check_names`]) are built in every daemon so the
//! command line can check them; the store itself needs the `kubernetes` feature.

mod config;

#[cfg(feature = "kubernetes")]
mod candidate;
#[cfg(feature = "kubernetes")]
mod client;
#[cfg(feature = "kubernetes")]
mod error;
#[cfg(feature = "kubernetes")]
mod lease_watch;
#[cfg(feature = "kubernetes")]
mod membership;
#[cfg(feature = "kubernetes")]
mod record;
#[cfg(feature = "kubernetes")]
mod request;

#[cfg(feature = "kubernetes")]
pub use client::{KubernetesStore, USER_AGENT};
pub use config::{KubernetesConfigError, check_lease_duration, check_names};
#[cfg(feature = "kubernetes")]
pub use error::KubernetesError;
#[cfg(feature = "kubernetes")]
pub use membership::{ELIGIBLE_ANNOTATION, GROUP_LABEL, member_lease_name};
#[cfg(feature = "kubernetes")]
pub use record::{SUCCESSOR_ANNOTATION, SUCCESSOR_TERM_ANNOTATION};
