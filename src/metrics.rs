//! Prometheus metrics of the daemon, served as text at `/metrics` on `--metrics-listen` (off by
//! default); the series are listed on [`Metrics`]. The elector records into an
//! [`ElectionMetrics`] with plain values (the pure machine knows nothing of it), each before the
//! change it reflects is published, so a client that has seen a state and then scrapes sees
//! that state's values.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{http::header::CONTENT_TYPE, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::ErrorKind;

/// The content type of the OpenMetrics text format that [`Metrics::render`] produces (Prometheus
/// reads it).
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics address cannot be bound.
    #[error("--metrics-listen {addr}: cannot bind: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("metrics server failed: {0}")]
    Serve(#[source] std::io::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ElectionLabel {
    election: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabel {
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreErrorLabels {
    election: String,
    kind: &'static str,
}

/// Latency buckets of a renewal: 0.25 ms (a file lock) to about 8 s (a slow API server).
fn renew_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

type HistogramFamily = Family<ElectionLabel, Histogram, fn() -> Histogram>;

/// The daemon's metric registry. Every series carries the election's name:
///
/// | metric | type | meaning |
/// |---|---|---|
/// | `baton_is_leader` | gauge | 1 while this replica leads, else 0 |
/// | `baton_term` | gauge | term of the current holding (the last known one while unknown) |
/// | `baton_leader_transitions_total` | counter | new leaderships seen by this replica (a leader with a term not seen before) |
/// | `baton_renew_duration_seconds` | histogram | time of each successful renewal (`keep`) of the holding |
/// | `baton_store_errors_total{kind}` | counter | failed store calls, by how the elector treats them: `lost`, `unavailable`, `invalid` |
/// | `baton_subscribers` | gauge | workers subscribed to the election (open `WatchLeadership` streams with a worker name) |
///
/// With `--balance`, three more carry the balancing group's name instead:
///
/// | metric | type | meaning |
/// |---|---|---|
/// | `baton_balance_members` | gauge | live members of the group seen in the store |
/// | `baton_balance_elections_led` | gauge | elections of the group this replica leads |
/// | `baton_balance_share` | gauge | elections the group's plan gives this replica |
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    is_leader: Family<ElectionLabel, Gauge>,
    term: Family<ElectionLabel, Gauge<u64, AtomicU64>>,
    transitions: Family<ElectionLabel, Counter>,
    renew: HistogramFamily,
    store_errors: Family<StoreErrorLabels, Counter>,
    subscribers: Family<ElectionLabel, Gauge>,
    balance: [Family<GroupLabel, Gauge>; 3],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with Baton's metric families, prefixed `baton_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let is_leader = Family::default();
        let term = Family::default();
        let transitions = Family::default();
        let renew = HistogramFamily::new_with_constructor(renew_histogram);
        let store_errors = Family::default();
        let subscribers = Family::default();
        registry.register(
            "is_leader",
            "1 while this replica leads the election, else 0",
            is_leader.clone(),
        );
        registry.register(
            "term",
            "Term (fencing token) of the current holding; the last known one while unknown",
            term.clone(),
        );
        registry.register(
            "leader_transitions",
            "New leaderships seen by this replica (a leader with a term not seen before)",
            transitions.clone(),
        );
        registry.register_with_unit(
            "renew_duration",
            "Time of each successful renewal (keep-alive) of the holding",
            Unit::Seconds,
            renew.clone(),
        );
        registry.register(
            "store_errors",
            "Failed store calls, by kind: lost, unavailable, invalid",
            store_errors.clone(),
        );
        registry.register(
            "subscribers",
            "Workers subscribed to the election (WatchLeadership streams with a worker name)",
            subscribers.clone(),
        );
        let balance: [Family<GroupLabel, Gauge>; 3] = Default::default();
        for (family, (name, help)) in balance.iter().zip([
            (
                "balance_members",
                "Live members of the balancing group seen in the store",
            ),
            (
                "balance_elections_led",
                "Elections of the group this replica leads",
            ),
            (
                "balance_share",
                "Elections the group's plan gives this replica",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
        Metrics {
            registry,
            balance,
            is_leader,
            term,
            transitions,
            renew,
            store_errors,
            subscribers,
        }
    }

    /// The series of `election`, created at zero so that they show before anything happens.
    pub fn election(&self, election: &str) -> ElectionMetrics {
        let label = ElectionLabel {
            election: election.to_owned(),
        };
        let error = |kind| {
            self.store_errors.get_or_create_owned(&StoreErrorLabels {
                election: election.to_owned(),
                kind,
            })
        };
        ElectionMetrics {
            is_leader: self.is_leader.get_or_create_owned(&label),
            term: self.term.get_or_create_owned(&label),
            transitions: self.transitions.get_or_create_owned(&label),
            counted_term: Arc::default(),
            renew: self.renew.get_or_create_owned(&label),
            lost: error("lost"),
            unavailable: error("unavailable"),
            invalid: error("invalid"),
            subscribers: self.subscribers.get_or_create_owned(&label),
        }
    }

    /// The series of balancing `group`.
    pub fn balance(&self, group: &str) -> BalanceMetrics {
        let label = GroupLabel {
            group: group.to_owned(),
        };
        let [members, led, share] = self
            .balance
            .each_ref()
            .map(|f| f.get_or_create_owned(&label));
        BalanceMetrics {
            members,
            led,
            share,
        }
    }

    /// Every series in the OpenMetrics text format.
    ///
    /// # Errors
    /// Formatting failed (it writes into a `String`, so only a bug in an encoder can).
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Bind `addr` for [`Metrics::serve`].
    ///
    /// # Errors
    /// [`MetricsError::Bind`], naming the flag.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
        TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })
    }

    /// Serve `GET /metrics` on `listener` until `stop` is cancelled.
    ///
    /// # Errors
    /// [`MetricsError::Serve`] if the HTTP server fails.
    pub async fn serve(
        self: Arc<Self>,
        listener: crate::limits::CappedListener,
        stop: CancellationToken,
    ) -> Result<(), MetricsError> {
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let metrics = self.clone();
                async move {
                    match metrics.render() {
                        Ok(text) => {
                            ([(CONTENT_TYPE, CONTENT_TYPE_OPENMETRICS)], text).into_response()
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot encode the metrics");
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                        }
                    }
                }
            }),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .map_err(MetricsError::Serve)
    }
}

