//! What every scenario shares: the embedded backend with a fresh stream and lease table,
//! a producer, an instrumented Kinesis client, the benchmark's record processor, a
//! running scheduler that can be stopped gracefully, and small statistics helpers.
//!
//! Everything talks to the embedded Kinesis and DynamoDB through the AWS SDK, exactly
//! as an application would; nothing in the library is bypassed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use aws_sdk_kinesis::config::interceptors::AfterDeserializationInterceptorContextRef;
use aws_sdk_kinesis::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kinesis::operation::get_records::GetRecordsOutput;
use bytes::Bytes;
use kcl_core::{
    InitialPositionInStream, ProcessRecordsInput, ProcessorError, RecordProcessor, RetrievalConfig, Scheduler,
    SchedulerBuilder, SchedulerError, ShutdownHandle, ShutdownRequestedInput,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
use kcl_local::LocalBackend;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a graceful scheduler shutdown may take before the benchmark gives up on it.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Records handed to `kcl_local::put_records` at once (it sends them 500 a call); keeps
/// the payloads of a large backlog from all being in memory together.
const PUT_CHUNK: usize = 10_000;

/// A name that no other stream or table of this process (or a parallel one) uses.
pub(crate) fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos:09}-{n}", std::process::id())
}

/// The backend of one scenario, with its clients: the embedded one, or one already
/// running in another process, such as `kcl-local serve` (see `external`).
#[derive(Debug)]
pub(crate) struct Bench {
    /// The embedded Kinesis + DynamoDB, shut down by [`Bench::shutdown`]; `None` when the
    /// benchmark talks to a backend in another process.
    backend: Option<LocalBackend>,
    /// The Kinesis client configuration, from which the instrumented client is built.
    kinesis_config: aws_sdk_kinesis::Config,
    /// A plain Kinesis client for the producer (the scheduler gets an instrumented one).
    pub(crate) kinesis: aws_sdk_kinesis::Client,
    /// The DynamoDB client the lease stores use.
    pub(crate) dynamodb: aws_sdk_dynamodb::Client,
}

impl Bench {
    /// Starts the embedded backend.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let backend = LocalBackend::start().await.context("starting the embedded backend")?;
        let kinesis_config = aws_sdk_kinesis::config::Builder::from(&backend.kinesis_sdk_config()).build();
        let dynamodb = backend.dynamodb_client();
        Ok(Self {
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis_config.clone()),
            kinesis_config,
            dynamodb,
            backend: Some(backend),
        })
    }

    /// Uses a backend that already runs elsewhere (for example `kcl-local serve`), at
    /// these endpoint URLs, with the local backend's static test credentials.
    pub(crate) fn connect(kinesis_endpoint: &str, dynamodb_endpoint: &str) -> Self {
        const REGION: &str = "us-east-1";
        let kinesis_config =
            aws_sdk_kinesis::config::Builder::from(&kcl_local::sdk_config_for_endpoint(kinesis_endpoint, REGION))
                .build();
        let dynamodb = aws_sdk_dynamodb::Client::new(&kcl_local::sdk_config_for_endpoint(dynamodb_endpoint, REGION));
        Self {
            kinesis: aws_sdk_kinesis::Client::from_conf(kinesis_config.clone()),
            kinesis_config,
            dynamodb,
            backend: None,
        }
    }

    /// Creates a fresh stream of `shards` shards and returns its name.
    pub(crate) async fn new_stream(&self, shards: i32) -> anyhow::Result<String> {
        let stream = unique("bench");
        kcl_local::create_stream(&self.kinesis, &stream, shards)
            .await
            .context("creating the stream")?;
        Ok(stream)
    }

    /// A Kinesis client that counts what `GetRecords` returns into `counters`.
    pub(crate) fn counting_kinesis_client(&self, counters: &Arc<Counters>) -> aws_sdk_kinesis::Client {
        let config = self
            .kinesis_config
            .to_builder()
            .interceptor(FetchCounter {
                counters: counters.clone(),
            })
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }

    /// A scheduler builder for `stream` with a new lease table (a new application), an
    /// instrumented Kinesis client, and the benchmark processor.
    pub(crate) fn scheduler(
        &self,
        stream: &str,
        counters: &Arc<Counters>,
        processor: ProcessorOptions,
        position: InitialPositionInStream,
        retrieval: RetrievalConfig,
    ) -> SchedulerBuilder {
        let counters_for_factory = counters.clone();
        Scheduler::builder(stream)
            .kinesis_client(self.counting_kinesis_client(counters))
            .lease_store(DynamoLeaseStore::new(self.dynamodb.clone(), unique("bench-app")))
            .initial_position(position)
            .retrieval_config(retrieval)
            .processor_factory(move |shard_id: &str| BenchProcessor {
                shard_id: shard_id.to_owned(),
                options: processor.clone(),
                counters: counters_for_factory.clone(),
            })
    }

    /// Stops the embedded backend and waits for its threads (an external one is left
    /// running).
    pub(crate) async fn shutdown(self) {
        if let Some(backend) = self.backend {
            backend.shutdown().await;
        }
    }
}

