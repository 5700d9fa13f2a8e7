//! The `failover` scenario: how fast shards move between worker processes, and what it
//! costs in duplicates.
//!
//! The backend runs in its own process; a producer in this process writes `--rate`
//! records/s over an 8-shard stream. Two worker processes (this program's hidden
//! `failover-worker` command: polling at 200 ms idle, checkpoint per batch, failover time
//! `--failover-ms`) start together:
//! 1. **balance**: the time until each holds 4 leases;
//! 2. **crash**: `kill -9` of one; the time until the survivor has processed a record
//!    of each of the dead worker's shards (the target: failover time + 1 s);
//! 3. a third worker joins and the leases balance again;
//! 4. **graceful stop**: SIGTERM of the survivor of step 2; the time until the third has
//!    processed a record of each of its shards, and how long each shard went
//!    unprocessed (the stopping worker's last record to the new owner's first; the
//!    target: 1 s).
//!
//! Then the producer stops, the last worker drains, and every acknowledged record is
//! looked up: lost records, and duplicates by when they were delivered again (after the
//! crash, after the graceful stop, or during balancing).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use clap::Args;
use kcl_core::{
    InitialPositionInStream, InitializationInput, LeaseManagementConfig, LeaseStore as _, ProcessRecordsInput,
    ProcessorError, RecordProcessor, RetrievalConfig, Scheduler, ShutdownRequestedInput,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::external::{Endpoints, ExternalBackend};
use crate::support::{ms, round1, unique};

/// Options of the `failover` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct FailoverArgs {
    /// Records per second written over the stream.
    #[arg(long, default_value_t = 100)]
    pub(crate) rate: u32,
    /// The workers' failover time, in ms.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) failover_ms: u64,
    /// Give up on a step after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) timeout_secs: u64,
}

/// Options of the hidden `failover-worker` command.
#[derive(Args, Debug, Clone)]
pub(crate) struct FailoverWorkerArgs {
    #[command(flatten)]
    pub(crate) endpoints: Endpoints,
    #[arg(long)]
    pub(crate) stream: String,
    #[arg(long)]
    pub(crate) application: String,
    #[arg(long)]
    pub(crate) worker_id: String,
    #[arg(long)]
    pub(crate) failover_ms: u64,
}

const SHARDS: i32 = 8;

/// A processor that prints `D <shard> <sequence>` per record, before checkpointing.
#[derive(Debug)]
struct PrintingProcessor {
    shard_id: String,
}

#[async_trait]
impl RecordProcessor for PrintingProcessor {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.shard_id = input.shard_id;
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let mut text = String::new();
        for r in &input.records {
            text.push_str(&format!("D {} {}\n", self.shard_id, r.sequence_number));
        }
        {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        input.checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        input.checkpointer.checkpoint().await?;
        Ok(())
    }
}

/// The hidden `failover-worker` command: a worker that prints what it processes, until
/// SIGTERM (graceful) or SIGKILL.
pub(crate) async fn worker(args: &FailoverWorkerArgs) -> anyhow::Result<()> {
    let bench = args.endpoints.bench();
    let scheduler = Scheduler::builder(args.stream.clone())
        .kinesis_client(bench.kinesis.clone())
        .lease_store(kcl_dynamo::DynamoLeaseStore::new(
            bench.dynamodb.clone(),
            args.application.clone(),
        ))
        .worker_id(args.worker_id.clone())
        .initial_position(InitialPositionInStream::TrimHorizon)
        .lease_config(LeaseManagementConfig::with_failover_time(Duration::from_millis(
            args.failover_ms,
        )))
        .retrieval_config(RetrievalConfig {
            idle_time_between_reads: Duration::from_millis(200),
            ..RetrievalConfig::default()
        })
        .processor_factory(|shard_id: &str| PrintingProcessor {
            shard_id: shard_id.to_owned(),
        })
        .build()?;
    let shutdown = scheduler.shutdown_handle();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        shutdown.shutdown();
    });
    scheduler.run().await?;
    Ok(())
}

/// A delivery seen by the scenario.
#[derive(Debug, Clone)]
struct Seen {
    worker: usize,
    shard: String,
    sequence: String,
    at: Instant,
}

/// A worker process whose deliveries flow into the scenario's channel.
#[derive(Debug)]
struct WorkerProcess {
    child: tokio::process::Child,
}

impl WorkerProcess {
    fn start(
        backend: &ExternalBackend,
        stream: &str,
        application: &str,
        index: usize,
        failover_ms: u64,
        tx: mpsc::UnboundedSender<Seen>,
    ) -> anyhow::Result<Self> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .arg("failover-worker")
            .args(backend.endpoint_args())
            .arg(format!("--stream={stream}"))
            .arg(format!("--application={application}"))
            .arg(format!("--worker-id=worker-{index}"))
            .arg(format!("--failover-ms={failover_ms}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut f = line.split(' ');
                if let (Some("D"), Some(shard), Some(sequence)) = (f.next(), f.next(), f.next()) {
                    let _ = tx.send(Seen {
                        worker: index,
                        shard: shard.to_owned(),
                        sequence: sequence.to_owned(),
                        at: Instant::now(),
                    });
                }
            }
        });
        Ok(Self { child })
    }

    fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the worker exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }
}

