//! The `baton` binary: parse the command line, set up logging, and run a subcommand. The daemon
//! itself is [`baton::daemon::run`]; this file only wires signals to its shutdown.

use std::{io::IsTerminal, process::ExitCode, time::Duration};

use anyhow::Context;
use baton::{
    client::{Client, LeaderState, Role, WatchEvent},
    config::{Cli, Command, EXIT_USAGE, LogFormat, RunArgs},
    listen::Listener,
};
use clap::Parser;
use futures::StreamExt;
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        // One object a line, the event's fields at the top level beside timestamp, level,
        // target and message: what log collectors index.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("baton: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => return run(*args).await,
            Command::Watch(args) => watch(&args.addr.addr, &args.election).await,
            Command::Status(args) => status(&args).await,
            Command::Resign(args) => {
                resign(&args.addr.addr, &args.election, args.successor.as_deref()).await
            }
        }
        .map(|()| ExitCode::SUCCESS)
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {}", with_causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and every cause under it (`Error::source`), e.g. "transport error: ...: Permission
/// denied", skipping a cause whose text the line already ends with, and a gRPC status (whose
/// message the client's error already says).
fn with_causes(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) || cause.is::<tonic::Status>() {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// `baton run`: validate, bind, serve until SIGTERM/SIGINT; a second signal exits at once.
async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = match args.validate() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("baton: {e}");
            return Ok(ExitCode::from(EXIT_USAGE as u8));
        }
    };
    // The store's configuration (lock directory, TLS files) is checked before the port is bound.
    let store = match baton::daemon::open_store(&config.store).await {
        Ok(store) => store,
        Err(e) => {
            eprintln!("baton: {e}");
            return Ok(ExitCode::from(if e.is_config() {
                EXIT_USAGE as u8
            } else {
                1
            }));
        }
    };
    // TLS files are read and checked, then the address bound.
    let listener =
        match Listener::bind(&config.listen, config.tls.as_ref(), config.socket_mode).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("baton: {e}");
                return Ok(ExitCode::from(EXIT_USAGE as u8));
            }
        };
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = baton::daemon::run_with_store(config, store, listener, async {
        let _ = stopped.await;
    });
    tokio::pin!(daemon);
    let finish = |result: Result<(), baton::daemon::DaemonError>| match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A taken --metrics-listen or --health-listen port, found before any election starts.
        Err(e) if e.is_config() => {
            eprintln!("baton: {e}");
            Ok(ExitCode::from(EXIT_USAGE as u8))
        }
        Err(e) => Err(anyhow::Error::from(e)),
    };
    tokio::select! {
        result = &mut daemon => return finish(result),
        name = next_signal(&mut terminate, &mut interrupt) => {
            tracing::info!("{name} received");
            let _ = stop.send(());
        }
    }
    // Graceful shutdown has begun; a second signal ends the process at once.
    tokio::select! {
        result = &mut daemon => finish(result),
        _ = next_signal(&mut terminate, &mut interrupt) => {
            eprintln!("baton: second signal: exiting without stepping down");
            std::process::exit(130);
        }
    }
}

/// The next SIGTERM or SIGINT, by name.
async fn next_signal(
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> &'static str {
    tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    }
}

/// One line per state, for people.
fn describe(state: &LeaderState) -> String {
    let role = match state.role {
        Role::Leader => "LEADER",
        Role::Follower => "FOLLOWER",
        Role::Unknown => "UNKNOWN",
    };
    let mut line = format!(
        "{} {role} identity={} leader={} term={}",
        state.election,
        state.identity,
        state.leader.as_deref().unwrap_or("-"),
        state.term
    );
    if let Some(until) = state.valid_until {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        line.push_str(&format!(" valid_for={:.3}s", left.as_secs_f64()));
    }
    if !state.reason.is_empty() {
        line.push_str(&format!(" reason={:?}", state.reason));
    }
    line
}

fn timestamp(state: &LeaderState) -> String {
    state
        .observed_at
        .map(|t| humantime::format_rfc3339_millis(t).to_string())
        .unwrap_or_default()
}

/// `baton watch`: one line per event until interrupted.
async fn watch(addr: &str, election: &str) -> anyhow::Result<()> {
    let client = Client::connect_lazy(addr)?;
    let mut events = Box::pin(client.watch(election));
    while let Some(event) = events.next().await {
        match event {
            WatchEvent::State(state) => println!("{} {}", timestamp(&state), describe(&state)),
            WatchEvent::Disconnected(e) if e.code() == Some(tonic::Code::NotFound) => {
                return Err(e.into());
            }
            WatchEvent::Disconnected(e) => eprintln!("baton: {e}; reconnecting"),
        }
    }
    Ok(())
}

/// `baton status`: every election of the daemon, then exit.
async fn status(addr: &baton::config::AddrArgs) -> anyhow::Result<()> {
    let client = tokio::time::timeout(Duration::from_secs(10), Client::connect(addr.addr.clone()))
        .await
        .context("connecting to the daemon timed out")??;
    let status = client.status().await?;
    for state in &status.elections {
        println!("{}", describe(state));
    }
    if let Some(group) = status.balance {
        println!(
            "balance group={} members={}",
            group.group,
            group.members.len()
        );
        for m in group.members {
            println!(
                "  member {} leads={} share={} eligible={}",
                m.identity, m.leads, m.share, m.eligible
            );
        }
    }
    Ok(())
}

/// `baton resign`.
async fn resign(addr: &str, election: &str, successor: Option<&str>) -> anyhow::Result<()> {
    let client = Client::connect(addr).await?;
    let term = client.resign(election, successor).await?;
    match successor {
        Some(s) => println!("resigned {election} (term {term}) for {s}"),
        None => println!("resigned {election} (term {term})"),
    }
    Ok(())
}
