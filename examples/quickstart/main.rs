//! Quickstart: a Kinesis consumer built on kcl-core, end to end.
//!
//! ```text
//! cargo run -p kcl-examples --bin quickstart
//! ```
//!
//! With no arguments it needs no AWS account: it starts kcl-local (an embedded Kinesis
//! and DynamoDB on 127.0.0.1), creates a 4-shard stream, writes 5,000 JSON click events
//! (`--records N`), runs a [`Scheduler`] whose [`ClickCounter`] processors count them per
//! shard and checkpoint after each batch, stops gracefully once every record was
//! processed, and prints a summary. It exits 0 only if every shard processed exactly
//! what was written to it.
//!
//! With `--stream NAME` it consumes a real stream instead (AWS credentials and region
//! from the usual environment, or `--region`), from LATEST (`--trim-horizon` to start at
//! the oldest record), until Ctrl-C. `--produce N` first writes N click events to it.
//!
//! `--fan-out` reads through enhanced fan-out (`SubscribeToShard`, with a stream
//! consumer named after `--application`) instead of polling, in either mode: the
//! processor is the same, only the retrieval configuration changes.
//!
//! Progress goes to stdout; logs go to stderr, filtered by `RUST_LOG` (default
//! `warn,kcl_core=info`, and only errors from the DynamoDB emulator).
//!
//! Files: `main.rs` (this flow), `producer.rs` (the `PutRecords` writer, with
//! partial-failure retry), `processor.rs` (the `ClickCounter` processor and its tally).

mod processor;
mod producer;

use std::future::{self, Future};
use std::pin::pin;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_config::{BehaviorVersion, Region};
use clap::Parser;
use kcl_core::{InitialPositionInStream, RetrievalConfig, Scheduler, SchedulerError};
use kcl_dynamo::DynamoLeaseStore;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
use kcl_local::LocalBackend;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing_subscriber::EnvFilter;

use crate::processor::{ClickCounter, Tally};
use crate::producer::ShardCounts;

/// The stream the local demo creates.
const LOCAL_STREAM: &str = "quickstart-clicks";
/// Shards of the local demo's stream.
const LOCAL_SHARDS: i32 = 4;
/// How often the local demo prints a progress line.
const LOCAL_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the consumer of a real stream prints a progress line: it runs for long.
const AWS_PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Command line. No arguments: the local demo.
#[derive(Debug, Parser)]
#[command(
    about = "A Kinesis consumer with kcl-core: a local end-to-end demo, or a consumer of a real stream",
    after_help = "Without --stream, everything runs in-process on 127.0.0.1 (kcl-local); no AWS account needed."
)]
struct Args {
    /// Local demo: click events to write before consuming them.
    #[arg(long, default_value_t = 5_000, conflicts_with = "stream")]
    records: u64,

    /// Local demo: fail if not every record was processed after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120, conflicts_with = "stream")]
    timeout: u64,

    /// Consume this existing Kinesis stream on AWS (until Ctrl-C) instead of the local demo.
    #[arg(long, value_name = "NAME")]
    stream: Option<String>,

    /// With --stream: the AWS region (default: from the environment or profile).
    #[arg(long, requires = "stream")]
    region: Option<String>,

    /// The application name, which names the DynamoDB lease table; workers with the
    /// same name share the stream's shards.
    #[arg(long, value_name = "NAME", default_value = "quickstart-app")]
    application: String,

    /// With --stream: shards without a checkpoint start at the oldest record, not LATEST.
    #[arg(long, requires = "stream")]
    trim_horizon: bool,

    /// With --stream: write this many click events to the stream before consuming.
    #[arg(long, value_name = "N", requires = "stream")]
    produce: Option<u64>,

    /// Read through enhanced fan-out (SubscribeToShard, with a stream consumer named
    /// after the application, registered when missing) instead of polling GetRecords.
    /// The processor is the same: only the retrieval configuration changes.
    #[arg(long)]
    fan_out: bool,
}

impl Args {
    /// The retrieval: fan-out with `--fan-out`, else `polling`.
    fn retrieval(&self, polling: RetrievalConfig) -> RetrievalMode {
        if self.fan_out {
            RetrievalMode::FanOut(FanOutConfig::new(self.application.clone()))
        } else {
            RetrievalMode::Polling(polling)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // dynoxide logs every 4xx it answers as a warning, including the expected "table not
    // found" of the lease table's first `DescribeTable`.
    let default_filter = || EnvFilter::new("warn,kcl_core=info,dynoxide::server=error");
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter()))
        .with_writer(std::io::stderr)
        .init();
    match args.stream.clone() {
        None => run_local(&args).await,
        Some(stream) => run_on_aws(&args, &stream).await,
    }
}

