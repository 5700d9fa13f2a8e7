//! A worker process for tests and demos: consumes a stream from a running backend
//! (`kcl-local serve`, or any Kinesis + DynamoDB endpoints) and appends what it
//! processed to a log file, one line per event, so that tests can run several workers,
//! kill them, and check what was delivered.
//!
//! ```sh
//! cargo run -p kcl-local -- serve --kinesis-port 4567 --dynamodb-port 8000 &
//! cargo run -p kcl-tests --bin kcl-worker -- --stream clicks --application demo \
//!     --worker-id w1 --output /tmp/w1.log [--retrieval fan-out --consumer-name demo]
//! ```
//!
//! Log lines (space separated; the payload is the last field, written by the tests'
//! own producer):
//! - `I <shard> <checkpoint>`: initialized, resuming after `checkpoint`
//! - `D <shard> <sequence> <sub-sequence> <payload>`: a delivered record (flushed before the
//!   batch is checkpointed, so that everything checkpointed is in the file even after `kill -9`)
//! - `C <shard> <position>`: a checkpoint was stored
//! - `L <shard>`: lease lost; `E <shard>`: shard ended; `S <shard>`: shutdown requested
//! - `X ok` or `X error <message>`: the scheduler returned

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_trait::async_trait;
use clap::{Parser, ValueEnum};
use kcl_core::{
    InitialPositionInStream, InitializationInput, LeaseLostInput, LeaseManagementConfig, ProcessRecordsInput,
    ProcessorError, RecordProcessor, RetrievalConfig, Scheduler, ShardEndedInput, ShutdownRequestedInput,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Position {
    TrimHorizon,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Retrieval {
    /// `GetRecords` polling.
    Polling,
    /// Enhanced fan-out (`SubscribeToShard`), through `--consumer-name`.
    FanOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CheckpointEvery {
    /// After every batch, and at shutdown.
    Batch,
    /// Only at shutdown.
    Shutdown,
}

/// A test worker: consumes a stream and logs what it processed.
#[derive(Debug, Parser)]
struct Args {
    /// Kinesis endpoint.
    #[arg(long, default_value = "http://127.0.0.1:4567")]
    kinesis_endpoint: String,
    /// DynamoDB endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    dynamodb_endpoint: String,
    /// Region.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Stream name.
    #[arg(long)]
    stream: String,
    /// Application name (the lease table).
    #[arg(long)]
    application: String,
    /// Worker id.
    #[arg(long)]
    worker_id: String,
    /// Log file (appended to).
    #[arg(long)]
    output: PathBuf,
    /// Failover time in milliseconds.
    #[arg(long, default_value_t = 3000)]
    failover_ms: u64,
    /// Lease-taking interval in milliseconds (default: failover / 5).
    #[arg(long)]
    taking_interval_ms: Option<u64>,
    /// Idle time between reads in milliseconds.
    #[arg(long, default_value_t = 200)]
    idle_ms: u64,
    /// GetRecords limit.
    #[arg(long, default_value_t = 10_000)]
    max_records: i32,
    /// Initial position of shards without a checkpoint.
    #[arg(long, value_enum, default_value = "trim-horizon")]
    initial_position: Position,
    /// When to checkpoint.
    #[arg(long, value_enum, default_value = "batch")]
    checkpoint: CheckpointEvery,
    /// How shards are read.
    #[arg(long, value_enum, default_value = "polling")]
    retrieval: Retrieval,
    /// The stream consumer of `--retrieval fan-out` (registered when missing).
    #[arg(long, default_value = "kcl-worker")]
    consumer_name: String,
}

/// The log file, shared by the processors of this process.
#[derive(Clone, Debug)]
struct Log(Arc<Mutex<File>>);

impl Log {
    fn write(&self, text: &str) {
        let mut file = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // One write per call so that lines of concurrent processors never interleave.
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("kcl-worker: cannot write the log: {e}");
            std::process::exit(3);
        }
    }
}

#[derive(Debug)]
struct LoggingProcessor {
    shard_id: String,
    log: Log,
    checkpoint: CheckpointEvery,
}

#[async_trait]
impl RecordProcessor for LoggingProcessor {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.log
            .write(&format!("I {} {}\n", input.shard_id, input.extended_sequence_number));
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        if input.records.is_empty() {
            return Ok(());
        }
        let mut lines = String::new();
        for r in &input.records {
            let payload = String::from_utf8_lossy(&r.data).replace(['\n', ' '], "_");
            lines.push_str(&format!(
                "D {} {} {} {}\n",
                self.shard_id, r.sequence_number, r.sub_sequence_number, payload
            ));
        }
        self.log.write(&lines);
        if self.checkpoint == CheckpointEvery::Batch {
            if let Some(last) = input.records.last() {
                match input.checkpointer.checkpoint_record(last).await {
                    Ok(()) => self
                        .log
                        .write(&format!("C {} {}\n", self.shard_id, last.sequence_number)),
                    Err(e) => eprintln!("kcl-worker: checkpoint of {} failed: {e}", self.shard_id),
                }
            }
        }
        Ok(())
    }

    async fn lease_lost(&mut self, input: LeaseLostInput) {
        self.log.write(&format!("L {}\n", input.shard_id));
    }

    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        input.checkpointer.checkpoint().await?;
        self.log.write(&format!("E {}\n", input.shard_id));
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        match input.checkpointer.checkpoint().await {
            Ok(()) => {
                let position = input.checkpointer.last_checkpoint().await;
                self.log.write(&format!("C {} {}\n", input.shard_id, position));
            }
            Err(e) => eprintln!("kcl-worker: checkpoint at shutdown of {} failed: {e}", input.shard_id),
        }
        self.log.write(&format!("S {}\n", input.shard_id));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kcl_core=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.output)
        .with_context(|| format!("opening {}", args.output.display()))?;
    let log = Log(Arc::new(Mutex::new(file)));

    let kinesis = aws_sdk_kinesis::Client::new(&kcl_local::sdk_config_for_endpoint(
        &args.kinesis_endpoint,
        &args.region,
    ));
    let dynamodb = aws_sdk_dynamodb::Client::new(&kcl_local::sdk_config_for_endpoint(
        &args.dynamodb_endpoint,
        &args.region,
    ));
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_millis(args.failover_ms));
    if let Some(ms) = args.taking_interval_ms {
        lease.lease_taking_interval = Duration::from_millis(ms);
    }
    let retrieval = match args.retrieval {
        Retrieval::Polling => RetrievalMode::Polling(RetrievalConfig {
            idle_time_between_reads: Duration::from_millis(args.idle_ms),
            max_records: args.max_records,
            ..RetrievalConfig::default()
        }),
        Retrieval::FanOut => RetrievalMode::FanOut(FanOutConfig {
            shard_end_check_interval: Duration::from_secs(1),
            ..FanOutConfig::new(args.consumer_name.clone())
        }),
    };
    let checkpoint = args.checkpoint;
    let factory_log = log.clone();
    let scheduler = Scheduler::builder(args.stream.clone())
        .kinesis_client(kinesis)
        .lease_store(DynamoLeaseStore::new(dynamodb, args.application.clone()))
        .worker_id(args.worker_id.clone())
        .initial_position(match args.initial_position {
            Position::TrimHorizon => InitialPositionInStream::TrimHorizon,
            Position::Latest => InitialPositionInStream::Latest,
        })
        .lease_config(lease)
        .retrieval_mode(retrieval)?
        .processor_factory(move |shard_id: &str| LoggingProcessor {
            shard_id: shard_id.to_owned(),
            log: factory_log.clone(),
            checkpoint,
        })
        .build()?;

    let shutdown = scheduler.shutdown_handle();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kcl-worker: no SIGTERM handler: {e}");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        shutdown.shutdown();
    });
    let result = scheduler.run().await;
    match &result {
        Ok(()) => log.write("X ok\n"),
        Err(e) => log.write(&format!("X error {}\n", e.to_string().replace('\n', " "))),
    }
    result.context("scheduler failed")
}
