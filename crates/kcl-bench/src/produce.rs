//! The `produce` scenario: `--records` records of `--record-size` bytes (1 KiB) over
//! `--keys` partition keys, written to a fresh `--shards`-shard stream by
//! `kcl-producer`'s [`KinesisProducer`] (aggregation off, then on) and by a reference:
//! a bare loop of `PutRecords` calls of 500 records, one at a time, resending the
//! entries a response marks failed. The backend runs in its own process, so the CPU
//! time read from this process is the writer's alone. Per case: records/s, CPU time per
//! record, and Kinesis records written (aggregation packs many into one).
//!
//! The embedded backend has no write limits, so the producer's per-shard rate limit is
//! off here: the figures are the producer's own cost, not the service's pace.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use kcl_producer::{KinesisProducer, ProducerConfig};
use serde_json::{json, Map, Value};

use crate::external::ExternalBackend;
use crate::support::{ms, payload_of_size, process_cpu_time, round1, round3, Bench};

/// Options of the `produce` scenario.
#[derive(Args, Debug)]
pub(crate) struct ProduceArgs {
    /// Records written per case.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) records: usize,
    /// Bytes of data per record.
    #[arg(long, default_value_t = 1024)]
    pub(crate) record_size: usize,
    /// Distinct partition keys.
    #[arg(long, default_value_t = 1000)]
    pub(crate) keys: usize,
    /// Shards of each case's stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
}

/// Runs the scenario; one JSON object.
pub(crate) async fn run(args: &ProduceArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let mut cases = Map::new();
    for case in ["reference-put-records", "producer", "producer-aggregated"] {
        let stream = bench.new_stream(args.shards).await?;
        eprintln!(
            "produce: {case}: {} records of {} bytes",
            args.records, args.record_size
        );
        let cpu = process_cpu_time();
        let started = Instant::now();
        let kinesis_records = match case {
            "reference-put-records" => reference(&bench, &stream, args).await?,
            _ => with_producer(&bench, &stream, args, case == "producer-aggregated").await?,
        };
        let wall = started.elapsed();
        let cpu = process_cpu_time().saturating_sub(cpu);
        #[allow(clippy::cast_precision_loss)]
        let per_second = args.records as f64 / wall.as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)]
        let cpu_us = cpu.as_secs_f64() * 1e6 / args.records.max(1) as f64;
        eprintln!("produce: {case}: {per_second:.0} records/s, {cpu_us:.1} µs CPU per record");
        cases.insert(
            case.to_owned(),
            json!({
                "records_per_second": round1(per_second),
                "cpu_us_per_record": round3(cpu_us),
                "wall_ms": ms(wall),
                "kinesis_records": kinesis_records,
            }),
        );
    }
    backend.stop().await?;
    let ratio = |case: &str, field: &str| -> Option<f64> {
        let ours = cases.get(case)?.get(field)?.as_f64()?;
        let reference = cases.get("reference-put-records")?.get(field)?.as_f64()?;
        Some(round3(ours / reference))
    };
    let ratios = json!({
        "producer_over_reference_records_per_second": ratio("producer", "records_per_second"),
        "producer_over_reference_cpu_per_record": ratio("producer", "cpu_us_per_record"),
        "aggregated_over_reference_records_per_second": ratio("producer-aggregated", "records_per_second"),
        "aggregated_over_reference_cpu_per_record": ratio("producer-aggregated", "cpu_us_per_record"),
    });
    Ok(json!({
        "scenario": "produce",
        "config": {
            "records": args.records,
            "record_size": args.record_size,
            "keys": args.keys,
            "shards": args.shards,
            "producer": "ProducerConfig::default() with the per-shard rate limit off; aggregation off, then on",
            "reference": "PutRecords calls of 500 records, one at a time, failed entries resent",
            "backend": "kcl-local servers in their own process",
        },
        "results": cases,
        "ratios": ratios,
        "note": "CPU is this process's (the writer's) per record written; the backend runs elsewhere.",
    }))
}

fn key(i: usize, keys: usize) -> String {
    format!("key-{}", i % keys.max(1))
}

async fn with_producer(bench: &Bench, stream: &str, args: &ProduceArgs, aggregate: bool) -> anyhow::Result<usize> {
    let mut config = ProducerConfig::default();
    config.rate_limit_enabled = false;
    config.aggregation_enabled = aggregate;
    let producer = KinesisProducer::try_new(bench.kinesis.clone(), stream, config)?;
    let mut acks = Vec::with_capacity(args.records);
    for i in 0..args.records {
        acks.push(
            producer
                .put(key(i, args.keys), payload_of_size(i, args.record_size))
                .await?,
        );
    }
    let mut sequences = std::collections::HashSet::new();
    for ack in acks {
        let result = ack.await.context("a record was not written")?;
        sequences.insert(result.sequence_number);
    }
    producer.close().await;
    Ok(sequences.len())
}

async fn reference(bench: &Bench, stream: &str, args: &ProduceArgs) -> anyhow::Result<usize> {
    let mut written = 0;
    let mut next = 0;
    while next < args.records {
        let end = args.records.min(next + 500);
        let mut pending: Vec<(String, Bytes)> = (next..end)
            .map(|i| (key(i, args.keys), payload_of_size(i, args.record_size)))
            .collect();
        while !pending.is_empty() {
            let entries = pending
                .iter()
                .map(|(k, d)| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(k)
                        .data(aws_sdk_kinesis::primitives::Blob::new(d.to_vec()))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = bench
                .kinesis
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await?;
            let sent = pending.len();
            let failed: Vec<(String, Bytes)> = pending
                .into_iter()
                .zip(out.records())
                .filter(|(_, r)| r.error_code().is_some())
                .map(|(p, _)| p)
                .collect();
            written += sent - failed.len();
            if !failed.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            pending = failed;
        }
        next = end;
    }
    Ok(written)
}