/// Handles on the series of one election; cheap to clone. [`ElectionMetrics::default`] records
/// into series that are exported nowhere (an election run without `--metrics-listen`, a test).
#[derive(Debug, Clone)]
pub struct ElectionMetrics {
    is_leader: Gauge,
    term: Gauge<u64, AtomicU64>,
    transitions: Counter,
    /// The highest term counted in `transitions`: a leader seen again (after an unknown spell)
    /// is not a new leadership.
    counted_term: Arc<AtomicU64>,
    renew: Histogram,
    lost: Counter,
    unavailable: Counter,
    invalid: Counter,
    subscribers: Gauge,
}

impl Default for ElectionMetrics {
    fn default() -> Self {
        ElectionMetrics {
            is_leader: Gauge::default(),
            term: Gauge::default(),
            transitions: Counter::default(),
            counted_term: Arc::default(),
            renew: renew_histogram(),
            lost: Counter::default(),
            unavailable: Counter::default(),
            invalid: Counter::default(),
            subscribers: Gauge::default(),
        }
    }
}

/// Handles on the series of a balancing group; [`BalanceMetrics::default`] exports nowhere.
#[derive(Debug, Clone, Default)]
pub struct BalanceMetrics {
    members: Gauge,
    led: Gauge,
    share: Gauge,
}

