//! The `lease-cost` scenario: what lease management costs in DynamoDB requests, per
//! operation and minute, in steady state.
//!
//! For each fleet (`--fleets`, default `2x8` and `4x64`: workers × shards) the backend
//! runs in its own process, a producer writes `--rate` records/s over the stream, and
//! the workers (schedulers on tasks of this process, default lease settings: failover
//! 10 s, renewals every 3.3 s, lease table read every 2 s; polling at the default 1.5 s
//! idle; the processor checkpoints once per batch) start together. Once each holds its
//! share of the leases, every DynamoDB request they send is counted (an SDK interceptor
//! reading `X-Amz-Target`) for `--seconds`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::external::ExternalBackend;
use crate::support::{leases_per_owner, round1, spawn_steady_producer, unique, Counters, ProcessorOptions, Running};

/// Options of the `lease-cost` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct LeaseCostArgs {
    /// Fleets to measure, as WORKERSxSHARDS, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = ["2x8".to_owned(), "4x64".to_owned()])]
    pub(crate) fleets: Vec<String>,
    /// Seconds of steady state counted per fleet.
    #[arg(long, default_value_t = 60)]
    pub(crate) seconds: u64,
    /// Records per second written over the stream while counting.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u32,
}

/// DynamoDB requests by operation.
#[derive(Debug, Clone, Default)]
pub(crate) struct RequestCounter(Arc<Mutex<BTreeMap<String, u64>>>);

impl RequestCounter {
    /// A DynamoDB client like `client` whose requests this counts.
    pub(crate) fn client(&self, client: &aws_sdk_dynamodb::Client) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(client.config().to_builder().interceptor(self.clone()).build())
    }

    /// The counts so far, by operation; starts counting again from zero.
    pub(crate) fn take(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        // `X-Amz-Target: DynamoDB_20120810.GetItem`: every attempt, retries included.
        let operation = context
            .request()
            .headers()
            .get("x-amz-target")
            .and_then(|t| t.rsplit('.').next())
            .unwrap_or("unknown")
            .to_owned();
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(operation)
            .or_default() += 1;
        Ok(())
    }
}

fn parse_fleet(fleet: &str) -> anyhow::Result<(usize, i32)> {
    let (workers, shards) = fleet
        .split_once('x')
        .with_context(|| format!("a fleet is WORKERSxSHARDS, not {fleet:?}"))?;
    Ok((workers.parse()?, shards.parse()?))
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &LeaseCostArgs) -> anyhow::Result<Value> {
    let mut fleets = serde_json::Map::new();
    for fleet in &args.fleets {
        let (workers, shards) = parse_fleet(fleet)?;
        eprintln!("lease-cost: {workers} workers x {shards} shards");
        fleets.insert(fleet.clone(), one_fleet(args, workers, shards).await?);
    }
    Ok(json!({
        "scenario": "lease-cost",
        "config": {
            "seconds": args.seconds,
            "rate": args.rate,
            "lease": "LeaseManagementConfig::default(): failover 10 s, renewals every 3.3 s, lease table read every 2 s",
            "retrieval": "polling, default idle 1.5 s",
            "checkpoint": "once per batch",
        },
        "results": fleets,
        "note": "Requests counted by an SDK interceptor on the workers' DynamoDB clients (every attempt), from the \
                 moment the leases were balanced, for `seconds`; per minute = count * 60 / seconds.",
    }))
}

async fn one_fleet(args: &LeaseCostArgs, workers: usize, shards: i32) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let stream = bench.new_stream(shards).await?;
    let application = unique("bench-lease-cost");
    let counter = RequestCounter::default();
    let dynamodb = counter.client(&bench.dynamodb);
    let counters = Arc::new(Counters::default());
    let mut running = Vec::new();
    for w in 0..workers {
        let builder = bench
            .scheduler(
                &stream,
                &counters,
                ProcessorOptions::counting(),
                InitialPositionInStream::TrimHorizon,
                RetrievalConfig::default(),
            )
            .lease_store(kcl_dynamo::DynamoLeaseStore::new(dynamodb.clone(), application.clone()))
            .worker_id(format!("worker-{w}"));
        running.push(Running::start(builder)?);
    }

    let cancel = CancellationToken::new();
    let producer = spawn_steady_producer(bench.kinesis.clone(), stream.clone(), args.rate, cancel.clone());

    // Steady state: every worker holds its share (a bounded poll of the lease table).
    let store = kcl_dynamo::DynamoLeaseStore::new(bench.dynamodb.clone(), application.clone());
    let share = usize::try_from(shards)? / workers;
    let started = Instant::now();
    loop {
        let held = leases_per_owner(&store).await;
        if held.len() == workers && held.values().all(|&n| n >= share) {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the leases did not balance within 300 s: {held:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let balanced_after = started.elapsed();
    counter.take();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let counts = counter.take();
    cancel.cancel();
    producer.await??;
    for r in running {
        r.stop().await?;
    }
    backend.stop().await?;

    let per_minute = |n: u64| round1(n as f64 * 60.0 / args.seconds as f64);
    let total: u64 = counts.values().sum();
    let by_operation: BTreeMap<&String, f64> = counts.iter().map(|(op, n)| (op, per_minute(*n))).collect();
    Ok(json!({
        "workers": workers,
        "shards": shards,
        "balanced_after_s": round1(balanced_after.as_secs_f64()),
        "requests_per_minute": by_operation,
        "requests_per_minute_total": per_minute(total),
        "requests_per_minute_per_shard": round1(per_minute(total) / f64::from(shards)),
    }))
}
