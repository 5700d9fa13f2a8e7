//! The chaos runner: a round of crashes, graceful stops, reshards and network and
//! service faults against worker processes, then the verifier's report.
//!
//! ```sh
//! cargo run --release -p kcl-tests --bin chaos -- --seconds 180 --seed 1 \
//!     [--workers 3] [--shards 4] [--mode polling|fan-out|mixed] [--faults 0.02]
//! ```
//!
//! A round starts the embedded backend (the same servers as `kcl-local serve`, in this
//! process), a stream, a TCP proxy in front of each service, a keyed producer (its
//! records carry a partition key and a per-key counter; a key's next record is only
//! written once the previous one was acknowledged) and `--workers` worker processes (this
//! binary's `worker` subcommand), which reach both services through the proxies and
//! inject throttling errors, HTTP 500s and expired iterators into a `--faults` share of
//! their SDK responses. It then follows the seeded schedule of [`kcl_tests::chaos`]
//! (kills, stops, restarts, splits, merges, proxy faults) for `--seconds`, stops
//! producing, lets the workers drain, stops them, and verifies every promise with
//! [`kcl_tests::verifier`].
//!
//! Everything a round wrote is in `--dir` (default `target/chaos`): `runner.log` (what
//! was produced, kills, reshards, network faults), one `<worker>.log` per worker process
//! (see [`kcl_tests::recording`]) with its stderr in `<worker>.err`, `lineage.txt`, and
//! `report.txt`. `chaos verify --dir DIR` verifies a round's files again.
//!
//! The last line printed is one JSON object with a `violations` count; the exit status
//! is 1 when there is a violation, 2 when the round itself could not run.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_trait::async_trait;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand, ValueEnum};
use kcl_core::error::ErrorChain;
use kcl_core::{
    stream_processor_factory, Checkpoint, ExtendedSequenceNumber, InitialPositionInStream, InitializationInput,
    LeaseLostInput, LeaseManagementConfig, ProcessRecordsInput, ProcessorError, RecordProcessor, RetrievalConfig,
    Scheduler, ShardEndedInput, ShutdownRequestedInput, StreamConfig, StreamIdentifier,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
use kcl_tests::chaos::{schedule, Action, Mode, Retrieval, ScheduleOptions};
use kcl_tests::proxy::{ChaosProxy, ProxyFault};
use kcl_tests::recording::{read_lines, Recording, Round};
use kcl_tests::sdk_faults::{FaultObserver, RandomFaults, Service};
use kcl_tests::verifier::{verify, VerifyOptions};
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

/// Chaos rounds against worker processes, checked by the verifier.
#[derive(Debug, Parser)]
#[command(name = "chaos", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    round: RoundArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify the files of a round again.
    Verify {
        /// The round's directory.
        #[arg(long)]
        dir: PathBuf,
        /// The failover time the round ran with, in milliseconds.
        #[arg(long, default_value_t = 4000)]
        failover_ms: u64,
    },
    /// A worker process (started by the runner).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Polling,
    FanOut,
    Mixed,
}

/// A round.
#[derive(Debug, Args)]
struct RoundArgs {
    /// How long the chaos lasts, in seconds (the drain comes after).
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// The seed of the schedule and of the workers' faults.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Shards at the start (of each stream).
    #[arg(long, default_value_t = 4)]
    shards: i32,
    /// Streams: with more than one, the workers run in multi-stream mode over all of
    /// them (one lease table), a producer writes to each, the reshards hit the first,
    /// and every shard is named `<stream>/<shard id>` in the files.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// How workers read: polling, enhanced fan-out, or both (alternating).
    #[arg(long, value_enum, default_value = "mixed")]
    mode: ModeArg,
    /// The share of SDK responses replaced by a fault, in each worker (0 to 1); 0 also
    /// turns the network faults off.
    #[arg(long, default_value_t = 0.02)]
    faults: f64,
    /// Partition keys of the producer.
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Records per second the producer aims at.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// The workers' failover time, in milliseconds.
    #[arg(long, default_value_t = 4000)]
    failover_ms: u64,
    /// The longest wait for the workers to deliver everything after the chaos, in
    /// seconds.
    #[arg(long, default_value_t = 180)]
    drain_seconds: u64,
    /// Where the round's files go (emptied first).
    #[arg(long, default_value = "target/chaos")]
    dir: PathBuf,
}

