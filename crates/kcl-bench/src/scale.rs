//! The `scale` scenario: many shards in one worker, and many leases in one fleet.
//!
//! 1. **One worker, `--shards` shards** (default 1,000): the backend runs in its own
//!    process, a producer writes `--rate` records/s over the stream, and one worker (a
//!    child process, this program's hidden `scale-worker` command; default lease and
//!    polling settings; checkpoint per batch) takes every lease. Once it holds them all,
//!    its CPU share (CPU time / wall time) and resident memory are measured for
//!    `--seconds`.
//! 2. **A fleet**: `--fleet-workers` schedulers (default 20, tasks of this process)
//!    share `--fleet-leases` leases (default 10,000: a stream of that many shards). The
//!    shards are not read (a retrieval factory whose publishers stay silent), so what
//!    is measured is lease management alone: the time until every worker holds its
//!    share, and the lease-table requests per minute by operation for `--seconds` after.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use clap::Args;
use kcl_core::retrieval::{PrefetchLimits, PublisherStart};
use kcl_core::{InitialPositionInStream, LeaseStore as _, RecordsPublisher, RetrievalConfig, RetrievalFactory};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::external::{Endpoints, ExternalBackend};
use crate::lease_cost::RequestCounter;
use crate::support::{
    leases_per_owner, process_cpu_time, read_status, round1, round3, run_case_in_child, spawn_steady_producer, unique,
    Counters, ProcessorOptions, Running,
};

/// Options of the `scale` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct ScaleArgs {
    /// Shards of the one-worker part (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub(crate) shards: i32,
    /// Records per second over the one-worker stream.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u32,
    /// Workers of the fleet part (0 skips it).
    #[arg(long, default_value_t = 20)]
    pub(crate) fleet_workers: usize,
    /// Leases (shards) of the fleet part.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) fleet_leases: i32,
    /// The fleet's failover time, in milliseconds (renewals every third of it).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) fleet_failover_ms: u64,
    /// Seconds measured in steady state, in each part.
    #[arg(long, default_value_t = 60)]
    pub(crate) seconds: u64,
    /// Give up on reaching steady state after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub(crate) timeout_secs: u64,
}

/// Options of the hidden `scale-worker` command.
#[derive(Args, Debug, Clone)]
pub(crate) struct ScaleWorkerArgs {
    #[command(flatten)]
    pub(crate) endpoints: Endpoints,
    #[arg(long)]
    pub(crate) stream: String,
    #[arg(long)]
    pub(crate) shards: usize,
    #[arg(long)]
    pub(crate) seconds: u64,
    #[arg(long)]
    pub(crate) timeout_secs: u64,
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &ScaleArgs) -> anyhow::Result<Value> {
    let mut results = serde_json::Map::new();
    if args.shards > 0 {
        results.insert("one_worker".into(), one_worker(args).await?);
    }
    if args.fleet_workers > 0 {
        results.insert("fleet".into(), fleet(args).await?);
    }
    Ok(json!({
        "scenario": "scale",
        "config": {
            "shards": args.shards,
            "rate": args.rate,
            "fleet_workers": args.fleet_workers,
            "fleet_leases": args.fleet_leases,
            "seconds": args.seconds,
            "lease": "one worker: LeaseManagementConfig::default(); fleet: with_failover_time(--fleet-failover-ms), renewals every third of it, lease table read every fifth",
            "retrieval": "one worker: polling, default idle 1.5 s, checkpoint per batch; fleet: no reads",
        },
        "results": results,
        "targets": { "one_worker": { "peak_rss_mib": "< 150", "cpu_share": "< 0.3" } },
        "note": "one_worker: CPU time and RSS of the worker's own process (the backend runs in another); \
                 cpu_share is CPU time over wall time in steady state. fleet: every worker in this process, \
                 requests counted by an SDK interceptor on their DynamoDB client (every attempt).",
    }))
}

async fn one_worker(args: &ScaleArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start_with_shard_limit(u32::try_from(args.shards)?.max(1000)).await?;
    let bench = backend.bench();
    eprintln!("scale: a stream of {} shards", args.shards);
    let stream = bench.new_stream(args.shards).await?;
    let cancel = CancellationToken::new();
    let producer = spawn_steady_producer(bench.kinesis.clone(), stream.clone(), args.rate, cancel.clone());
    let mut child_args = vec![
        "scale-worker".to_owned(),
        format!("--stream={stream}"),
        format!("--shards={}", args.shards),
        format!("--seconds={}", args.seconds),
        format!("--timeout-secs={}", args.timeout_secs),
    ];
    child_args.extend(backend.endpoint_args());
    let result = run_case_in_child(child_args, "the scale worker".to_owned()).await;
    cancel.cancel();
    producer.await??;
    backend.stop().await?;
    result
}

