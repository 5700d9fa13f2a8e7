//! Polling retrieval (the Java KCL's `PrefetchRecordsPublisher` over `GetRecords`).
//!
//! One task per shard consumer fetches ahead of the processor into the bounded channel
//! of the [retrieval seam](super): at most `max_pending_batches` batches, and no new
//! fetch starts while the queued records or bytes are at their limits, so memory is
//! bounded by the limits plus one batch whatever the backlog. Between calls it waits
//! `idle_time_between_reads` from the start of the previous call (so a new record waits
//! about one idle time, never more), or `backlog_time_between_reads` while the shard
//! has a backlog.
//!
//! Expired iterators are renewed after the last record fetched (or, with nothing
//! fetched yet, where the first iterator stood); throttling, transient failures and
//! calls that exceed `kinesis_call_timeout` are retried with backoff without end; a KMS
//! key that cannot be used ends the publisher with `Failed` ([`RetrievalError::Kms`]); (each
//! one logged and counted), never sooner than 200 ms after the failed call started. A shard Kinesis does not know is reported as
//! `ShardNotFound`; a checkpoint older than the retention resumes at `TRIM_HORIZON`,
//! while a sequence number refused for another reason fails the publisher.

use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::types::ShardIteratorType;
use aws_smithy_types::DateTime;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{
    checkpoint_expired, refused_for_retention, ChildShard, PrefetchLimits, PublisherEvent, PublisherSink,
    PublisherStart, RecordsPublisher, RetrievalError, RetrievalFactory, StartingPosition,
};
use crate::config::RetrievalConfig;
use crate::error::BoxError;
use crate::metrics;
use crate::retry::with_timeout;
use crate::sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};

/// The least time between two `GetRecords` (or `GetShardIterator`) calls on one shard:
/// Kinesis allows five of each per shard per second, shared by every application that
/// reads the shard. Retries after throttling or a failure never come sooner, whatever
/// the backoff policy's jitter draws.
const MIN_CALL_SPACING: Duration = Duration::from_millis(200);

/// The wait before retrying a call that started at `call_start` and failed on attempt
/// `attempt`: the policy's backoff, but never less than [`MIN_CALL_SPACING`] after the
/// failed call started.
fn retry_at(call_start: Instant, policy: &crate::retry::RetryPolicy, attempt: u32) -> Instant {
    (Instant::now() + policy.backoff(attempt)).max(call_start + MIN_CALL_SPACING)
}

/// Polling retrieval: a `GetRecords` loop per shard with bounded prefetch, configured
/// by a [`RetrievalConfig`]. The default [`RetrievalFactory`].
#[derive(Debug, Clone, Default)]
pub struct PollingRetrievalFactory {
    config: RetrievalConfig,
}

impl PollingRetrievalFactory {
    /// Polling with `config`.
    pub fn new(config: RetrievalConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &RetrievalConfig {
        &self.config
    }
}

#[async_trait::async_trait]
impl RetrievalFactory for PollingRetrievalFactory {
    fn start(&self, start: PublisherStart) -> RecordsPublisher {
        let (sink, publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: self.config.max_pending_batches,
            max_records: self.config.max_prefetch_records,
            max_bytes: self.config.max_prefetch_bytes,
        });
        let task = PollingPublisher {
            kinesis: start.kinesis,
            stream_name: start.stream_name,
            stream_arn: start.stream_arn,
            shard_id: start.shard_id,
            config: self.config.clone(),
            sink,
            last_fetched: None,
        };
        let position = start.position;
        let cancel = start.cancel;
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                tokio::select! {
                    // Cancel safety: dropping the publisher mid-call loses nothing; the
                    // consumer resumes from its own last delivered position.
                    () = cancel.cancelled() => {}
                    () = task.run(position) => {}
                }
            },
            span,
        ));
        publisher
    }
}

struct PollingPublisher {
    kinesis: aws_sdk_kinesis::Client,
    stream_name: String,
    stream_arn: Option<String>,
    shard_id: String,
    config: RetrievalConfig,
    sink: PublisherSink,
    /// The last Kinesis record fetched, where a renewed iterator resumes after.
    last_fetched: Option<SequenceNumber>,
}

