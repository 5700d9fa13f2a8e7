//! The `throughput` scenario: a backlog written first (the write rate is reported
//! too), then read from `TRIM_HORIZON` by one scheduler whose processor checkpoints
//! after every batch. The CPU time the process used while reading (`/proc/self/stat`,
//! consumer and embedded backend together) and its resident peak (`VmHWM`, reset when
//! reading starts) are reported with the read rate.
//!
//! The emulator reports `MillisBehindLatest` as 0, so the library paces a shard at
//! `backlog_time_between_reads` only while `GetRecords` returns full batches
//! (`max_records`); the last, partial batch of each shard is followed by the idle time.
//! The time to the last record therefore depends on `max_records` and the shard count
//! as much as on raw speed: compare runs with the same settings.
//!
//! With `--fan-out` the same drain runs twice, each time in a fresh child process (this
//! program's hidden `throughput-case` command, so that CPU time and resident memory are
//! each mode's own) with its own embedded backend and a stream holding the same records
//! (of 1 KiB by default): first through enhanced
//! fan-out (a stream consumer registered at start, shards read with `SubscribeToShard`),
//! then through polling, and both results are printed side by side in one JSON object.
//! On the embedded backend (ferrokinesis 0.7) a consumer becomes `ACTIVE` after a fixed
//! 500 ms, and a subscription's first event carries up to 10,000 records of backlog,
//! then one event follows every 200 ms: that cadence, not the library, bounds a
//! fan-out drain there (at most 10,000 records per shard per 200 ms).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Args, ValueEnum};
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use kcl_efo::FanOutConfig;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{
    fan_out, ms, round1, round3, run_case_in_child, unique, write_backlog, Bench, Counters, ProcessorOptions,
    Resources, Running,
};

/// Payload bytes per record without `--fan-out`.
const DEFAULT_RECORD_SIZE: usize = 100;

/// Payload bytes per record with `--fan-out`.
const DEFAULT_FAN_OUT_RECORD_SIZE: usize = 1024;

/// Options of the `throughput` scenario.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct ThroughputArgs {
    /// Records written, then consumed. Try 1000000 with a release build.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) records: usize,
    /// Shards of the stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
    /// Payload bytes per record [default: 100, or 1024 with --fan-out].
    #[arg(long)]
    pub(crate) record_size: Option<usize>,
    /// `RetrievalConfig::max_records` (records per `GetRecords`, 1 to 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) max_records: i32,
    /// Give up if the records are not all processed within this many seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// Drain through enhanced fan-out (SubscribeToShard), then the same data through
    /// polling on a fresh backend and stream, and print both side by side.
    #[arg(long)]
    pub(crate) fan_out: bool,
}

impl ThroughputArgs {
    fn record_size(&self) -> usize {
        self.record_size.unwrap_or(if self.fan_out {
            DEFAULT_FAN_OUT_RECORD_SIZE
        } else {
            DEFAULT_RECORD_SIZE
        })
    }

    fn retrieval(&self) -> RetrievalConfig {
        RetrievalConfig {
            max_records: self.max_records,
            ..RetrievalConfig::default()
        }
    }
}

/// How one drain reads the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
pub(crate) enum Mode {
    /// `GetRecords` polling.
    Polling,
    /// Enhanced fan-out (`SubscribeToShard`).
    FanOut,
}

