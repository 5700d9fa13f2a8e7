//! Shared support for the integration tests: a fresh stream and lease table per test
//! on the embedded backend, a producer that remembers what it wrote, a recording
//! processor, and event-driven waiting.
//!
//! Every helper here talks to the real Kinesis and DynamoDB wire protocols through the
//! AWS SDK; nothing is faked in memory. One module per role:
//!
//! - [`conformance`] starts the npm conformance backends (kinesis-mock, dynalite);
//! - [`faults`]: Kinesis-side faults no emulator produces on its own ([`FaultInjector`]:
//!   throttling, expired iterators, internal failures, crafted responses;
//!   [`HangingHttpClient`]: requests that never complete);
//! - [`faulty_store`]: lease-table faults ([`FaultyLeaseStore`]: partitions, failed
//!   renewals and reads, writes that land but report failure);
//! - [`logs`]: in-memory log capture ([`capture_logs`]).
//! - [`proxy`]: a TCP proxy for network faults (resets mid-response, slowness,
//!   blackouts) through the real client code paths ([`proxy::ChaosProxy`]).
//! - [`verifier`]: the chaos verifier, which checks the design's promises against what a
//!   producer acknowledged and what workers recorded.
//! - [`chaos`]: the chaos runner's seeded schedule (kills, stops, reshards, network
//!   faults); [`recording`]: the event files of a round and how they are read back;
//!   [`sdk_faults`]: faults at a rate in Kinesis and DynamoDB responses
//!   ([`sdk_faults::RandomFaults`]). The runner itself is `src/bin/chaos.rs`.

pub mod chaos;
pub mod conformance;
pub mod faults;
pub mod faulty_store;
pub mod logs;
pub mod proxy;
pub mod recording;
pub mod sdk_faults;
pub mod verifier;

pub use faults::{Fault, FaultInjector, HangingHttpClient, StreamMessage};
pub use faulty_store::FaultyLeaseStore;
pub use logs::{capture_logs, LogCapture};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use kcl_core::{
    CheckpointError, Checkpointer, CoordinatorConfig, InitializationInput, LeaseLostInput, LeaseManagementConfig,
    ProcessRecordsInput, ProcessorError, RecordProcessor, RetrievalConfig, SchedulerBuilder, SequenceNumber,
    ShardEndedInput, ShutdownRequestedInput,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_local::LocalBackend;
use tokio::sync::Notify;

/// A random suffix so that tests running in parallel never share a stream or table.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Which Kinesis + DynamoDB a test talks to.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value per test; boxing would only add noise"
)]
pub enum Backend {
    /// The embedded ferrokinesis + dynoxide (`kcl-local`): fast, the default.
    Embedded(LocalBackend),
    /// kinesis-mock + dynalite from npm: slower, and the most faithful (`ChildShards`).
    Conformance(conformance::ConformanceBackend),
}

impl Backend {
    /// The Kinesis endpoint URL.
    pub fn kinesis_endpoint(&self) -> String {
        match self {
            Self::Embedded(b) => b.kinesis_endpoint(),
            Self::Conformance(b) => b.kinesis_endpoint(),
        }
    }

    /// The DynamoDB endpoint URL.
    pub fn dynamodb_endpoint(&self) -> String {
        match self {
            Self::Embedded(b) => b.dynamodb_endpoint(),
            Self::Conformance(b) => b.dynamodb_endpoint(),
        }
    }

    /// SDK config for Kinesis.
    pub fn kinesis_sdk_config(&self) -> aws_types::SdkConfig {
        match self {
            Self::Embedded(b) => b.kinesis_sdk_config(),
            Self::Conformance(b) => b.kinesis_sdk_config(),
        }
    }

    /// SDK config for DynamoDB.
    pub fn dynamodb_sdk_config(&self) -> aws_types::SdkConfig {
        match self {
            Self::Embedded(b) => b.dynamodb_sdk_config(),
            Self::Conformance(b) => b.dynamodb_sdk_config(),
        }
    }
}