/// The local demo: starts kcl-local, runs [`local_demo`], and stops kcl-local whatever
/// the outcome.
async fn run_local(args: &Args) -> anyhow::Result<()> {
    let backend = LocalBackend::start().await.context("starting kcl-local")?;
    let outcome = local_demo(&backend, args).await;
    backend.shutdown().await;
    outcome
}

/// Creates the stream, writes the click events, consumes them all, and prints the
/// summary.
///
/// # Errors
/// When kcl-local, the producer or the scheduler fails, when the records are not all
/// processed within `--timeout`, or when a shard processed more or fewer records than
/// were written to it.
async fn local_demo(backend: &LocalBackend, args: &Args) -> anyhow::Result<()> {
    let kinesis = backend.kinesis_client();
    kcl_local::create_stream(&kinesis, LOCAL_STREAM, LOCAL_SHARDS)
        .await
        .with_context(|| format!("creating the stream {LOCAL_STREAM:?}"))?;
    println!(
        "kcl-local: Kinesis on {}, DynamoDB on {}; stream {LOCAL_STREAM:?} with {LOCAL_SHARDS} shards",
        backend.kinesis_endpoint(),
        backend.dynamodb_endpoint()
    );

    let producing = Instant::now();
    let written = producer::put_clicks(&kinesis, LOCAL_STREAM, args.records).await?;
    println!(
        "wrote {} click events in {:.2?}",
        written.values().sum::<u64>(),
        producing.elapsed()
    );

    let consumer = Consumer {
        stream: LOCAL_STREAM,
        application: &args.application,
        kinesis,
        dynamodb: backend.dynamodb_client(),
        initial_position: InitialPositionInStream::TrimHorizon,
        retrieval: args.retrieval(snappy_retrieval()),
    };
    let run = consumer
        .run(
            Some(&written),
            Some(Duration::from_secs(args.timeout)),
            LOCAL_PROGRESS_EVERY,
        )
        .await?;
    print_summary(&run, Some(&written));

    match run.stop {
        Stop::AllProcessed => {}
        Stop::TimedOut => bail!(
            "timed out after {} s: {} of {} records processed",
            args.timeout,
            run.tally.processed(),
            written.values().sum::<u64>()
        ),
        Stop::Interrupted => bail!("interrupted before every record was processed"),
    }
    let mismatched = run.tally.mismatches(&written);
    if !mismatched.is_empty() {
        bail!("processed != written on {}", mismatched.join(", "));
    }
    println!("OK: processed == written on every shard");
    Ok(())
}

/// Polling settings for the local demo: a caught-up shard is polled every 200 ms (the
/// minimum) instead of every 1.5 s, so that the demo is snappy.
#[allow(
    clippy::field_reassign_with_default,
    reason = "RetrievalConfig is #[non_exhaustive]: the struct update clippy suggests does not compile here"
)]
fn snappy_retrieval() -> RetrievalConfig {
    let mut retrieval = RetrievalConfig::default();
    retrieval.idle_time_between_reads = Duration::from_millis(200);
    retrieval
}

/// A consumer of a real stream: AWS configuration from the environment, optionally
/// writes click events first, then consumes until Ctrl-C.
///
/// # Errors
/// When the producer or the scheduler fails (a missing stream, no credentials, ...).
async fn run_on_aws(args: &Args, stream: &str) -> anyhow::Result<()> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &args.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let config = loader.load().await;
    let kinesis = aws_sdk_kinesis::Client::new(&config);

    let written = match args.produce {
        Some(count) => {
            let written = producer::put_clicks(&kinesis, stream, count).await?;
            println!("wrote {} click events to {stream:?}", written.values().sum::<u64>());
            if !args.trim_horizon {
                println!(
                    "note: a new application starts at LATEST, after these events; add --trim-horizon to see them"
                );
            }
            Some(written)
        }
        None => None,
    };

    let consumer = Consumer {
        stream,
        application: &args.application,
        kinesis,
        dynamodb: aws_sdk_dynamodb::Client::new(&config),
        initial_position: if args.trim_horizon {
            InitialPositionInStream::TrimHorizon
        } else {
            InitialPositionInStream::Latest
        },
        // The polling defaults (a caught-up shard is polled every 1.5 s) leave room for
        // other consumers within Kinesis's five reads per shard per second.
        retrieval: args.retrieval(RetrievalConfig::default()),
    };
    println!(
        "consuming {stream:?} as application {:?}; Ctrl-C to stop",
        args.application
    );
    let run = consumer.run(None, None, AWS_PROGRESS_EVERY).await?;
    print_summary(&run, written.as_ref());
    Ok(())
}

