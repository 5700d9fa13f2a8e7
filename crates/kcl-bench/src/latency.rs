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
//!
//! With `--fan-out` the same measurement runs through enhanced fan-out (the scheduler
//! registers a stream consumer and reads with `SubscribeToShard`; `--idle-ms` does not
//! apply), and next to it, on the same stream and with the same producer pattern, a
//! reference: a bare `SubscribeToShard` reader (its own stream consumer, subscribed at
//! `LATEST` to the shard; no leases, no checkpoints, no processor) that stamps each
//! record when the event carrying it arrives. The ratio ours/reference of p50 and p99
//! is what the library's fan-out path adds. On the embedded backend (ferrokinesis 0.7)
//! a subscription's first event carries the backlog and then one event follows every
//! 200 ms (empty when nothing is new), so both are bounded below by that cadence:
//! expect latencies spread between about 0 and 200 ms, not the typical ~70 ms AWS
//! documents.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition, SubscribeToShardEventStream};
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use kcl_efo::FanOutConfig;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::support::{
    fan_out, ms, put_records, quantile, round1, round3, summary, summary_with_p99, unique, Bench, Counters, Delivered,
    Jitter, ProcessorOptions, Running,
};

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
    /// Write at this many records per second for `--seconds` instead (`--records`,
    /// `--min-gap-ms` and `--max-gap-ms` are then ignored): the steady-traffic case.
    #[arg(long)]
    pub(crate) rate: Option<u32>,
    /// How long to write at `--rate`, in seconds.
    #[arg(long, default_value_t = 30)]
    pub(crate) seconds: u64,
    /// Read through enhanced fan-out (SubscribeToShard) instead of polling, and measure
    /// a bare SubscribeToShard reader on the same stream as a reference (`--idle-ms`
    /// does not apply).
    #[arg(long, conflicts_with = "idle_ms")]
    pub(crate) fan_out: bool,
}