/// The hidden `scale-worker` command: takes every lease, then measures itself.
pub(crate) async fn worker(args: &ScaleWorkerArgs) -> anyhow::Result<()> {
    let bench = args.endpoints.bench();
    let counters = Arc::new(Counters::default());
    let application = unique("bench-scale");
    let builder = bench
        .scheduler(
            &args.stream,
            &counters,
            ProcessorOptions::counting(),
            InitialPositionInStream::TrimHorizon,
            RetrievalConfig::default(),
        )
        .lease_store(kcl_dynamo::DynamoLeaseStore::new(
            bench.dynamodb.clone(),
            application.clone(),
        ));
    let started = Instant::now();
    let running = Running::start(builder)?;
    let store = kcl_dynamo::DynamoLeaseStore::new(bench.dynamodb.clone(), application);
    // All leases held (the lease table is another process's: polled).
    loop {
        let held = store
            .list_leases()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|l| l.lease_owner.is_some())
            .count();
        if held >= args.shards {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            bail!("only {held} of {} leases held in time", args.shards);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let all_held = started.elapsed();
    let (cpu0, wall0) = (process_cpu_time(), Instant::now());
    let mut peak_rss_kib = 0;
    let deadline = wall0 + Duration::from_secs(args.seconds);
    while Instant::now() < deadline {
        peak_rss_kib = peak_rss_kib.max(read_status()?.rss_kib);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (cpu, wall) = (process_cpu_time() - cpu0, wall0.elapsed());
    let processed = counters.processed_records.load(std::sync::atomic::Ordering::Acquire);
    running.stop().await?;
    let result = json!({
        "shards": args.shards,
        "all_leases_held_after_s": round1(all_held.as_secs_f64()),
        "cpu_share": round3(cpu.as_secs_f64() / wall.as_secs_f64()),
        "peak_rss_mib": round1(peak_rss_kib as f64 / 1024.0),
        "records_processed": processed,
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{result}")?;
    stdout.flush()?;
    Ok(())
}

/// Publishers that never send: the fleet part measures lease management alone.
#[derive(Debug)]
struct SilentFactory;

#[async_trait]
impl RetrievalFactory for SilentFactory {
    fn start(&self, start: PublisherStart) -> RecordsPublisher {
        let (sink, publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: 1,
            max_records: 1,
            max_bytes: 1,
        });
        tokio::spawn(async move {
            start.cancel.cancelled().await;
            drop(sink);
        });
        publisher
    }
}

async fn fleet(args: &ScaleArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start_with_shard_limit(u32::try_from(args.fleet_leases)?.max(1000)).await?;
    let bench = backend.bench();
    eprintln!(
        "scale: a fleet of {} workers on {} leases",
        args.fleet_workers, args.fleet_leases
    );
    let stream = bench.new_stream(args.fleet_leases).await?;
    let application = unique("bench-fleet");
    let counter = RequestCounter::default();
    let dynamodb = counter.client(&bench.dynamodb);
    let mut running = Vec::new();
    let started = Instant::now();
    for w in 0..args.fleet_workers {
        let builder = kcl_core::Scheduler::builder(stream.clone())
            .kinesis_client(bench.kinesis.clone())
            .lease_store(kcl_dynamo::DynamoLeaseStore::new(dynamodb.clone(), application.clone()))
            .worker_id(format!("worker-{w}"))
            .initial_position(InitialPositionInStream::TrimHorizon)
            .retrieval_factory(SilentFactory)
            .lease_config(kcl_core::LeaseManagementConfig::with_failover_time(
                Duration::from_millis(args.fleet_failover_ms),
            ))
            .processor_factory(|_: &str| Idle);
        running.push(Running::start(builder)?);
    }
    let store = kcl_dynamo::DynamoLeaseStore::new(bench.dynamodb.clone(), application);
    let leases = usize::try_from(args.fleet_leases)?;
    let share = leases / args.fleet_workers;
    let mut last: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let held = leases_per_owner(&store).await;
        if held.len() == args.fleet_workers && held.values().all(|&n| n >= share) {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_secs) {
            bail!("the fleet did not balance in time: {held:?}");
        }
        if held != last {
            eprintln!(
                "scale: {} of {leases} leases held by {} workers (fewest {}, most {}) after {:.0} s",
                held.values().sum::<usize>(),
                held.len(),
                held.values().min().copied().unwrap_or(0),
                held.values().max().copied().unwrap_or(0),
                started.elapsed().as_secs_f64()
            );
            last = held;
        }
        // Each look is a read of the whole table: not too often, it loads the backend.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let balanced = started.elapsed();
    counter.take();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let counts = counter.take();
    for r in running {
        r.stop().await.context("stopping a fleet worker")?;
    }
    backend.stop().await?;
    let per_minute = |n: u64| round1(n as f64 * 60.0 / args.seconds as f64);
    let by_operation: BTreeMap<&String, f64> = counts.iter().map(|(op, n)| (op, per_minute(*n))).collect();
    Ok(json!({
        "workers": args.fleet_workers,
        "leases": args.fleet_leases,
        "failover_ms": args.fleet_failover_ms,
        "balanced_after_s": round1(balanced.as_secs_f64()),
        "lease_table_requests_per_minute": by_operation,
        "lease_table_requests_per_minute_total": per_minute(counts.values().sum()),
    }))
}

/// A processor for shards that are never read.
#[derive(Debug)]
struct Idle;

#[async_trait]
impl kcl_core::RecordProcessor for Idle {
    async fn process_records(&mut self, _input: kcl_core::ProcessRecordsInput) -> Result<(), kcl_core::ProcessorError> {
        Ok(())
    }
}
