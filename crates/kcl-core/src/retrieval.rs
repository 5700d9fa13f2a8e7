//! Polling retrieval (the Java KCL's `PrefetchRecordsPublisher` over `GetRecords`).
//!
//! One task per shard consumer fetches ahead of the processor into a bounded queue:
//! at most `max_pending_batches` batches, and no new fetch starts while the queued
//! records or bytes are at their limits, so memory is bounded by the limits plus one
//! batch whatever the backlog. Between calls it waits `idle_time_between_reads` from
//! the start of the previous call (so a new record waits about one idle time, never
//! more), or `backlog_time_between_reads` while the shard has a backlog.
//!
//! Expired iterators are renewed after the last record fetched (or, with nothing
//! fetched yet, where the first iterator stood); throttling, transient failures and
//! calls that exceed `kinesis_call_timeout` are retried with backoff without end (each
//! one logged and counted). A shard Kinesis no longer knows has ended; a missing stream
//! ends the publisher with `StreamNotFound`; a checkpoint older than the retention
//! resumes at `TRIM_HORIZON`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant as StdInstant, SystemTime};

use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError;
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::types::{ChildShard, ShardIteratorType};
use aws_smithy_types::DateTime;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::aggregation;
use crate::config::RetrievalConfig;
use crate::error::{BoxError, ErrorChain};
use crate::metrics;
use crate::record::Record;
use crate::retry::with_timeout;
use crate::sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};

/// Shared accounting of what sits in the prefetch queue.
#[derive(Debug)]
struct PrefetchBudget {
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    /// Woken whenever a batch is released, so a waiting fetcher re-checks the budget.
    released: Notify,
}

impl PrefetchBudget {
    fn has_room(&self) -> bool {
        self.records.load(Ordering::Acquire) < self.max_records && self.bytes.load(Ordering::Acquire) < self.max_bytes
    }

    async fn wait_for_room(&self) {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.has_room() {
                return;
            }
            released.await;
        }
    }
}

/// Returns a batch's share of the budget when the batch is dropped.
#[derive(Debug)]
pub(crate) struct PrefetchPermit {
    budget: Arc<PrefetchBudget>,
    records: usize,
    bytes: usize,
}

impl PrefetchPermit {
    fn new(budget: Arc<PrefetchBudget>, records: usize, bytes: usize) -> Self {
        budget.records.fetch_add(records, Ordering::AcqRel);
        budget.bytes.fetch_add(bytes, Ordering::AcqRel);
        Self { budget, records, bytes }
    }
}

impl Drop for PrefetchPermit {
    fn drop(&mut self) {
        self.budget.records.fetch_sub(self.records, Ordering::AcqRel);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.released.notify_waiters();
    }
}

/// A fetched batch waiting for the processor.
#[derive(Debug)]
pub(crate) struct RecordsBatch {
    pub(crate) records: Vec<Record>,
    pub(crate) millis_behind_latest: Option<i64>,
    pub(crate) fetched_at: StdInstant,
    /// Held until the batch is processed; dropping it frees prefetch room.
    pub(crate) _permit: PrefetchPermit,
}

/// What the publisher hands to the shard consumer.
#[derive(Debug)]
pub(crate) enum PublisherEvent {
    Batch(RecordsBatch),
    /// The shard was read to its end; every record was sent before this.
    ShardEnd {
        child_shards: Vec<ChildShard>,
    },
    /// The stream does not exist any more.
    StreamNotFound,
    /// The shard cannot be read (access denied, an invalid request).
    Failed {
        operation: &'static str,
        source: BoxError,
    },
}

/// Where a publisher starts.
#[derive(Debug, Clone)]
pub(crate) struct StartingPosition {
    pub(crate) checkpoint: ExtendedSequenceNumber,
    /// For `AT_TIMESTAMP` checkpoints.
    pub(crate) timestamp: Option<SystemTime>,
}