/// One test's world: a backend, a stream, and a lease table name.
#[derive(Debug)]
pub struct TestEnv {
    /// The Kinesis + DynamoDB.
    pub backend: Backend,
    /// Kinesis client for the producer and the scheduler.
    pub kinesis: aws_sdk_kinesis::Client,
    /// DynamoDB client.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// The stream, created with the requested shard count.
    pub stream: String,
    /// The lease table (the application name).
    pub table: String,
}

impl TestEnv {
    /// Starts the embedded backend and creates a stream of `shards` shards.
    pub async fn start(shards: i32) -> anyhow::Result<Self> {
        init_tracing();
        let backend = LocalBackend::start().await.context("starting the embedded backend")?;
        Self::with_backend(Backend::Embedded(backend), shards).await
    }

    /// Starts the conformance backend (kinesis-mock + dynalite; `npm ci --prefix
    /// tests/conformance` first) and creates a stream of `shards` shards.
    pub async fn start_conformance(shards: i32) -> anyhow::Result<Self> {
        init_tracing();
        let backend = conformance::ConformanceBackend::start()
            .await
            .context("starting the conformance backend")?;
        Self::with_backend(Backend::Conformance(backend), shards).await
    }

    async fn with_backend(backend: Backend, shards: i32) -> anyhow::Result<Self> {
        let kinesis = aws_sdk_kinesis::Client::new(&backend.kinesis_sdk_config());
        let dynamodb = aws_sdk_dynamodb::Client::new(&backend.dynamodb_sdk_config());
        let stream = unique("stream");
        kcl_local::create_stream(&kinesis, &stream, shards)
            .await
            .context("creating the stream")?;
        Ok(Self {
            backend,
            kinesis,
            dynamodb,
            stream,
            table: unique("app"),
        })
    }

    /// A DynamoDB lease store on this test's table.
    pub fn lease_store(&self) -> DynamoLeaseStore {
        DynamoLeaseStore::new(self.dynamodb.clone(), self.table.clone())
    }

    /// A scheduler builder with fast test timings (failover 3 s, reads every 200 ms).
    pub fn scheduler(&self, recorder: &Recorder, mode: CheckpointMode) -> SchedulerBuilder {
        let recorder = recorder.clone();
        fast_config(
            kcl_core::Scheduler::builder(self.stream.clone())
                .kinesis_client(self.kinesis.clone())
                .lease_store(self.lease_store()),
        )
        .processor_factory(move |shard_id: &str| RecordingProcessor::new(shard_id, recorder.clone(), mode))
    }

    /// Writes `n` records, as [`put_records`] does.
    pub async fn put(&self, n: usize, tag: &str) -> anyhow::Result<Vec<Written>> {
        put_records(&self.kinesis, &self.stream, n, tag).await
    }
}

/// Applies fast timings suited to tests to a builder.
pub fn fast_config(builder: SchedulerBuilder) -> SchedulerBuilder {
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_secs(3));
    lease.lease_taking_interval = Duration::from_secs(1);
    let retrieval = RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        ..RetrievalConfig::default()
    };
    let coordinator = CoordinatorConfig {
        parent_shard_poll_interval: Duration::from_millis(200),
        graceful_shutdown_timeout: Duration::from_secs(10),
        ..CoordinatorConfig::default()
    };
    builder
        .lease_config(lease)
        .retrieval_config(retrieval)
        .coordinator_config(coordinator)
}

/// A record the producer wrote, with where Kinesis put it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The shard Kinesis chose.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
    /// The partition key.
    pub partition_key: String,
    /// The payload.
    pub data: Bytes,
}

