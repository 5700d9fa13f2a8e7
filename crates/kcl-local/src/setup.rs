//! Helpers that prepare resources for tests and examples, on any Kinesis endpoint.
//!
//! They use only the public Kinesis API, so they work the same against the embedded
//! backend, `kcl-local serve`, kinesis-mock, or AWS.

use std::time::Duration;

use aws_sdk_kinesis::types::StreamStatus;
use tokio::time::Instant;

use kcl_producer::{KinesisProducer, ProducerConfig, ProducerError};

use crate::error::LocalError;

/// How long [`create_stream`] waits for the stream to become `ACTIVE`. Generous, so that
/// the slower conformance emulator (and AWS, which takes tens of seconds) pass too.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// The first pause between two `DescribeStreamSummary` calls; it doubles up to
/// [`MAX_POLL_INTERVAL`]. Short, because the embedded backend is ready in milliseconds.
const FIRST_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// The longest pause between two `DescribeStreamSummary` calls.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Creates the stream `stream_name` with `shard_count` shards (provisioned mode) and
/// waits until it is `ACTIVE`, polling `DescribeStreamSummary` every few milliseconds at
/// first and at most every 250 ms, for up to two minutes.
///
/// # Errors
///
/// [`LocalError::Kinesis`] if a request fails — with `ResourceInUseException` if the
/// stream already exists (this helper does not silently reuse a stream whose shard count
/// may differ), `LimitExceededException` above the shard limit, `InvalidArgumentException`
/// for a bad name or count; [`LocalError::Timeout`] if the stream is not `ACTIVE` in time.
///
/// # Cancel safety
///
/// Dropping the future after `CreateStream` was sent leaves the stream being created.
pub async fn create_stream(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    shard_count: i32,
) -> Result<(), LocalError> {
    client
        .create_stream()
        .stream_name(stream_name)
        .shard_count(shard_count)
        .send()
        .await
        .map_err(|error| LocalError::kinesis("CreateStream", error))?;

    let started = Instant::now();
    let mut interval = FIRST_POLL_INTERVAL;
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream_name)
            .send()
            .await
            .map_err(|error| LocalError::kinesis("DescribeStreamSummary", error))?;
        let status = summary
            .stream_description_summary()
            .map(|description| description.stream_status());
        if status == Some(&StreamStatus::Active) {
            tracing::debug!(
                stream = stream_name,
                shard_count,
                elapsed = ?started.elapsed(),
                "stream is ACTIVE"
            );
            return Ok(());
        }
        if started.elapsed() >= ACTIVE_TIMEOUT {
            return Err(LocalError::Timeout {
                what: format!("stream {stream_name:?} to become ACTIVE (last status {status:?})"),
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// Where Kinesis put a record written by [`put_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutResult {
    /// The shard the record went to.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: String,
}

/// Writes `(partition key, data)` records with `kcl-producer`'s [`KinesisProducer`]:
/// `PutRecords` calls of up to 500 records, one at a time and in input order (so that
/// per shard the sequence numbers follow the input), resending exactly the entries a
/// partial failure reports with a backoff, within 30 s per record. Returns where each
/// record went, in input order. A helper for tests, benchmarks and demos on any backend;
/// per-shard rate limits are off (the embedded backend has none).
///
/// # Errors
/// [`LocalError::Producer`] when a record cannot be written for good (a missing stream,
/// for example);
/// [`LocalError::PutRecordsIncomplete`] when records could not be written in time.
///
/// # Cancel safety
/// Dropping the future may leave some records written and others not.
pub async fn put_records(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    records: &[(String, bytes::Bytes)],
) -> Result<Vec<PutResult>, LocalError> {
    let mut config = ProducerConfig::default();
    config.max_in_flight_calls = 1;
    config.ordered_per_key = false;
    config.rate_limit_enabled = false;
    config.record_max_buffered_time = Duration::ZERO;
    config.min_retry_backoff = Duration::from_millis(20);
    config.max_retry_backoff = Duration::from_millis(500);
    let producer = KinesisProducer::new(client.clone(), stream_name, config);
    let mut acknowledgements = Vec::with_capacity(records.len());
    let mut outcome = Ok(());
    for (partition_key, data) in records {
        match producer.put(partition_key.clone(), data.clone()).await {
            Ok(ack) => acknowledgements.push(ack),
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let mut results = Vec::with_capacity(records.len());
    let mut failed = 0;
    let mut last_error = None;
    for ack in acknowledgements {
        match ack.await {
            Ok(r) => results.push(PutResult {
                shard_id: r.shard_id,
                sequence_number: r.sequence_number.as_str().to_owned(),
            }),
            Err(e) => {
                failed += 1;
                last_error = Some(e);
            }
        }
    }
    producer.close().await;
    if let Err(source) = outcome {
        return Err(LocalError::Producer { source });
    }
    match last_error {
        None => Ok(results),
        Some(ProducerError::Expired { attempts, last_error }) => Err(LocalError::PutRecordsIncomplete {
            failed,
            attempts,
            last_error_code: Some(last_error),
        }),
        Some(source) => Err(LocalError::Producer { source }),
    }
}