/// A worker process.
#[derive(Debug, Args)]
struct WorkerArgs {
    #[arg(long)]
    id: String,
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    kinesis_endpoint: String,
    #[arg(long)]
    dynamodb_endpoint: String,
    /// The stream, or several separated by commas (multi-stream mode).
    #[arg(long)]
    stream: String,
    #[arg(long)]
    application: String,
    /// `Some`: enhanced fan-out with this consumer.
    #[arg(long)]
    fan_out_consumer: Option<String>,
    #[arg(long, default_value_t = 0.0)]
    faults: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 4000)]
    failover_ms: u64,
}

const REGION: &str = "us-east-1";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: no runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Some(Command::Worker(args)) => worker(args).await.map(|()| true),
            Some(Command::Verify { dir, failover_ms }) => {
                let (text, ok) = verify_dir(&dir, Duration::from_millis(failover_ms), &serde_json::json!({}))?;
                println!("{text}");
                Ok(ok)
            }
            None => run_round(cli.round).await,
        }
    });
    match result {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------
// The worker.

/// Records what it is handed, checkpoints every batch.
#[derive(Debug)]
struct ChaosProcessor {
    shard_id: String,
    recording: Recording,
}

impl ChaosProcessor {
    fn worker(&self) -> &str {
        self.recording.name()
    }

    /// A `C` line for a stored position (none for an initial-position sentinel).
    fn checkpointed(&self, position: &ExtendedSequenceNumber) {
        let position = match &position.checkpoint {
            Checkpoint::Sequence(s) => s.to_string(),
            Checkpoint::ShardEnd => "SHARD_END".to_owned(),
            _ => return,
        };
        self.recording
            .line('C', format!("{} {} {position}", self.worker(), self.shard_id));
    }
}

#[async_trait]
impl RecordProcessor for ChaosProcessor {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.recording.line(
            'T',
            format!("{} {} {}", self.worker(), self.shard_id, input.extended_sequence_number),
        );
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let Some(last) = input.records.last() else {
            return Ok(());
        };
        let lines: Vec<(char, String)> = input
            .records
            .iter()
            .map(|r| {
                // The producer's data is `<counter>:<padding>`.
                let counter = std::str::from_utf8(&r.data)
                    .ok()
                    .and_then(|s| s.split(':').next())
                    .unwrap_or("unparsable");
                (
                    'D',
                    format!(
                        "{} {} {} {} {} {counter}",
                        self.worker(),
                        self.shard_id,
                        r.sequence_number,
                        r.sub_sequence_number,
                        r.partition_key
                    ),
                )
            })
            .collect();
        // Written (and flushed) before the checkpoint that covers them.
        self.recording.write(&lines);
        match input.checkpointer.checkpoint_record(last).await {
            Ok(()) => self.checkpointed(&ExtendedSequenceNumber::new(
                last.sequence_number.clone(),
                last.sub_sequence_number,
            )),
            Err(e) => eprintln!("checkpoint of {} failed: {}", self.shard_id, ErrorChain(&e)),
        }
        Ok(())
    }

    async fn lease_lost(&mut self, _input: LeaseLostInput) {
        self.recording.line('L', format!("{} {}", self.worker(), self.shard_id));
    }

    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        input.checkpointer.checkpoint().await?;
        self.checkpointed(&ExtendedSequenceNumber::SHARD_END);
        self.recording.line('E', format!("{} {}", self.worker(), self.shard_id));
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        match input.checkpointer.checkpoint().await {
            Ok(()) => self.checkpointed(&input.checkpointer.last_checkpoint().await),
            Err(e) => eprintln!("checkpoint at shutdown of {} failed: {}", self.shard_id, ErrorChain(&e)),
        }
        self.recording.line('S', format!("{} {}", self.worker(), self.shard_id));
        Ok(())
    }
}