/// What a [`Scheduler`] needs to consume one stream as one application.
#[derive(Debug)]
struct Consumer<'a> {
    /// The stream to read.
    stream: &'a str,
    /// Names the lease table.
    application: &'a str,
    /// Reads the stream.
    kinesis: aws_sdk_kinesis::Client,
    /// Holds the lease table.
    dynamodb: aws_sdk_dynamodb::Client,
    /// Where shards without a checkpoint start.
    initial_position: InitialPositionInStream,
    /// Polling or fan-out, and its settings.
    retrieval: RetrievalMode,
}

/// Why [`Consumer::run`] stopped the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Every record written was processed.
    AllProcessed,
    /// The timeout passed first.
    TimedOut,
    /// Ctrl-C.
    Interrupted,
}

/// What [`Consumer::run`] saw.
#[derive(Debug)]
struct Run {
    /// Why it stopped.
    stop: Stop,
    /// The processors' counts after the graceful shutdown.
    tally: Tally,
    /// When the scheduler started running, for the time-to-first-record figure.
    scheduler_started: Instant,
    /// When the stop condition was met (before the graceful shutdown).
    stopped_at: Instant,
}

impl Consumer<'_> {
    /// Runs a scheduler until every record in `expected` was processed (when given),
    /// `timeout` passed (when given), or Ctrl-C, printing a progress line every
    /// `progress_every`; then shuts it down gracefully (each processor checkpoints in
    /// `shutdown_requested`, the leases are released).
    ///
    /// # Errors
    /// When the scheduler cannot be built, or stops on its own with an error (for example
    /// [`SchedulerError::StreamNotFound`]).
    async fn run(
        self,
        expected: Option<&ShardCounts>,
        timeout: Option<Duration>,
        progress_every: Duration,
    ) -> anyhow::Result<Run> {
        // This function keeps `tally_tx`, so the channel stays open while it waits.
        let (tally_tx, tally_rx) = watch::channel(Tally::default());
        let factory_tx = tally_tx.clone();
        let scheduler = Scheduler::builder(self.stream)
            .kinesis_client(self.kinesis)
            .lease_store(DynamoLeaseStore::new(self.dynamodb, self.application))
            .processor_factory(move |shard_id: &str| ClickCounter::new(shard_id, factory_tx.clone()))
            .initial_position(self.initial_position)
            .retrieval_mode(self.retrieval)
            .context("the retrieval configuration")?
            .build()
            .context("building the scheduler")?;
        let shutdown = scheduler.shutdown_handle();
        let scheduler_started = Instant::now();
        let mut scheduler_task: JoinHandle<Result<(), SchedulerError>> = tokio::spawn(scheduler.run());

        let mut wait_rx = tally_rx.clone();
        let mut all_processed = pin!(async move {
            match expected {
                Some(written) => {
                    // Fails only when every sender is gone, and `tally_tx` lives on.
                    let _ = wait_rx.wait_for(|tally| tally.covers(written)).await;
                }
                None => future::pending().await,
            }
        });
        let mut deadline = pin!(or_never(timeout.map(tokio::time::sleep)));
        let mut ctrl_c = pin!(async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                // Without a Ctrl-C handler, the other stop conditions still work.
                tracing::warn!(%error, "cannot listen for Ctrl-C");
                future::pending::<()>().await;
            }
        });
        let mut progress = Progress::new(expected, progress_every);

        let stop = loop {
            tokio::select! {
                () = &mut all_processed => break Stop::AllProcessed,
                () = &mut deadline => break Stop::TimedOut,
                () = &mut ctrl_c => break Stop::Interrupted,
                ended = &mut scheduler_task => {
                    // The scheduler runs until asked to stop: ending on its own is a failure.
                    return Err(match ended {
                        Ok(Ok(())) => anyhow::anyhow!("the scheduler stopped unexpectedly"),
                        Ok(Err(error)) => anyhow::Error::new(error).context("the scheduler failed"),
                        Err(panicked) => anyhow::Error::new(panicked).context("the scheduler task failed"),
                    });
                }
                _ = progress.tick.tick() => progress.print(&tally_rx.borrow()),
            }
        };
        let stopped_at = Instant::now();
        match stop {
            Stop::AllProcessed => println!("all records processed; shutting down"),
            Stop::TimedOut => println!("timed out; shutting down"),
            Stop::Interrupted => println!("Ctrl-C; shutting down"),
        }
        shutdown.shutdown();
        scheduler_task
            .await
            .context("the scheduler task failed")?
            .context("the scheduler failed while shutting down")?;
        drop(tally_tx);
        let tally = tally_rx.borrow().clone();
        Ok(Run {
            stop,
            tally,
            scheduler_started,
            stopped_at,
        })
    }
}

