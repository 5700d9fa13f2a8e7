//! Helpers that prepare resources for tests and examples, on any Kinesis endpoint.
//!
//! They use only the public Kinesis API, so they work the same against the embedded
//! backend, `kcl-local serve`, kinesis-mock, or AWS.

use std::time::Duration;

use aws_sdk_kinesis::types::StreamStatus;
use tokio::time::Instant;

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

/// How many entries one `PutRecords` call carries (the Kinesis maximum).
const PUT_RECORDS_BATCH: usize = 500;
/// How many times a refused entry is sent before giving up.
const PUT_RECORDS_ATTEMPTS: u32 = 10;

/// Writes `(partition key, data)` records with `PutRecords`, 500 a call, resending
/// exactly the entries a partial failure reports (throttled shards, for example) with a
/// short backoff. Returns where each record went, in input order. A helper for tests,
/// benchmarks and demos on any backend.
///
/// # Errors
/// [`LocalError::Kinesis`] when a call fails as a whole; [`LocalError::PutRecordsIncomplete`]
/// when entries are still refused after 10 attempts.
///
/// # Cancel safety
/// Dropping the future may leave some records written and others not.
pub async fn put_records(
    client: &aws_sdk_kinesis::Client,
    stream_name: &str,
    records: &[(String, bytes::Bytes)],
) -> Result<Vec<PutResult>, LocalError> {
    let mut results: Vec<Option<PutResult>> = vec![None; records.len()];
    for (chunk_index, chunk) in records.chunks(PUT_RECORDS_BATCH).enumerate() {
        let offset = chunk_index * PUT_RECORDS_BATCH;
        let mut pending: Vec<usize> = (0..chunk.len()).collect();
        let mut last_error_code = None;
        for attempt in 1..=PUT_RECORDS_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|&i| {
                    aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                        .partition_key(&chunk[i].0)
                        .data(aws_sdk_kinesis::primitives::Blob::new(chunk[i].1.to_vec()))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| LocalError::kinesis("PutRecords", aws_sdk_kinesis::Error::from(error)))?;
            let out = client
                .put_records()
                .stream_name(stream_name)
                .set_records(Some(entries))
                .send()
                .await
                .map_err(|error| LocalError::kinesis("PutRecords", error))?;
            let mut refused = Vec::new();
            for (entry, i) in out.records().iter().zip(pending.drain(..)) {
                match (entry.shard_id(), entry.sequence_number()) {
                    (Some(shard_id), Some(sequence_number)) if entry.error_code().is_none() => {
                        results[offset + i] = Some(PutResult {
                            shard_id: shard_id.to_owned(),
                            sequence_number: sequence_number.to_owned(),
                        });
                    }
                    _ => {
                        last_error_code = entry.error_code().map(str::to_owned);
                        refused.push(i);
                    }
                }
            }
            pending = refused;
            if pending.is_empty() {
                break;
            }
            if attempt < PUT_RECORDS_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(20) * attempt).await;
            }
        }
        if !pending.is_empty() {
            return Err(LocalError::PutRecordsIncomplete {
                failed: pending.len(),
                attempts: PUT_RECORDS_ATTEMPTS,
                last_error_code,
            });
        }
    }
    Ok(results.into_iter().flatten().collect())
}
