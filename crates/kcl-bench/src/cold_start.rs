//! The `cold-start` scenario: from starting a worker process to its first record.
//!
//! The backend runs in its own process. Each iteration writes a few records to a
//! 4-shard stream, then starts a worker (this program's hidden `cold-start-case`
//! command: a `Scheduler` at `TRIM_HORIZON`, polling at 200 ms idle, checkpointing every
//! batch) that prints a line when its first record arrives and shuts down gracefully.
//! The time is from spawning the process to reading that line, so it includes the
//! process's own start (exec, runtime, SDK clients). Three cases, in this order, on one
//! application:
//! - `new_table`: a new application; the worker creates the lease table and the leases;
//! - `existing_table_same_worker`: the same worker id again (its leases were released at
//!   its graceful shutdown; the checkpoints are there);
//! - `existing_table_other_worker`: another worker id.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;

use crate::external::{Endpoints, ExternalBackend};
use crate::support::{ms, put_records, summary, unique, Counters, ProcessorOptions, Running};

/// Options of the `cold-start` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct ColdStartArgs {
    /// Iterations of the three cases (each on a new application).
    #[arg(long, default_value_t = 5)]
    pub(crate) iterations: usize,
    /// Shards of the stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
}

/// Options of the hidden `cold-start-case` command.
#[derive(Args, Debug, Clone)]
pub(crate) struct ColdStartCaseArgs {
    #[command(flatten)]
    pub(crate) endpoints: Endpoints,
    #[arg(long)]
    pub(crate) stream: String,
    #[arg(long)]
    pub(crate) application: String,
    #[arg(long)]
    pub(crate) worker_id: String,
}

const CASES: [&str; 3] = ["new_table", "existing_table_same_worker", "existing_table_other_worker"];

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &ColdStartArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let stream = bench.new_stream(args.shards).await?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for iteration in 0..args.iterations {
        let application = unique("bench-cold");
        for (case, worker) in CASES.iter().zip(["a", "a", "b"]) {
            // New records on every shard, after the previous case's checkpoints.
            put_records(&bench.kinesis, &stream, 16, |i| {
                bytes::Bytes::from(format!("cold-{iteration}-{case}-{i}"))
            })
            .await?;
            let mut command = tokio::process::Command::new(std::env::current_exe()?);
            command
                .arg("cold-start-case")
                .args(backend.endpoint_args())
                .arg(format!("--stream={stream}"))
                .arg(format!("--application={application}"))
                .arg(format!("--worker-id={worker}"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::inherit())
                .kill_on_drop(true);
            let spawned = Instant::now();
            let mut child = command.spawn().context("starting the worker")?;
            let stdout = child.stdout.take().context("the worker's stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let first = tokio::time::timeout(Duration::from_secs(60), async {
                while let Some(line) = lines.next_line().await? {
                    if line == "first-record" {
                        return anyhow::Ok(spawned.elapsed());
                    }
                }
                bail!("the worker exited before its first record")
            })
            .await
            .context("no record within 60 s")??;
            let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .context("the worker did not stop")??;
            anyhow::ensure!(status.success(), "the worker failed: {status}");
            let i = CASES.iter().position(|c| c == case).unwrap_or(0);
            times[i].push(ms(first));
            eprintln!("cold-start {iteration} {case}: {:.1} ms", ms(first));
        }
    }
    backend.stop().await?;
    let results: serde_json::Map<String, Value> = CASES
        .iter()
        .zip(&times)
        .map(|(case, t)| ((*case).to_owned(), summary(t)))
        .collect();
    Ok(json!({
        "scenario": "cold-start",
        "config": {
            "iterations": args.iterations,
            "shards": args.shards,
            "retrieval": "polling, idle 200 ms",
            "initial_position": "TRIM_HORIZON",
            "backend": "kcl-local servers in their own process",
        },
        "results": { "process_start_to_first_record_ms": results },
        "targets": { "process_start_to_first_record_ms": "< 100" },
        "note": "From spawning the worker process to it printing that process_records got its first record: \
                 process start, SDK clients, stream check, lease table (created in new_table), shard sync, lease \
                 taking, first GetRecords. Each worker stops gracefully (releasing its leases) before the next case.",
    }))
}

/// The hidden `cold-start-case` command: runs until the first record, prints
/// `first-record`, shuts down gracefully.
pub(crate) async fn run_case(args: &ColdStartCaseArgs) -> anyhow::Result<()> {
    let bench = args.endpoints.bench();
    let counters = std::sync::Arc::new(Counters::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let builder = bench
        .scheduler(
            &args.stream,
            &counters,
            ProcessorOptions::reporting(tx),
            InitialPositionInStream::TrimHorizon,
            RetrievalConfig {
                idle_time_between_reads: Duration::from_millis(200),
                ..RetrievalConfig::default()
            },
        )
        .lease_store(kcl_dynamo::DynamoLeaseStore::new(
            bench.dynamodb.clone(),
            args.application.clone(),
        ))
        .worker_id(args.worker_id.clone());
    let running = Running::start(builder)?;
    if rx.recv().await.is_some() {
        println!("first-record");
    }
    running.stop().await?;
    Ok(())
}
