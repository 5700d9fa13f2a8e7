//! The `latency` scenario: on an idle shard, how long a record takes from the
//! producer's acknowledged `PutRecord` to the processor, for each configured
//! `idle_time_between_reads`.
//!
//! A caught-up shard is polled once per idle time (measured from the start of the
//! previous `GetRecords`), so a record written at a random moment waits for the next
//! poll: expect latencies spread evenly between about zero and the idle time, a mean of
//! about half the idle time, and a maximum of about the idle time plus one call.
//!
//! Each run uses a fresh single-shard stream with a few records already on it; the
//! scheduler starts at `TRIM_HORIZON`, and the measurement begins once those are
//! processed, so the shard is caught up and idle. Then single records are written at
//! jittered intervals.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_kinesis::primitives::Blob;
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{ms, put_records, round1, summary, Bench, Counters, Delivered, Jitter, ProcessorOptions, Running};

/// Options of the `latency` scenario.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct LatencyArgs {
    /// Records measured per run, written one at a time.
    #[arg(long, default_value_t = 30)]
    pub(crate) records: usize,
    /// `idle_time_between_reads` of each run, in ms (comma-separated; one run each; the
    /// library's minimum is 200).
    #[arg(long, value_delimiter = ',', default_values_t = [1500u64, 200])]
    pub(crate) idle_ms: Vec<u64>,
    /// Shortest pause between two writes, in ms.
    #[arg(long, default_value_t = 300)]
    pub(crate) min_gap_ms: u64,
    /// Longest pause between two writes, in ms (pauses are uniform in between).
    #[arg(long, default_value_t = 700)]
    pub(crate) max_gap_ms: u64,
    /// Records on the stream before the scheduler starts; they are consumed, unmeasured,
    /// so that the measured records find an idle, caught-up shard.
    #[arg(long, default_value_t = 5)]
    pub(crate) warmup_records: usize,
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &LatencyArgs) -> anyhow::Result<Value> {
    let bench = Bench::start().await?;
    let mut runs = Vec::new();
    for &idle_ms in &args.idle_ms {
        let run = one_run(&bench, args, Duration::from_millis(idle_ms)).await?;
        runs.push(run);
    }
    bench.shutdown().await;
    Ok(json!({
        "scenario": "latency",
        "config": {
            "records_per_run": args.records,
            "idle_time_between_reads_ms": args.idle_ms,
            "write_gap_ms": [args.min_gap_ms, args.max_gap_ms],
            "shards": 1,
            "warmup_records": args.warmup_records,
            "initial_position": "TRIM_HORIZON (measurement starts once the warm-up records are processed)",
        },
        "results": { "runs": runs },
        "note": "latency_ms is from the acknowledged PutRecord (the call returned) to the moment \
                 process_records is entered with that record; from_send_ms adds the PutRecord call itself. \
                 A caught-up shard is polled once per idle_time_between_reads, so expect max ~ idle time + one \
                 call and mean ~ half the idle time. mean_get_records_interval_ms is the measured poll cadence \
                 during the run. The backend is embedded in this process, so call times are loopback times.",
    }))
}

async fn one_run(bench: &Bench, args: &LatencyArgs, idle: Duration) -> anyhow::Result<Value> {
    let stream = bench.new_stream(1).await?;
    put_records(&bench.kinesis, &stream, args.warmup_records, |i| {
        bytes::Bytes::from(format!("warmup-{i}"))
    })
    .await?;

    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel::<Delivered>();
    let mut options = ProcessorOptions::reporting(tx);
    options.keep_payloads = true;
    let retrieval = RetrievalConfig {
        idle_time_between_reads: idle,
        ..RetrievalConfig::default()
    };
    let builder = bench.scheduler(
        &stream,
        &counters,
        options,
        InitialPositionInStream::TrimHorizon,
        retrieval,
    );
    let running = Running::start(builder)?;

    // Wait until the warm-up records are through: from then on the shard is idle.
    let mut warmed = 0;
    while warmed < args.warmup_records {
        let delivered = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("the warm-up records did not arrive within 60 s")?;
        let Some(delivered) = delivered else {
            bail!("the processors stopped during the warm-up")
        };
        warmed += delivered.records;
    }

    // Write the measured records, one at a time, at jittered moments.
    let mut jitter = Jitter::from_clock();
    let mut sent_at = Vec::with_capacity(args.records);
    let mut acked_at = Vec::with_capacity(args.records);
    let calls_before = counters.get_records_calls.load(Ordering::Acquire);
    let window_start = Instant::now();
    for i in 0..args.records {
        tokio::time::sleep(Duration::from_millis(jitter.between(args.min_gap_ms, args.max_gap_ms))).await;
        let sent = Instant::now();
        bench
            .kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("pk-{i}"))
            .data(Blob::new(format!("lat-{i}")))
            .send()
            .await
            .context("PutRecord")?;
        sent_at.push(sent);
        acked_at.push(Instant::now());
    }

    // Collect every measured record (each was stamped when process_records was entered).
    let mut delivered_at: BTreeMap<usize, Instant> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + idle + Duration::from_secs(30);
    while delivered_at.len() < args.records {
        let Ok(Some(delivered)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            let _ = running.stop().await;
            bail!(
                "only {} of {} records reached the processor (idle {idle:?})",
                delivered_at.len(),
                args.records
            );
        };
        for payload in &delivered.payloads {
            let index = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.strip_prefix("lat-"))
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(index) = index {
                delivered_at.entry(index).or_insert(delivered.at);
            }
        }
    }
    let window = window_start.elapsed();
    let calls = counters.get_records_calls.load(Ordering::Acquire) - calls_before;
    let shutdown = running.stop().await?;

    let mut latency = Vec::with_capacity(args.records);
    let mut from_send = Vec::with_capacity(args.records);
    let mut put_call = Vec::with_capacity(args.records);
    for (index, at) in &delivered_at {
        // A record can in principle be processed before its PutRecord response is read;
        // keep the sign rather than hide it.
        latency.push(signed_ms(acked_at[*index], *at));
        from_send.push(signed_ms(sent_at[*index], *at));
        put_call.push(ms(acked_at[*index] - sent_at[*index]));
    }
    let idle_ms = ms(idle);
    let max_latency = latency.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    eprintln!(
        "latency idle {idle_ms} ms: max {max_latency:.1} ms over {} records",
        latency.len()
    );
    Ok(json!({
        "idle_time_between_reads_ms": idle_ms,
        "latency_ms": summary(&latency),
        "from_send_ms": summary(&from_send),
        "put_record_call_ms": summary(&put_call),
        "max_over_idle_time": if idle_ms > 0.0 { (max_latency / idle_ms * 1000.0).round() / 1000.0 } else { f64::NAN },
        "get_records_calls_during_run": calls,
        "mean_get_records_interval_ms": if calls == 0 { f64::NAN } else { round1(ms(window) / calls as f64) },
        "graceful_shutdown_ms": ms(shutdown),
    }))
}

/// `to - from` in milliseconds, negative if `to` is earlier.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        ms(to - from)
    } else {
        -ms(from - to)
    }
}
