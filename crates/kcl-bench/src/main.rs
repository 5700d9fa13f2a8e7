//! `kcl-bench`: benchmarks of the Kinesis Client Library against the embedded backend.
//!
//! ```text
//! cargo run --release -p kcl-bench -- <scenario> [options]
//! cargo run -p kcl-bench -- <scenario> --help
//! cargo run -p kcl-bench -- smoke      # every scenario at a tiny size (CI)
//! ```
//!
//! The scenarios of `BENCHMARKS.md` (`drain`, `latency`, `failover`, `cold-start`,
//! `lease-cost`, `backlog-memory`, `scale`, `overhead`, `produce`) are explained there,
//! with their results. Those that read CPU time or memory from `/proc/self` run the
//! backend in a process of its own (this program's hidden `serve` command: the
//! `kcl-local serve` servers), so that what they read is the consumer's alone; where it
//! makes sense they measure a reference reader (a bare SDK loop) on the same backend and
//! data and print the ratio.
//!
//! `startup` and `latency` start the embedded Kinesis + DynamoDB (`kcl-local`) in this
//! process, use a fresh stream and a new lease table (a new application), run a real
//! [`Scheduler`](kcl_core::Scheduler) with a `DynamoLeaseStore`, shut it down
//! gracefully, and print ONE JSON object on stdout:
//! `{"scenario": ..., "config": {...}, "results": {...}, "note": "..."}`. Progress
//! goes to stderr; `RUST_LOG=info` shows the library's logs there too. Nothing is
//! asserted on timings: the numbers are for people (and notes) to compare.
//!
//! # Scenarios and how to read them
//!
//! - `startup`: a 4-shard stream with a few records on every shard, a new application
//!   at `TRIM_HORIZON`. Measures, from `run()` being called, the time to the first
//!   record reaching a processor and to every shard's first record; repeated
//!   `--iterations` times with a fresh stream and table each, reported as
//!   min/median(p50)/max. This is what a first deployment pays: stream check, lease
//!   table creation, shard sync, first lease-taking pass, first reads. (`cold-start`
//!   times a worker process from its spawn to its first record, of any shard; this one
//!   times `run()` to every shard's first record, and the graceful shutdown after.)
//! - `latency`: an idle single shard (the warm-up records are consumed first), then
//!   single records written at jittered intervals (300-700 ms), for each
//!   `--idle-ms` value (default 1500, the library's default, and 200, its minimum).
//!   `latency_ms` is from the acknowledged `PutRecord` to `process_records`. The claim
//!   to check: a record reaches the processor within about one idle time, so
//!   `max ≈ idle + one call` (`max_over_idle_time` ≈ 1) and `mean ≈ idle / 2`.
//!   `mean_get_records_interval_ms` shows the actual poll cadence.
//! - `latency --fan-out`: the same through enhanced fan-out (`SubscribeToShard`;
//!   `--idle-ms` does not apply), with p50/p90/p99/max, and next to it a reference
//!   measured on the same stream with the same producer pattern: a bare
//!   `SubscribeToShard` reader (its own stream consumer, `LATEST`, no leases, no
//!   checkpoints) stamping each record when its event arrives, and the ratio
//!   ours/reference of p50 and p99. The embedded backend (ferrokinesis 0.7) sends one
//!   event every 200 ms after a subscription's first (backlog) event, so both sides
//!   are bounded below by that cadence; it makes a consumer `ACTIVE` after a fixed
//!   500 ms, ignores `AT_`/`AFTER_SEQUENCE_NUMBER` positions (always starts at the
//!   shard's first record) and honours `TRIM_HORIZON` and `LATEST`.
//! - `drain`, `backlog-memory`, `cold-start` and the other scenarios of `BENCHMARKS.md`:
//!   explained there, with their results.
//! - `all`: `startup`, `latency`, `latency --fan-out`, `drain` and `backlog-memory`, each
//!   with its defaults, one JSON object each, in this order.
//!
//! Use a release build for real numbers (`cargo run --release -p kcl-bench -- ...`), and
//! for bigger runs, for example, `drain --records 1000000` or
//! `backlog-memory --records 200000,1000000`.
//!
//! # Modules
//! - `support`: the backend, producer, instrumented Kinesis client (counts what
//!   `GetRecords` returns), the benchmark processor, a stoppable running scheduler,
//!   fan-out selection, statistics, process CPU time and resident memory.
//! - `external`: the backend in its own process (`serve`).
//! - `drain`, `latency`, `failover`, `cold_start`, `lease_cost`, `backlog_memory`, `scale`,
//!   `overhead`, `produce`, `startup`: one scenario each.

mod backlog_memory;
mod cold_start;
mod drain;
mod external;
mod failover;
mod latency;
mod lease_cost;
mod overhead;
mod produce;
mod scale;
mod startup;
mod support;

use clap::{Parser, Subcommand};
use serde_json::Value;