/// Writes `n` records to `stream` with [`kcl_local::put_records`] (batches of 500,
/// refused entries resent). `payload(i)` makes record `i`; partition keys are distinct,
/// so records spread over every shard. Returns the shard of every record written, in
/// write order.
pub(crate) async fn put_records(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    n: usize,
    payload: impl Fn(usize) -> Bytes,
) -> anyhow::Result<Vec<String>> {
    let mut shards = Vec::with_capacity(n);
    for start in (0..n).step_by(PUT_CHUNK) {
        let records: Vec<(String, Bytes)> = (start..n.min(start + PUT_CHUNK))
            .map(|i| (format!("pk-{i}"), payload(i)))
            .collect();
        let written = kcl_local::put_records(kinesis, stream, &records)
            .await
            .context("PutRecords")?;
        shards.extend(written.into_iter().map(|r| r.shard_id));
    }
    Ok(shards)
}

/// Leases held per owner in `store`'s table now: a lease being handed over counts for
/// the worker still processing it (its checkpoint owner); unowned leases are not
/// counted; a failed read counts as an empty table.
pub(crate) async fn leases_per_owner(store: &DynamoLeaseStore) -> std::collections::BTreeMap<String, usize> {
    use kcl_core::LeaseStore as _;
    let mut held = std::collections::BTreeMap::new();
    for owner in store
        .list_leases()
        .await
        .unwrap_or_default()
        .into_iter()
        // A lease still being handed over counts for the worker processing it.
        .filter_map(|l| l.actual_owner().map(str::to_owned))
    {
        *held.entry(owner).or_default() += 1;
    }
    held
}

/// Writes `rate` records a second to `stream` (ten `PutRecords` a second) until
/// `cancel`; the task fails when a write does.
pub(crate) fn spawn_steady_producer(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    rate: u32,
    cancel: tokio_util::sync::CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        let per_tick = usize::try_from(rate.max(1).div_ceil(10)).unwrap_or(1);
        let mut n = 0usize;
        while !cancel.is_cancelled() {
            ticks.tick().await;
            put_records(&kinesis, &stream, per_tick, |i| Bytes::from(format!("r{}", n + i))).await?;
            n += per_tick;
        }
        Ok(())
    })
}

