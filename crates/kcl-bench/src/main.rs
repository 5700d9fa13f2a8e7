//! `kcl-bench`: benchmarks of the Kinesis Client Library against the embedded backend.
//!
//! ```text
//! cargo run --release -p kcl-bench -- <scenario> [options]
//! cargo run -p kcl-bench -- <scenario> --help
//! cargo run -p kcl-bench -- smoke      # every scenario at a tiny size (CI)
//! ```
//!
//! The scenarios of `BENCHMARKS.md` (`drain`, `latency`, `failover`, `cold-start`,
//! `lease-cost`, `backlog-memory`, `scale`, `overhead`, `produce`) run the backend in a process of
//! its own (this program's hidden `serve` command: the `kcl-local serve` servers), so
//! that the CPU time and memory they read from `/proc/self` are the consumer's alone;
//! where it makes sense they measure a reference reader (a bare SDK loop) on the same
//! backend and data and print the ratio. The older scenarios below (`startup`,
//! `throughput`, `memory`) keep the backend in the measuring process.
//!
//! The older scenarios start the embedded Kinesis + DynamoDB (`kcl-local`) in this process,
//! uses a fresh stream and a new lease table (a new application), runs a real
//! [`Scheduler`](kcl_core::Scheduler) with a `DynamoLeaseStore`, shuts it down
//! gracefully, and prints ONE JSON object on stdout:
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
//!   table creation, shard sync, first lease-taking pass, first reads.
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
//! - `throughput`: `--records` (default 100,000) records on 4 shards, written first
//!   (write rate reported), then consumed from `TRIM_HORIZON` by one scheduler whose
//!   processor checkpoints every batch. Reports records/s and the time from `run()` to
//!   the last record, with and without the startup part, and the process's CPU time
//!   per record and resident peak while reading (`read.resources`).
//!   With `--fan-out` the drain runs through fan-out and then through polling, each in
//!   a fresh child process with its own backend and the same records (1 KiB by default,
//!   `--record-size`), and both are printed side by side with their ratios; on the
//!   embedded backend a fan-out drain is paced by its 200 ms event cadence (at most
//!   10,000 records per shard per event).
//! - `memory`: the bounded-prefetch promise. For each prefetch limit × backlog size, a
//!   child process writes a backlog of ~1 KiB records, measures its resident memory as
//!   a baseline, and runs a scheduler with a deliberately slow processor for a fixed
//!   time while sampling RSS every 100 ms. `peak_rss_above_baseline_mib` should follow
//!   `max_prefetch_bytes` and stay flat as the backlog grows;
//!   `peak_library_outstanding_mib` (bytes fetched but not yet processed, counted
//!   exactly) must stay within `bound_mib` (limit + one batch per shard). The emulator
//!   keeps the whole stream in this process, hence the baseline; with
//!   `--kinesis-endpoint`/`--dynamodb-endpoint` the cases use a backend in another
//!   process instead (`kcl-local serve --kinesis-port 0 --dynamodb-port 0`), and RSS is
//!   the consumer's alone.
//! - `all`: every scenario with its defaults, one JSON object each, in the order above,
//!   including `latency --fan-out` (but not `throughput --fan-out`).
//!
//! Defaults are sized so that `all` takes a few minutes in a debug build on 2 cores.
//! For bigger runs use a release build (`cargo run --release -p kcl-bench -- ...`) and,
//! for example, `throughput --records 1000000`, `throughput --fan-out --records 200000`
//! or `memory --records 200000,1000000`.
//!
//! # Modules
//! - `support`: the backend, producer, instrumented Kinesis client (counts what
//!   `GetRecords` returns), the benchmark processor, a stoppable running scheduler,
//!   fan-out selection, statistics, process CPU time and resident memory.
//! - `external`: the backend in its own process (`serve`).
//! - `drain`, `latency`, `failover`, `cold_start`, `lease_cost`, `memory`
//!   (`backlog-memory` and `memory`), `scale`, `overhead`, `produce`, `startup`,
//!   `throughput`: one scenario each.

mod cold_start;
mod drain;
mod external;
mod failover;
mod latency;
mod lease_cost;
mod memory;
mod overhead;
mod produce;
mod scale;
mod startup;
mod support;
mod throughput;

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
    /// Write rate, then read rate, CPU per record and peak RSS of one scheduler
    /// checkpointing every batch (fan-out and polling side by side with --fan-out).
    Throughput(throughput::ThroughputArgs),
    /// Peak resident memory with a large backlog and a slow processor, per prefetch
    /// limit and backlog size (each case in a child process).
    Memory(memory::MemoryArgs),
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
    BacklogMemory(memory::MemoryArgs),
    /// Every scenario at a tiny size, to prove they still run (CI runs this).
    Smoke,
    /// Every scenario with its default options (and latency --fan-out), one JSON object
    /// each.
    All,
    /// One memory case in this process (used by `memory`; prints one JSON line).
    #[command(hide = true)]
    MemoryCase(memory::MemoryCaseArgs),
    /// One throughput drain in this process (used by `throughput --fan-out`; prints one
    /// JSON line).
    #[command(hide = true)]
    ThroughputCase(throughput::ThroughputCaseArgs),
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
        Scenario::MemoryCase(args) => memory::run_case(&args).await,
        Scenario::ThroughputCase(args) => throughput::run_case(&args).await,
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

/// Every scenario with its defaults, in this order (`all`).
const ALL: &[&[&str]] = &[
    &["startup"],
    &["latency"],
    &["latency", "--fan-out"],
    &["throughput"],
    &["memory"],
];

/// Every scenario at a tiny size, to prove they still run (`smoke`, run by CI).
const SMOKE: &[&[&str]] = &[
    &["drain", "--records", "2000"],
    &["latency", "--rate", "50", "--seconds", "1", "--idle-ms", "200"],
    &["latency", "--fan-out", "--records", "5"],
    &["failover", "--failover-ms", "2000", "--rate", "50"],
    &["cold-start", "--iterations", "1"],
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
        Scenario::Throughput(args) => throughput::run(&args).await,
        Scenario::Memory(args) => memory::run(&args).await,
        Scenario::Drain(args) => drain::run(&args).await,
        Scenario::ColdStart(args) => cold_start::run(&args).await,
        Scenario::LeaseCost(args) => lease_cost::run(&args).await,
        Scenario::Failover(args) => failover::run(&args).await,
        Scenario::Overhead(args) => overhead::run(&args).await,
        Scenario::Scale(args) => scale::run(&args).await,
        Scenario::BacklogMemory(args) => memory::run_backlog_memory(&args).await,
        Scenario::Produce(args) => produce::run(&args).await,
        other => anyhow::bail!("{other:?} is not a measuring scenario"),
    }
}

/// Prints one scenario's JSON object on one line of stdout.
fn print(value: Value) {
    println!("{value}");
}
