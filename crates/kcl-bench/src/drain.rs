//! The `drain` scenario: a backlog read from `TRIM_HORIZON` by one worker, next to a
//! reference reader on the same backend and data.
//!
//! The backend runs in its own process ([`ExternalBackend`]); the backlog (200,000
//! records of 1 KiB on 4 shards by default) is written once; then each case runs in a
//! fresh child process (this program's hidden `drain-case` command), so that its CPU
//! time and resident peak are its own:
//! - `polling-idle-200`, `polling-default`: one worker (a `Scheduler` with a new lease
//!   table) whose processor counts and checkpoints once per batch, polling with
//!   `idle_time_between_reads` 200 ms or the default;
//! - `fan-out`: the same through enhanced fan-out;
//! - `reference-polling`: a bare loop over the SDK, one task per shard:
//!   `GetShardIterator(TRIM_HORIZON)`, then `GetRecords` (10,000 a call) until the
//!   records are all read, pausing 200 ms only on an empty answer; no leases, no
//!   checkpoints;
//! - `reference-polling-paced`: the same, keeping to Kinesis's limit of five calls per
//!   shard per second (200 ms between call starts), as the library does (its
//!   `backlog_time_between_reads`) and as any reader on AWS must;
//! - `reference-fan-out`: a bare `SubscribeToShard(TRIM_HORIZON)` per shard with its own
//!   stream consumer.
//!
//! Each reports records/s from its first record to its last, CPU microseconds per
//! record and the resident peak of its process; each of ours is set against its
//! reference (`ours_over_reference`, polling against both polling references).

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition, SubscribeToShardEventStream};
use clap::{Args, ValueEnum};
use kcl_core::{InitialPositionInStream, RetrievalConfig};
use kcl_efo::FanOutConfig;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;

use crate::external::{Endpoints, ExternalBackend};
use crate::support::{
    fan_out, ms, round1, round3, run_case_in_child, unique, write_backlog, Bench, Counters, ProcessorOptions,
    Resources, Running,
};

/// The cases, ours and the references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Case {
    /// Polling, `idle_time_between_reads` 200 ms.
    #[value(name = "polling-idle-200")]
    PollingIdle200,
    /// Polling, the default configuration.
    PollingDefault,
    /// Enhanced fan-out.
    FanOut,
    /// A bare `GetRecords` loop, as fast as the backend answers.
    ReferencePolling,
    /// A bare `GetRecords` loop that keeps to Kinesis's five calls per shard per second
    /// (200 ms between call starts), as any reader on AWS must.
    ReferencePollingPaced,
    /// A bare `SubscribeToShard` reader.
    ReferenceFanOut,
}

impl Case {
    fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    /// The references each of ours is compared with.
    fn references(self) -> &'static [Case] {
        match self {
            Self::PollingIdle200 | Self::PollingDefault => &[Self::ReferencePolling, Self::ReferencePollingPaced],
            Self::FanOut => &[Self::ReferenceFanOut],
            Self::ReferencePolling | Self::ReferencePollingPaced | Self::ReferenceFanOut => &[],
        }
    }
}

/// Options of the `drain` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct DrainArgs {
    /// Records in the backlog.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) records: usize,
    /// Shards of the stream.
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 1024)]
    pub(crate) record_size: usize,
    /// The cases to run, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "reference-polling,reference-polling-paced,polling-idle-200,polling-default,reference-fan-out,fan-out"
    )]
    pub(crate) cases: Vec<Case>,
    /// Give up on a case that has not read everything after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout_secs: u64,
}

/// Options of the hidden `drain-case` command: one case, in this process.
#[derive(Args, Debug, Clone)]
pub(crate) struct DrainCaseArgs {
    /// The case.
    #[arg(long, value_enum)]
    pub(crate) case: Case,
    #[command(flatten)]
    pub(crate) endpoints: Endpoints,
    /// The stream holding the backlog.
    #[arg(long)]
    pub(crate) stream: String,
    /// Records to read.
    #[arg(long)]
    pub(crate) records: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout_secs: u64,
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &DrainArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let stream = bench.new_stream(args.shards).await?;
    eprintln!("drain: writing {} records of {} bytes", args.records, args.record_size);
    let write = write_backlog(&bench.kinesis, &stream, args.records, args.record_size).await?;

    let mut cases = Map::new();
    for case in &args.cases {
        eprintln!("drain: {}", case.name());
        let mut child_args = vec![
            "drain-case".to_owned(),
            format!("--case={}", case.name()),
            format!("--stream={stream}"),
            format!("--records={}", args.records),
            format!("--timeout-secs={}", args.timeout_secs),
        ];
        child_args.extend(backend.endpoint_args());
        let result = run_case_in_child(child_args, format!("the drain case {}", case.name())).await?;
        cases.insert(case.name(), result);
    }
    backend.stop().await?;

