//! The balancer over the in-memory store: members spread the elections, and a member that
//! leaves hands its share to the others.

use std::{collections::BTreeMap, time::Duration};

use clap::Parser;

use super::*;
use crate::{
    config::{Cli, Command},
    election::ElectionConfig,
    store::memory::MemoryStore,
};

const ELECTIONS: [&str; 9] = ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"];

struct Running {
    balancer: Balancer,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn config(identity: &str) -> Config {
    let elections = ELECTIONS.join(",");
    let argv = [
        "baton",
        "run",
        "--election",
        &elections,
        "--identity",
        identity,
        "--balance",
        "--lease-duration",
        "3s",
        "--renew-deadline",
        "2s",
        "--retry-period",
        "200ms",
    ];
    let Command::Run(args) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!("parsed `run`");
    };
    args.validate().unwrap()
}

fn start(store: &MemoryStore, identity: &str) -> Running {
    let config = config(identity);
    let stop = CancellationToken::new();
    let (handles, tasks) = config
        .elections
        .iter()
        .map(|name| {
            Election::spawn(
                Arc::new(store.clone()),
                ElectionConfig {
                    name: name.clone(),
                    identity: config.identity.clone(),
                    timing: config.timing,
                    drain_timeout: Duration::from_secs(1),
                    campaign: config.campaign,
                    balanced: true,
                },
                stop.child_token(),
            )
        })
        .unzip();
    let group = crate::balance::group_name(ELECTIONS);
    let balancer = Balancer::start(
        Arc::new(store.clone()),
        &config,
        group,
        handles,
        BalanceMetrics::default(),
    );
    Running {
        balancer,
        stop,
        tasks,
    }
}

/// How many elections each identity holds, once every election is held and `done` says so.
async fn settle(
    store: &MemoryStore,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> BTreeMap<String, usize> {
    let mut last = BTreeMap::new();
    for _ in 0..1000 {
        let holders: Vec<Option<String>> = ELECTIONS.iter().map(|e| store.holder(e)).collect();
        last = BTreeMap::new();
        for holder in holders.iter().flatten() {
            *last.entry(holder.clone()).or_default() += 1;
        }
        if holders.iter().all(Option::is_some) && done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("did not settle: {last:?}");
}

#[tokio::test]
async fn members_spread_the_elections_and_a_leaving_one_hands_its_share_over() {
    let store = MemoryStore::new();
    let members: Vec<Running> = ["a", "b", "c"].map(|id| start(&store, id)).into();
    let spread = settle(&store, |held| {
        held.len() == 3 && held.values().all(|n| *n == 3)
    })
    .await;
    assert_eq!(spread.values().sum::<usize>(), 9, "{spread:?}");

    let mut members = members.into_iter();
    let (a, b, c) = (
        members.next().unwrap(),
        members.next().unwrap(),
        members.next().unwrap(),
    );
    let c_held: Vec<&str> = ELECTIONS
        .into_iter()
        .filter(|e| store.holder(e).as_deref() == Some("c"))
        .collect();
    // The daemon's stop: leave the group, then step down.
    c.balancer.leave(Duration::from_secs(5)).await;
    c.stop.cancel();
    futures::future::join_all(c.tasks).await;
    let after = settle(&store, |held| {
        !held.contains_key("c") && held.values().max().unwrap() - held.values().min().unwrap() <= 1
    })
    .await;
    assert_eq!(after.len(), 2, "{after:?}");
    for election in c_held {
        assert!(
            store.holder(election).is_some_and(|h| h != "c"),
            "{election} taken over"
        );
    }
    for member in [a, b] {
        member.stop.cancel();
    }
}
