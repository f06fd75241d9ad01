//! Figures of `baton run --balance`, per store (file; etcd with the `etcd` feature; Kubernetes
//! through the Lease API double), printed and never asserted: a group of daemons over 30
//! elections, each with a timer worker (`testkit::balance`), on `testkit::SHORT_TIMING` (3 s
//! lease, 500 ms retry period). Each round, with a and b at 15/15:
//!
//! - **join**: c starts; until every daemon shows 10/10/10 with each election's work running
//!   on its holder's worker only; and how many elections moved (the minimum is 10);
//! - **death**: `kill -9` of c; until a and b settle at 15/15 again; how many moved (the
//!   minimum is 10, c's).
//!
//! ```text
//! cargo bench --all-features --bench balance          # 5 rounds per store
//! BATON_BENCH_RUNS=20 cargo bench --all-features --bench balance
//! ```
//!
//! Without `--bench` in argv (as under `cargo test --all-targets`) it makes 1 round per store.
//! The workers' intervals are checked for overlap at the end of each store's run.

use std::time::Instant;

use testkit::{
    balance::{Group, Holders},
    scenario::Backend,
    summary,
};

fn runs() -> usize {
    let full = std::env::args().any(|a| a == "--bench");
    std::env::var("BATON_BENCH_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if full { 5 } else { 1 })
}

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
    let (took, mut holders) = group.settle(t, "a and b").await;
    println!("{name}: a and b over 30 elections settled in {took:.2?} from the first start");
    let (mut join, mut death) = (Vec::new(), Vec::new());
    let (mut join_moves, mut death_moves) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        group.join("c");
        let (took, joined) = group.settle(t, "join of c").await;
        join.push(took);
        join_moves.push(moves(&holders, &joined));

        let t = Instant::now();
        group.kill_9("c");
        let (took, survived) = group.settle(t, "death of c").await;
        death.push(took);
        death_moves.push(moves(&joined, &survived));
        holders = survived;
    }
    group.check_safety();
    println!("{name} join (2 -> 3 members) to settled: {}", summary(join));
    println!("{name} join: elections moved per join (minimum 10): {join_moves:?}");
    println!(
        "{name} death (kill -9, 3 -> 2) to settled: {}",
        summary(death)
    );
    println!("{name} death: elections moved per death (minimum 10): {death_moves:?}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = runs();
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
