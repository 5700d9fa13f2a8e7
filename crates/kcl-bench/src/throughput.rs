//! The `throughput` scenario: a backlog written first (the write rate is reported
//! too), then read from `TRIM_HORIZON` by one scheduler whose processor checkpoints
//! after every batch.
//!
//! The emulator reports `MillisBehindLatest` as 0, so the library paces a shard at
//! `backlog_time_between_reads` only while `GetRecords` returns full batches
//! (`max_records`); the last, partial batch of each shard is followed by the idle time.
//! The time to the last record therefore depends on `max_records` and the shard count
//! as much as on raw speed: compare runs with the same settings.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{ms, round1, write_backlog, Bench, Counters, ProcessorOptions, Running};

/// Options of the `throughput` scenario.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct ThroughputArgs {
    /// Records written, then consumed. Try 1000000 with a release build.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) records: usize,
    /// Shards of the stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 100)]
    pub(crate) record_size: usize,
    /// `RetrievalConfig::max_records` (records per `GetRecords`, 1 to 10,000).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) max_records: i32,
    /// Give up if the records are not all processed within this many seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &ThroughputArgs) -> anyhow::Result<Value> {
    let bench = Bench::start().await?;
    let stream = bench.new_stream(args.shards).await?;
    eprintln!(
        "throughput: writing {} records of {} bytes",
        args.records, args.record_size
    );
    let write = write_backlog(&bench.kinesis, &stream, args.records, args.record_size).await?;

    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let retrieval = RetrievalConfig {
        max_records: args.max_records,
        ..RetrievalConfig::default()
    };
    let builder = bench.scheduler(
        &stream,
        &counters,
        ProcessorOptions::reporting(tx),
        InitialPositionInStream::TrimHorizon,
        retrieval.clone(),
    );
    eprintln!("throughput: consuming");
    let running = Running::start(builder)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut processed = 0usize;
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    let mut first: Option<Instant> = None;
    let mut last = running.started;
    while processed < args.records {
        let Ok(Some(delivered)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            let _ = running.stop().await;
            bail!("only {processed} of {} records processed in time", args.records);
        };
        first.get_or_insert(delivered.at);
        last = delivered.at;
        processed += delivered.records;
        *per_shard.entry(delivered.shard_id).or_default() += delivered.records;
    }
    let total = last.duration_since(running.started);
    let first_at = first.map_or(Duration::ZERO, |f| f.duration_since(running.started));
    let shutdown = running.stop().await?;
    bench.shutdown().await;

    let seconds = total.as_secs_f64();
    let after_first = (total - first_at).as_secs_f64();
    Ok(json!({
        "scenario": "throughput",
        "config": {
            "records": args.records,
            "shards": args.shards,
            "record_size_bytes": args.record_size,
            "max_records": retrieval.max_records,
            "backlog_time_between_reads_ms": ms(retrieval.backlog_time_between_reads),
            "idle_time_between_reads_ms": ms(retrieval.idle_time_between_reads),
            "max_pending_batches": retrieval.max_pending_batches,
            "checkpoint": "after every batch",
            "initial_position": "TRIM_HORIZON",
        },
        "results": {
            "write": write,
            "read": {
                "records_processed": processed,
                "per_shard": per_shard,
                "first_record_ms": ms(first_at),
                "last_record_ms": ms(total),
                "records_per_sec": round1(processed as f64 / seconds),
                "records_per_sec_after_first_record": if after_first > 0.0 { round1(processed as f64 / after_first) } else { f64::NAN },
                "graceful_shutdown_ms": ms(shutdown),
                "library": counters.to_json(),
            },
        },
        "note": "Read times are from Scheduler::run() to process_records being entered with the last record \
                 (startup included; records_per_sec_after_first_record excludes it). The embedded backend runs in \
                 this process and shares its 2 cores with the consumer; in a debug build our crates are \
                 unoptimized. records_processed above records means duplicates.",
    }))
}
