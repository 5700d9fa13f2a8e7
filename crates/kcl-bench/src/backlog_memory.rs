//! The `backlog-memory` scenario: checks the bounded-prefetch promise. A large backlog,
//! a deliberately slow processor, and the consumer's resident memory sampled while the
//! scheduler runs: peak memory should follow `max_prefetch_bytes`, not the backlog.
//!
//! The backend runs in a process of its own (started here, unless `--kinesis-endpoint`
//! and `--dynamodb-endpoint` name one already running, such as `kcl-local serve`), so
//! the resident memory measured is the consumer's alone. Every case (one prefetch limit
//! × one backlog size) runs in a fresh child process (this binary's hidden `memory-case`
//! command), so that memory freed by one case and kept by the allocator cannot hide the
//! next case's growth. In the child:
//! 1. the backlog is written;
//! 2. the baseline is the resident size measured after writing, just before `run()`
//!    (and the kernel's peak counter, `VmHWM`, is reset there);
//! 3. the scheduler runs for a fixed time (or until the backlog is processed) while a
//!    thread samples `VmRSS` every 100 ms; the peak is the larger of the highest sample
//!    and `VmHWM`.
//!
//! (Run by hand without endpoints, `memory-case` starts the embedded backend in its own
//! process instead; then the baseline also holds the whole stream.)
//!
//! Besides RSS, the benchmark counts what the library holds directly: payload bytes
//! returned by `GetRecords` (seen by an SDK interceptor) minus bytes whose
//! `process_records` returned. That is the prefetch queue plus the batch in hand, the
//! quantity the limits bound: at most `max_prefetch_bytes` plus one batch per shard
//! (the limit is checked before each fetch, and one batch may be in flight).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde::Serialize;
use serde_json::{json, Value};

use crate::support::{
    ms, read_status, reset_hwm, round3, run_case_in_child, write_backlog, Bench, Counters, ProcessorOptions, Running,
    MIB,
};

/// How often resident memory is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// One timeline entry per this many samples (one per second).
const TIMELINE_EVERY: usize = 10;

/// Options of the `backlog-memory` scenario: the cases to run, and what they share.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MemoryArgs {
    /// Backlog sizes in records (comma-separated); every size runs with every limit.
    /// Try 200000,1000000 with a release build.
    #[arg(long, value_delimiter = ',', default_values_t = [40_000usize, 120_000])]
    pub(crate) records: Vec<usize>,
    /// `max_prefetch_bytes` of each case, in KiB (comma-separated). Default: the
    /// library's default 8 MiB, and 1 MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [8192usize, 1024])]
    pub(crate) prefetch_kib: Vec<usize>,
    /// What every case shares.
    #[command(flatten)]
    pub(crate) common: MemoryCommon,
}

/// Settings shared by every memory case.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MemoryCommon {
    /// Payload bytes per record.
    #[arg(long, default_value_t = 1024)]
    pub(crate) record_size: usize,
    /// Shards of the stream (each shard has its own prefetch budget).
    #[arg(long, default_value_t = 1)]
    pub(crate) shards: i32,
    /// `RetrievalConfig::max_records`. Kept small by default so that one batch
    /// (1000 × 1 KiB ≈ 1 MiB) is smaller than the limits and the byte limit is what
    /// binds; with the default 10,000 one batch alone is ~10 MiB.
    #[arg(long, default_value_t = 1000)]
    pub(crate) max_records: i32,
    /// `RetrievalConfig::max_pending_batches`. High by default so that the byte limit,
    /// not the batch count, is what binds.
    #[arg(long, default_value_t = 64)]
    pub(crate) max_pending_batches: usize,
    /// `RetrievalConfig::max_prefetch_records` (the library's default).
    #[arg(long, default_value_t = 30_000)]
    pub(crate) max_prefetch_records: usize,
    /// How long the scheduler runs per case, in seconds (less if the backlog is done).
    #[arg(long, default_value_t = 10)]
    pub(crate) duration_secs: u64,
    /// Simulated work per record, in microseconds: the processor sleeps
    /// `records × this` per batch (500 µs × 1000 records = 0.5 s per batch), slower than
    /// the reads, so the prefetch queue fills up to its limit.
    #[arg(long, default_value_t = 500)]
    pub(crate) sleep_us_per_record: u64,
    /// Use a Kinesis emulator already running in another process (for example
    /// `kcl-local serve --kinesis-port 0 --dynamodb-port 0`) instead of starting one.
    /// Requires `--dynamodb-endpoint`.
    #[arg(long, requires = "dynamodb_endpoint")]
    pub(crate) kinesis_endpoint: Option<String>,
    /// The DynamoDB endpoint to use with `--kinesis-endpoint`.
    #[arg(long, requires = "kinesis_endpoint")]
    pub(crate) dynamodb_endpoint: Option<String>,
}