/// Everything delivered so far, drained from the channel.
#[derive(Debug, Default)]
struct Deliveries {
    all: Vec<Seen>,
}

impl Deliveries {
    fn drain(&mut self, rx: &mut mpsc::UnboundedReceiver<Seen>) {
        while let Ok(seen) = rx.try_recv() {
            self.all.push(seen);
        }
    }

    /// Waits until `worker` processed a record of each of `shards` after `since`; returns
    /// the time from `since` to each shard's first such record.
    async fn wait_taken_over(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Seen>,
        worker: usize,
        shards: &BTreeSet<String>,
        since: Instant,
        timeout: Duration,
    ) -> anyhow::Result<BTreeMap<String, f64>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut taken: BTreeMap<String, f64> = BTreeMap::new();
        loop {
            for s in self.all.iter().filter(|s| s.worker == worker && s.at >= since) {
                if shards.contains(&s.shard) {
                    taken.entry(s.shard.clone()).or_insert(ms(s.at - since));
                }
            }
            if taken.len() == shards.len() {
                return Ok(taken);
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(seen)) => self.all.push(seen),
                Ok(None) => bail!("the workers' output ended"),
                Err(_) => bail!("worker-{worker} took over only {taken:?} of {shards:?} in time"),
            }
        }
    }
}