    let mut comparisons = Map::new();
    for case in &args.cases {
        let Some(ours) = cases.get(&case.name()) else {
            continue;
        };
        let mut against = Map::new();
        for reference in case.references() {
            let Some(theirs) = cases.get(&reference.name()) else {
                continue;
            };
            let get = |v: &Value, key: &str| v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
            against.insert(
                reference.name(),
                json!({
                    "records_per_sec_ratio": round3(get(ours, "records_per_sec") / get(theirs, "records_per_sec")),
                    "cpu_us_per_record_ratio": round3(get(ours, "cpu_us_per_record") / get(theirs, "cpu_us_per_record")),
                    "peak_rss_extra_mib": round1(get(ours, "peak_rss_mib") - get(theirs, "peak_rss_mib")),
                }),
            );
        }
        if !against.is_empty() {
            comparisons.insert(case.name(), Value::Object(against));
        }
    }
    Ok(json!({
        "scenario": "drain",
        "config": {
            "records": args.records,
            "shards": args.shards,
            "record_size_bytes": args.record_size,
            "initial_position": "TRIM_HORIZON",
            "ours": "one worker, processor counts and checkpoints once per batch",
            "reference": "bare SDK loops, no leases, no checkpoints",
            "backend": "kcl-local servers in their own process; each case in a fresh child process",
        },
        "write": write,
        "results": cases,
        "ours_over_reference": comparisons,
        "targets": {
            "records_per_sec_ratio": ">= 0.95",
            "cpu_us_per_record_ratio": "<= 1.05",
            "peak_rss_extra_mib": "<= 10",
        },
        "note": "records_per_sec counts from the case's first record to its last; cpu_us_per_record and \
                 peak_rss_mib are the case's whole child process (user + system time from /proc/self/stat, and \
                 VmHWM reset when the case starts). The backend's own CPU is not in them.",
    }))
}

/// Runs one case in this process and prints its JSON (one line) on stdout.
pub(crate) async fn run_case(args: &DrainCaseArgs) -> anyhow::Result<()> {
    let result = case(args).await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
    stdout.flush()?;
    Ok(())
}

/// When the first and the last record arrived, and how many records.
#[derive(Debug)]
struct Read {
    first: Instant,
    last: Instant,
    records: usize,
}

async fn case(args: &DrainCaseArgs) -> anyhow::Result<Value> {
    let bench = args.endpoints.bench();
    let resources = Resources::start()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let (tx, rx) = mpsc::unbounded_channel::<(Instant, usize)>();
    let started = Instant::now();
    let mut extra = json!({});
    let read = match args.case {
        Case::PollingIdle200 | Case::PollingDefault | Case::FanOut => {
            let counters = Arc::new(Counters::default());
            let (delivered_tx, mut delivered_rx) = mpsc::unbounded_channel();
            let retrieval = if args.case == Case::PollingIdle200 {
                RetrievalConfig {
                    idle_time_between_reads: Duration::from_millis(200),
                    ..RetrievalConfig::default()
                }
            } else {
                RetrievalConfig::default()
            };
            let mut builder = bench.scheduler(
                &args.stream,
                &counters,
                ProcessorOptions::reporting(delivered_tx),
                InitialPositionInStream::TrimHorizon,
                retrieval,
            );
            if args.case == Case::FanOut {
                builder = fan_out(builder, FanOutConfig::new(unique("bench-efo")))?;
            }
            let running = Running::start(builder)?;
            let forward = tokio::spawn(async move {
                while let Some(d) = delivered_rx.recv().await {
                    let _ = tx.send((d.at, d.records));
                }
            });
            let read = collect(rx, args.records, deadline).await;
            let shutdown = running.stop().await?;
            forward.abort();
            extra = json!({ "graceful_shutdown_ms": ms(shutdown), "library": counters.to_json() });
            read?
        }
        Case::ReferencePolling | Case::ReferencePollingPaced => {
            let paced = args.case == Case::ReferencePollingPaced;
            let readers = reference_polling(&bench, &args.stream, tx, paced).await?;
            let read = collect(rx, args.records, deadline).await;
            readers.abort();
            read?
        }
        Case::ReferenceFanOut => {
            let readers = reference_fan_out(&bench, &args.stream, tx).await?;
            let read = collect(rx, args.records, deadline).await;
            readers.abort();
            read?
        }
    };
    let resources = resources.finish(read.records)?;
    let seconds = read.last.duration_since(read.first).as_secs_f64();
    let mut result = json!({
        "records": read.records,
        "first_record_ms": ms(read.first.duration_since(started)),
        "records_per_sec": if seconds > 0.0 { round1(read.records as f64 / seconds) } else { f64::NAN },
        "cpu_us_per_record": resources.get("cpu_us_per_record").cloned().unwrap_or(Value::Null),
        "peak_rss_mib": resources.get("peak_rss_mib").cloned().unwrap_or(Value::Null),
        "resources": resources,
    });
    if let (Some(result), Some(extra)) = (result.as_object_mut(), extra.as_object()) {
        result.extend(extra.clone());
    }
    Ok(result)
}

