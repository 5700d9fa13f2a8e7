//! `kcl-local`: runs the embedded Kinesis and DynamoDB as a process.
//!
//! `kcl-local serve` prints one line per endpoint (`kinesis http://127.0.0.1:PORT`,
//! `dynamodb http://127.0.0.1:PORT`), then `ready`, on stdout, and serves until Ctrl-C
//! or SIGTERM. Logs go to stderr (`RUST_LOG`, default `info`). `--stream NAME=SHARDS`
//! creates streams first.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kcl_local::{LocalBackend, LocalOptions};

/// An embedded Kinesis and DynamoDB on 127.0.0.1, for development and tests.
#[derive(Debug, Parser)]
#[command(name = "kcl-local", version)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve Kinesis and DynamoDB on 127.0.0.1 until Ctrl-C or SIGTERM.
    ///
    /// Prints `kinesis URL`, `dynamodb URL` and then `ready` on stdout.
    Serve(ServeArgs),
}

/// Options of `kcl-local serve`.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Kinesis port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 4567)]
    kinesis_port: u16,
    /// DynamoDB port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8000)]
    dynamodb_port: u16,
    /// Keep state here across restarts (DynamoDB in a SQLite file, Kinesis in a
    /// write-ahead log). Without it, everything is in memory.
    #[arg(long, value_name = "PATH")]
    data_dir: Option<PathBuf>,
    /// Region reported in ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// How long CreateStream, UpdateShardCount and friends take, in milliseconds.
    #[arg(long, default_value_t = 10)]
    stream_delay_ms: u64,
    /// The most open shards all streams together may have.
    #[arg(long, default_value_t = 1000)]
    shard_limit: u32,
    /// Create a stream before announcing `ready`, as `NAME=SHARDS` (repeatable). A
    /// stream that exists already (with `--data-dir`) is kept as it is.
    #[arg(long = "stream", value_name = "NAME=SHARDS", value_parser = parse_stream)]
    streams: Vec<(String, i32)>,
}

/// Parses `NAME=SHARDS`.
fn parse_stream(s: &str) -> Result<(String, i32), String> {
    let (name, shards) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=SHARDS, got {s:?}"))?;
    let shards: i32 = shards.parse().map_err(|_| format!("{shards:?} is not a shard count"))?;
    if name.is_empty() || shards < 1 {
        return Err(format!("expected a stream name and at least one shard, got {s:?}"));
    }
    Ok((name.to_owned(), shards))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    match Cli::parse().command {
        Command::Serve(args) => serve(args).await,
    }
}

/// Runs `kcl-local serve`.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut options = LocalOptions::default();
    options.kinesis_port = args.kinesis_port;
    options.dynamodb_port = args.dynamodb_port;
    options.data_dir = args.data_dir;
    options.region = args.region;
    options.stream_delay = Duration::from_millis(args.stream_delay_ms);
    options.shard_limit = args.shard_limit;

    // Install the handlers before announcing `ready`, so a signal sent right after it
    // is not lost.
    let stop = stop_signal()?;
    let backend = LocalBackend::start_with(options)
        .await
        .context("cannot start the backend")?;

    let kinesis = backend.kinesis_client();
    for (name, shards) in &args.streams {
        match kcl_local::create_stream(&kinesis, name, *shards).await {
            Ok(()) => tracing::info!(stream = %name, shards, "stream created"),
            Err(kcl_local::LocalError::Kinesis { source, .. })
                if matches!(*source, aws_sdk_kinesis::Error::ResourceInUseException(_)) =>
            {
                tracing::info!(stream = %name, "stream exists already");
            }
            Err(error) => {
                backend.shutdown().await;
                return Err(error).with_context(|| format!("cannot create stream {name:?}"));
            }
        }
    }

    let announced = {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "kinesis {}", backend.kinesis_endpoint())
            .and_then(|()| writeln!(stdout, "dynamodb {}", backend.dynamodb_endpoint()))
            .and_then(|()| writeln!(stdout, "ready"))
            .and_then(|()| stdout.flush())
    };
    if let Err(error) = announced {
        backend.shutdown().await;
        return Err(error).context("cannot write the endpoints to stdout");
    }

    stop.await;
    tracing::info!("stop signal received; shutting down");
    backend.shutdown().await;
    Ok(())
}

/// A future that resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            result = tokio::signal::ctrl_c() => {
                if let Err(error) = result {
                    tracing::warn!(%error, "cannot listen for Ctrl-C; waiting for SIGTERM");
                    sigterm.recv().await;
                }
            }
            _ = sigterm.recv() => {}
        }
        #[cfg(not(unix))]
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C; serving until killed");
            std::future::pending::<()>().await;
        }
    })
}