/// Writes `n` records with `PutRecords` ([`kcl_local::put_records`]: batches of 500,
/// refused entries resent) and returns what was written. Payloads are `"{tag}-{i}"`,
/// partition keys spread over the key space.
pub async fn put_records(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<Written>> {
    let records: Vec<(String, Bytes)> = (0..n)
        .map(|i| (format!("key-{tag}-{i}"), Bytes::from(format!("{tag}-{i}"))))
        .collect();
    let results = kcl_local::put_records(kinesis, stream, &records).await?;
    records
        .into_iter()
        .zip(results)
        .map(|((partition_key, data), r)| {
            Ok(Written {
                shard_id: r.shard_id,
                sequence_number: SequenceNumber::parse(&r.sequence_number)?,
                partition_key,
                data,
            })
        })
        .collect()
}

/// The multi-stream identifier the backend gives `stream` (the account from its ARN,
/// its creation time), as a multi-stream worker resolves it.
pub async fn stream_identifier(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<kcl_core::StreamIdentifier> {
    let summary = kinesis.describe_stream_summary().stream_name(stream).send().await?;
    let d = summary.stream_description_summary().context("description")?;
    let account = d.stream_arn().split(':').nth(4).context("account in the ARN")?;
    Ok(kcl_core::StreamIdentifier::multi_stream(
        account,
        stream,
        d.stream_creation_timestamp().secs(),
    ))
}

/// Sequence numbers written per shard, in write order.
pub fn by_shard(written: &[Written]) -> BTreeMap<String, Vec<SequenceNumber>> {
    let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
    for w in written {
        map.entry(w.shard_id.clone())
            .or_default()
            .push(w.sequence_number.clone());
    }
    map
}

/// A record as a processor received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The shard it came from.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
    /// Its sub-sequence number.
    pub sub_sequence_number: u64,
    /// Its payload.
    pub data: Bytes,
    /// [`kcl_core::Record::malformed_aggregate`].
    pub malformed_aggregate: bool,
    /// When it was delivered.
    pub at: Instant,
}

/// Lifecycle calls a processor received. The fields name the shard and what the call
/// carried.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Event {
    /// `initialize`, with the checkpoint it started from and any pending (prepared)
    /// checkpoint with its application state.
    Initialized {
        shard_id: String,
        checkpoint: String,
        pending: Option<(String, Option<Bytes>)>,
    },
    /// `lease_lost`.
    LeaseLost { shard_id: String },
    /// `shard_ended`.
    ShardEnded { shard_id: String },
    /// `shutdown_requested`, with the result of the checkpoint made there (if any).
    ShutdownRequested { shard_id: String },
    /// A `process_records` call, with the number of records (for empty batches).
    Batch { shard_id: String, records: usize },
    /// A processor call that failed on purpose (recorded by test processors).
    Failed { shard_id: String },
}

/// What every processor of a test recorded.
#[derive(Debug, Default)]
pub struct RecorderState {
    /// Every record delivered, in delivery order.
    pub deliveries: Vec<Delivery>,
    /// Lifecycle calls, in order.
    pub events: Vec<Event>,
    /// The same calls with the time they were made.
    pub timeline: Vec<(Instant, Event)>,
    /// The last checkpointer handed to each shard's processor.
    pub checkpointers: BTreeMap<String, Checkpointer>,
    /// Errors returned by checkpoints the processors made.
    pub checkpoint_errors: Vec<String>,
}

impl RecorderState {
    fn push(&mut self, event: Event) {
        self.timeline.push((Instant::now(), event.clone()));
        self.events.push(event);
    }

    /// Deliveries per shard, in delivery order.
    pub fn by_shard(&self) -> BTreeMap<String, Vec<SequenceNumber>> {
        let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
        for d in &self.deliveries {
            map.entry(d.shard_id.clone())
                .or_default()
                .push(d.sequence_number.clone());
        }
        map
    }

    /// How many lifecycle events match.
    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }
}

/// Shared, awaitable record of what the processors saw.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    state: Arc<Mutex<RecorderState>>,
    changed: Arc<Notify>,
}

impl Recorder {
    /// Locks the state.
    pub fn state(&self) -> MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event.
    pub fn note(&self, event: Event) {
        self.update(|s| s.push(event));
    }

    fn update(&self, f: impl FnOnce(&mut RecorderState)) {
        f(&mut self.state());
        self.changed.notify_waiters();
    }

    /// Waits until `pred` holds, woken by every change; fails after `timeout` with
    /// `what` in the message.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&RecorderState) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(&self.state()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let s = self.state();
                bail!(
                    "timed out after {timeout:?} waiting for {what}: {} deliveries, events {:?}",
                    s.deliveries.len(),
                    s.events
                );
            }
        }
    }

    /// Waits until at least `n` records were delivered.
    pub async fn wait_for_records(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{n} records"), timeout, |s| s.deliveries.len() >= n)
            .await
    }
}