/// Benchmarks of the Kinesis Client Library on the embedded backend. Each scenario
/// prints one JSON object on stdout; progress goes to stderr (RUST_LOG for more).
#[derive(Parser, Debug)]
#[command(name = "kcl-bench", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Time from run() to the first record, and to every shard's first record, for a
    /// new application on a 4-shard stream (min/median/max over iterations).
    Startup(startup::StartupArgs),
    /// PutRecord-ack to processor latency on an idle shard, per idle_time_between_reads
    /// (or through fan-out, next to a bare SubscribeToShard reader, with --fan-out).
    Latency(latency::LatencyArgs),
    /// A backlog read by one worker (polling at idle 200 ms and default, fan-out) next
    /// to a bare SDK reference reader: records/s, CPU per record, peak RSS; the backend
    /// in its own process, each case in a fresh child process.
    Drain(drain::DrainArgs),
    /// Process start to first record: new lease table, existing one with the same and
    /// with another worker id.
    ColdStart(cold_start::ColdStartArgs),
    /// DynamoDB requests per minute by operation in steady state, per fleet of workers
    /// and shards.
    LeaseCost(lease_cost::LeaseCostArgs),
    /// Two worker processes on 8 shards: balance, crash takeover, graceful handoff,
    /// lost records and duplicates.
    Failover(failover::FailoverArgs),
    /// The framework alone (synthetic records, in-memory leases): ns per record of
    /// dispatch and checkpoint bookkeeping.
    Overhead(overhead::OverheadArgs),
    /// 1,000 shards in one worker (CPU share, RSS), and a fleet of 20 workers on 10,000
    /// leases (time to balanced, lease-table requests per minute).
    Scale(scale::ScaleArgs),
    /// Records/s and CPU per record of kcl-producer (without and with aggregation) next
    /// to a bare PutRecords loop, 1 KiB records, the backend in its own process.
    Produce(produce::ProduceArgs),
    /// A slow processor on a large backlog, the backend in its own process: peak RSS
    /// per prefetch limit and backlog size (each case in a child process).
    BacklogMemory(backlog_memory::MemoryArgs),
    /// Every scenario at a tiny size, to prove they still run (CI runs this).
    Smoke,
    /// startup, latency, latency --fan-out, drain and backlog-memory with their default
    /// options, one JSON object each.
    All,
    /// One memory case in this process (used by `backlog-memory`; prints one JSON line).
    #[command(hide = true)]
    MemoryCase(backlog_memory::MemoryCaseArgs),
    /// The worker process of `scale`.
    #[command(hide = true)]
    ScaleWorker(scale::ScaleWorkerArgs),
    /// A worker process of `failover`.
    #[command(hide = true)]
    FailoverWorker(failover::FailoverWorkerArgs),
    /// One cold-start worker (used by `cold-start`).
    #[command(hide = true)]
    ColdStartCase(cold_start::ColdStartCaseArgs),
    /// One drain case in this process (used by `drain`; prints one JSON line).
    #[command(hide = true)]
    DrainCase(drain::DrainCaseArgs),
    /// The embedded backend in this process until stdin closes (used by scenarios that
    /// keep the backend out of the measured process).
    #[command(hide = true)]
    Serve(external::ServeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,dynoxide=error")),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    match cli.scenario {
        Scenario::All => run_list(ALL).await,
        Scenario::Smoke => run_list(SMOKE).await,
        Scenario::MemoryCase(args) => backlog_memory::run_case(&args).await,
        Scenario::DrainCase(args) => drain::run_case(&args).await,
        Scenario::ColdStartCase(args) => cold_start::run_case(&args).await,
        Scenario::FailoverWorker(args) => failover::worker(&args).await,
        Scenario::ScaleWorker(args) => scale::worker(&args).await,
        Scenario::Serve(args) => external::serve(&args).await,
        scenario => {
            print(measure(scenario).await?);
            Ok(())
        }
    }
}

/// The scenarios of `all`, with their defaults, in this order.
const ALL: &[&[&str]] = &[
    &["startup"],
    &["latency"],
    &["latency", "--fan-out"],
    &["drain"],
    &["backlog-memory"],
];

/// Every scenario at a tiny size, to prove they still run (`smoke`, run by CI).
const SMOKE: &[&[&str]] = &[
    &["drain", "--records", "2000"],
    &["latency", "--rate", "50", "--seconds", "1", "--idle-ms", "200"],
    &["latency", "--fan-out", "--records", "5"],
    &["failover", "--failover-ms", "2000", "--rate", "50"],
    &["cold-start", "--iterations", "1"],
    &["startup", "--iterations", "1"],
    &["lease-cost", "--fleets", "2x4", "--seconds", "3"],
    &[
        "backlog-memory",
        "--records",
        "2000",
        "--prefetch-kib",
        "256",
        "--duration-secs",
        "1",
    ],
    &[
        "scale",
        "--shards",
        "20",
        "--fleet-workers",
        "2",
        "--fleet-leases",
        "20",
        "--seconds",
        "2",
    ],
    &["overhead", "--records", "20000"],
    &["produce", "--records", "2000"],
];

/// Runs each scenario of `list` as if given on the command line, printing each one's
/// JSON object.
async fn run_list(list: &[&[&str]]) -> anyhow::Result<()> {
    for args in list {
        eprintln!("== {}", args.join(" "));
        let cli = Cli::try_parse_from(std::iter::once("kcl-bench").chain(args.iter().copied()))?;
        print(measure(cli.scenario).await?);
    }
    Ok(())
}

/// Runs one measuring scenario and returns its JSON object.
async fn measure(scenario: Scenario) -> anyhow::Result<Value> {
    match scenario {
        Scenario::Startup(args) => startup::run(&args).await,
        Scenario::Latency(args) => latency::run(&args).await,
        Scenario::Drain(args) => drain::run(&args).await,
        Scenario::ColdStart(args) => cold_start::run(&args).await,
        Scenario::LeaseCost(args) => lease_cost::run(&args).await,
        Scenario::Failover(args) => failover::run(&args).await,
        Scenario::Overhead(args) => overhead::run(&args).await,
        Scenario::Scale(args) => scale::run(&args).await,
        Scenario::BacklogMemory(args) => backlog_memory::run(&args).await,
        Scenario::Produce(args) => produce::run(&args).await,
        other => anyhow::bail!("{other:?} is not a measuring scenario"),
    }
}

/// Prints one scenario's JSON object on one line of stdout.
fn print(value: Value) {
    println!("{value}");
}