/// Options of the hidden `throughput-case` command: one drain, run in this process
/// (used by `throughput --fan-out`, one child process per retrieval mode).
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct ThroughputCaseArgs {
    /// How the shards are read.
    #[arg(long, value_enum)]
    pub(crate) mode: Mode,
    /// The drain's settings.
    #[command(flatten)]
    pub(crate) throughput: ThroughputArgs,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Polling => "polling",
            Mode::FanOut => "fan-out",
        }
    }
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &ThroughputArgs) -> anyhow::Result<Value> {
    if args.fan_out {
        return run_fan_out(args).await;
    }
    let retrieval = args.retrieval();
    let results = drain(args, Mode::Polling).await?;
    Ok(json!({
        "scenario": "throughput",
        "config": {
            "records": args.records,
            "shards": args.shards,
            "record_size_bytes": args.record_size(),
            "max_records": retrieval.max_records,
            "backlog_time_between_reads_ms": ms(retrieval.backlog_time_between_reads),
            "idle_time_between_reads_ms": ms(retrieval.idle_time_between_reads),
            "max_pending_batches": retrieval.max_pending_batches,
            "checkpoint": "after every batch",
            "initial_position": "TRIM_HORIZON",
        },
        "results": results,
        "note": "Read times are from Scheduler::run() to process_records being entered with the last record \
                 (startup included; records_per_sec_after_first_record excludes it). The embedded backend runs in \
                 this process and shares its 2 cores with the consumer; in a debug build our crates are \
                 unoptimized. records_processed above records means duplicates. read.resources: CPU time of the \
                 whole process (consumer and embedded backend) from run() to the last record, from \
                 /proc/self/stat in 10 ms ticks (USER_HZ 100 assumed), and VmHWM reset at run().",
    }))
}

/// Runs one drain in this process and prints its JSON (one line) on stdout.
pub(crate) async fn run_case(args: &ThroughputCaseArgs) -> anyhow::Result<()> {
    let result = drain(&args.throughput, args.mode).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
    stdout.flush()?;
    Ok(())
}

/// Runs one drain in a child process (this program's hidden `throughput-case` command),
/// so that neither its CPU time nor its resident memory is mixed with the other mode's,
/// and returns its JSON.
async fn drain_in_child(args: &ThroughputArgs, mode: Mode) -> anyhow::Result<Value> {
    let mode_name = mode
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .context("mode name")?;
    let child_args: Vec<String> = vec![
        "throughput-case".into(),
        format!("--mode={mode_name}"),
        format!("--records={}", args.records),
        format!("--shards={}", args.shards),
        format!("--record-size={}", args.record_size()),
        format!("--max-records={}", args.max_records),
        format!("--timeout-secs={}", args.timeout_secs),
    ];
    run_case_in_child(child_args, format!("the {} throughput case", mode.name())).await
}

/// `throughput --fan-out`: fan-out, then polling, each in a fresh child process with its
/// own backend and stream.
async fn run_fan_out(args: &ThroughputArgs) -> anyhow::Result<Value> {
    let retrieval = args.retrieval();
    let fan_out_config = FanOutConfig::default();
    let fan_out = drain_in_child(args, Mode::FanOut).await?;
    let polling = drain_in_child(args, Mode::Polling).await?;
    let ratio = |path: &[&str]| {
        let get = |v: &Value| path.iter().try_fold(v, |v, k| v.get(k)).and_then(Value::as_f64);
        match (get(&fan_out), get(&polling)) {
            (Some(a), Some(b)) if b > 0.0 => round3(a / b),
            _ => f64::NAN,
        }
    };
    let comparison = json!({
        "records_per_sec": ratio(&["read", "records_per_sec"]),
        "records_per_sec_after_first_record": ratio(&["read", "records_per_sec_after_first_record"]),
        "cpu_us_per_record": ratio(&["read", "resources", "cpu_us_per_record"]),
        "peak_rss_above_start_mib": ratio(&["read", "resources", "peak_rss_above_start_mib"]),
    });
    Ok(json!({
        "scenario": "throughput",
        "config": {
            "retrieval": "fan-out, then polling; each in a fresh child process with its own embedded backend \
                          and a stream of the same records",
            "records": args.records,
            "shards": args.shards,
            "record_size_bytes": args.record_size(),
            "checkpoint": "after every batch",
            "initial_position": "TRIM_HORIZON",
            "workers": 1,
            "fan_out": {
                "max_pending_batches": fan_out_config.max_pending_batches,
                "max_prefetch_records": fan_out_config.max_prefetch_records,
                "max_prefetch_bytes": fan_out_config.max_prefetch_bytes,
            },
            "polling": {
                "max_records": retrieval.max_records,
                "backlog_time_between_reads_ms": ms(retrieval.backlog_time_between_reads),
                "idle_time_between_reads_ms": ms(retrieval.idle_time_between_reads),
                "max_pending_batches": retrieval.max_pending_batches,
                "max_prefetch_records": retrieval.max_prefetch_records,
                "max_prefetch_bytes": retrieval.max_prefetch_bytes,
            },
        },
        "results": {
            "fan_out": fan_out,
            "polling": polling,
            "fan_out_over_polling": comparison,
        },
        "note": "Read times are from Scheduler::run() to process_records being entered with the last record \
                 (startup included, for fan-out also the consumer registration; records_per_sec_after_first_record \
                 excludes it). read.resources: CPU time of the whole process (consumer AND the embedded backend, \
                 which serves the reads in this process) from run() to the last record, from /proc/self/stat in \
                 10 ms ticks (USER_HZ 100 assumed), and the resident peak (VmHWM, reset at run(); the backend holds \
                 the whole stream in this process, so compare peak_rss_above_start_mib; it includes the backend's \
                 buffers, such as the events it encodes). Each mode runs in its own child process, so neither \
                 sees the other's CPU time or allocator state. The embedded backend \
                 (ferrokinesis 0.7) makes a stream consumer ACTIVE after a fixed 500 ms, sends a subscription's \
                 backlog (up to 10,000 records) in its first event and then one event every 200 ms, so a fan-out \
                 drain there is paced at <= 10,000 records per shard per 200 ms by the backend; it ignores \
                 AT_/AFTER_SEQUENCE_NUMBER positions (always starts at the shard's first record) but honours \
                 TRIM_HORIZON and LATEST. Polling is paced by backlog_time_between_reads while batches are full \
                 (the emulator reports MillisBehindLatest 0). fan_out_over_polling divides fan-out by polling. \
                 records_processed above records means duplicates. In a debug build our crates are unoptimized.",
    }))
}