/// Writes `n` records of `size` bytes and returns the write rate as JSON
/// (`records`, `bytes`, `seconds`, `records_per_sec`, `mib_per_sec`).
pub(crate) async fn write_backlog(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    put_records(kinesis, stream, n, |i| payload_of_size(i, size)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = n * size;
    Ok(json!({
        "records": n,
        "bytes": bytes,
        "seconds": round3(seconds),
        "records_per_sec": round1(n as f64 / seconds),
        "mib_per_sec": round3(bytes as f64 / MIB / seconds),
    }))
}

/// A payload of exactly `size` bytes that starts with the record's index.
pub(crate) fn payload_of_size(index: usize, size: usize) -> Bytes {
    let mut data = format!("{index}:").into_bytes();
    data.resize(size.max(data.len()), b'x');
    data.truncate(size);
    Bytes::from(data)
}

/// Counters shared by the instrumented Kinesis client, the processors and the scenario.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// `GetRecords` calls that returned.
    pub(crate) get_records_calls: AtomicU64,
    /// Records returned by `GetRecords` (fetched into the library).
    pub(crate) fetched_records: AtomicU64,
    /// Payload bytes returned by `GetRecords`.
    pub(crate) fetched_bytes: AtomicU64,
    /// Records whose `process_records` call returned (the library frees a batch's
    /// prefetch budget at that moment).
    pub(crate) processed_records: AtomicU64,
    /// Payload bytes of those records.
    pub(crate) processed_bytes: AtomicU64,
    /// `process_records` calls.
    pub(crate) batches: AtomicU64,
    /// Checkpoints made, and the time they took in total (microseconds).
    pub(crate) checkpoints: AtomicU64,
    /// Total time of those checkpoints, in microseconds.
    pub(crate) checkpoint_micros: AtomicU64,
    /// Checkpoints that failed.
    pub(crate) checkpoint_errors: AtomicU64,
    /// The most payload bytes fetched and not yet processed, checked at every fetch
    /// (the only moment the amount grows), so it is exact rather than sampled.
    pub(crate) peak_outstanding_bytes: AtomicU64,
    /// The most records fetched and not yet processed.
    pub(crate) peak_outstanding_records: AtomicU64,
}

impl Counters {
    /// Payload bytes fetched but not yet processed: what the library holds in its
    /// prefetch queue (plus the batch the processor is working on).
    pub(crate) fn outstanding_bytes(&self) -> u64 {
        self.fetched_bytes
            .load(Ordering::Acquire)
            .saturating_sub(self.processed_bytes.load(Ordering::Acquire))
    }

    /// Records fetched but not yet processed.
    pub(crate) fn outstanding_records(&self) -> u64 {
        self.fetched_records
            .load(Ordering::Acquire)
            .saturating_sub(self.processed_records.load(Ordering::Acquire))
    }

    /// The counters as JSON, for the `results` of a scenario.
    pub(crate) fn to_json(&self) -> Value {
        let checkpoints = self.checkpoints.load(Ordering::Acquire);
        let micros = self.checkpoint_micros.load(Ordering::Acquire);
        let batches = self.batches.load(Ordering::Acquire);
        let processed = self.processed_records.load(Ordering::Acquire);
        json!({
            "get_records_calls": self.get_records_calls.load(Ordering::Acquire),
            "fetched_records": self.fetched_records.load(Ordering::Acquire),
            "processed_records": processed,
            "process_records_calls": batches,
            "mean_batch_records": if batches == 0 { 0.0 } else { round1(processed as f64 / batches as f64) },
            "checkpoints": checkpoints,
            "checkpoint_errors": self.checkpoint_errors.load(Ordering::Acquire),
            "mean_checkpoint_ms": if checkpoints == 0 { 0.0 } else { round3(micros as f64 / 1000.0 / checkpoints as f64) },
        })
    }
}

/// An SDK interceptor that counts what `GetRecords` returned. It sees the parsed
/// output, so it counts records and payload bytes, not wire bytes.
#[derive(Debug)]
struct FetchCounter {
    counters: Arc<Counters>,
}

impl Intercept for FetchCounter {
    fn name(&self) -> &'static str {
        "kcl-bench FetchCounter"
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        if let Ok(output) = context.output_or_error() {
            if let Some(out) = output.downcast_ref::<GetRecordsOutput>() {
                let bytes: usize = out.records().iter().map(|r| r.data().as_ref().len()).sum();
                self.counters.get_records_calls.fetch_add(1, Ordering::AcqRel);
                self.counters
                    .fetched_records
                    .fetch_add(out.records().len() as u64, Ordering::AcqRel);
                self.counters.fetched_bytes.fetch_add(bytes as u64, Ordering::AcqRel);
                let outstanding = self.counters.outstanding_bytes();
                self.counters
                    .peak_outstanding_bytes
                    .fetch_max(outstanding, Ordering::AcqRel);
                let outstanding = self.counters.outstanding_records();
                self.counters
                    .peak_outstanding_records
                    .fetch_max(outstanding, Ordering::AcqRel);
            }
        }
        Ok(())
    }
}

