//! The `overhead` scenario: the framework alone, with no Kinesis reads and no DynamoDB
//! writes on the record path: nanoseconds per record of dispatch (publisher channel,
//! prefetch accounting, shard consumer, processor call) and checkpoint bookkeeping.
//!
//! Records come from a synthetic [`RetrievalFactory`] (batches of `--batch` records of
//! `--record-size` bytes sharing one payload buffer, with increasing sequence numbers,
//! as fast as the consumer takes them); leases live in an [`InMemoryLeaseStore`]. The
//! only backend call is shard discovery (`ListShards` on a stream in a backend process,
//! once at start). The processor counts, and checkpoints once per batch unless
//! `--no-checkpoint`. Reported: CPU time of this process per record, and wall time per
//! record, over `--records`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use clap::Args;
use kcl_core::retrieval::{PrefetchLimits, PublisherStart};
use kcl_core::{
    InMemoryLeaseStore, InitialPositionInStream, ProcessRecordsInput, ProcessorError, Record, RecordProcessor,
    RecordsPublisher, RetrievalFactory, Scheduler, SequenceNumber,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::external::ExternalBackend;
use crate::support::{process_cpu_time, round1};

/// Options of the `overhead` scenario.
#[derive(Args, Debug, Clone)]
pub(crate) struct OverheadArgs {
    /// Records processed in the measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pub(crate) records: u64,
    /// Shards (one consumer each).
    #[arg(long, default_value_t = 4)]
    pub(crate) shards: i32,
    /// Records per batch.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
    /// Payload bytes per record (one shared buffer: no copying is measured).
    #[arg(long, default_value_t = 1024)]
    pub(crate) record_size: usize,
    /// Do not checkpoint (dispatch alone).
    #[arg(long)]
    pub(crate) no_checkpoint: bool,
}

/// Endless batches of records, as fast as the consumer takes them.
#[derive(Debug)]
struct SyntheticFactory {
    batch: usize,
    payload: Bytes,
}

#[async_trait]
impl RetrievalFactory for SyntheticFactory {
    fn start(&self, start: PublisherStart) -> RecordsPublisher {
        let (sink, publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: 3,
            max_records: 10 * self.batch,
            max_bytes: usize::MAX,
        });
        let (batch, payload, cancel) = (self.batch, self.payload.clone(), start.cancel);
        tokio::spawn(async move {
            let mut sequence: u64 = 1;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = sink.wait_for_room() => {}
                }
                let mut records = Vec::with_capacity(batch);
                for i in 0..batch as u64 {
                    let Ok(seq) = SequenceNumber::parse(&(sequence + i).to_string()) else {
                        return;
                    };
                    records.push(Record::new(payload.clone(), "pk", seq));
                }
                sequence += batch as u64;
                if sink.batch(records, Some(0)).await.is_err() {
                    return;
                }
            }
        });
        publisher
    }
}

/// A moment of the measurement: wall clock, process CPU time, records processed.
type Mark = (Instant, Duration, u64);

/// Where the processors note the start (warm-up done) and the end (target reached).
#[derive(Debug, Default)]
struct Marks {
    start: std::sync::Mutex<Option<Mark>>,
    end: std::sync::Mutex<Option<Mark>>,
    done: Notify,
}

/// Counts records; checkpoints once per batch (or not); marks the measurement's start
/// and end.
#[derive(Debug)]
struct CountingProcessor {
    processed: Arc<AtomicU64>,
    warmup: u64,
    target: u64,
    marks: Arc<Marks>,
    checkpoint: bool,
}

#[async_trait]
impl RecordProcessor for CountingProcessor {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let n = input.records.len() as u64;
        if self.checkpoint && n > 0 {
            input.checkpointer.checkpoint().await?;
        }
        let total = self.processed.fetch_add(n, Ordering::AcqRel) + n;
        let mark = |slot: &std::sync::Mutex<Option<Mark>>| {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert((Instant::now(), process_cpu_time(), total));
        };
        if total >= self.warmup {
            mark(&self.marks.start);
        }
        if total >= self.target {
            mark(&self.marks.end);
            self.marks.done.notify_one();
        }
        Ok(())
    }
}

/// Runs the scenario and returns its JSON object.
pub(crate) async fn run(args: &OverheadArgs) -> anyhow::Result<Value> {
    let backend = ExternalBackend::start().await?;
    let bench = backend.bench();
    let stream = bench.new_stream(args.shards).await?;
    let processed = Arc::new(AtomicU64::new(0));
    let marks = Arc::new(Marks::default());
    // A warm-up of a tenth, then the measurement.
    let warmup = (args.records / 10).max(1);
    let target = warmup + args.records;
    let scheduler = Scheduler::builder(stream)
        .kinesis_client(bench.kinesis.clone())
        .lease_store(InMemoryLeaseStore::new())
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_factory(SyntheticFactory {
            batch: args.batch,
            payload: Bytes::from(vec![b'x'; args.record_size]),
        })
        .processor_factory({
            let (processed, marks, checkpoint) = (processed.clone(), marks.clone(), !args.no_checkpoint);
            move |_: &str| CountingProcessor {
                processed: processed.clone(),
                warmup,
                target,
                marks: marks.clone(),
                checkpoint,
            }
        })
        .build()?;
    let shutdown = scheduler.shutdown_handle();
    let task = tokio::spawn(scheduler.run());
    marks.done.notified().await;
    let take = |slot: &std::sync::Mutex<Option<Mark>>| *slot.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(start), Some(end)) = (take(&marks.start), take(&marks.end)) else {
        anyhow::bail!("the measurement did not start and end");
    };
    let (wall, cpu, records) = (end.0 - start.0, end.1 - start.1, end.2 - start.2);
    shutdown.shutdown();
    task.await??;
    backend.stop().await?;
    let per_record = |d: Duration| round1(d.as_nanos() as f64 / records as f64);
    Ok(json!({
        "scenario": "overhead",
        "config": {
            "records": args.records,
            "shards": args.shards,
            "batch": args.batch,
            "record_size_bytes": args.record_size,
            "checkpoint": if args.no_checkpoint { "never" } else { "once per batch (in-memory lease store)" },
            "source": "synthetic RetrievalFactory, one shared payload buffer",
        },
        "results": {
            "records_measured": records,
            "cpu_ns_per_record": per_record(cpu),
            "wall_ns_per_record": per_record(wall),
            "records_per_sec": round1(records as f64 / wall.as_secs_f64()),
        },
        "targets": { "cpu_ns_per_record": "< 300" },
        "note": "CPU time of this whole process (CLOCK_PROCESS_CPUTIME_ID): the synthetic publishers build \
                 the records (a sequence number parsed from a decimal string and a Record per entry) too, so \
                 this is an upper bound of the framework's own cost. Measured after a warm-up of a tenth.",
    }))
}
