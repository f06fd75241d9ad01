//! Figures of `baton run --balance`, per store (file; etcd with the `etcd` feature; Kubernetes
//! through the Lease API double), printed and never asserted: a group of daemons over 30
//! elections, each with a timer worker (`testkit::balance`), on `testkit::SHORT_TIMING` (3 s
//! lease, 500 ms retry period). Each round, with a and b at 15/15:
//!
//! - **join**: c starts; until every daemon shows 10/10/10 (agreed), and until each election's
//!   work runs on its holder's worker only (working; c's worker, started once, reconnects to
//!   c's next incarnation with the client's back-off); how many elections moved (minimum 10);
//! - **death**: `kill -9` of c; until a and b settle at 15/15 again, agreed and working; how
//!   many moved (the minimum is 10, c's).
//!
//! ```text
//! cargo bench --all-features --bench balance          # 5 rounds per store
//! BATON_BENCH_RUNS=20 cargo bench --all-features --bench balance
//! ```
//!
//! Without `--bench` in argv (as under `cargo test --all-targets`) it makes 1 round per store.
//! The workers' intervals are checked for overlap at the end of each store's run.

use tokio::time::Instant;

use testkit::{
    balance::{Group, Holders},
    bench_runs,
    scenario::Backend,
    summary,
};

/// How many elections changed holder.
fn moves(before: &Holders, after: &Holders) -> usize {
    after
        .iter()
        .filter(|(election, holder)| before.get(*election) != Some(holder))
        .count()
}

/// `n` rounds of join and death on `backend`; prints its figures.
async fn store(backend: Backend, n: usize) {
    let name = backend.name();
    let mut group = Group::new(&backend, 30, &[]);
    let t = Instant::now();
    group.join("a");
    group.join("b");
    let settled = group.settle(t, "a and b").await;
    println!("{name}: a and b over 30 elections, from the first start: {settled}");
    let mut holders = settled.holders;
    let (mut join, mut join_working) = (Vec::new(), Vec::new());
    let (mut death, mut death_working) = (Vec::new(), Vec::new());
    let (mut join_moves, mut death_moves) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        group.join("c");
        let settled = group.settle(t, "join of c").await;
        join.push(settled.agreed);
        join_working.push(settled.working);
        join_moves.push(moves(&holders, &settled.holders));
        let joined = settled.holders;

        let t = Instant::now();
        group.kill_9("c");
        let settled = group.settle(t, "death of c").await;
        death.push(settled.agreed);
        death_working.push(settled.working);
        death_moves.push(moves(&joined, &settled.holders));
        holders = settled.holders;
    }
    group.check_safety();
    println!(
        "{name} join (2 -> 3 members) to daemons agreed: {}",
        summary(join)
    );
    println!("{name} join to work running: {}", summary(join_working));
    println!("{name} join: elections moved per join (minimum 10): {join_moves:?}");
    println!(
        "{name} death (kill -9, 3 -> 2) to daemons agreed: {}",
        summary(death)
    );
    println!("{name} death to work running: {}", summary(death_working));
    println!("{name} death: elections moved per death (minimum 10): {death_moves:?}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = bench_runs(1, 5);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "balance benchmark: {n} rounds per store, {profile} build, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    store(Backend::file(), n).await;
    #[cfg(feature = "etcd")]
    store(Backend::etcd(), n).await;
    #[cfg(feature = "kubernetes")]
    store(Backend::kubernetes(), n).await;
}