/// What the benchmark processor does with each batch.
#[derive(Debug, Clone)]
pub(crate) struct ProcessorOptions {
    /// Where a [`Delivered`] is sent for every batch; `None` to send nothing.
    pub(crate) events: Option<mpsc::UnboundedSender<Delivered>>,
    /// Whether [`Delivered::payloads`] carries the records' payloads (latency needs
    /// them; `backlog-memory` must not keep payloads alive).
    pub(crate) keep_payloads: bool,
    /// Whether to checkpoint after every batch (and in `shutdown_requested`).
    pub(crate) checkpoint: bool,
    /// Simulated work: the processor sleeps this long per record of a batch.
    pub(crate) sleep_per_record: Duration,
}

impl ProcessorOptions {
    /// A processor that only counts and checkpoints every batch (reports nothing).
    pub(crate) fn counting() -> Self {
        Self {
            events: None,
            keep_payloads: false,
            checkpoint: true,
            sleep_per_record: Duration::ZERO,
        }
    }

    /// A processor that reports each batch on `events` and checkpoints every batch.
    pub(crate) fn reporting(events: mpsc::UnboundedSender<Delivered>) -> Self {
        Self {
            events: Some(events),
            keep_payloads: false,
            checkpoint: true,
            sleep_per_record: Duration::ZERO,
        }
    }
}

/// One `process_records` call, as the benchmark processor saw it.
#[derive(Debug)]
pub(crate) struct Delivered {
    /// The shard.
    pub(crate) shard_id: String,
    /// When `process_records` was entered.
    pub(crate) at: Instant,
    /// Records in the batch.
    pub(crate) records: usize,
    /// Their payloads, if [`ProcessorOptions::keep_payloads`].
    pub(crate) payloads: Vec<Bytes>,
}

/// The benchmark's [`RecordProcessor`]: reports, optionally sleeps, checkpoints.
#[derive(Debug)]
struct BenchProcessor {
    shard_id: String,
    options: ProcessorOptions,
    counters: Arc<Counters>,
}

impl BenchProcessor {
    async fn checkpoint(&self, checkpointer: &kcl_core::Checkpointer) {
        let started = Instant::now();
        let result = checkpointer.checkpoint().await;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.counters.checkpoints.fetch_add(1, Ordering::AcqRel);
        self.counters.checkpoint_micros.fetch_add(micros, Ordering::AcqRel);
        if let Err(error) = result {
            self.counters.checkpoint_errors.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(shard_id = %self.shard_id, error = %kcl_core::error::ErrorChain(&error), "checkpoint failed");
        }
    }
}

#[async_trait]
impl RecordProcessor for BenchProcessor {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let at = Instant::now();
        let count = input.records.len();
        let bytes: usize = input.records.iter().map(|r| r.data.len()).sum();
        if let Some(events) = &self.options.events {
            let payloads = if self.options.keep_payloads {
                input.records.iter().map(|r| r.data.clone()).collect()
            } else {
                Vec::new()
            };
            // The scenario may have stopped listening already; that is fine.
            let _ = events.send(Delivered {
                shard_id: self.shard_id.clone(),
                at,
                records: count,
                payloads,
            });
        }
        if !self.options.sleep_per_record.is_zero() {
            let records = u32::try_from(count).unwrap_or(u32::MAX);
            tokio::time::sleep(self.options.sleep_per_record.saturating_mul(records)).await;
        }
        if self.options.checkpoint && count > 0 {
            self.checkpoint(&input.checkpointer).await;
        }
        self.counters.batches.fetch_add(1, Ordering::AcqRel);
        self.counters.processed_bytes.fetch_add(bytes as u64, Ordering::AcqRel);
        self.counters
            .processed_records
            .fetch_add(count as u64, Ordering::AcqRel);
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        if self.options.checkpoint {
            self.checkpoint(&input.checkpointer).await;
        }
        Ok(())
    }
}