enum Step<T> {
    Done(T),
    Retry,
    Fatal(&'static str, BoxError),
    ExpiredIterator,
    /// `ResourceNotFoundException`: the shard, or the whole stream, is gone.
    NotFound(BoxError),
}

impl PollingPublisher {
    async fn run(mut self, start: StartingPosition) {
        let Some((mut iterator, resume)) = self.first_iterator(&start).await else {
            return;
        };
        let mut attempt = 0u32;
        let mut next_call = Instant::now();
        loop {
            self.sink.wait_for_room().await;
            tokio::time::sleep_until(next_call).await;
            let call_start = Instant::now();
            match self.get_records(&iterator).await {
                Step::Done(out) => {
                    attempt = 0;
                    let full = out.records().len() >= usize::try_from(self.config.max_records).unwrap_or(usize::MAX);
                    let behind = out.millis_behind_latest().is_some_and(|m| m > 0);
                    let pause = if full || behind {
                        self.config.backlog_time_between_reads
                    } else {
                        self.config.idle_time_between_reads
                    };
                    next_call = call_start + pause;
                    let millis_behind_latest = out.millis_behind_latest();
                    let next_iterator = out.next_shard_iterator().map(str::to_owned);
                    let child_shards = out.child_shards().to_vec();
                    let delivered = self
                        .sink
                        .deliver(
                            &self.stream_name,
                            &self.shard_id,
                            out.records,
                            millis_behind_latest,
                            |_| true,
                        )
                        .await;
                    let Ok(delivered) = delivered else {
                        return;
                    };
                    if delivered.last.is_some() {
                        self.last_fetched = delivered.last;
                    }
                    match next_iterator {
                        Some(next) => iterator = next,
                        None => {
                            debug!("shard end reached");
                            let child_shards = child_shards.iter().map(ChildShard::from).collect();
                            let _ = self.sink.send(PublisherEvent::ShardEnd { child_shards }).await;
                            return;
                        }
                    }
                }
                Step::ExpiredIterator => {
                    // After the last record fetched; with nothing fetched yet, where the
                    // first iterator stood (a LATEST start resumes at the time it was
                    // obtained, not at a newer LATEST that would skip what was written
                    // in between).
                    let position = match &self.last_fetched {
                        Some(seq) => StartingPosition {
                            checkpoint: ExtendedSequenceNumber::new(seq.clone(), 0),
                            timestamp: None,
                        },
                        None => resume.clone(),
                    };
                    debug!(resume_at = %position.checkpoint, "shard iterator expired; getting a new one");
                    iterator = match self.get_iterator(&position).await {
                        Some(it) => it,
                        None => return,
                    };
                    next_call = next_call.max(call_start + MIN_CALL_SPACING);
                }
                Step::Retry => {
                    attempt = attempt.saturating_add(1);
                    next_call = retry_at(call_start, &self.config.retry, attempt);
                }
                Step::Fatal(operation, source) => {
                    let _ = self.sink.send(PublisherEvent::Failed { operation, source }).await;
                    return;
                }
                Step::NotFound(source) => {
                    let operation = "GetRecords";
                    let _ = self
                        .sink
                        .send(PublisherEvent::ShardNotFound { operation, source })
                        .await;
                    return;
                }
            }
        }
    }

    /// The first iterator, and the position an expired iterator resumes at while
    /// nothing was fetched: the start itself, except that `LATEST` becomes
    /// `AT_TIMESTAMP` of the moment the first iterator was asked for.
    async fn first_iterator(&mut self, start: &StartingPosition) -> Option<(String, StartingPosition)> {
        let asked_at = SystemTime::now();
        let iterator = self.get_iterator(start).await?;
        let resume = match start.checkpoint.checkpoint {
            Checkpoint::Latest => StartingPosition {
                checkpoint: ExtendedSequenceNumber::AT_TIMESTAMP,
                timestamp: Some(asked_at),
            },
            _ => start.clone(),
        };
        Some((iterator, resume))
    }