/// When a [`RecordingProcessor`] checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointMode {
    /// After every batch, and in `shutdown_requested`.
    EveryBatch,
    /// Only in `shutdown_requested`.
    OnShutdown,
    /// Never (the checkpointer is kept in the recorder for the test to use).
    Never,
}

/// A processor that records everything into a [`Recorder`].
#[derive(Debug)]
pub struct RecordingProcessor {
    shard_id: String,
    recorder: Recorder,
    mode: CheckpointMode,
}

impl RecordingProcessor {
    /// A processor for one shard.
    pub fn new(shard_id: &str, recorder: Recorder, mode: CheckpointMode) -> Self {
        Self {
            shard_id: shard_id.to_owned(),
            recorder,
            mode,
        }
    }

    fn note_checkpoint(&self, result: Result<(), CheckpointError>) {
        if let Err(e) = result {
            self.recorder.update(|s| s.checkpoint_errors.push(e.to_string()));
        }
    }
}

#[async_trait]
impl RecordProcessor for RecordingProcessor {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.recorder.note(Event::Initialized {
            shard_id: input.shard_id.clone(),
            checkpoint: input.extended_sequence_number.to_string(),
            pending: input
                .pending_checkpoint
                .as_ref()
                .map(|p| (p.to_string(), input.pending_checkpoint_state.clone())),
        });
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let shard_id = self.shard_id.clone();
        self.recorder.update(|s| {
            s.push(Event::Batch {
                shard_id: shard_id.clone(),
                records: input.records.len(),
            });
            let at = Instant::now();
            s.deliveries.extend(input.records.iter().map(|r| Delivery {
                shard_id: shard_id.clone(),
                sequence_number: r.sequence_number.clone(),
                sub_sequence_number: r.sub_sequence_number,
                data: r.data.clone(),
                malformed_aggregate: r.malformed_aggregate,
                at,
            }));
            s.checkpointers.insert(shard_id.clone(), input.checkpointer.clone());
        });
        if self.mode == CheckpointMode::EveryBatch && !input.records.is_empty() {
            let result = input.checkpointer.checkpoint().await;
            self.note_checkpoint(result);
        }
        Ok(())
    }

    async fn lease_lost(&mut self, input: LeaseLostInput) {
        self.recorder.note(Event::LeaseLost {
            shard_id: input.shard_id,
        });
    }

    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        self.recorder.note(Event::ShardEnded {
            shard_id: input.shard_id.clone(),
        });
        input.checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        if self.mode != CheckpointMode::Never {
            let result = input.checkpointer.checkpoint().await;
            self.note_checkpoint(result);
        }
        self.recorder.note(Event::ShutdownRequested {
            shard_id: input.shard_id,
        });
        Ok(())
    }
}

/// A processor whose `shutdown_requested` waits until `release` is cancelled before it
/// goes on as the wrapped one: an application that is slow to let a shard go.
#[derive(Debug)]
pub struct HangingShutdownProcessor<P> {
    inner: P,
    release: tokio_util::sync::CancellationToken,
}

impl<P> HangingShutdownProcessor<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, release: tokio_util::sync::CancellationToken) -> Self {
        Self { inner, release }
    }
}

#[async_trait]
impl<P: RecordProcessor> RecordProcessor for HangingShutdownProcessor<P> {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.inner.initialize(input).await
    }
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.inner.process_records(input).await
    }
    async fn lease_lost(&mut self, input: LeaseLostInput) {
        self.inner.lease_lost(input).await;
    }
    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        self.inner.shard_ended(input).await
    }
    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        self.release.cancelled().await;
        self.inner.shutdown_requested(input).await
    }
}