/// Options of the hidden `memory-case` command: one case, run in this process.
#[derive(Args, Debug, Clone, Serialize)]
pub(crate) struct MemoryCaseArgs {
    /// Backlog in records.
    #[arg(long)]
    pub(crate) records: usize,
    /// `max_prefetch_bytes`.
    #[arg(long)]
    pub(crate) prefetch_bytes: usize,
    /// What every case shares.
    #[command(flatten)]
    pub(crate) common: MemoryCommon,
}

/// Runs the scenario and returns its JSON object: the cases against a backend in its own
/// process (started here unless endpoints are given), so that each case's RSS is the
/// consumer's alone.
pub(crate) async fn run(args: &MemoryArgs) -> anyhow::Result<Value> {
    let mut args = args.clone();
    let backend = match (&args.common.kinesis_endpoint, &args.common.dynamodb_endpoint) {
        (Some(_), Some(_)) => None,
        _ => {
            let backend = crate::external::ExternalBackend::start().await?;
            args.common.kinesis_endpoint = Some(backend.kinesis_endpoint.clone());
            args.common.dynamodb_endpoint = Some(backend.dynamodb_endpoint.clone());
            Some(backend)
        }
    };
    let value = cases(&args).await?;
    if let Some(backend) = backend {
        backend.stop().await?;
    }
    Ok(value)
}

/// Runs every case, each in a child process, and returns the scenario's JSON object.
async fn cases(args: &MemoryArgs) -> anyhow::Result<Value> {
    let mut runs = Vec::new();
    let mut table = Vec::new();
    for &kib in &args.prefetch_kib {
        for &records in &args.records {
            eprintln!("backlog-memory: case prefetch {kib} KiB, backlog {records} records (child process)");
            let c = &args.common;
            let mut child_args: Vec<String> = vec![
                "memory-case".into(),
                format!("--records={records}"),
                format!("--prefetch-bytes={}", kib * 1024),
                format!("--record-size={}", c.record_size),
                format!("--shards={}", c.shards),
                format!("--max-records={}", c.max_records),
                format!("--max-pending-batches={}", c.max_pending_batches),
                format!("--max-prefetch-records={}", c.max_prefetch_records),
                format!("--duration-secs={}", c.duration_secs),
                format!("--sleep-us-per-record={}", c.sleep_us_per_record),
            ];
            if let (Some(kinesis), Some(dynamodb)) = (&c.kinesis_endpoint, &c.dynamodb_endpoint) {
                child_args.push(format!("--kinesis-endpoint={kinesis}"));
                child_args.push(format!("--dynamodb-endpoint={dynamodb}"));
            }
            let what = format!("the memory case (prefetch {kib} KiB, {records} records)");
            let case = run_case_in_child(child_args, what).await?;
            table.push(json!({
                "max_prefetch_mib": round3(kib as f64 / 1024.0),
                "backlog_records": records,
                "backlog_mib": case["backlog"]["bytes"].as_f64().map(|b| round3(b / MIB)),
                "peak_rss_above_baseline_mib": case["rss"]["peak_above_baseline_mib"],
                "peak_library_outstanding_mib": case["library"]["peak_outstanding_mib"],
                "bound_mib": case["library"]["bound_mib"],
                "within_bound": case["library"]["within_bound"],
            }));
            runs.push(case);
        }
    }
    Ok(json!({
        "scenario": "backlog-memory",
        "config": args,
        "results": { "summary": table, "runs": runs },
        "note": "Each case ran in a fresh child process against the backend in another process, so RSS is the \
                 consumer's own: the peak above the baseline (measured just before run()) should stay within the \
                 prefetch bound plus a fixed overhead whatever the backlog size. peak_library_outstanding_mib is \
                 exact: payload bytes fetched minus bytes whose process_records returned; bound_mib = shards x \
                 (max_prefetch_bytes + one batch of max_records x record_size).",
    }))
}

/// Runs one case in this process and prints its JSON (one line) on stdout.
pub(crate) async fn run_case(args: &MemoryCaseArgs) -> anyhow::Result<()> {
    let case = case(args).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&case)?)?;
    stdout.flush()?;
    Ok(())
}