async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kcl_core=info,kcl_efo=info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let recording = Recording::open(&args.output, &args.id)?;
    let observer: FaultObserver = {
        let recording = recording.clone();
        Arc::new(move |service: Service, operation: &str, fault| {
            recording.line(
                'F',
                format!("{} {} {operation} {}", recording.name(), service.name(), fault.name()),
            );
        })
    };
    let kinesis = RandomFaults::new(Service::Kinesis, args.faults, args.seed, observer.clone())
        .kinesis_client(&kcl_local::sdk_config_for_endpoint(&args.kinesis_endpoint, REGION));
    let dynamodb = RandomFaults::new(Service::DynamoDb, args.faults, args.seed ^ 0x00d1_a0d8, observer)
        .dynamodb_client(&kcl_local::sdk_config_for_endpoint(&args.dynamodb_endpoint, REGION));

    let retrieval = match &args.fan_out_consumer {
        None => RetrievalMode::Polling(RetrievalConfig {
            idle_time_between_reads: Duration::from_millis(200),
            max_records: 1000,
            ..RetrievalConfig::default()
        }),
        Some(consumer) => RetrievalMode::FanOut(FanOutConfig {
            shard_end_check_interval: Duration::from_secs(1),
            ..FanOutConfig::new(consumer.clone())
        }),
    };
    let factory_recording = recording.clone();
    let streams: Vec<&str> = args.stream.split(',').collect();
    let builder = if streams.len() > 1 {
        let configs = streams
            .iter()
            .map(|s| StreamConfig::new(*s).map(|c| c.initial_position(InitialPositionInStream::TrimHorizon)))
            .collect::<Result<Vec<_>, _>>()?;
        Scheduler::multi_stream_builder(configs)
    } else {
        Scheduler::builder(args.stream.clone())
    };
    let multi = streams.len() > 1;
    let scheduler = builder
        .kinesis_client(kinesis)
        .lease_store(DynamoLeaseStore::new(dynamodb, args.application.clone()))
        .worker_id(args.id.clone())
        .initial_position(InitialPositionInStream::TrimHorizon)
        .lease_config(LeaseManagementConfig::with_failover_time(Duration::from_millis(
            args.failover_ms,
        )))
        .retrieval_mode(retrieval)?
        .processor_factory(stream_processor_factory(
            move |stream: &StreamIdentifier, shard_id: &str| ChaosProcessor {
                shard_id: shard_label(multi, stream.stream_name(), shard_id),
                recording: factory_recording.clone(),
            },
        ))
        .build()?;

    let shutdown = scheduler.shutdown_handle();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        term.recv().await;
        shutdown.shutdown();
    });
    let result = scheduler.run().await;
    let outcome = match &result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("error {}", e.to_string().replace('\n', " ")),
    };
    recording.line('X', format!("{} {outcome}", args.id));
    result.context("scheduler failed")
}

