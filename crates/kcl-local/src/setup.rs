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