/// Writes the backlog on a fresh backend and stream, drains it in `mode`, and returns
/// `{"write": ..., "read": ...}`.
async fn drain(args: &ThroughputArgs, mode: Mode) -> anyhow::Result<Value> {
    let record_size = args.record_size();
    let bench = Bench::start().await?;
    let stream = bench.new_stream(args.shards).await?;
    eprintln!(
        "throughput ({}): writing {} records of {} bytes",
        mode.name(),
        args.records,
        record_size
    );
    let write = write_backlog(&bench.kinesis, &stream, args.records, record_size).await?;

    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut builder = bench.scheduler(
        &stream,
        &counters,
        ProcessorOptions::reporting(tx),
        InitialPositionInStream::TrimHorizon,
        args.retrieval(),
    );
    if mode == Mode::FanOut {
        builder = fan_out(builder, FanOutConfig::new(unique("bench-efo")))?;
    }
    eprintln!("throughput ({}): consuming", mode.name());
    let resources = Resources::start()?;
    let running = Running::start(builder)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut processed = 0usize;
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    let mut first: Option<Instant> = None;
    let mut last = running.started;
    while processed < args.records {
        let Ok(Some(delivered)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            let _ = running.stop().await;
            bail!(
                "{}: only {processed} of {} records processed in time",
                mode.name(),
                args.records
            );
        };
        first.get_or_insert(delivered.at);
        last = delivered.at;
        processed += delivered.records;
        *per_shard.entry(delivered.shard_id).or_default() += delivered.records;
    }
    let resources = resources.finish(processed)?;
    let total = last.duration_since(running.started);
    let first_at = first.map_or(Duration::ZERO, |f| f.duration_since(running.started));
    let shutdown = running.stop().await?;
    bench.shutdown().await;

    let seconds = total.as_secs_f64();
    let after_first = (total - first_at).as_secs_f64();
    eprintln!(
        "throughput ({}): {:.0} records/s",
        mode.name(),
        processed as f64 / seconds
    );
    Ok(json!({
        "write": write,
        "read": {
            "records_processed": processed,
            "per_shard": per_shard,
            "first_record_ms": ms(first_at),
            "last_record_ms": ms(total),
            "records_per_sec": round1(processed as f64 / seconds),
            "records_per_sec_after_first_record": if after_first > 0.0 { round1(processed as f64 / after_first) } else { f64::NAN },
            "graceful_shutdown_ms": ms(shutdown),
            "resources": resources,
            "library": counters.to_json(),
        },
    }))
}