impl BalanceMetrics {
    /// Record what the balancer sees: live members, elections led here, and this share.
    pub fn seen(&self, members: usize, led: usize, share: usize) {
        for (gauge, value) in [
            (&self.members, members),
            (&self.led, led),
            (&self.share, share),
        ] {
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

/// A published state of an election, as the metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// This replica leads.
    pub leading: bool,
    /// Some replica is known to lead (this one or another).
    pub leader_known: bool,
    /// The term; 0 while none is known.
    pub term: u64,
}

impl ElectionMetrics {
    /// Record a published state.
    pub fn published(&self, state: Published) {
        let Published {
            leading,
            leader_known,
            term,
        } = state;
        self.is_leader.set(i64::from(leading));
        if term > 0 {
            self.term.set(term);
        }
        if leader_known && term > 0 && self.counted_term.fetch_max(term, Ordering::Relaxed) < term {
            self.transitions.inc();
        }
    }

    /// Record a successful renewal that took `took`.
    pub fn renewed(&self, took: Duration) {
        self.renew.observe(took.as_secs_f64());
    }

    /// Record a failed store call.
    pub fn store_failed(&self, kind: ErrorKind) {
        match kind {
            ErrorKind::Lost => &self.lost,
            ErrorKind::Unavailable => &self.unavailable,
            ErrorKind::Invalid => &self.invalid,
        }
        .inc();
    }

    /// Record how many workers are subscribed.
    pub fn subscribers(&self, count: usize) {
        self.subscribers
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(leading: bool, leader_known: bool, term: u64) -> Published {
        Published {
            leading,
            leader_known,
            term,
        }
    }

    fn line<'a>(text: &'a str, prefix: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
    }

    #[test]
    fn series_exist_at_zero_and_follow_the_states() {
        let metrics = Metrics::new();
        let e = metrics.election("orders");
        let text = metrics.render().unwrap();
        assert!(text.contains("# TYPE baton_is_leader gauge"), "{text}");
        assert_eq!(
            line(&text, "baton_is_leader{"),
            "baton_is_leader{election=\"orders\"} 0"
        );
        assert_eq!(
            line(
                &text,
                "baton_store_errors_total{election=\"orders\",kind=\"lost\"}"
            ),
            "baton_store_errors_total{election=\"orders\",kind=\"lost\"} 0"
        );
        assert!(text.contains("baton_renew_duration_seconds_count{election=\"orders\"} 0"));
        assert!(text.ends_with("# EOF\n"));

        // (is_leader, leader_known, term)
        e.published(state(false, false, 0)); // unknown
        e.published(state(false, true, 3)); // following "a"
        e.published(state(false, false, 0)); // store trouble: not a new leadership
        e.published(state(false, true, 3)); // following "a" again
        e.published(state(false, false, 3)); // released
        e.published(state(true, true, 4)); // leading
        e.renewed(Duration::from_millis(2));
        e.store_failed(ErrorKind::Unavailable);
        e.subscribers(2);
        let text = metrics.render().unwrap();
        assert_eq!(
            line(&text, "baton_is_leader{"),
            "baton_is_leader{election=\"orders\"} 1"
        );
        assert_eq!(
            line(&text, "baton_term{"),
            "baton_term{election=\"orders\"} 4"
        );
        assert_eq!(
            line(&text, "baton_leader_transitions_total{"),
            "baton_leader_transitions_total{election=\"orders\"} 2"
        );
        assert!(text.contains("baton_renew_duration_seconds_count{election=\"orders\"} 1"));
        assert!(
            text.contains("baton_store_errors_total{election=\"orders\",kind=\"unavailable\"} 1")
        );
        assert_eq!(
            line(&text, "baton_subscribers{"),
            "baton_subscribers{election=\"orders\"} 2"
        );
    }

    #[test]
    fn a_balancing_group_shows_its_members_and_this_replica_s_share() {
        let metrics = Metrics::new();
        let plain = metrics.render().unwrap();
        assert!(!plain.contains("baton_balance_members{"), "{plain}");
        metrics.balance("b-1").seen(3, 9, 10);
        let text = metrics.render().unwrap();
        for (series, value) in [
            ("baton_balance_members", 3),
            ("baton_balance_elections_led", 9),
            ("baton_balance_share", 10),
        ] {
            let prefix = format!("{series}{{group=\"b-1\"}}");
            assert_eq!(line(&text, &prefix), format!("{prefix} {value}"));
        }
    }
}