/// Receives `(arrival, records)` until `records` arrived.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<(Instant, usize)>,
    records: usize,
    deadline: tokio::time::Instant,
) -> anyhow::Result<Read> {
    let mut read: Option<Read> = None;
    loop {
        if let Some(r) = &read {
            if r.records >= records {
                return read.context("unreachable");
            }
        }
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((at, n))) => {
                let r = read.get_or_insert(Read {
                    first: at,
                    last: at,
                    records: 0,
                });
                r.last = at;
                r.records += n;
            }
            Ok(None) => bail!("the readers stopped"),
            Err(_) => bail!(
                "only {} of {records} records read in time",
                read.map_or(0, |r| r.records)
            ),
        }
    }
}

/// Reader tasks, aborted together.
struct Readers(Vec<tokio::task::JoinHandle<anyhow::Result<()>>>);

impl Readers {
    fn abort(&self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn shard_ids(bench: &Bench, stream: &str) -> anyhow::Result<Vec<String>> {
    let shards = bench.kinesis.list_shards().stream_name(stream).send().await?;
    Ok(shards.shards().iter().map(|s| s.shard_id().to_owned()).collect())
}

/// The reference polling reader: one bare `GetRecords` loop per shard; `paced`: at most
/// five calls per shard per second.
async fn reference_polling(
    bench: &Bench,
    stream: &str,
    tx: mpsc::UnboundedSender<(Instant, usize)>,
    paced: bool,
) -> anyhow::Result<Readers> {
    let mut tasks = Vec::new();
    for shard_id in shard_ids(bench, stream).await? {
        let kinesis = bench.kinesis.clone();
        let stream = stream.to_owned();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut iterator = kinesis
                .get_shard_iterator()
                .stream_name(&stream)
                .shard_id(&shard_id)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator
                .context("no iterator")?;
            loop {
                let call_start = tokio::time::Instant::now();
                let out = kinesis
                    .get_records()
                    .shard_iterator(&iterator)
                    .limit(10_000)
                    .send()
                    .await?;
                let at = Instant::now();
                // What a processor would look at: every record's data.
                let n = out.records().iter().filter(|r| !r.data().as_ref().is_empty()).count();
                if n > 0 {
                    let _ = tx.send((at, n));
                    if paced {
                        tokio::time::sleep_until(call_start + Duration::from_millis(200)).await;
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                match out.next_shard_iterator {
                    Some(next) => iterator = next,
                    None => return Ok(()),
                }
            }
        }));
    }
    Ok(Readers(tasks))
}

/// The reference fan-out reader: one bare `SubscribeToShard` per shard, its own consumer.
async fn reference_fan_out(
    bench: &Bench,
    stream: &str,
    tx: mpsc::UnboundedSender<(Instant, usize)>,
) -> anyhow::Result<Readers> {
    let consumer = kcl_efo::register_stream_consumer(
        &bench.kinesis,
        stream,
        &unique("bench-ref"),
        Duration::from_secs(60),
        Duration::from_secs(10),
    )
    .await
    .context("registering the reference's stream consumer")?;
    let mut tasks = Vec::new();
    for shard_id in shard_ids(bench, stream).await? {
        let kinesis = bench.kinesis.clone();
        let consumer_arn = consumer.consumer_arn.clone();
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let output = kinesis
                .subscribe_to_shard()
                .consumer_arn(&consumer_arn)
                .shard_id(&shard_id)
                .starting_position(
                    StartingPosition::builder()
                        .r#type(ShardIteratorType::TrimHorizon)
                        .build()?,
                )
                .send()
                .await
                .context("SubscribeToShard")?;
            let mut events = output.event_stream;
            while let Some(event) = events.recv().await? {
                if let SubscribeToShardEventStream::SubscribeToShardEvent(event) = event {
                    let at = Instant::now();
                    let n = event.records().iter().filter(|r| !r.data().as_ref().is_empty()).count();
                    if n > 0 {
                        let _ = tx.send((at, n));
                    }
                }
            }
            Ok(())
        }));
    }
    Ok(Readers(tasks))
}