/// How a shard is named in the files: `<stream>/<shard id>` in multi-stream mode.
fn shard_label(multi: bool, stream: &str, shard_id: &str) -> String {
    if multi {
        format!("{stream}/{shard_id}")
    } else {
        shard_id.to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// The runner.

/// A worker slot: the process running in it, if any.
#[derive(Debug)]
struct Slot {
    child: Option<tokio::process::Child>,
    id: String,
    incarnation: usize,
}

#[derive(Debug)]
struct Runner {
    args: RoundArgs,
    mode: Mode,
    exe: PathBuf,
    /// The streams; reshards hit the first.
    streams: Vec<String>,
    application: String,
    consumer: String,
    kinesis: aws_sdk_kinesis::Client,
    kinesis_proxy: ChaosProxy,
    dynamodb_proxy: ChaosProxy,
    recording: Recording,
    slots: Vec<Slot>,
    /// Stopped gracefully, still shutting down.
    stopping: Vec<tokio::task::JoinHandle<()>>,
    /// Workers that exited without being stopped.
    unexpected_exits: Vec<String>,
}

impl Runner {
    fn proxy(&self, service: Service) -> &ChaosProxy {
        match service {
            Service::Kinesis => &self.kinesis_proxy,
            Service::DynamoDb => &self.dynamodb_proxy,
        }
    }

    fn start_worker(&mut self, slot: usize) -> anyhow::Result<()> {
        let s = &mut self.slots[slot];
        let incarnation = s.incarnation;
        s.incarnation += 1;
        s.id = format!("w{slot}-{incarnation}");
        let id = s.id.clone();
        let dir = &self.args.dir;
        let mut command = tokio::process::Command::new(&self.exe);
        command
            .arg("worker")
            .args(["--id", &id])
            .arg("--output")
            .arg(dir.join(format!("{id}.log")))
            .args(["--kinesis-endpoint", &self.kinesis_proxy.endpoint()])
            .args(["--dynamodb-endpoint", &self.dynamodb_proxy.endpoint()])
            .args(["--stream", &self.streams.join(","), "--application", &self.application])
            .args(["--faults", &self.args.faults.to_string()])
            .args([
                "--seed",
                &(self.args.seed.wrapping_mul(1_000_003) ^ ((slot as u64) << 32 | incarnation as u64)).to_string(),
            ])
            .args(["--failover-ms", &self.args.failover_ms.to_string()]);
        if self.mode.retrieval(slot, incarnation) == Retrieval::FanOut {
            command.args(["--fan-out-consumer", &self.consumer]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{id}.err")))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        self.slots[slot].child = Some(child);
        Ok(())
    }

    async fn kill(&mut self, slot: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.slots[slot].child.take() {
            child.kill().await?;
            self.recording.line('K', self.slots[slot].id.clone());
        }
        Ok(())
    }

    fn stop(&mut self, slot: usize) -> anyhow::Result<()> {
        let Some(mut child) = self.slots[slot].child.take() else {
            return Ok(());
        };
        let pid = child.id().context("worker already reaped")?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
        self.recording.line('G', self.slots[slot].id.clone());
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let id = self.slots[slot].id.clone();
        self.stopping.push(tokio::spawn(async move {
            if tokio::time::timeout(Duration::from_secs(60), child.wait())
                .await
                .is_err()
            {
                eprintln!("chaos: {id} did not stop within 60 s of SIGTERM; killing it");
                let _ = child.kill().await;
            }
        }));
        Ok(())
    }

    /// The stream's open shards, sorted by starting hash key.
    async fn open_shards(&self) -> anyhow::Result<Vec<aws_sdk_kinesis::types::Shard>> {
        let mut open: Vec<_> = kcl_tests::list_shards(&self.kinesis, &self.streams[0])
            .await?
            .into_iter()
            .filter(|s| {
                s.sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_none())
            })
            .collect();
        open.sort_by_key(|s| {
            s.hash_key_range()
                .and_then(|r| r.starting_hash_key().parse::<u128>().ok())
                .unwrap_or(0)
        });
        Ok(open)
    }

    async fn reshard(&mut self, split: bool, pick: u64) -> anyhow::Result<()> {
        let open = self.open_shards().await?;
        let shards = usize::try_from(self.args.shards)?;
        // Keep the stream between half and twice its first size.
        let split = (split || open.len() <= (shards / 2).max(1)) && open.len() < shards * 2;
        if split {
            let shard = &open[usize::try_from(pick % open.len() as u64)?];
            kcl_tests::split_shard_in_half(&self.kinesis, &self.streams[0], shard.shard_id()).await?;
            self.recording.line('R', format!("split {}", shard.shard_id()));
        } else {
            let adjacent: Vec<(&str, &str)> = open
                .windows(2)
                .filter(|w| {
                    let end = w[0]
                        .hash_key_range()
                        .and_then(|r| r.ending_hash_key().parse::<u128>().ok());
                    let start = w[1]
                        .hash_key_range()
                        .and_then(|r| r.starting_hash_key().parse::<u128>().ok());
                    matches!((end, start), (Some(e), Some(s)) if e + 1 == s)
                })
                .map(|w| (w[0].shard_id(), w[1].shard_id()))
                .collect();
            if adjacent.is_empty() {
                bail!("no adjacent open shards to merge");
            }
            let (a, b) = adjacent[usize::try_from(pick % adjacent.len() as u64)?];
            kcl_tests::merge_shards(&self.kinesis, &self.streams[0], a, b).await?;
            self.recording.line('R', format!("merge {a} {b}"));
        }
        Ok(())
    }

    /// Restarts the workers that exited on their own (a scheduler error: each is counted
    /// and reported, and its stderr says why).
    fn restart_exited(&mut self) -> anyhow::Result<()> {
        for slot in 0..self.slots.len() {
            let exited = match self.slots[slot].child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                let id = self.slots[slot].id.clone();
                eprintln!("chaos: {id} exited on its own ({status}); see {id}.err");
                self.unexpected_exits.push(id);
                self.start_worker(slot)?;
            }
        }
        Ok(())
    }

    async fn act(&mut self, action: Action) -> anyhow::Result<()> {
        self.restart_exited()?;
        match action {
            Action::Kill(slot) => self.kill(slot).await,
            Action::Stop(slot) => self.stop(slot),
            Action::Restart(slot) => self.start_worker(slot),
            Action::Split(pick) => self.reshard(true, pick).await,
            Action::Merge(pick) => self.reshard(false, pick).await,
            Action::Network(service, fault) => {
                self.proxy(service).set(fault);
                let name = match fault {
                    ProxyFault::None => "none -".to_owned(),
                    ProxyFault::Slow(d) => format!("slow {}ms", d.as_millis()),
                    ProxyFault::Blackout => "blackout -".to_owned(),
                    ProxyFault::ResetAfter(n) => format!("reset {n}B"),
                };
                self.recording.line('N', format!("{} {name}", service.name()));
                Ok(())
            }
            Action::Heal(service) => {
                self.proxy(service).set(ProxyFault::None);
                Ok(())
            }
        }
    }
}

/// Writes rounds of one record per key (`<counter>:<padding>`), each only after the
/// previous one was acknowledged, so that each key's records are in counter order in
/// the stream, whatever is retried. A `P` line per acknowledged record.
async fn produce(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    multi: bool,
    keys: usize,
    rate: u32,
    recording: Recording,
    cancel: CancellationToken,
) -> anyhow::Result<u64> {
    let period = Duration::from_secs_f64(keys as f64 / f64::from(rate.max(1)));
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let padding = "x".repeat(100);
    let mut counter = 0u64;
    let mut acknowledged = 0u64;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(acknowledged),
            _ = ticks.tick() => {}
        }
        // Keys differ between streams: each stream's are checked on their own.
        let round: Vec<(String, Bytes)> = (0..keys)
            .map(|k| {
                let key = if multi {
                    format!("{stream}.k{k}")
                } else {
                    format!("k{k}")
                };
                (key, Bytes::from(format!("{counter}:{padding}")))
            })
            .collect();
        let mut failing_since = None;
        let results = loop {
            match kcl_local::put_records(&kinesis, &stream, &round).await {
                Ok(results) => break results,
                Err(e) => {
                    // A reshard can refuse writes for a moment. The same round again: a
                    // record written twice has one counter twice, which keeps the order.
                    let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() > Duration::from_secs(60) {
                        return Err(e).context("the producer failed for a minute");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let lines: Vec<(char, String)> = round
            .iter()
            .zip(&results)
            .map(|((key, _), r)| {
                let shard = shard_label(multi, &stream, &r.shard_id);
                ('P', format!("{key} {counter} {shard} {}", r.sequence_number))
            })
            .collect();
        recording.write(&lines);
        acknowledged += lines.len() as u64;
        counter += 1;
    }
}

/// Reads what was appended to a file since the last call (complete lines only).
#[derive(Debug)]
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl Tail {
    async fn new_lines(&mut self) -> anyhow::Result<Vec<String>> {
        let mut file = match tokio::fs::File::open(&self.path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(self.offset)).await?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<String> = self.partial[..end].lines().map(str::to_owned).collect();
        self.partial.drain(..=end);
        Ok(complete)
    }
}

/// Waits until every acknowledged record was delivered by some worker, or `timeout`.
/// Worker processes write files: there is no event to await, so this polls them.
async fn drain(dir: &Path, runner_log: &Path, timeout: Duration) -> anyhow::Result<(bool, Duration)> {
    let started = tokio::time::Instant::now();
    let mut tails: BTreeMap<PathBuf, Tail> = BTreeMap::new();
    let mut missing: HashSet<(String, String)> = HashSet::new();
    let mut delivered: HashSet<(String, String)> = HashSet::new();
    for line in read_lines(runner_log)? {
        if line.tag == 'P' {
            if let (Some(shard), Some(seq)) = (line.fields.get(2), line.fields.get(3)) {
                missing.insert((shard.clone(), seq.clone()));
            }
        }
    }
    loop {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "log") && path != runner_log {
                tails.entry(path.clone()).or_insert_with(|| Tail {
                    path,
                    offset: 0,
                    partial: String::new(),
                });
            }
        }
        for tail in tails.values_mut() {
            for line in tail.new_lines().await? {
                let f: Vec<&str> = line.split(' ').collect();
                if f.first() == Some(&"D") && f.len() >= 6 {
                    delivered.insert((f[4].to_owned(), f[5].to_owned()));
                }
            }
        }
        missing.retain(|k| !delivered.contains(k));
        if missing.is_empty() {
            return Ok((true, started.elapsed()));
        }
        if started.elapsed() >= timeout {
            eprintln!("chaos: {} records still undelivered after {timeout:?}", missing.len());
            return Ok((false, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `child parent [adjacent parent]` per line, for `chaos verify`.
fn write_lineage(path: &Path, lineage: &BTreeMap<String, Vec<String>>) -> anyhow::Result<()> {
    let text: String = lineage
        .iter()
        .map(|(child, parents)| format!("{child} {}\n", parents.join(" ")))
        .collect();
    std::fs::write(path, text)?;
    Ok(())
}

fn read_lineage(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ').map(str::to_owned);
            f.next().map(|child| (child, f.collect()))
        })
        .collect())
}

/// Reads a round's files and verifies them; returns the report (JSON last, with
/// `extra`'s members added) and whether there was no violation.
fn verify_dir(dir: &Path, failover: Duration, extra: &serde_json::Value) -> anyhow::Result<(String, bool)> {
    let mut round = Round::default();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths.iter().filter(|p| p.extension().is_some_and(|e| e == "log")) {
        round
            .add(&read_lines(path)?)
            .with_context(|| format!("in {}", path.display()))?;
    }
    let lineage = read_lineage(&dir.join("lineage.txt"))?;
    let report = verify(
        &round.produced,
        &round.recorded,
        &lineage,
        &VerifyOptions {
            transfer_window: failover * 2,
        },
    );
    let mut json = report.json();
    if let (Some(object), Some(extra)) = (json.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            object.insert(k.clone(), v.clone());
        }
        object.insert("sdk_faults".into(), serde_json::json!(round.sdk_faults));
        object.insert("network_faults".into(), serde_json::json!(round.network_faults));
        object.insert("splits".into(), round.splits.into());
        object.insert("merges".into(), round.merges.into());
        object.insert("leases_taken".into(), round.leases_taken.into());
        object.insert("leases_lost".into(), round.leases_lost.into());
        object.insert("shard_ends".into(), round.shard_ends.into());
    }
    let faults = |m: &BTreeMap<String, usize>| m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ");
    let text = format!(
        "{}\nsdk faults injected: {}\nnetwork faults: {}\nreshards: {} splits, {} merges; leases taken {}, lost {}; shards ended {}\n{json}",
        report.human().trim_end(),
        faults(&round.sdk_faults),
        faults(&round.network_faults),
        round.splits,
        round.merges,
        round.leases_taken,
        round.leases_lost,
        round.shard_ends,
    );
    Ok((text, report.violations.is_empty()))
}

async fn run_round(args: RoundArgs) -> anyhow::Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,dynoxide=error,ferrokinesis=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    anyhow::ensure!(
        args.workers >= 1 && args.shards >= 1,
        "at least one worker and one shard"
    );
    anyhow::ensure!((0.0..=1.0).contains(&args.faults), "--faults is a share, from 0 to 1");
    let mode = match args.mode {
        ModeArg::Polling => Mode::Polling,
        ModeArg::FanOut => Mode::FanOut,
        ModeArg::Mixed => Mode::Mixed,
    };
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("emptying {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let runner_log = args.dir.join("runner.log");

    let backend = kcl_local::LocalBackend::start().await?;
    let kinesis = backend.kinesis_client();
    anyhow::ensure!(args.streams >= 1, "at least one stream");
    let streams: Vec<String> = (0..args.streams)
        .map(|i| {
            if i == 0 {
                "chaos".to_owned()
            } else {
                format!("chaos-{i}")
            }
        })
        .collect();
    for stream in &streams {
        kcl_local::create_stream(&kinesis, stream, args.shards).await?;
    }
    let multi = streams.len() > 1;
    let upstream = |endpoint: String| -> anyhow::Result<std::net::SocketAddr> {
        Ok(endpoint.trim_start_matches("http://").parse()?)
    };
    let events = schedule(&ScheduleOptions {
        length: Duration::from_secs(args.seconds),
        workers: args.workers,
        network_faults: args.faults > 0.0,
        seed: args.seed,
    });
    println!(
        "chaos round: seed {}, {} s, {} workers, {} stream(s) of {} shards, mode {:?}, faults {}, {} keys at {} records/s \
         (each stream), files in {}",
        args.seed,
        args.seconds,
        args.workers,
        args.streams,
        args.shards,
        args.mode,
        args.faults,
        args.keys,
        args.rate,
        args.dir.display()
    );
    for e in &events {
        println!("  at {:>7.1} s: {:?}", e.at.as_secs_f64(), e.action);
    }

    let mut runner = Runner {
        mode,
        exe: std::env::current_exe()?,
        streams: streams.clone(),
        application: "chaos".to_owned(),
        consumer: "chaos".to_owned(),
        kinesis: kinesis.clone(),
        kinesis_proxy: ChaosProxy::start(upstream(backend.kinesis_endpoint())?).await?,
        dynamodb_proxy: ChaosProxy::start(upstream(backend.dynamodb_endpoint())?).await?,
        recording: Recording::open(&runner_log, "runner")?,
        slots: (0..args.workers)
            .map(|_| Slot {
                child: None,
                id: String::new(),
                incarnation: 0,
            })
            .collect(),
        stopping: Vec::new(),
        unexpected_exits: Vec::new(),
        args,
    };
    for slot in 0..runner.slots.len() {
        runner.start_worker(slot)?;
    }
    let cancel = CancellationToken::new();
    let producers: Vec<_> = streams
        .iter()
        .map(|stream| {
            tokio::spawn(produce(
                kinesis.clone(),
                stream.clone(),
                multi,
                runner.args.keys,
                runner.args.rate,
                runner.recording.clone(),
                cancel.clone(),
            ))
        })
        .collect();

    // The chaos.
    let start = tokio::time::Instant::now();
    for event in events {
        tokio::time::sleep_until(start + event.at).await;
        if let Err(e) = runner.act(event.action).await {
            eprintln!("chaos: {:?} at {:?} failed: {e:#}", event.action, event.at);
        }
    }
    tokio::time::sleep_until(start + Duration::from_secs(runner.args.seconds)).await;

    // The drain: no more writes or faults, every slot running.
    cancel.cancel();
    let mut acknowledged = 0;
    for producer in producers {
        acknowledged += producer.await??;
    }
    runner.kinesis_proxy.set(ProxyFault::None);
    runner.dynamodb_proxy.set(ProxyFault::None);
    runner.restart_exited()?;
    for slot in 0..runner.slots.len() {
        if runner.slots[slot].child.is_none() {
            runner.start_worker(slot)?;
        }
    }
    println!("chaos over: {acknowledged} records acknowledged; draining");
    let (drained, drain_time) = drain(
        &runner.args.dir,
        &runner_log,
        Duration::from_secs(runner.args.drain_seconds),
    )
    .await?;

    // Stop everyone gracefully.
    for slot in 0..runner.slots.len() {
        runner.stop(slot)?;
    }
    for task in std::mem::take(&mut runner.stopping) {
        task.await?;
    }

    let mut lineage: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for stream in &streams {
        for s in kcl_tests::list_shards(&kinesis, stream).await? {
            let parents: Vec<String> = s
                .parent_shard_id()
                .into_iter()
                .chain(s.adjacent_parent_shard_id())
                .map(|p| shard_label(multi, stream, p))
                .collect();
            if !parents.is_empty() {
                lineage.insert(shard_label(multi, stream, s.shard_id()), parents);
            }
        }
    }
    write_lineage(&runner.args.dir.join("lineage.txt"), &lineage)?;
    let extra = serde_json::json!({
        "seed": runner.args.seed,
        "seconds": runner.args.seconds,
        "workers": runner.args.workers,
        "shards": runner.args.shards,
        "streams": runner.args.streams,
        "mode": format!("{:?}", runner.args.mode),
        "faults_rate": runner.args.faults,
        "drained": drained,
        "workers_exited_on_their_own": runner.unexpected_exits,
        "drain_seconds": drain_time.as_secs_f64(),
    });
    let (text, verified) = verify_dir(&runner.args.dir, Duration::from_millis(runner.args.failover_ms), &extra)?;
    // A worker that stopped on its own is a failure of the round even when nothing was
    // lost: the library gave up where it should have recovered.
    let ok = verified && runner.unexpected_exits.is_empty();
    std::fs::write(runner.args.dir.join("report.txt"), format!("{text}\n"))?;
    println!("{text}");
    drop(runner);
    backend.shutdown().await;
    Ok(ok)
}