async fn case(args: &MemoryCaseArgs) -> anyhow::Result<Value> {
    let c = &args.common;
    let bench = match (&c.kinesis_endpoint, &c.dynamodb_endpoint) {
        (Some(kinesis), Some(dynamodb)) => Bench::connect(kinesis, dynamodb),
        _ => Bench::start().await?,
    };
    let stream = bench.new_stream(c.shards).await?;
    let before_write = read_status()?;
    let write = write_backlog(&bench.kinesis, &stream, args.records, c.record_size).await?;

    let counters = Arc::new(Counters::default());
    let retrieval = RetrievalConfig {
        max_records: c.max_records,
        max_pending_batches: c.max_pending_batches,
        max_prefetch_records: c.max_prefetch_records,
        max_prefetch_bytes: args.prefetch_bytes,
        ..RetrievalConfig::default()
    };
    let processor = ProcessorOptions {
        events: None,
        keep_payloads: false,
        checkpoint: true,
        sleep_per_record: Duration::from_micros(c.sleep_us_per_record),
    };
    let builder = bench.scheduler(
        &stream,
        &counters,
        processor,
        InitialPositionInStream::TrimHorizon,
        retrieval.clone(),
    );

    // Baseline: after the backlog is in the emulator, just before run().
    let baseline_hwm_before_reset = read_status()?.hwm_kib;
    let hwm_reset = reset_hwm();
    let baseline = read_status()?;
    let sampler = Sampler::start(counters.clone());
    let running = Running::start(builder)?;
    let deadline = running.started + Duration::from_secs(c.duration_secs);
    let target = args.records as u64;
    while Instant::now() < deadline && counters.processed_records.load(Ordering::Acquire) < target {
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    let ran_for = running.started.elapsed();
    let samples = sampler.stop();
    let end = read_status()?;
    let shutdown = running.stop().await?;
    bench.shutdown().await;

    let kib_above = |kib: u64| kib.saturating_sub(baseline.rss_kib) as f64 / 1024.0;
    let peak_sampled = samples.peak_rss_kib.max(baseline.rss_kib);
    let peak = if hwm_reset {
        peak_sampled.max(end.hwm_kib)
    } else {
        peak_sampled
    };
    let shards = u64::try_from(c.shards).unwrap_or(1);
    let one_batch = u64::try_from(c.max_records).unwrap_or(0) * c.record_size as u64;
    let bound = shards * (args.prefetch_bytes as u64 + one_batch);
    let peak_outstanding = counters.peak_outstanding_bytes.load(Ordering::Acquire);
    eprintln!(
        "memory case: prefetch {:.2} MiB, backlog {} records: peak RSS +{:.1} MiB, library outstanding {:.2} MiB (bound {:.2} MiB)",
        args.prefetch_bytes as f64 / MIB,
        args.records,
        kib_above(peak),
        peak_outstanding as f64 / MIB,
        bound as f64 / MIB
    );
    Ok(json!({
        "config": {
            "backlog_records": args.records,
            "record_size_bytes": c.record_size,
            "shards": c.shards,
            "max_prefetch_bytes": retrieval.max_prefetch_bytes,
            "max_prefetch_records": retrieval.max_prefetch_records,
            "max_records": retrieval.max_records,
            "max_pending_batches": retrieval.max_pending_batches,
            "backlog_time_between_reads_ms": ms(retrieval.backlog_time_between_reads),
            "processor_sleep_us_per_record": c.sleep_us_per_record,
            "run_secs": c.duration_secs,
            "backend": if c.kinesis_endpoint.is_some() { "external process" } else { "embedded (same process)" },
        },
        "backlog": write,
        "rss": {
            "before_write_mib": round3(before_write.rss_kib as f64 / 1024.0),
            "baseline_mib": round3(baseline.rss_kib as f64 / 1024.0),
            "hwm_while_writing_mib": round3(baseline_hwm_before_reset as f64 / 1024.0),
            "vmhwm_reset": hwm_reset,
            "peak_above_baseline_mib": round3(kib_above(peak)),
            "peak_sampled_above_baseline_mib": round3(kib_above(peak_sampled)),
            "end_above_baseline_mib": round3(kib_above(end.rss_kib)),
            "samples": samples.count,
            "timeline": {
                "columns": ["seconds", "rss_above_baseline_mib", "library_outstanding_mib"],
                "rows": samples.timeline.iter().map(|(t, rss, out)| {
                    json!([round3(*t), round3(kib_above(*rss)), round3(*out as f64 / MIB)])
                }).collect::<Vec<_>>(),
            },
        },
        "library": {
            "peak_outstanding_mib": round3(peak_outstanding as f64 / MIB),
            "peak_outstanding_records": counters.peak_outstanding_records.load(Ordering::Acquire),
            "bound_mib": round3(bound as f64 / MIB),
            "within_bound": peak_outstanding <= bound,
            "counters": counters.to_json(),
        },
        "ran_ms": ms(ran_for),
        "graceful_shutdown_ms": ms(shutdown),
    }))
}

/// What the sampler thread saw.
#[derive(Debug, Default)]
struct Samples {
    count: usize,
    peak_rss_kib: u64,
    /// (seconds since start, RSS in KiB, library outstanding bytes), once a second.
    timeline: Vec<(f64, u64, u64)>,
}

/// A plain thread (not a task, so a busy runtime cannot delay it) sampling RSS.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Samples>>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(counters: Arc<Counters>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Samples::default()));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            let samples = samples.clone();
            move || {
                let started = Instant::now();
                while !stop.load(Ordering::Acquire) {
                    if let Ok(status) = read_status() {
                        let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
                        if s.count % TIMELINE_EVERY == 0 {
                            let t = started.elapsed().as_secs_f64();
                            s.timeline.push((t, status.rss_kib, counters.outstanding_bytes()));
                        }
                        s.count += 1;
                        s.peak_rss_kib = s.peak_rss_kib.max(status.rss_kib);
                    }
                    std::thread::sleep(SAMPLE_EVERY);
                }
            }
        });
        Self { stop, samples, thread }
    }

    fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *samples)
    }
}