/// Spawns the polling publisher of one shard; it stops when `cancel` fires, the
/// receiver is dropped, or the shard ends.
pub(crate) fn spawn_polling_publisher(
    kinesis: aws_sdk_kinesis::Client,
    stream_name: String,
    shard_id: String,
    start: StartingPosition,
    config: RetrievalConfig,
    cancel: CancellationToken,
) -> mpsc::Receiver<PublisherEvent> {
    let (tx, rx) = mpsc::channel(config.max_pending_batches);
    let budget = Arc::new(PrefetchBudget {
        records: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        max_records: config.max_prefetch_records,
        max_bytes: config.max_prefetch_bytes,
        released: Notify::new(),
    });
    let publisher = PollingPublisher {
        kinesis,
        stream_name,
        shard_id,
        config,
        budget,
        tx,
        last_fetched: None,
    };
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            tokio::select! {
                // Cancel safety: dropping the publisher mid-call loses nothing; the
                // consumer resumes from its own last delivered position.
                () = cancel.cancelled() => {}
                () = publisher.run(start) => {}
            }
        },
        span,
    ));
    rx
}

struct PollingPublisher {
    kinesis: aws_sdk_kinesis::Client,
    stream_name: String,
    shard_id: String,
    config: RetrievalConfig,
    budget: Arc<PrefetchBudget>,
    tx: mpsc::Sender<PublisherEvent>,
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

/// What a `ResourceNotFoundException` for a shard turned out to mean.
enum Gone {
    /// The stream exists: the shard aged out past retention or is otherwise unknown.
    Shard,
    /// The stream itself is gone.
    Stream,
}

impl PollingPublisher {
    async fn run(mut self, start: StartingPosition) {
        let Some((mut iterator, resume)) = self.first_iterator(&start).await else {
            return;
        };
        let mut attempt = 0u32;
        let mut next_call = Instant::now();
        loop {
            self.budget.wait_for_room().await;
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
                    let records = self.convert(out.records);
                    if !records.is_empty() || millis_behind_latest.is_some() {
                        let bytes = records.iter().map(|r| r.data.len()).sum();
                        let permit = PrefetchPermit::new(self.budget.clone(), records.len(), bytes);
                        let batch = RecordsBatch {
                            records,
                            millis_behind_latest,
                            fetched_at: StdInstant::now(),
                            _permit: permit,
                        };
                        if self.tx.send(PublisherEvent::Batch(batch)).await.is_err() {
                            return;
                        }
                    }
                    match next_iterator {
                        Some(next) => iterator = next,
                        None => {
                            debug!("shard end reached");
                            let _ = self.tx.send(PublisherEvent::ShardEnd { child_shards }).await;
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
                }
                Step::Retry => {
                    attempt = attempt.saturating_add(1);
                    next_call = Instant::now() + self.config.retry.backoff(attempt);
                }
                Step::Fatal(operation, source) => {
                    let _ = self.tx.send(PublisherEvent::Failed { operation, source }).await;
                    return;
                }
                Step::NotFound(source) => {
                    self.on_not_found("GetRecords", source).await;
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

    fn convert(&mut self, records: Vec<aws_sdk_kinesis::types::Record>) -> Vec<Record> {
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            let Ok(sequence_number) = SequenceNumber::parse(r.sequence_number()) else {
                // Not a Kinesis sequence number: it cannot be ordered, checkpointed or
                // resumed after, so it cannot be delivered. Loud, and counted.
                metrics::invalid_sequence_number(&self.shard_id);
                error!(
                    sequence_number = r.sequence_number(),
                    "record with an unparseable sequence number skipped"
                );
                continue;
            };
            self.last_fetched = Some(sequence_number.clone());
            let arrival = r
                .approximate_arrival_timestamp()
                .and_then(|t| SystemTime::try_from(*t).ok());
            let mut record = Record::new(
                bytes::Bytes::from(r.data.into_inner()),
                r.partition_key.unwrap_or_default(),
                sequence_number,
            );
            record.approximate_arrival_timestamp = arrival;
            match aggregation::deaggregate(record.clone()) {
                Ok(user_records) => out.extend(user_records),
                Err(e) => {
                    // Delivered as it is, marked: losing it would be worse than a record
                    // the processor may not be able to parse.
                    metrics::malformed_aggregate(&self.shard_id);
                    warn!(error = %ErrorChain(&e), sequence_number = %record.sequence_number, "malformed aggregated record delivered without de-aggregation");
                    record.malformed_aggregate = true;
                    out.push(record);
                }
            }
        }
        out
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

    /// After a `ResourceNotFoundException` for this shard: asks whether the stream
    /// exists, and ends the publisher with a shard end (the shard is gone: aged out
    /// past retention, or the stream was resharded while nobody read it; the consumer
    /// learns the children from `ListShards`) or with `StreamNotFound`. Keeps asking
    /// with backoff while the answer is unknown.
    async fn on_not_found(&self, operation: &'static str, source: BoxError) {
        let mut attempt = 0u32;
        let gone = loop {
            let call = self
                .kinesis
                .describe_stream_summary()
                .stream_name(&self.stream_name)
                .send();
            match with_timeout(self.config.kinesis_call_timeout, call).await {
                Ok(_) => break Gone::Shard,
                Err(SdkError::ServiceError(e))
                    if matches!(e.err(), DescribeStreamSummaryError::ResourceNotFoundException(_)) =>
                {
                    break Gone::Stream
                }
                Err(e) => {
                    warn!(error = %DisplayErrorContext(&e), "cannot tell whether the stream still exists; retrying");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(self.config.retry.backoff(attempt)).await;
                }
            }
        };
        let event = match gone {
            Gone::Shard => {
                metrics::shard_gone(&self.shard_id);
                warn!(
                    operation,
                    error = %ErrorChain(source.as_ref()),
                    "Kinesis no longer knows this shard (aged out past retention, or resharded long ago); \
                     treating it as ended"
                );
                PublisherEvent::ShardEnd {
                    child_shards: Vec::new(),
                }
            }
            Gone::Stream => PublisherEvent::StreamNotFound,
        };
        let _ = self.tx.send(event).await;
    }

    /// A shard iterator at `start`: sentinels map to their iterator types, and a
    /// sequence number to `AT_SEQUENCE_NUMBER` (the consumer drops what it has already
    /// delivered, which keeps the remaining user records of a partly checkpointed
    /// aggregated record). A sequence number Kinesis refuses as invalid is a checkpoint
    /// older than the stream's retention: reading resumes at `TRIM_HORIZON`, the oldest
    /// record left, with a loud warning and `kcl_checkpoints_expired_total`.
    async fn get_iterator(&self, start: &StartingPosition) -> Option<String> {
        let mut attempt = 0u32;
        let mut checkpoint = start.checkpoint.checkpoint.clone();
        loop {
            let mut req = self
                .kinesis
                .get_shard_iterator()
                .stream_name(&self.stream_name)
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
                            .tx
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
                    self.on_not_found("GetShardIterator", BoxError::from(e)).await;
                    return None;
                }
                Some(GetShardIteratorError::InvalidArgumentException(_))
                    if matches!(checkpoint, Checkpoint::Sequence(_)) =>
                {
                    metrics::checkpoint_expired(&self.shard_id);
                    error!(
                        checkpoint = %start.checkpoint,
                        error = %DisplayErrorContext(&e),
                        "Kinesis refuses the checkpoint's sequence number: it is older than the stream's retention \
                         (records past it were trimmed unread). Resuming at TRIM_HORIZON, the oldest record left"
                    );
                    checkpoint = Checkpoint::TrimHorizon;
                }
                Some(
                    GetShardIteratorError::AccessDeniedException(_)
                    | GetShardIteratorError::InvalidArgumentException(_),
                ) => {
                    let _ = self
                        .tx
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
                    tokio::time::sleep(self.config.retry.backoff(attempt)).await;
                }
                _ => {
                    warn!(error = %DisplayErrorContext(&e), "GetShardIterator failed; retrying");
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(self.config.retry.backoff(attempt)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts every counter increment by metric name (labels ignored).
    #[derive(Debug, Default)]
    struct Counting {
        counters: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicU64>>>,
    }

    impl Counting {
        fn get(&self, name: &str) -> u64 {
            let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            counters.get(name).map_or(0, |c| c.load(Ordering::SeqCst))
        }
    }

    impl ::metrics::Recorder for Counting {
        fn describe_counter(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
        fn describe_gauge(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
        fn describe_histogram(&self, _: ::metrics::KeyName, _: Option<::metrics::Unit>, _: ::metrics::SharedString) {}
        fn register_counter(&self, key: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Counter {
            let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            ::metrics::Counter::from_arc(counters.entry(key.name().to_owned()).or_default().clone())
        }
        fn register_gauge(&self, _: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Gauge {
            ::metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &::metrics::Key, _: &::metrics::Metadata<'_>) -> ::metrics::Histogram {
            ::metrics::Histogram::noop()
        }
    }

    fn kinesis_record(sequence_number: &str, data: Vec<u8>) -> aws_sdk_kinesis::types::Record {
        aws_sdk_kinesis::types::Record::builder()
            .sequence_number(sequence_number)
            .partition_key("key")
            .data(aws_sdk_kinesis::primitives::Blob::new(data))
            .build()
            .expect("all required fields set")
    }

    /// Guards hardening item 12: a record with an unparseable sequence number is not
    /// skipped in silence (it is counted, and logged), and a malformed KPL aggregate is
    /// delivered marked as such, and counted.
    #[test]
    fn unparseable_sequence_numbers_are_counted_and_malformed_aggregates_marked() {
        use md5::Digest as _;
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .build();
        let (tx, _rx) = mpsc::channel(1);
        let mut publisher = PollingPublisher {
            kinesis: aws_sdk_kinesis::Client::from_conf(config),
            stream_name: "stream".into(),
            shard_id: "shardId-000000000000".into(),
            config: RetrievalConfig::default(),
            budget: Arc::new(PrefetchBudget {
                records: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_records: 10,
                max_bytes: 1000,
                released: Notify::new(),
            }),
            tx,
            last_fetched: None,
        };
        let garbage = b"\xff\xff not protobuf".to_vec();
        let mut malformed = aggregation::AGGREGATED_RECORD_MAGIC.to_vec();
        malformed.extend_from_slice(&garbage);
        malformed.extend_from_slice(&md5::Md5::digest(&garbage));
        let records = vec![
            kinesis_record("not-a-number", b"a".to_vec()),
            kinesis_record("100", b"b".to_vec()),
            kinesis_record("101", malformed.clone()),
        ];
        let counting = Counting::default();
        let out = ::metrics::with_local_recorder(&counting, || publisher.convert(records));
        assert_eq!(out.len(), 2, "only the unparseable record is left out");
        assert_eq!(out[0].sequence_number.as_str(), "100");
        assert!(!out[0].malformed_aggregate);
        assert_eq!(out[1].sequence_number.as_str(), "101");
        assert!(out[1].malformed_aggregate, "marked for the processor");
        assert_eq!(out[1].data.as_ref(), &malformed[..], "delivered as it is");
        assert_eq!(counting.get("kcl_records_invalid_sequence_number_total"), 1);
        assert_eq!(counting.get("kcl_records_malformed_aggregate_total"), 1);
        assert_eq!(publisher.last_fetched.as_ref().map(SequenceNumber::as_str), Some("101"));
    }

    #[tokio::test]
    async fn budget_blocks_until_a_batch_is_released() {
        let budget = Arc::new(PrefetchBudget {
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records: 10,
            max_bytes: 1000,
            released: Notify::new(),
        });
        let permit = PrefetchPermit::new(budget.clone(), 10, 5);
        assert!(!budget.has_room());
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(permit);
        waiter.await.expect("waiter finishes once the batch is released");
        assert!(budget.has_room());
        let _big = PrefetchPermit::new(budget.clone(), 1, 1000);
        assert!(!budget.has_room(), "the byte limit counts too");
    }
}