/// A scheduler running on its own task.
#[derive(Debug)]
pub(crate) struct Running {
    handle: ShutdownHandle,
    task: JoinHandle<Result<(), SchedulerError>>,
    /// When `run()` was called.
    pub(crate) started: Instant,
}

impl Running {
    /// Builds the scheduler and calls `run()` on a new task; [`Running::started`] is the
    /// moment just before.
    pub(crate) fn start(builder: SchedulerBuilder) -> anyhow::Result<Self> {
        let scheduler = builder.build().context("building the scheduler")?;
        let handle = scheduler.shutdown_handle();
        let started = Instant::now();
        let task = tokio::spawn(scheduler.run());
        Ok(Self { handle, task, started })
    }

    /// Shuts the scheduler down gracefully and returns how long that took.
    pub(crate) async fn stop(self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.handle.shutdown();
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task).await {
            Ok(joined) => joined
                .context("the scheduler task panicked")?
                .context("the scheduler failed")?,
            Err(_) => bail!("the scheduler did not shut down within {SHUTDOWN_TIMEOUT:?}"),
        }
        Ok(started.elapsed())
    }
}

/// Bytes in a mebibyte, for reporting.
pub(crate) const MIB: f64 = 1024.0 * 1024.0;

/// Milliseconds as a float, to microsecond precision.
pub(crate) fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

/// Rounds to three decimals (JSON stays readable).
pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Rounds to one decimal.
pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The `q`-quantile (0..=1) of sorted values, by nearest rank.
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// min / p50 / p90 / max / mean of `values` (in whatever unit they are), as JSON.
pub(crate) fn summary(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mean = if sorted.is_empty() {
        f64::NAN
    } else {
        sorted.iter().sum::<f64>() / sorted.len() as f64
    };
    json!({
        "n": sorted.len(),
        "min": round3(sorted.first().copied().unwrap_or(f64::NAN)),
        "p50": round3(quantile(&sorted, 0.5)),
        "p90": round3(quantile(&sorted, 0.9)),
        "max": round3(sorted.last().copied().unwrap_or(f64::NAN)),
        "mean": round3(mean),
    })
}

/// A small, seedable pseudo-random generator (xorshift64*) for jittered pauses; good
/// enough for spacing writes, and it keeps the benchmark free of another dependency.
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    /// Seeded from the clock.
    pub(crate) fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64);
        Self(nanos | 1)
    }

    /// A value uniformly spread over `low..=high` (close enough for pauses).
    pub(crate) fn between(&mut self, low: u64, high: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        let r = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        if high <= low {
            low
        } else {
            low + r % (high - low + 1)
        }
    }
}

