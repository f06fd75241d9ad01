//! The timer route of Apache Camel's `master` example, as a Baton worker: on the leader only,
//! every `--period` it logs `Clustered route (timer) <uuid> ...`; followers log nothing of it.
//!
//! ```text
//! cargo run --example timer_worker -- --daemon http://127.0.0.1:50051 --election default
//! ```
//!
//! Each line also carries the term and `mono=<CLOCK_MONOTONIC ns>`, one clock for every process
//! on the host, so that tests can order one worker's last tick before another's first.
//!
//! `--election a,b,c` follows several elections in one process, each with a worker of its own;
//! then every line also names its election (`election=a`). `--unready b` keeps that election's
//! worker not ready (a `--campaign when-ready` daemon does not campaign for it).
//!
//! SIGTERM or SIGINT stop it for good: a running term ends (`stopped term=T ending=hand-over`),
//! the stop is confirmed to the daemon, and it exits 0 (in a container it is PID 1, which the
//! kernel would not let SIGTERM end without a handler). `ending=abrupt` marks a stop where the
//! leadership may already be elsewhere (stream to the daemon lost, validity ran out).

use std::time::Duration;

use baton::client::{Client, Ending, Lease};
use futures::future::join_all;
use nix::time::{ClockId, clock_gettime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// CLOCK_MONOTONIC in nanoseconds.
fn mono() -> i128 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or_default()
}

struct Args {
    daemon: String,
    /// One or more elections, each followed by a worker of its own.
    elections: Vec<String>,
    /// Elections whose worker declares itself not ready.
    unready: Vec<String>,
    period: Duration,
}

/// The names of a comma-separated list, none empty.
fn names(flag: &str, value: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = value.split(',').map(str::to_owned).collect();
    if names.iter().any(String::is_empty) {
        return Err(format!("{flag} {value:?}: an empty election name"));
    }
    Ok(names)
}

fn parse_args() -> Result<Args, String> {
    let election = std::env::var("BATON_ELECTION").unwrap_or_else(|_| "default".into());
    let mut args = Args {
        daemon: std::env::var("BATON_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into()),
        elections: names("BATON_ELECTION", &election)?,
        unready: Vec::new(),
        period: Duration::from_secs(1),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--daemon" => args.daemon = value,
            "--election" => args.elections = names("--election", &value)?,
            "--unready" => args.unready = names("--unready", &value)?,
            "--period" => {
                args.period = humantime::parse_duration(&value)
                    .map_err(|e| format!("--period {value:?}: {e}"))?
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; expected --daemon, --election, --unready, --period"
                ));
            }
        }
    }
    if let Some(stray) = args.unready.iter().find(|e| !args.elections.contains(e)) {
        return Err(format!("--unready {stray:?}: not one of --election"));
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("timer_worker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let client = match Client::connect_lazy(args.daemon.clone()) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("timer_worker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let stop = CancellationToken::new();
    let shutdown = match baton::client::terminated() {
        Ok(signal) => {
            let stop = stop.clone();
            async move {
                eprintln!("timer_worker: {}: stopping", signal.await);
                stop.cancel();
            }
        }
        Err(e) => {
            eprintln!("timer_worker: cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::spawn(shutdown);
    // One election keeps the lines as they were; several name theirs.
    let several = args.elections.len() > 1;
    let workers = args.elections.iter().map(|election| {
        let tag = if several {
            format!(" election={election}")
        } else {
            String::new()
        };
        let (ready, ready_rx) = watch::channel(!args.unready.contains(election));
        let work = work(tag, args.period);
        let worker = client
            .worker(election)
            .ready_when(ready_rx)
            .until(stop.clone().cancelled_owned());
        async move {
            // The readiness never changes; its sender lives as long as the worker.
            let outcome = worker.run(work).await;
            drop(ready);
            outcome
        }
    });
    let mut code = std::process::ExitCode::SUCCESS;
    for outcome in join_all(workers).await {
        if let Err(e) = outcome {
            eprintln!("timer_worker: {e}");
            code = std::process::ExitCode::FAILURE;
        }
    }
    code
}

/// The work of one election: a tick every `period` while it leads; `tag` is appended to the
/// term of every line.
fn work(
    tag: String,
    period: Duration,
) -> impl FnMut(Lease) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send {
    move |lease: Lease| {
        let tag = tag.clone();
        Box::pin(async move {
            println!("started term={}{tag} mono={}", lease.term(), mono());
            let mut ticks = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = lease.cancelled() => break,
                    _ = ticks.tick() => println!(
                        "Clustered route (timer) {} term={}{tag} mono={}",
                        uuid::Uuid::new_v4(),
                        lease.term(),
                        mono()
                    ),
                }
            }
            let ending = lease.ending().unwrap_or(Ending::Abrupt);
            println!(
                "stopped term={}{tag} ending={ending} mono={}",
                lease.term(),
                mono()
            );
        })
    }
}
