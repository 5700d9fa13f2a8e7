//! The `startup` scenario: how long a brand-new application takes from `run()` to its
//! first record, and to the first record of every shard.
//!
//! Each iteration creates a fresh stream (with a few records on every shard) and a new
//! lease table name, so `run()` pays for everything a first start pays for: describing
//! the stream, creating the lease table, listing shards and creating leases, the first
//! lease-taking pass, and each shard's first `GetShardIterator` + `GetRecords`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{ms, put_records, summary, Bench, Counters, ProcessorOptions, Running};

/// Options of the `startup` scenario.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct StartupArgs {
    /// Fresh stream + lease table per iteration; min/median/max are over iterations.
    #[arg(long, default_value_t = 5)]
    pub(crate) iterations: usize,
    /// Shards of each stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
    /// Records written before the start (more are written if a shard got none).
    #[arg(long, default_value_t = 20)]
    pub(crate) records: usize,
    /// Give up on an iteration after this many seconds without every shard's first record.
    #[arg(long, default_value_t = 60)]
    pub(crate) timeout_secs: u64,
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &StartupArgs) -> anyhow::Result<Value> {
    let bench = Bench::start().await?;
    let mut iterations = Vec::new();
    let mut first = Vec::new();
    let mut all = Vec::new();
    let mut shutdown = Vec::new();
    for i in 0..args.iterations {
        let result = iteration(&bench, args).await?;
        eprintln!(
            "startup iteration {}: first record {:.1} ms, every shard {:.1} ms",
            i + 1,
            result.first_ms,
            result.all_ms
        );
        first.push(result.first_ms);
        all.push(result.all_ms);
        shutdown.push(result.shutdown_ms);
        iterations.push(json!({
            "first_record_ms": result.first_ms,
            "all_shards_first_record_ms": result.all_ms,
            "per_shard_first_record_ms": result.per_shard,
            "shutdown_ms": result.shutdown_ms,
        }));
    }
    bench.shutdown().await;
    Ok(json!({
        "scenario": "startup",
        "config": {
            "iterations": args.iterations,
            "shards": args.shards,
            "records_written_before_start": args.records,
            "initial_position": "TRIM_HORIZON",
            "lease_config": "defaults (failover 10 s; the first lease-taking pass runs at once)",
            "retrieval_config": "defaults",
        },
        "results": {
            "first_record_ms": summary(&first),
            "all_shards_first_record_ms": summary(&all),
            "graceful_shutdown_ms": summary(&shutdown),
            "iterations": iterations,
        },
        "note": "Times are from the moment Scheduler::run() is spawned to the moment process_records is \
                 entered, on a new application (no lease table) against the embedded backend in this \
                 process. They include creating the lease table, the shard sync and the first lease-taking \
                 pass. min/p50/max are over iterations; p50 is the median.",
    }))
}

/// What one iteration measured.
struct Iteration {
    first_ms: f64,
    all_ms: f64,
    per_shard: BTreeMap<String, f64>,
    shutdown_ms: f64,
}

async fn iteration(bench: &Bench, args: &StartupArgs) -> anyhow::Result<Iteration> {
    let stream = bench.new_stream(args.shards).await?;
    let mut written: BTreeSet<String> = BTreeSet::new();
    let shard_count = usize::try_from(args.shards)?;
    for attempt in 0..10 {
        let n = if attempt == 0 { args.records } else { shard_count * 4 };
        written.extend(put_records(&bench.kinesis, &stream, n, |i| bytes::Bytes::from(format!("start-{i}"))).await?);
        if written.len() >= shard_count {
            break;
        }
    }
    if written.len() < shard_count {
        bail!(
            "could not write a record to every shard ({} of {shard_count})",
            written.len()
        );
    }

    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let builder = bench.scheduler(
        &stream,
        &counters,
        ProcessorOptions::reporting(tx),
        InitialPositionInStream::TrimHorizon,
        RetrievalConfig::default(),
    );
    let running = Running::start(builder)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut per_shard: BTreeMap<String, f64> = BTreeMap::new();
    while per_shard.len() < shard_count {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(delivered)) => {
                per_shard
                    .entry(delivered.shard_id)
                    .or_insert_with(|| ms(delivered.at.duration_since(running.started)));
            }
            Ok(None) => bail!("every processor stopped before each shard delivered a record"),
            Err(_) => {
                let _ = running.stop().await;
                bail!(
                    "only {} of {shard_count} shards delivered a record within {} s",
                    per_shard.len(),
                    args.timeout_secs
                );
            }
        }
    }
    let shutdown = running.stop().await?;
    let first_ms = per_shard.values().copied().fold(f64::INFINITY, f64::min);
    let all_ms = per_shard.values().copied().fold(0.0, f64::max);
    Ok(Iteration {
        first_ms,
        all_ms,
        per_shard,
        shutdown_ms: ms(shutdown),
    })
}