impl LatencyArgs {
    /// With `--rate`: the records and the (fixed) gap it stands for.
    fn effective(&self) -> Self {
        let mut args = self.clone();
        if let Some(rate) = self.rate {
            let rate = rate.max(1);
            args.records = usize::try_from(u64::from(rate) * self.seconds).unwrap_or(usize::MAX);
            args.min_gap_ms = 1000 / u64::from(rate);
            args.max_gap_ms = args.min_gap_ms;
        }
        args
    }
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &LatencyArgs) -> anyhow::Result<Value> {
    let args = &args.effective();
    if args.fan_out {
        return run_fan_out(args).await;
    }
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

/// `latency --fan-out`: the library through fan-out, then the bare reference reader, on
/// one single-shard stream.
async fn run_fan_out(args: &LatencyArgs) -> anyhow::Result<Value> {
    let bench = Bench::start().await?;
    let stream = bench.new_stream(1).await?;
    put_records(&bench.kinesis, &stream, args.warmup_records, |i| {
        bytes::Bytes::from(format!("warmup-{i}"))
    })
    .await?;
    let ours = fan_out_run(&bench, &stream, args).await?;
    let reference = reference_run(&bench, &stream, args).await?;
    bench.shutdown().await;

    let ratio = |q: f64| {
        let ours = sorted_quantile(&ours.latency, q);
        let reference = sorted_quantile(&reference.latency, q);
        if reference > 0.0 {
            round3(ours / reference)
        } else {
            f64::NAN
        }
    };
    eprintln!(
        "latency fan-out: p50 {:.1} ms (reference {:.1} ms), p99 {:.1} ms (reference {:.1} ms)",
        sorted_quantile(&ours.latency, 0.5),
        sorted_quantile(&reference.latency, 0.5),
        sorted_quantile(&ours.latency, 0.99),
        sorted_quantile(&reference.latency, 0.99),
    );
    Ok(json!({
        "scenario": "latency",
        "config": {
            "retrieval": "fan-out",
            "records_per_run": args.records,
            "write_gap_ms": [args.min_gap_ms, args.max_gap_ms],
            "shards": 1,
            "warmup_records": args.warmup_records,
            "initial_position": "TRIM_HORIZON (measurement starts once the warm-up records are processed)",
            "fan_out": "FanOutConfig::new(consumer) defaults, a new stream consumer per run",
            "reference": "a bare SubscribeToShard reader on the same stream after ours stopped: its own stream \
                          consumer, subscribed at LATEST, records stamped when their event arrives; no leases, \
                          checkpoints or processor",
        },
        "results": {
            "fan_out": ours.json,
            "reference": reference.json,
            "ours_over_reference": { "p50": ratio(0.5), "p99": ratio(0.99) },
        },
        "note": "latency_ms is from the acknowledged PutRecord to process_records being entered with the record \
                 (fan_out) or to the SubscribeToShard event carrying it being received (reference); from_send_ms \
                 adds the PutRecord call. The embedded backend (ferrokinesis 0.7) makes a stream consumer ACTIVE \
                 after a fixed 500 ms, sends a subscription's backlog (up to 10,000 records) in its first event and \
                 then one event every 200 ms, empty when nothing is new: fan-out latency here is bounded below by \
                 that 200 ms cadence (expect ~0-200 ms, mean ~100 ms, for ours and the reference alike), which says \
                 nothing of AWS (it documents a typical ~70 ms). It ignores AT_/AFTER_SEQUENCE_NUMBER positions \
                 (always starts at the shard's first record; the library drops what precedes its position) but \
                 honours TRIM_HORIZON and LATEST. ours_over_reference near 1 means the library adds little to the \
                 subscription itself. The backend is embedded in this process, so call times are loopback times; \
                 with a few dozen records, p99 is the maximum.",
    }))
}

/// One side of the fan-out comparison: the latencies (ms) and the JSON of the run.
struct Measured {
    latency: Vec<f64>,
    json: Value,
}

/// The library through fan-out on `stream` (warm-up records already written).
async fn fan_out_run(bench: &Bench, stream: &str, args: &LatencyArgs) -> anyhow::Result<Measured> {
    let counters = Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel::<Delivered>();
    let mut options = ProcessorOptions::reporting(tx);
    options.keep_payloads = true;
    let builder = bench.scheduler(
        stream,
        &counters,
        options,
        InitialPositionInStream::TrimHorizon,
        RetrievalConfig::default(),
    );
    let builder = fan_out(builder, FanOutConfig::new(unique("bench-efo")))?;
    let running = Running::start(builder)?;
    wait_for_warmup(&mut rx, args.warmup_records).await?;
    let warmed_up = running.started.elapsed();

    let (sent_at, acked_at) = write_measured(bench, stream, args, "lat-").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let delivered_at = match collect(&mut rx, args.records, "lat-", deadline).await {
        Ok(delivered_at) => delivered_at,
        Err(received) => {
            let _ = running.stop().await;
            bail!(
                "fan-out: only {received} of {} records reached the processor",
                args.records
            );
        }
    };
    let shutdown = running.stop().await?;
    let (latency, from_send, put_call) = latencies(&delivered_at, &sent_at, &acked_at);
    let json = json!({
        "latency_ms": summary_with_p99(&latency),
        "from_send_ms": summary_with_p99(&from_send),
        "put_record_call_ms": summary(&put_call),
        "run_to_warmup_processed_ms": ms(warmed_up),
        "process_records_calls": counters.batches.load(Ordering::Acquire),
        "graceful_shutdown_ms": ms(shutdown),
    });
    Ok(Measured { latency, json })
}

/// The reference: a bare `SubscribeToShard` reader at `LATEST` of the stream's shard,
/// with its own stream consumer.
async fn reference_run(bench: &Bench, stream: &str, args: &LatencyArgs) -> anyhow::Result<Measured> {
    let registration_started = Instant::now();
    let consumer = kcl_efo::register_stream_consumer(
        &bench.kinesis,
        stream,
        &unique("bench-ref"),
        Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .await
    .context("registering the reference's stream consumer")?;
    let registration = registration_started.elapsed();
    let shards = bench
        .kinesis
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .context("ListShards")?;
    let shard_id = shards
        .shards()
        .first()
        .map(|s| s.shard_id().to_owned())
        .context("the stream has no shard")?;
    let output = bench
        .kinesis
        .subscribe_to_shard()
        .consumer_arn(&consumer.consumer_arn)
        .shard_id(&shard_id)
        .starting_position(StartingPosition::builder().r#type(ShardIteratorType::Latest).build()?)
        .send()
        .await
        .context("SubscribeToShard")?;
    // From here on, records written are after LATEST.
    let mut events = output.event_stream;
    let event_count = Arc::new(AtomicU64::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Delivered>();
    let reader = tokio::spawn({
        let event_count = event_count.clone();
        async move {
            loop {
                match events.recv().await {
                    Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => {
                        let at = Instant::now();
                        event_count.fetch_add(1, Ordering::AcqRel);
                        if event.records.is_empty() {
                            continue;
                        }
                        let payloads: Vec<bytes::Bytes> = event
                            .records
                            .into_iter()
                            .map(|r| bytes::Bytes::from(r.data.into_inner()))
                            .collect();
                        let _ = tx.send(Delivered {
                            shard_id: shard_id.clone(),
                            at,
                            records: payloads.len(),
                            payloads,
                        });
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return "the subscription ended".to_owned(),
                    Err(e) => {
                        return format!(
                            "the subscription failed: {}",
                            aws_sdk_kinesis::error::DisplayErrorContext(&e)
                        )
                    }
                }
            }
        }
    });

    let events_before = event_count.load(Ordering::Acquire);
    let window_start = Instant::now();
    let (sent_at, acked_at) = write_measured(bench, stream, args, "ref-").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let collected = collect(&mut rx, args.records, "ref-", deadline).await;
    let window = window_start.elapsed();
    let events = event_count.load(Ordering::Acquire) - events_before;
    reader.abort();
    let why = reader.await.unwrap_or_else(|_| "the reader was stopped".to_owned());
    let delivered_at = match collected {
        Ok(delivered_at) => delivered_at,
        Err(received) => bail!("reference: only {received} of {} records arrived ({why})", args.records),
    };
    let (latency, from_send, put_call) = latencies(&delivered_at, &sent_at, &acked_at);
    let json = json!({
        "latency_ms": summary_with_p99(&latency),
        "from_send_ms": summary_with_p99(&from_send),
        "put_record_call_ms": summary(&put_call),
        "consumer_registration_ms": ms(registration),
        "events_during_run": events,
        "mean_event_interval_ms": if events == 0 { f64::NAN } else { round1(ms(window) / events as f64) },
    });
    Ok(Measured { latency, json })
}

/// The `q`-quantile of unsorted values.
fn sorted_quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, q)
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
    wait_for_warmup(&mut rx, args.warmup_records).await?;

    // Write the measured records, one at a time, at jittered moments.
    let calls_before = counters.get_records_calls.load(Ordering::Acquire);
    let window_start = Instant::now();
    let (sent_at, acked_at) = write_measured(bench, &stream, args, "lat-").await?;

    // Collect every measured record (each was stamped when process_records was entered).
    let deadline = tokio::time::Instant::now() + idle + Duration::from_secs(30);
    let delivered_at = match collect(&mut rx, args.records, "lat-", deadline).await {
        Ok(delivered_at) => delivered_at,
        Err(received) => {
            let _ = running.stop().await;
            bail!(
                "only {received} of {} records reached the processor (idle {idle:?})",
                args.records
            );
        }
    };
    let window = window_start.elapsed();
    let calls = counters.get_records_calls.load(Ordering::Acquire) - calls_before;
    let shutdown = running.stop().await?;

    let (latency, from_send, put_call) = latencies(&delivered_at, &sent_at, &acked_at);
    let reference = reference_polling_run(bench, &stream, args, idle).await?;
    let ratio = |q: f64| {
        let theirs = sorted_quantile(&reference.latency, q);
        if theirs > 0.0 {
            round3(sorted_quantile(&latency, q) / theirs)
        } else {
            f64::NAN
        }
    };
    let idle_ms = ms(idle);
    let max_latency = latency.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    eprintln!(
        "latency idle {idle_ms} ms: max {max_latency:.1} ms over {} records",
        latency.len()
    );
    Ok(json!({
        "idle_time_between_reads_ms": idle_ms,
        "latency_ms": summary_with_p99(&latency),
        "from_send_ms": summary_with_p99(&from_send),
        "reference": reference.json,
        "ours_over_reference": { "p50": ratio(0.5), "p99": ratio(0.99) },
        "put_record_call_ms": summary(&put_call),
        "max_over_idle_time": if idle_ms > 0.0 { (max_latency / idle_ms * 1000.0).round() / 1000.0 } else { f64::NAN },
        "get_records_calls_during_run": calls,
        "mean_get_records_interval_ms": if calls == 0 { f64::NAN } else { round1(ms(window) / calls as f64) },
        "graceful_shutdown_ms": ms(shutdown),
    }))
}

/// The polling reference on `stream` (after ours stopped): a bare loop that asks
/// `GetRecords` once per `idle` (from the start of the previous call, as the library
/// paces an idle shard) from `LATEST`, and stamps records when the answer arrives.
async fn reference_polling_run(
    bench: &Bench,
    stream: &str,
    args: &LatencyArgs,
    idle: Duration,
) -> anyhow::Result<Measured> {
    let shards = bench.kinesis.list_shards().stream_name(stream).send().await?;
    let shard_id = shards
        .shards()
        .first()
        .map(|s| s.shard_id().to_owned())
        .context("the stream has no shard")?;
    let mut iterator = bench
        .kinesis
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(&shard_id)
        .shard_iterator_type(ShardIteratorType::Latest)
        .send()
        .await?
        .shard_iterator
        .context("no iterator")?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Delivered>();
    let kinesis = bench.kinesis.clone();
    let reader = tokio::spawn(async move {
        loop {
            let started = tokio::time::Instant::now();
            let out = kinesis.get_records().shard_iterator(&iterator).send().await?;
            let at = Instant::now();
            let payloads: Vec<bytes::Bytes> = out
                .records()
                .iter()
                .map(|r| bytes::Bytes::copy_from_slice(r.data().as_ref()))
                .collect();
            if !payloads.is_empty() {
                let _ = tx.send(Delivered {
                    shard_id: shard_id.clone(),
                    at,
                    records: payloads.len(),
                    payloads,
                });
            }
            iterator = out.next_shard_iterator.context("the shard closed")?;
            tokio::time::sleep_until(started + idle).await;
        }
        #[allow(unreachable_code, reason = "the loop only ends with an error")]
        anyhow::Ok(())
    });
    let (sent_at, acked_at) = write_measured(bench, stream, args, "ref-").await?;
    let deadline = tokio::time::Instant::now() + idle + Duration::from_secs(30);
    let collected = collect(&mut rx, args.records, "ref-", deadline).await;
    reader.abort();
    let delivered_at = match collected {
        Ok(d) => d,
        Err(received) => bail!("reference: only {received} of {} records arrived", args.records),
    };
    let (latency, from_send, _) = latencies(&delivered_at, &sent_at, &acked_at);
    let json = json!({
        "what": "a bare GetRecords loop, one call per idle time from LATEST, records stamped on the answer",
        "latency_ms": summary_with_p99(&latency),
        "from_send_ms": summary_with_p99(&from_send),
    });
    Ok(Measured { latency, json })
}

/// Waits until `records` records reached the processor (the warm-up).
async fn wait_for_warmup(rx: &mut mpsc::UnboundedReceiver<Delivered>, records: usize) -> anyhow::Result<()> {
    let mut warmed = 0;
    while warmed < records {
        let delivered = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .context("the warm-up records did not arrive within 60 s")?;
        let Some(delivered) = delivered else {
            bail!("the processors stopped during the warm-up")
        };
        warmed += delivered.records;
    }
    Ok(())
}

/// Writes `args.records` single records `{prefix}{i}` with `PutRecord`, one at a time,
/// each after a jittered pause; returns when each was sent and when it was acknowledged.
async fn write_measured(
    bench: &Bench,
    stream: &str,
    args: &LatencyArgs,
    prefix: &str,
) -> anyhow::Result<(Vec<Instant>, Vec<Instant>)> {
    let mut jitter = Jitter::from_clock();
    let mut sent_at = Vec::with_capacity(args.records);
    let mut acked_at = Vec::with_capacity(args.records);
    // Each write is due a gap after the previous one was due (not after it returned), so
    // a fixed gap holds the rate whatever the call takes.
    let mut due = tokio::time::Instant::now();
    for i in 0..args.records {
        due += Duration::from_millis(jitter.between(args.min_gap_ms, args.max_gap_ms));
        tokio::time::sleep_until(due).await;
        let sent = Instant::now();
        bench
            .kinesis
            .put_record()
            .stream_name(stream)
            .partition_key(format!("pk-{i}"))
            .data(Blob::new(format!("{prefix}{i}")))
            .send()
            .await
            .context("PutRecord")?;
        sent_at.push(sent);
        acked_at.push(Instant::now());
    }
    Ok((sent_at, acked_at))
}

/// Collects, until `records` distinct measured records (payload `{prefix}{i}`) arrived,
/// the first moment each arrived. `Err` holds how many arrived by `deadline`.
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<Delivered>,
    records: usize,
    prefix: &str,
    deadline: tokio::time::Instant,
) -> Result<BTreeMap<usize, Instant>, usize> {
    let mut delivered_at: BTreeMap<usize, Instant> = BTreeMap::new();
    while delivered_at.len() < records {
        let Ok(Some(delivered)) = tokio::time::timeout_at(deadline, rx.recv()).await else {
            return Err(delivered_at.len());
        };
        for payload in &delivered.payloads {
            let index = std::str::from_utf8(payload)
                .ok()
                .and_then(|s| s.strip_prefix(prefix))
                .and_then(|s| s.parse::<usize>().ok());
            if let Some(index) = index {
                delivered_at.entry(index).or_insert(delivered.at);
            }
        }
    }
    Ok(delivered_at)
}

/// Per measured record: latency from the acknowledgement, from the send, and the
/// `PutRecord` call time, in ms.
fn latencies(
    delivered_at: &BTreeMap<usize, Instant>,
    sent_at: &[Instant],
    acked_at: &[Instant],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut latency = Vec::with_capacity(delivered_at.len());
    let mut from_send = Vec::with_capacity(delivered_at.len());
    let mut put_call = Vec::with_capacity(delivered_at.len());
    for (index, at) in delivered_at {
        // A record can in principle be processed before its PutRecord response is read;
        // keep the sign rather than hide it.
        latency.push(signed_ms(acked_at[*index], *at));
        from_send.push(signed_ms(sent_at[*index], *at));
        put_call.push(ms(acked_at[*index] - sent_at[*index]));
    }
    (latency, from_send, put_call)
}

/// `to - from` in milliseconds, negative if `to` is earlier.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    if to >= from {
        ms(to - from)
    } else {
        -ms(from - to)
    }
}
