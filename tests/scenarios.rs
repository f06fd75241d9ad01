//! The hand-off and take-over scenarios (`testkit::scenario`) on every store: the file store
//! always, etcd with the `etcd` feature (a real etcd), Kubernetes with the `kubernetes` feature
//! (the Lease API double). A store's own checks follow the shared ones where only that store
//! can show them (Kubernetes: the release is a write the successor builds on).

use testkit::{
    k8s_api::{last_write, take_over},
    scenario::{self, Backend},
};

/// One `#[tokio::test]` per store for `scenario`: `NAME::file`, `NAME::etcd`,
/// `NAME::kubernetes`, each given its backend and an election name.
macro_rules! every_store {
    ($name:ident, $scenario:path) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn file() {
                $scenario(&Backend::file(), "default").await;
            }

            #[cfg(feature = "etcd")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                $scenario(&Backend::etcd(), "handoff").await;
            }

            #[cfg(feature = "kubernetes")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubernetes() {
                $scenario(&Backend::kubernetes(), "handoff").await;
            }
        }
    };
}

every_store!(
    sigterm_hands_over_after_the_old_worker_stopped,
    sigterm_hand_off_checked
);
every_store!(
    kill_9_of_the_leader_hands_over_with_a_greater_term,
    scenario::kill_9_take_over
);

/// [`scenario::sigterm_hand_off`], then the store's own evidence of the release.
async fn sigterm_hand_off_checked(backend: &Backend, election: &str) {
    // The daemons and workers run on through the checks.
    let _ran = scenario::sigterm_hand_off(backend, election).await;
    if let Backend::Kubernetes { api, .. } = backend {
        let token_a = backend.token("a").expect("a's token");
        let token_b = backend.token("b").expect("b's token");
        let writes = api.writes();
        let release = last_write(&writes, &token_a);
        assert_eq!(release.holder, "", "a's last write is its release");
        let took = take_over(&writes, &token_b, "b");
        assert_eq!(
            took.base,
            Some(release.rv),
            "b took over the released record, not an expired one"
        );
        eprintln!(
            "release -> take-over at the server: {:.1} ms",
            (took.mono - release.mono) as f64 / 1e6
        );
        for token in [&token_a, &token_b] {
            assert_eq!(api.stats(token).unconditional_updates, 0);
        }
    }
}