/// Polls the lease table until every one of `workers` holds `per_worker` leases (another
/// process's writes to DynamoDB: there is no event to await); returns the owners.
async fn wait_balanced(
    store: &kcl_dynamo::DynamoLeaseStore,
    workers: &[usize],
    per_worker: usize,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let leases = store.list_leases().await.unwrap_or_default();
        let owners: BTreeMap<String, String> = leases
            .into_iter()
            .filter_map(|l| l.lease_owner.map(|o| (l.lease_key, o)))
            .collect();
        let balanced = workers.iter().all(|w| {
            let id = format!("worker-{w}");
            owners.values().filter(|o| **o == id).count() == per_worker
        });
        if balanced && owners.len() == workers.len() * per_worker {
            return Ok(owners);
        }
        if Instant::now() > deadline {
            bail!("leases not balanced in time: {owners:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn shards_of(owners: &BTreeMap<String, String>, worker: usize) -> BTreeSet<String> {
    let id = format!("worker-{worker}");
    owners
        .iter()
        .filter(|(_, o)| **o == id)
        .map(|(s, _)| s.clone())
        .collect()
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &FailoverArgs) -> anyhow::Result<Value> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let stream = bench.new_stream(SHARDS).await?;
    let application = unique("bench-failover");
    let store = kcl_dynamo::DynamoLeaseStore::new(bench.dynamodb.clone(), application.clone());

    // The producer: acknowledged (shard, sequence) pairs.
    let cancel = CancellationToken::new();
    let producer = tokio::spawn({
        let kinesis = bench.kinesis.clone();
        let stream = stream.clone();
        let cancel = cancel.clone();
        let rate = args.rate.max(1);
        async move {
            let mut acked: Vec<(String, String)> = Vec::new();
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            let per_tick = usize::try_from(rate.div_ceil(10)).unwrap_or(1);
            while !cancel.is_cancelled() {
                ticks.tick().await;
                let records: Vec<(String, bytes::Bytes)> = (0..per_tick)
                    .map(|i| {
                        (
                            format!("pk-{}", acked.len() + i),
                            bytes::Bytes::from_static(b"failover"),
                        )
                    })
                    .collect();
                for r in kcl_local::put_records(&kinesis, &stream, &records).await? {
                    acked.push((r.shard_id, r.sequence_number));
                }
            }
            anyhow::Ok(acked)
        }
    });

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut seen = Deliveries::default();
    let start = |i: usize| WorkerProcess::start(&backend, &stream, &application, i, args.failover_ms, tx.clone());

    // 1. Two workers balance.
    let started = Instant::now();
    let mut w0 = start(0)?;
    let w1 = start(1)?;
    let owners = wait_balanced(&store, &[0, 1], 4, timeout).await?;
    let balance = started.elapsed();
    eprintln!("failover: balanced 4/4 after {:.0} ms", ms(balance));

    // 2. kill -9 of worker 0.
    let victim_shards = shards_of(&owners, 0);
    seen.drain(&mut rx);
    let killed_at = Instant::now();
    w0.child.kill().await?;
    let crash = seen
        .wait_taken_over(&mut rx, 1, &victim_shards, killed_at, timeout)
        .await?;
    let crash_max = crash.values().copied().fold(0.0, f64::max);
    eprintln!("failover: crash taken over after {crash_max:.0} ms");

    // 3. A third worker joins.
    let rebalance_started = Instant::now();
    let w2 = start(2)?;
    let owners = wait_balanced(&store, &[1, 2], 4, timeout).await?;
    let rebalance = rebalance_started.elapsed();

    // 4. Graceful stop of worker 1.
    let stopped_shards = shards_of(&owners, 1);
    seen.drain(&mut rx);
    let stopped_at = Instant::now();
    w1.terminate()?;
    let graceful = seen
        .wait_taken_over(&mut rx, 2, &stopped_shards, stopped_at, timeout)
        .await?;
    let graceful_max = graceful.values().copied().fold(0.0, f64::max);
    // How long each shard went unprocessed: from the stopping worker's last record of
    // it to the new owner's first.
    let gap: BTreeMap<String, f64> = stopped_shards
        .iter()
        .filter_map(|shard| {
            let of = |worker: usize| seen.all.iter().filter(move |s| s.worker == worker && &s.shard == shard);
            let last_old = of(1).map(|s| s.at).max()?;
            let first_new = of(2).filter(|s| s.at >= stopped_at).map(|s| s.at).min()?;
            Some((shard.clone(), ms(first_new.saturating_duration_since(last_old))))
        })
        .collect();
    let gap_max = gap.values().copied().fold(0.0, f64::max);
    eprintln!("failover: graceful handoff after {graceful_max:.0} ms; shards unprocessed for at most {gap_max:.0} ms");

    // Drain: every acknowledged record delivered (or the timeout).
    cancel.cancel();
    let acked = producer.await??;
    let wanted: BTreeSet<(String, String)> = acked.into_iter().collect();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        seen.drain(&mut rx);
        let delivered: BTreeSet<(&str, &str)> = seen
            .all
            .iter()
            .map(|s| (s.shard.as_str(), s.sequence.as_str()))
            .collect();
        if wanted
            .iter()
            .all(|(sh, sq)| delivered.contains(&(sh.as_str(), sq.as_str())))
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            break;
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(s)) => seen.all.push(s),
            _ => break,
        }
    }
    w2.terminate()?;
    drop(w1);
    drop(w2);
    backend.stop().await?;

    // Lost records and duplicates by when they came again.
    let mut first: HashMap<(&str, &str), ()> = HashMap::new();
    let (mut after_crash, mut after_stop, mut balancing) = (0usize, 0usize, 0usize);
    let window = Duration::from_millis(args.failover_ms) + Duration::from_secs(5);
    for s in &seen.all {
        if first.insert((&s.shard, &s.sequence), ()).is_some() {
            if s.at >= killed_at && s.at <= killed_at + window {
                after_crash += 1;
            } else if s.at >= stopped_at && s.at <= stopped_at + window {
                after_stop += 1;
            } else {
                balancing += 1;
            }
        }
    }
    let lost = wanted
        .iter()
        .filter(|(sh, sq)| !first.contains_key(&(sh.as_str(), sq.as_str())))
        .count();
    Ok(json!({
        "scenario": "failover",
        "config": {
            "shards": SHARDS,
            "rate": args.rate,
            "failover_time_ms": args.failover_ms,
            "retrieval": "polling, idle 200 ms",
            "checkpoint": "once per batch",
            "backend": "kcl-local servers in their own process; workers are processes",
        },
        "results": {
            "balance_two_workers_ms": ms(balance),
            "crash_takeover_ms": { "per_shard": crash, "max": round1(crash_max) },
            "rebalance_third_worker_ms": ms(rebalance),
            "graceful_handoff_ms": { "per_shard": graceful, "max": round1(graceful_max) },
            "graceful_gap_ms": { "per_shard": gap, "max": round1(gap_max) },
            "records_acknowledged": wanted.len(),
            "records_lost": lost,
            "duplicates": { "after_crash": after_crash, "after_graceful_stop": after_stop, "during_balancing": balancing },
        },
        "targets": {
            "crash_takeover_ms": format!("<= failover time + 1 s = {}", args.failover_ms + 1000),
            "graceful_gap_ms": "<= 1000",
            "records_lost": 0,
        },
        "note": "Takeover times are from the kill -9 (or SIGTERM) to the first record of each of the worker's \
                 shards processed by the one taking over (a stopping worker goes on processing while its handoffs \
                 are announced, so its takeover time includes that); the graceful gap is from the stopping \
                 worker's last record of a shard to the new owner's first; the lease table is read every 100 ms for the balance \
                 steps. Duplicates are records processed a second time, counted by when: within failover time + 5 s \
                 of the crash or of the graceful stop, or else (balancing moves leases by taking them, and the \
                 previous owner stops at its next renewal).",
    }))
}