/// A line of a `kcl-worker` log file (see that binary's docs). The fields name what
/// the line carries.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum WorkerLine {
    /// `I`: initialized at a checkpoint.
    Initialized { shard_id: String, checkpoint: String },
    /// `D`: a delivered record.
    Delivered {
        shard_id: String,
        sequence_number: SequenceNumber,
        payload: String,
    },
    /// `C`: a stored checkpoint.
    Checkpointed { shard_id: String, position: String },
    /// `L`: lease lost.
    LeaseLost { shard_id: String },
    /// `E`: shard ended.
    ShardEnded { shard_id: String },
    /// `S`: shutdown requested.
    ShutdownRequested { shard_id: String },
    /// `X`: the scheduler returned.
    Exited { ok: bool },
}

/// Reads a worker log; a missing file is an empty log.
pub fn read_worker_log(path: &std::path::Path) -> anyhow::Result<Vec<WorkerLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    // The last line may be cut short by a kill -9 mid-write: only complete lines count.
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let f: Vec<&str> = line.trim_end().split(' ').collect();
        let shard = || f.get(1).map(|s| s.to_string()).unwrap_or_default();
        out.push(match f.first().copied() {
            Some("I") => WorkerLine::Initialized {
                shard_id: shard(),
                checkpoint: f.get(2).unwrap_or(&"").to_string(),
            },
            Some("D") => WorkerLine::Delivered {
                shard_id: shard(),
                sequence_number: SequenceNumber::parse(f.get(2).unwrap_or(&""))?,
                payload: f.get(4).unwrap_or(&"").to_string(),
            },
            Some("C") => WorkerLine::Checkpointed {
                shard_id: shard(),
                position: f.get(2).unwrap_or(&"").to_string(),
            },
            Some("L") => WorkerLine::LeaseLost { shard_id: shard() },
            Some("E") => WorkerLine::ShardEnded { shard_id: shard() },
            Some("S") => WorkerLine::ShutdownRequested { shard_id: shard() },
            Some("X") => WorkerLine::Exited {
                ok: f.get(1) == Some(&"ok"),
            },
            _ => bail!("unexpected worker log line {line:?}"),
        });
    }
    Ok(out)
}

/// Delivered sequence numbers per shard, in log order.
pub fn worker_deliveries(lines: &[WorkerLine]) -> BTreeMap<String, Vec<SequenceNumber>> {
    let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
    for line in lines {
        if let WorkerLine::Delivered {
            shard_id,
            sequence_number,
            ..
        } = line
        {
            map.entry(shard_id.clone()).or_default().push(sequence_number.clone());
        }
    }
    map
}

/// A `kcl-worker` child process, killed when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    /// The worker id.
    pub worker_id: String,
    /// Its log file.
    pub log: std::path::PathBuf,
    child: tokio::process::Child,
}

/// Settings of a `kcl-worker` process.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Failover time.
    pub failover: Duration,
    /// Lease-taking interval.
    pub taking_interval: Duration,
    /// GetRecords limit.
    pub max_records: i32,
    /// `Some(consumer name)`: read through enhanced fan-out with that stream consumer
    /// (`--retrieval fan-out --consumer-name NAME`); `None`: polling.
    pub fan_out_consumer: Option<String>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            failover: Duration::from_secs(3),
            taking_interval: Duration::from_millis(500),
            max_records: 10_000,
            fan_out_consumer: None,
        }
    }
}

