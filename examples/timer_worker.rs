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
//! SIGTERM or SIGINT stop it for good: a running term ends (`stopped term=T ending=hand-over`),
//! the stop is confirmed to the daemon, and it exits 0 (in a container it is PID 1, which the
//! kernel would not let SIGTERM end without a handler). `ending=abrupt` marks a stop where the
//! leadership may already be elsewhere (stream to the daemon lost, validity ran out).

use std::time::Duration;

use baton::client::{Client, Ending, Lease};
use nix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC in nanoseconds.
fn mono() -> i128 {
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as i128 * 1_000_000_000 + t.tv_nsec() as i128)
        .unwrap_or_default()
}

struct Args {
    daemon: String,
    election: String,
    period: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        daemon: std::env::var("BATON_ADDR").unwrap_or_else(|_| "http://127.0.0.1:50051".into()),
        election: std::env::var("BATON_ELECTION").unwrap_or_else(|_| "default".into()),
        period: Duration::from_secs(1),
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--daemon" => args.daemon = value,
            "--election" => args.election = value,
            "--period" => {
                args.period = humantime::parse_duration(&value)
                    .map_err(|e| format!("--period {value:?}: {e}"))?
            }
            other => {
                return Err(format!(
                    "unknown flag {other}; expected --daemon, --election, --period"
                ));
            }
        }
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
    let period = args.period;
    let shutdown = match baton::client::terminated() {
        Ok(signal) => {
            async move {
                eprintln!("timer_worker: {}: stopping", signal.await);
            }
        }
        Err(e) => {
            eprintln!("timer_worker: cannot install signal handlers: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let work = |lease: Lease| async move {
        println!("started term={} mono={}", lease.term(), mono());
        let mut ticks = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = lease.cancelled() => break,
                _ = ticks.tick() => println!(
                    "Clustered route (timer) {} term={} mono={}",
                    uuid::Uuid::new_v4(),
                    lease.term(),
                    mono()
                ),
            }
        }
        let ending = lease.ending().unwrap_or(Ending::Abrupt);
        println!(
            "stopped term={} ending={ending} mono={}",
            lease.term(),
            mono()
        );
    };
    let outcome = client
        .worker(&args.election)
        .until(shutdown)
        .run(work)
        .await;
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("timer_worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