/// The output of `future`, or never when there is none.
async fn or_never<F: Future<Output = ()>>(future: Option<F>) {
    match future {
        Some(future) => future.await,
        None => future::pending().await,
    }
}

/// Prints a progress line per tick: records processed, and the rate since the last line.
#[derive(Debug)]
struct Progress<'a> {
    /// Fires once per progress line.
    tick: tokio::time::Interval,
    /// The records to process, per shard, when known.
    expected: Option<&'a ShardCounts>,
    /// Records processed at the previous line.
    last_processed: u64,
    /// When the previous line was printed.
    last_at: Instant,
}

impl<'a> Progress<'a> {
    /// A first line one `every` from now, then one per `every`.
    fn new(expected: Option<&'a ShardCounts>, every: Duration) -> Self {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Self {
            tick,
            expected,
            last_processed: 0,
            last_at: Instant::now(),
        }
    }

    /// Prints one line for `tally`.
    fn print(&mut self, tally: &Tally) {
        let processed = tally.processed();
        let now = Instant::now();
        let rate = per_second(processed.saturating_sub(self.last_processed), now - self.last_at);
        self.last_processed = processed;
        self.last_at = now;
        let mut line = match self.expected {
            Some(written) => format!("progress: {processed} / {} records", written.values().sum::<u64>()),
            None => format!("progress: {processed} records on {} shards", tally.shards.len()),
        };
        line.push_str(&format!(", {rate:.0} records/s"));
        if tally.bad() > 0 {
            line.push_str(&format!(", {} bad", tally.bad()));
        }
        if let Some(behind) = tally.max_millis_behind_latest() {
            line.push_str(&format!(", {behind} ms behind latest"));
        }
        println!("{line}");
    }
}

/// Prints the per-shard table, the totals and the timings of a [`Run`]. `written` is
/// `None` when this program did not write the stream's records.
fn print_summary(run: &Run, written: Option<&ShardCounts>) {
    let tally = &run.tally;
    let mut shard_ids: Vec<&String> = tally
        .shards
        .keys()
        .chain(written.into_iter().flat_map(|w| w.keys()))
        .collect();
    shard_ids.sort();
    shard_ids.dedup();

    println!();
    println!("{:<24} {:>10} {:>10} {:>6}", "shard", "written", "processed", "bad");
    let written_of = |shard_id: &str| match written {
        Some(written) => written.get(shard_id).copied().unwrap_or(0).to_string(),
        None => "-".to_owned(),
    };
    for shard_id in shard_ids {
        let shard = tally.shards.get(shard_id).cloned().unwrap_or_default();
        println!(
            "{shard_id:<24} {:>10} {:>10} {:>6}",
            written_of(shard_id),
            shard.processed,
            shard.bad
        );
    }
    let total_written = written.map_or_else(|| "-".to_owned(), |w| w.values().sum::<u64>().to_string());
    println!(
        "{:<24} {total_written:>10} {:>10} {:>6}",
        "total",
        tally.processed(),
        tally.bad()
    );
    println!();

    match (tally.first_record_at, tally.last_record_at) {
        (Some(first), Some(last)) => {
            println!(
                "time to first record:  {:.2?} after the scheduler started",
                first - run.scheduler_started
            );
            println!(
                "time to last record:   {:.2?} after the scheduler started",
                last - run.scheduler_started
            );
            println!(
                "records/s:             {:.0} (scheduler start to last record)",
                per_second(tally.processed(), last - run.scheduler_started)
            );
        }
        _ => println!("no records reached a processor"),
    }
    println!(
        "ran for:               {:.2?} until the stop condition",
        run.stopped_at - run.scheduler_started
    );
}

/// `count` per second over `elapsed`; 0 for an empty interval.
fn per_second(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}