/// The two lines of `/proc/self/status` the benchmarks read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Status {
    /// `VmRSS`: resident now.
    pub(crate) rss_kib: u64,
    /// `VmHWM`: the resident peak since start (or since the last reset).
    pub(crate) hwm_kib: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/self/status` (Linux only).
pub(crate) fn read_status() -> anyhow::Result<Status> {
    let text = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status (Linux only)")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing from /proc/self/status"))?;
        let kib = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("cannot parse {line:?}"))?;
        Ok(kib)
    };
    Ok(Status {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Resets the kernel's peak-RSS counter (`VmHWM`) to the current RSS; false where the
/// kernel does not allow it (then `VmHWM` is the peak since the process started).
pub(crate) fn reset_hwm() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Clock ticks per second of the `utime`/`stime` fields of `/proc/self/stat`
/// (`USER_HZ`). It is 100 on every mainstream Linux architecture and part of the
/// kernel's user ABI; the workspace forbids `unsafe`, so `sysconf(_SC_CLK_TCK)` (and
/// `getrusage`) through `libc` are not used, and 100 is assumed.
pub(crate) const CLOCK_TICKS_PER_SEC: u64 = 100;

/// CPU time used by the whole process so far (every thread, exited ones included).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTime {
    /// User mode.
    pub(crate) user: Duration,
    /// Kernel mode.
    pub(crate) system: Duration,
}

/// Reads `utime` and `stime` (fields 14 and 15) of `/proc/self/stat`, in clock ticks of
/// 1/[`CLOCK_TICKS_PER_SEC`] s (so a resolution of 10 ms).
pub(crate) fn cpu_time() -> anyhow::Result<CpuTime> {
    let text = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat (Linux only)")?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // after its closing parenthesis, where field 3 (the state) is the first.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc/self/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {n} of /proc/self/stat"))
    };
    let to_duration = |t: u64| Duration::from_millis(t * 1000 / CLOCK_TICKS_PER_SEC);
    Ok(CpuTime {
        user: to_duration(ticks(14)?),
        system: to_duration(ticks(15)?),
    })
}

/// CPU time (user + system) of the whole process so far, from
/// `CLOCK_PROCESS_CPUTIME_ID` (nanoseconds, unlike the 10 ms ticks of `/proc/self/stat`).
pub(crate) fn process_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// CPU time and peak resident memory of one measured phase: [`Resources::start`] resets
/// the kernel's peak counter and notes the CPU time, [`Resources::finish`] reports both.
#[derive(Debug)]
pub(crate) struct Resources {
    cpu: CpuTime,
    /// `CLOCK_PROCESS_CPUTIME_ID` at the start: user + system, to the nanosecond.
    cpu_precise: Duration,
    rss_kib: u64,
    hwm_reset: bool,
}

impl Resources {
    /// Starts measuring (resets `VmHWM` to the current RSS where the kernel allows it).
    pub(crate) fn start() -> anyhow::Result<Self> {
        let hwm_reset = reset_hwm();
        Ok(Self {
            cpu: cpu_time()?,
            cpu_precise: process_cpu_time(),
            rss_kib: read_status()?.rss_kib,
            hwm_reset,
        })
    }

    /// CPU time since [`Resources::start`] (total, user, system, and per record) and the
    /// resident peak (`VmHWM`) since then, as JSON.
    pub(crate) fn finish(&self, records: usize) -> anyhow::Result<Value> {
        let cpu = cpu_time()?;
        let status = read_status()?;
        let user = cpu.user.saturating_sub(self.cpu.user);
        let system = cpu.system.saturating_sub(self.cpu.system);
        let total = process_cpu_time().saturating_sub(self.cpu_precise);
        let per_record = if records == 0 {
            f64::NAN
        } else {
            round3(total.as_secs_f64() * 1e6 / records as f64)
        };
        let mib = |kib: u64| round1(kib as f64 / 1024.0);
        Ok(json!({
            "cpu_ms": ms(total),
            "cpu_user_ms": ms(user),
            "cpu_system_ms": ms(system),
            "cpu_us_per_record": per_record,
            "rss_at_start_mib": mib(self.rss_kib),
            "peak_rss_mib": mib(status.hwm_kib),
            "peak_rss_above_start_mib": mib(status.hwm_kib.saturating_sub(self.rss_kib)),
            "peak_rss_since": if self.hwm_reset {
                "the start of this phase (VmHWM reset)"
            } else {
                "process start (VmHWM could not be reset)"
            },
        }))
    }
}

/// Switches a scheduler builder to enhanced fan-out with `config` (its stream consumer
/// is registered by the scheduler when it starts).
pub(crate) fn fan_out(builder: SchedulerBuilder, config: FanOutConfig) -> anyhow::Result<SchedulerBuilder> {
    builder
        .retrieval_mode(RetrievalMode::FanOut(config))
        .context("fan-out configuration")
}

/// Like [`summary`], with the 99th percentile too.
pub(crate) fn summary_with_p99(values: &[f64]) -> Value {
    let mut value = summary(values);
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if let Value::Object(map) = &mut value {
        map.insert("p99".into(), json!(round3(quantile(&sorted, 0.99))));
    }
    value
}

/// Runs this program again as a child process with `args` (a hidden `*-case`
/// subcommand), stderr inherited, and parses the last non-empty line of its stdout as
/// JSON. `what` names the case in errors.
pub(crate) async fn run_case_in_child(args: Vec<String>, what: String) -> anyhow::Result<Value> {
    let exe = std::env::current_exe().context("finding this program to run a case")?;
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(exe)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
    })
    .await
    .with_context(|| format!("waiting for {what}"))?
    .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("{what} printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("parsing the output of {what}"))
}
