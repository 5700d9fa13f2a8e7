//! Multi-stream: one worker and one lease table for several streams.
//!
//! ```text
//! cargo run -p kcl-examples --bin multi_stream
//! ```
//!
//! Needs no AWS account: it starts kcl-local (an embedded Kinesis and DynamoDB on
//! 127.0.0.1), creates three streams, writes 1,000 records to each, and runs a
//! [`Scheduler`] in multi-stream mode over a fixed list of [`StreamConfig`]s (a
//! `Vec<StreamConfig>` is a [`MultiStreamTracker`](kcl_core::MultiStreamTracker); an
//! application that adds and removes streams while it runs implements the trait). The
//! processor factory learns each shard's stream; the processors count per stream and
//! checkpoint after each batch. It stops once every record was counted, prints the
//! lease keys (`account-id:stream-name:creation-epoch:shard-id`, as the Java KCL 3.x
//! writes them) and exits 0 only if every stream's count equals what was written.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use kcl_core::{
    stream_processor_factory, InitialPositionInStream, LeaseStore as _, ProcessRecordsInput, ProcessorError,
    RecordProcessor, Scheduler, StreamConfig, StreamIdentifier,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_local::LocalBackend;

const STREAMS: [&str; 3] = ["orders", "payments", "audit"];
const RECORDS_PER_STREAM: usize = 1_000;

type Counts = Arc<Mutex<BTreeMap<String, usize>>>;

/// Counts the records of its stream.
struct StreamCounter {
    stream: String,
    counts: Counts,
}

#[async_trait::async_trait]
impl RecordProcessor for StreamCounter {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        *self
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(self.stream.clone())
            .or_default() += input.records.len();
        input.checkpointer.checkpoint().await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await.context("starting kcl-local")?;
    let kinesis = backend.kinesis_client();
    let dynamodb = backend.dynamodb_client();
    for (i, stream) in STREAMS.iter().enumerate() {
        kcl_local::create_stream(&kinesis, stream, i32::try_from(i + 1)?).await?;
        let records: Vec<(String, Bytes)> = (0..RECORDS_PER_STREAM)
            .map(|n| (format!("key-{n}"), Bytes::from(format!("{stream} event {n}"))))
            .collect();
        kcl_local::put_records(&kinesis, stream, &records).await?;
        println!("wrote {RECORDS_PER_STREAM} records to {stream} ({} shards)", i + 1);
    }

    let streams: Vec<StreamConfig> = STREAMS
        .iter()
        .map(|s| Ok(StreamConfig::new(*s)?.initial_position(InitialPositionInStream::TrimHorizon)))
        .collect::<anyhow::Result<_>>()?;
    let counts: Counts = Arc::default();
    let factory_counts = counts.clone();
    let scheduler = Scheduler::multi_stream_builder(streams)
        .kinesis_client(kinesis.clone())
        .lease_store(DynamoLeaseStore::new(dynamodb.clone(), "multi-stream-example"))
        .processor_factory(stream_processor_factory(
            move |stream: &StreamIdentifier, _shard: &str| StreamCounter {
                stream: stream.stream_name().to_owned(),
                counts: factory_counts.clone(),
            },
        ))
        .build()?;
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    loop {
        ticker.tick().await;
        let done = {
            let counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            STREAMS
                .iter()
                .all(|s| counts.get(*s).copied().unwrap_or(0) >= RECORDS_PER_STREAM)
        };
        if done || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    shutdown.shutdown();
    running.await??;

    for lease in DynamoLeaseStore::new(dynamodb, "multi-stream-example")
        .list_leases()
        .await?
    {
        println!("lease {} checkpoint {}", lease.lease_key, lease.checkpoint);
    }
    let counts = counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
    for stream in STREAMS {
        println!("{stream}: processed {}", counts.get(stream).copied().unwrap_or(0));
    }
    backend.shutdown().await;
    if STREAMS
        .iter()
        .any(|s| counts.get(*s).copied() != Some(RECORDS_PER_STREAM))
    {
        bail!("some stream's count differs from what was written: {counts:?}");
    }
    println!("OK: processed == written on every stream");
    Ok(())
}