    async fn get_records(&self, iterator: &str) -> Step<aws_sdk_kinesis::operation::get_records::GetRecordsOutput> {
        let call = self
            .kinesis
            .get_records()
            .shard_iterator(iterator)
            .limit(self.config.max_records)
            .send();
        match with_timeout(self.config.kinesis_call_timeout, call).await {
            Ok(out) => Step::Done(out),
            Err(SdkError::ServiceError(e)) => match e.err() {
                GetRecordsError::ExpiredIteratorException(_) => Step::ExpiredIterator,
                GetRecordsError::ProvisionedThroughputExceededException(_)
                | GetRecordsError::KmsThrottlingException(_) => {
                    metrics::throttled("GetRecords");
                    debug!("GetRecords throttled; backing off");
                    Step::Retry
                }
                GetRecordsError::ResourceNotFoundException(_) => {
                    Step::NotFound(BoxError::from(SdkError::ServiceError(e)))
                }
                GetRecordsError::AccessDeniedException(_) | GetRecordsError::InvalidArgumentException(_) => {
                    Step::Fatal("GetRecords", BoxError::from(SdkError::ServiceError(e)))
                }
                GetRecordsError::KmsAccessDeniedException(_)
                | GetRecordsError::KmsDisabledException(_)
                | GetRecordsError::KmsInvalidStateException(_)
                | GetRecordsError::KmsNotFoundException(_)
                | GetRecordsError::KmsOptInRequired(_) => {
                    let code = e.err().meta().code().unwrap_or("KMS error").to_owned();
                    let source = RetrievalError::Kms {
                        operation: "GetRecords",
                        code,
                        source: BoxError::from(SdkError::ServiceError(e)),
                    };
                    Step::Fatal("GetRecords", source.into())
                }
                _ => {
                    let e = SdkError::ServiceError(e);
                    warn!(error = %DisplayErrorContext(&e), "GetRecords failed; retrying");
                    Step::Retry
                }
            },
            Err(e) => {
                warn!(error = %DisplayErrorContext(&e), "GetRecords failed; retrying");
                Step::Retry
            }
        }
    }