impl WorkerProcess {
    /// Starts `kcl-worker` (the binary at `binary`: pass `env!("CARGO_BIN_EXE_kcl-worker")`,
    /// which Cargo defines for integration tests only) against `env`'s backend, stream
    /// and table; its log goes to `dir/<worker_id>.log` and its stderr to
    /// `dir/<worker_id>.err`.
    pub fn start(
        binary: &str,
        env: &TestEnv,
        dir: &std::path::Path,
        worker_id: &str,
        spec: &WorkerSpec,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{worker_id}.log"));
        let err = std::fs::File::create(dir.join(format!("{worker_id}.err")))?;
        let mut command = tokio::process::Command::new(binary);
        if let Some(consumer) = &spec.fan_out_consumer {
            command.args(["--retrieval", "fan-out", "--consumer-name", consumer]);
        }
        let child = command
            .args(["--kinesis-endpoint", &env.backend.kinesis_endpoint()])
            .args(["--dynamodb-endpoint", &env.backend.dynamodb_endpoint()])
            .args([
                "--stream",
                &env.stream,
                "--application",
                &env.table,
                "--worker-id",
                worker_id,
            ])
            .arg("--output")
            .arg(&log)
            .args(["--failover-ms", &spec.failover.as_millis().to_string()])
            .args(["--taking-interval-ms", &spec.taking_interval.as_millis().to_string()])
            .args(["--max-records", &spec.max_records.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting kcl-worker")?;
        Ok(Self {
            worker_id: worker_id.to_owned(),
            log,
            child,
        })
    }

    /// The log so far.
    pub fn lines(&self) -> anyhow::Result<Vec<WorkerLine>> {
        read_worker_log(&self.log)
    }

    /// `kill -9`: no shutdown, no release, nothing flushed beyond what was written.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM (graceful shutdown), then waits for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("worker already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("worker did not exit")??)
    }
}

/// Polls the lease table until `pred` holds on the owners (shard -> owner), sampling
/// every `every`, and calls `observe` with each sample. There is no event to await in
/// another process's writes to DynamoDB, so this is a bounded poll.
pub async fn poll_leases(
    store: &DynamoLeaseStore,
    timeout: Duration,
    every: Duration,
    mut observe: impl FnMut(&BTreeMap<String, Option<String>>),
    pred: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    use kcl_core::LeaseStore as _;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let leases = match store.list_leases().await {
            // The workers have not created the table yet.
            Err(kcl_core::LeaseStoreError::TableNotFound { .. }) => Vec::new(),
            other => other?,
        };
        let owners: BTreeMap<String, Option<String>> =
            leases.into_iter().map(|l| (l.lease_key, l.lease_owner)).collect();
        observe(&owners);
        if pred(&owners) {
            return Ok(owners);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?}; owners: {owners:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Leases per owner, sorted by count (unowned leases are not counted).
pub fn load(owners: &BTreeMap<String, Option<String>>) -> Vec<usize> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in owners.values().flatten() {
        *counts.entry(owner).or_default() += 1;
    }
    let mut v: Vec<usize> = counts.into_values().collect();
    v.sort_unstable();
    v
}

/// Waits until the stream is `ACTIVE` again after a reshard (bounded poll: the stream
/// status is the only signal Kinesis gives).
pub async fn wait_for_active(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = kinesis.describe_stream_summary().stream_name(stream).send().await?;
        let status = out.stream_description_summary().map(|d| d.stream_status().clone());
        if status == Some(aws_sdk_kinesis::types::StreamStatus::Active) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "stream {stream} not ACTIVE: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream's shards (all pages, by `ExclusiveStartShardId`, which every backend here
/// supports).
pub async fn list_shards(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<Vec<aws_sdk_kinesis::types::Shard>> {
    let mut shards: Vec<aws_sdk_kinesis::types::Shard> = Vec::new();
    loop {
        let mut req = kinesis.list_shards().stream_name(stream);
        if let Some(last) = shards.last() {
            req = req.exclusive_start_shard_id(last.shard_id());
        }
        let page = req.send().await?;
        if page.shards().is_empty() {
            return Ok(shards);
        }
        shards.extend(page.shards().iter().cloned());
        if page.next_token().is_none() {
            return Ok(shards);
        }
    }
}

/// Splits a shard at the middle of its hash key range and waits until the stream is
/// `ACTIVE`.
pub async fn split_shard_in_half(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
) -> anyhow::Result<()> {
    let shards = list_shards(kinesis, stream).await?;
    let shard = shards
        .iter()
        .find(|s| s.shard_id() == shard_id)
        .context("shard to split")?;
    let range = shard.hash_key_range().context("hash key range")?;
    let start: u128 = range.starting_hash_key().parse()?;
    let end: u128 = range.ending_hash_key().parse()?;
    let middle = start + (end - start) / 2 + 1;
    kinesis
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard_id)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await?;
    wait_for_active(kinesis, stream).await
}

/// Merges two adjacent shards and waits until the stream is `ACTIVE`.
pub async fn merge_shards(kinesis: &aws_sdk_kinesis::Client, stream: &str, a: &str, b: &str) -> anyhow::Result<()> {
    kinesis
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(a)
        .adjacent_shard_to_merge(b)
        .send()
        .await?;
    wait_for_active(kinesis, stream).await
}

/// A record of a keyed producer: the `n`-th record of partition key `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedWritten {
    /// The partition key.
    pub key: String,
    /// Its per-key sequence number, from 0.
    pub n: u64,
    /// Where Kinesis put it.
    pub written: Written,
}

/// Checks that, per partition key, the records of a [`spawn_keyed_producer`] first
/// arrive in the order they were written (across parent and child shards too), and
/// returns per key how many records arrived.
///
/// # Panics
/// When a key's record arrives before an earlier one of the same key.
pub fn assert_keyed_order(deliveries: &[Delivery]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for d in deliveries {
        let text = String::from_utf8_lossy(&d.data);
        let (key, n) = text.split_once(':').context("keyed payload")?;
        let n: u64 = n.parse()?;
        let expected = next.entry(key.to_owned()).or_insert(0);
        if n == *expected {
            *expected += 1;
        } else {
            assert!(n < *expected, "key {key}: record {n} arrived before record {expected}");
        }
    }
    Ok(next)
}

/// Writes rounds of one record per key (`"{key}:{n}"`) until cancelled, each round
/// only after the previous one was acknowledged, so that the per-key order of writes is
/// also their order in time, across shards.
pub fn spawn_keyed_producer(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    keys: usize,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<KeyedWritten>>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut n = 0u64;
        while !cancel.is_cancelled() {
            let round: Vec<(String, Bytes)> = (0..keys)
                .map(|k| (format!("key{k}"), Bytes::from(format!("key{k}:{n}"))))
                .collect();
            let mut attempts = 0;
            let results = loop {
                match kcl_local::put_records(&kinesis, &stream, &round).await {
                    Ok(results) => break results,
                    // A reshard in progress may refuse writes for a moment: the round
                    // is written again (a duplicate of a round is harmless to the
                    // per-key order checks; the next round only starts after this one).
                    Err(e) if attempts < 20 => {
                        attempts += 1;
                        tracing::debug!(error = %e, "round {n} refused; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            for ((key, data), r) in round.into_iter().zip(results) {
                out.push(KeyedWritten {
                    key: key.clone(),
                    n,
                    written: Written {
                        shard_id: r.shard_id,
                        sequence_number: SequenceNumber::parse(&r.sequence_number)?,
                        partition_key: key,
                        data,
                    },
                });
            }
            n += 1;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        Ok(out)
    })
}

/// Takes `shard_id`'s lease for `owner` as another worker would: reads it and takes it
/// with the counter read, again if the owner's renewal moved the counter in between.
pub async fn steal_lease(store: &DynamoLeaseStore, shard_id: &str, owner: &str) -> anyhow::Result<kcl_core::Lease> {
    use kcl_core::LeaseStore as _;
    for _ in 0..20 {
        let mut lease = store.get_lease(shard_id).await?.context("lease to steal")?;
        if store.take_lease(&mut lease, owner).await? {
            return Ok(lease);
        }
    }
    bail!("could not take {shard_id}: its counter kept moving")
}

/// Runs a scheduler on a task; returns its shutdown handle and the task.
pub fn spawn_scheduler(
    scheduler: kcl_core::Scheduler,
) -> (
    kcl_core::ShutdownHandle,
    tokio::task::JoinHandle<Result<(), kcl_core::SchedulerError>>,
) {
    let handle = scheduler.shutdown_handle();
    (handle, tokio::spawn(scheduler.run()))
}

/// Requests a graceful shutdown and waits (at most `timeout`) for `run()` to return.
pub async fn stop_scheduler(
    handle: kcl_core::ShutdownHandle,
    task: tokio::task::JoinHandle<Result<(), kcl_core::SchedulerError>>,
    timeout: Duration,
) -> anyhow::Result<Result<(), kcl_core::SchedulerError>> {
    handle.shutdown();
    Ok(tokio::time::timeout(timeout, task)
        .await
        .context("the scheduler did not stop in time")??)
}