    /// A shard iterator at `start`: sentinels map to their iterator types, and a
    /// sequence number to `AT_SEQUENCE_NUMBER` (the consumer drops what it has already
    /// delivered, which keeps the remaining user records of a partly checkpointed
    /// aggregated record). A sequence number Kinesis refuses as past the stream's
    /// retention ([`refused_for_retention`]) resumes at `TRIM_HORIZON`, the oldest record
    /// left, with a loud warning and `kcl_checkpoints_expired_total`; any other refusal
    /// ends the publisher with `Failed` ([`RetrievalError::CheckpointRefused`]).
    async fn get_iterator(&self, start: &StartingPosition) -> Option<String> {
        let mut attempt = 0u32;
        let mut checkpoint = start.checkpoint.checkpoint.clone();
        loop {
            let call_start = Instant::now();
            let mut req = self
                .kinesis
                .get_shard_iterator()
                .set_stream_name(self.stream_arn.is_none().then(|| self.stream_name.clone()))
                .set_stream_arn(self.stream_arn.clone())
                .shard_id(&self.shard_id);
            req = match &checkpoint {
                Checkpoint::TrimHorizon | Checkpoint::ShardEnd => {
                    req.shard_iterator_type(ShardIteratorType::TrimHorizon)
                }
                Checkpoint::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
                Checkpoint::AtTimestamp => req
                    .shard_iterator_type(ShardIteratorType::AtTimestamp)
                    .timestamp(DateTime::from(start.timestamp.unwrap_or(SystemTime::UNIX_EPOCH))),
                Checkpoint::Sequence(seq) => req
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(seq.as_str()),
            };
            let result = with_timeout(self.config.kinesis_call_timeout, req.send()).await;
            let e = match result {
                Ok(out) => match out.shard_iterator {
                    Some(it) => return Some(it),
                    None => {
                        // No iterator means the shard is closed and read through.
                        let _ = self
                            .sink
                            .send(PublisherEvent::ShardEnd {
                                child_shards: Vec::new(),
                            })
                            .await;
                        return None;
                    }
                },
                Err(e) => e,
            };
            let kind = match &e {
                SdkError::ServiceError(s) => Some(s.err()),
                _ => None,
            };
            match kind {
                Some(GetShardIteratorError::ResourceNotFoundException(_)) => {
                    let event = PublisherEvent::ShardNotFound {
                        operation: "GetShardIterator",
                        source: BoxError::from(e),
                    };
                    let _ = self.sink.send(event).await;
                    return None;
                }
                Some(GetShardIteratorError::InvalidArgumentException(refusal))
                    if matches!(checkpoint, Checkpoint::Sequence(_)) =>
                {
                    if !refused_for_retention(refusal.message()) {
                        let source = RetrievalError::CheckpointRefused {
                            operation: "GetShardIterator",
                            checkpoint: checkpoint.to_string(),
                            source: BoxError::from(e),
                        };
                        let event = PublisherEvent::Failed {
                            operation: "GetShardIterator",
                            source: source.into(),
                        };
                        let _ = self.sink.send(event).await;
                        return None;
                    }
                    checkpoint_expired(
                        &self.stream_name,
                        &self.shard_id,
                        &start.checkpoint,
                        &DisplayErrorContext(&e),
                    );
                    checkpoint = Checkpoint::TrimHorizon;
                }
                Some(
                    GetShardIteratorError::AccessDeniedException(_)
                    | GetShardIteratorError::InvalidArgumentException(_),
                ) => {
                    let _ = self
                        .sink
                        .send(PublisherEvent::Failed {
                            operation: "GetShardIterator",
                            source: BoxError::from(e),
                        })
                        .await;
                    return None;
                }
                Some(GetShardIteratorError::ProvisionedThroughputExceededException(_)) => {
                    metrics::throttled("GetShardIterator");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep_until(retry_at(call_start, &self.config.retry, attempt)).await;
                }
                _ => {
                    warn!(error = %DisplayErrorContext(&e), "GetShardIterator failed; retrying");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep_until(retry_at(call_start, &self.config.retry, attempt)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::aggregation::encode_aggregated;

    const SHARD0: &str = "shardId-000000000000";

    async fn backend(stream: &str) -> (kcl_local::LocalBackend, aws_sdk_kinesis::Client) {
        let backend = kcl_local::LocalBackend::start().await.expect("backend");
        let kinesis = backend.kinesis_client();
        kcl_local::create_stream(&kinesis, stream, 1).await.expect("stream");
        (backend, kinesis)
    }

    async fn put(kinesis: &aws_sdk_kinesis::Client, stream: &str, data: Bytes) {
        kinesis
            .put_record()
            .stream_name(stream)
            .partition_key("outer")
            .data(aws_sdk_kinesis::primitives::Blob::new(data.to_vec()))
            .send()
            .await
            .expect("put");
    }

    fn start(kinesis: &aws_sdk_kinesis::Client, stream: &str, config: RetrievalConfig) -> RecordsPublisher {
        PollingRetrievalFactory::new(config).start(PublisherStart::new(
            kinesis.clone(),
            stream.to_owned(),
            SHARD0.to_owned(),
            StartingPosition::new(ExtendedSequenceNumber::TRIM_HORIZON, None),
            CancellationToken::new(),
        ))
    }

    /// The retry floor holds whatever the policy: a policy that never waits still waits
    /// 200 ms from the failed call's start (paused clock).
    #[tokio::test(start_paused = true)]
    async fn retries_wait_at_least_200_ms_from_the_failed_call() {
        let no_wait = crate::retry::RetryPolicy::no_sleep(None);
        let start = Instant::now();
        for attempt in 1..10 {
            assert_eq!(retry_at(start, &no_wait, attempt), start + MIN_CALL_SPACING);
        }
        tokio::time::advance(Duration::from_millis(150)).await;
        assert_eq!(
            retry_at(start, &no_wait, 1),
            start + MIN_CALL_SPACING,
            "counted from the call's start"
        );
        let slow = crate::retry::RetryPolicy::new(Duration::from_secs(5), Duration::from_secs(5), None);
        assert!(retry_at(start, &slow, 1) >= start + MIN_CALL_SPACING);
    }

    /// One Kinesis record holding 20,000 user records (a KPL aggregate of tiny records:
    /// about 300 KB) must not land in the prefetch queue all at once: with a bound of
    /// 1,000 records, no batch holds more than 1,000, and every user record still comes,
    /// in order. Before, the whole aggregate was one batch of 20,000 records, whatever
    /// the bound.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_aggregate_of_many_user_records_stays_within_the_prefetch_bound() {
        let (_backend, kinesis) = backend("many-users").await;
        let users: Vec<_> = (0..20_000)
            .map(|i| (format!("k{}", i % 7), None, Bytes::from(format!("{i}"))))
            .collect();
        put(&kinesis, "many-users", encode_aggregated(&users)).await;
        let config = RetrievalConfig {
            idle_time_between_reads: Duration::from_millis(200),
            max_prefetch_records: 1_000,
            ..RetrievalConfig::default()
        };
        let mut publisher = start(&kinesis, "many-users", config);
        let mut seen = 0u64;
        let mut largest = 0;
        while seen < 20_000 {
            let event = tokio::time::timeout(Duration::from_secs(30), publisher.next())
                .await
                .expect("an event in time")
                .expect("publisher running");
            let PublisherEvent::Batch(batch) = event else {
                panic!("unexpected {event:?}");
            };
            largest = largest.max(batch.records.len());
            for record in &batch.records {
                assert_eq!(record.sub_sequence_number, seen, "in order, none lost");
                seen += 1;
            }
        }
        assert!(largest <= 1_000, "a batch of {largest} records with a bound of 1,000");
    }
}
