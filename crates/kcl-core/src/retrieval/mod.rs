//! Retrieval: how a shard consumer gets its shard's records, behind one seam (the Java
//! KCL's `RetrievalFactory` and `RecordsPublisher`).
//!
//! A [`RetrievalFactory`] starts one publisher per shard consumer. The publisher reads
//! its shard from a [`StartingPosition`] and hands [`PublisherEvent`]s to the consumer
//! through a bounded channel ([`RecordsPublisher::channel`]): at most
//! [`PrefetchLimits::max_batches`] batches, and no batch is to be fetched while the
//! queued records or bytes are at their limits, so a slow processor slows the reader
//! down instead of growing memory. The contract of every implementation:
//!
//! - **Order.** Batches come in sequence-number order. A publisher may repeat records
//!   (after a reconnect, for example): the consumer drops everything at or below the
//!   last (sequence, sub-sequence) it delivered, so repeats never reach the processor.
//!   It must never skip one.
//! - **End.** [`PublisherEvent::ShardEnd`] comes after the shard's last record, and
//!   nothing after it. Children are optional: the consumer learns them from `ListShards`
//!   when the backend did not send them.
//! - **Failures.** Transient errors (throttling, timeouts, dropped connections) are the
//!   publisher's to retry, with backoff, without end. A shard Kinesis does not know
//!   ([`PublisherEvent::ShardNotFound`]) and errors retrying cannot fix
//!   ([`PublisherEvent::Failed`]) end the publisher; the consumer decides what they mean.
//! - **Stop.** The publisher stops when its [`PublisherStart::cancel`] token fires or
//!   its [`RecordsPublisher`] is dropped; [`PublisherSink`] reports both.
//!
//! Implementations: polling `GetRecords` ([`PollingRetrievalFactory`], the default) and
//! enhanced fan-out `SubscribeToShard` (the crate `kcl-efo`). Both build records with
//! [`records_from_kinesis`], so KPL de-aggregation and bad-data handling are the same.

mod polling;

use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant as StdInstant, SystemTime};

use async_trait::async_trait;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use crate::aggregation;
use crate::error::{BoxError, ErrorChain};
use crate::lease::HashKeyRange;
use crate::metrics;
use crate::record::Record;
use crate::sequence::{ExtendedSequenceNumber, SequenceNumber};

pub use polling::PollingRetrievalFactory;

/// Where a publisher starts reading.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StartingPosition {
    /// The lease's checkpoint: a sentinel (`TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`)
    /// or the last processed record, which the publisher reads again (`AT_SEQUENCE_NUMBER`,
    /// so that the rest of a partly processed KPL aggregate is not lost; the consumer
    /// drops what was delivered).
    pub checkpoint: ExtendedSequenceNumber,
    /// The time of an `AT_TIMESTAMP` checkpoint.
    pub timestamp: Option<SystemTime>,
}

impl StartingPosition {
    /// A position at `checkpoint` (and `timestamp`, for `AT_TIMESTAMP`).
    pub fn new(checkpoint: ExtendedSequenceNumber, timestamp: Option<SystemTime>) -> Self {
        Self { checkpoint, timestamp }
    }
}

/// What a [`RetrievalFactory`] needs to start one shard's publisher.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PublisherStart {
    /// The scheduler's Kinesis client.
    pub kinesis: aws_sdk_kinesis::Client,
    /// The stream.
    pub stream_name: String,
    /// Set when Kinesis calls should address the stream by this ARN alone (it was
    /// configured by ARN and the endpoint accepts that); by `stream_name` otherwise.
    pub stream_arn: Option<String>,
    /// The shard to read.
    pub shard_id: String,
    /// Where to start.
    pub position: StartingPosition,
    /// Cancelled when the consumer no longer wants events; the publisher stops.
    pub cancel: CancellationToken,
}

impl PublisherStart {
    /// A start request (the scheduler builds these; tests and other drivers of a
    /// [`RetrievalFactory`] may too).
    pub fn new(
        kinesis: aws_sdk_kinesis::Client,
        stream_name: String,
        shard_id: String,
        position: StartingPosition,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            kinesis,
            stream_name,
            stream_arn: None,
            shard_id,
            position,
            cancel,
        }
    }

    /// Addresses the stream by `arn` alone.
    #[must_use]
    pub fn with_stream_arn(mut self, arn: Option<String>) -> Self {
        self.stream_arn = arn;
        self
    }
}

/// Creates the publisher of each shard consumer (the Java KCL's `RetrievalFactory`).
/// One factory serves every shard of a scheduler.
#[async_trait]
pub trait RetrievalFactory: Send + Sync + Debug + 'static {
    /// Called by [`Scheduler::run`](crate::Scheduler::run) after it checked the
    /// stream and before any shard is read; for example to register an enhanced fan-out
    /// consumer and wait until it is active. In multi-stream mode a factory that serves
    /// several streams is called once for each. The default does nothing.
    ///
    /// # Errors
    /// Any error ends `run()` with
    /// [`SchedulerError::Retrieval`](crate::SchedulerError::Retrieval), its source kept.
    async fn initialize(&self, kinesis: &aws_sdk_kinesis::Client, stream_name: &str) -> Result<(), BoxError> {
        let _ = (kinesis, stream_name);
        Ok(())
    }

    /// Starts reading a shard: spawns the publisher's task and returns the receiving
    /// end of its channel (see the module docs for the contract).
    fn start(&self, start: PublisherStart) -> RecordsPublisher;
}

/// A child of an ended shard, as the backend reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChildShard {
    /// The child's shard id.
    pub shard_id: String,
    /// All of the child's parents (two for a merge).
    pub parent_shard_ids: Vec<String>,
    /// The child's hash key range.
    pub hash_key_range: Option<HashKeyRange>,
}

impl From<&aws_sdk_kinesis::types::ChildShard> for ChildShard {
    fn from(c: &aws_sdk_kinesis::types::ChildShard) -> Self {
        Self {
            shard_id: c.shard_id().to_owned(),
            parent_shard_ids: c.parent_shards().to_vec(),
            hash_key_range: c.hash_key_range().map(|r| HashKeyRange {
                starting_hash_key: r.starting_hash_key().to_owned(),
                ending_hash_key: r.ending_hash_key().to_owned(),
            }),
        }
    }
}

/// What a publisher hands to its shard consumer.
#[derive(Debug)]
#[non_exhaustive]
pub enum PublisherEvent {
    /// Records, in order.
    Batch(RecordsBatch),
    /// The shard was read to its end; every record was sent before this.
    ShardEnd {
        /// The children, when the backend named them (else the consumer asks
        /// `ListShards`).
        child_shards: Vec<ChildShard>,
    },
    /// Kinesis does not know the shard (`ResourceNotFoundException`): it aged out past
    /// the retention, was resharded while nobody read it, or the whole stream is gone.
    /// The consumer tells which.
    ShardNotFound {
        /// The API operation that failed.
        operation: &'static str,
        /// Its error.
        source: BoxError,
    },
    /// The shard cannot be read and retrying will not fix it (access denied, a KMS key
    /// that cannot be used, an invalid request). Where both publishers can meet the
    /// cause, `source` is a [`RetrievalError`].
    Failed {
        /// The API operation that failed.
        operation: &'static str,
        /// Its error.
        source: BoxError,
    },
}

/// Why a shard cannot be read, for the errors retrying cannot fix that both publishers
/// report alike: the `source` of [`PublisherEvent::Failed`], saying what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RetrievalError {
    /// The stream is encrypted and its KMS key cannot be used to read it
    /// (`KMSAccessDeniedException`, `KMSDisabledException`, `KMSInvalidStateException`,
    /// `KMSNotFoundException`, `KMSOptInRequired`): fix the key, its policy or the
    /// worker's credentials. (`KMSThrottlingException` is throttling, retried.)
    #[error(
        "{operation} failed with {code}: the stream's KMS key cannot be used to read it (the key is \
         disabled, deleted, in a state that cannot be used, not allowed to this worker's credentials, or the \
         account is not subscribed to KMS); fix the key or its policy, the shard is not read until then"
    )]
    Kms {
        /// The API operation that failed.
        operation: &'static str,
        /// The error code Kinesis returned, such as `KMSAccessDeniedException`.
        code: String,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// Kinesis refused the sequence number to resume at (the checkpoint, or the last
    /// record read) with an `InvalidArgumentException` that is not about the stream's
    /// retention: a sequence number of another shard or stream, or a malformed one.
    /// Restarting at `TRIM_HORIZON` would re-read up to the whole retention (a year,
    /// at most), so the shard is not read: check the lease's checkpoint.
    #[error(
        "{operation} refused the sequence number {checkpoint} for a reason other than the stream's retention \
         (it may belong to another shard or stream); not restarting at TRIM_HORIZON, which would read the whole \
         retention again: check the shard's checkpoint in the lease table"
    )]
    CheckpointRefused {
        /// The API operation that failed.
        operation: &'static str,
        /// The sequence number refused.
        checkpoint: String,
        /// The SDK's error, with Kinesis's message.
        #[source]
        source: BoxError,
    },
}

/// Whether Kinesis's message for an `InvalidArgumentException` at a sequence number
/// (`GetShardIterator` or `SubscribeToShard` at `AT_`/`AFTER_SEQUENCE_NUMBER`) says the
/// record is past the stream's retention, rather than another refusal. Kinesis gives
/// no error code for the difference, only the message: its other refusals ("Invalid
/// StartingSequenceNumber. It encodes shardId-..., while it was used in a call to a
/// shard with ...", "... is invalid because it did not come from this stream", a
/// malformed number) never speak of retention, trimming or expiry. No message, or any
/// other, is not an expiry: the shard then fails clearly instead of re-reading the
/// whole retention.
pub fn refused_for_retention(message: Option<&str>) -> bool {
    let Some(message) = message else {
        return false;
    };
    let message = message.to_ascii_lowercase();
    ["retention", "trim", "expired", "older than", "no longer available"]
        .iter()
        .any(|word| message.contains(word))
}

/// Logs and counts (`kcl_checkpoints_expired_total`) a sequence number Kinesis refused
/// as past the stream's retention, before the publisher resumes at `TRIM_HORIZON`: one
/// message for both publishers.
pub fn checkpoint_expired(
    stream_name: &str,
    shard_id: &str,
    checkpoint: &dyn std::fmt::Display,
    error: &dyn std::fmt::Display,
) {
    metrics::checkpoint_expired(stream_name, shard_id);
    error!(
        shard_id,
        %checkpoint,
        %error,
        "Kinesis refuses the checkpoint's sequence number as older than the stream's retention: the checkpointed \
         record was trimmed. Resuming at TRIM_HORIZON, the oldest record still in the stream: records after the \
         checkpoint that are still in the stream are read from there; only those older than the retention were \
         lost unread"
    );
}

/// A batch of records waiting for the processor. Holds its share of the prefetch
/// budget until it is dropped.
#[derive(Debug)]
pub struct RecordsBatch {
    /// The records, in order.
    pub records: Vec<Record>,
    /// How far the batch was behind the shard's tip, when the backend said.
    pub millis_behind_latest: Option<i64>,
    /// When the batch was received.
    pub fetched_at: StdInstant,
    _permit: PrefetchPermit,
}

/// Bounds of what a publisher may hold ahead of the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchLimits {
    /// Batches queued at most.
    pub max_batches: usize,
    /// Records queued before the publisher stops fetching (one more batch may follow).
    pub max_records: usize,
    /// Bytes of record data and keys queued before the publisher stops fetching. A
    /// record larger than this is still delivered, alone.
    pub max_bytes: usize,
}

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
struct PrefetchPermit {
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

/// The receiving end of one shard's publisher (the Java KCL's `RecordsPublisher`, seen
/// from the consumer).
#[derive(Debug)]
pub struct RecordsPublisher {
    rx: mpsc::Receiver<PublisherEvent>,
}

impl RecordsPublisher {
    /// A bounded channel between a publisher (the [`PublisherSink`]) and its consumer.
    pub fn channel(limits: PrefetchLimits) -> (PublisherSink, RecordsPublisher) {
        let (tx, rx) = mpsc::channel(limits.max_batches.max(1));
        let budget = Arc::new(PrefetchBudget {
            records: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_records: limits.max_records,
            max_bytes: limits.max_bytes,
            released: Notify::new(),
        });
        (PublisherSink { tx, budget }, RecordsPublisher { rx })
    }

    /// The next event; `None` once the publisher stopped without an end event (its task
    /// ended or panicked).
    ///
    /// # Cancel safety
    /// Cancel safe: an event not returned stays queued.
    pub async fn next(&mut self) -> Option<PublisherEvent> {
        self.rx.recv().await
    }
}

/// The sending end of a publisher's channel.
#[derive(Debug, Clone)]
pub struct PublisherSink {
    tx: mpsc::Sender<PublisherEvent>,
    budget: Arc<PrefetchBudget>,
}

/// The consumer dropped its [`RecordsPublisher`]: stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shard consumer stopped listening")]
pub struct ConsumerGone;

impl PublisherSink {
    /// Waits until the queued records and bytes are under their limits: call it before
    /// fetching (or reading the next pushed event), so that a slow processor holds the
    /// publisher back.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn wait_for_room(&self) {
        self.budget.wait_for_room().await;
    }

    /// Queues a batch (waiting while `max_batches` are queued). Empty batches are sent
    /// too when they carry `millis_behind_latest`, so that the consumer can publish it.
    ///
    /// # Errors
    /// [`ConsumerGone`] when the consumer stopped listening.
    pub async fn batch(&self, records: Vec<Record>, millis_behind_latest: Option<i64>) -> Result<(), ConsumerGone> {
        if records.is_empty() && millis_behind_latest.is_none() {
            return Ok(());
        }
        let bytes = records.iter().map(Record::accounted_bytes).sum();
        let permit = PrefetchPermit::new(self.budget.clone(), records.len(), bytes);
        let batch = RecordsBatch {
            records,
            millis_behind_latest,
            fetched_at: StdInstant::now(),
            _permit: permit,
        };
        self.send(PublisherEvent::Batch(batch)).await
    }

    /// Converts one response's Kinesis records as [`records_from_kinesis`] does, keeps
    /// those `admit` accepts, and queues them in batches that each fit the prefetch
    /// limits (`max_records` records, `max_bytes` bytes of data and keys; a record
    /// larger than `max_bytes` goes alone), waiting for room between batches: an
    /// aggregate of a hundred thousand user records is held a batch at a time, never
    /// whole. `millis_behind_latest` goes with the last batch (an empty one, if nothing
    /// was admitted).
    ///
    /// # Errors
    /// [`ConsumerGone`] when the consumer stopped listening.
    ///
    /// # Cancel safety
    /// Dropping it part-way leaves the batches already queued; the rest are lost, as
    /// with any cancelled publisher (the consumer resumes from what it delivered).
    pub async fn deliver(
        &self,
        stream_name: &str,
        shard_id: &str,
        records: Vec<aws_sdk_kinesis::types::Record>,
        millis_behind_latest: Option<i64>,
        mut admit: impl FnMut(&Record) -> bool,
    ) -> Result<Delivered, ConsumerGone> {
        let mut converter = Converter::new(stream_name, shard_id, records);
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut delivered = 0;
        for record in converter.by_ref() {
            if !admit(&record) {
                continue;
            }
            let size = record.accounted_bytes();
            let full =
                chunk.len() >= self.budget.max_records || chunk_bytes.saturating_add(size) > self.budget.max_bytes;
            if !chunk.is_empty() && full {
                delivered += chunk.len();
                self.batch(std::mem::take(&mut chunk), None).await?;
                chunk_bytes = 0;
                self.wait_for_room().await;
            }
            chunk_bytes = chunk_bytes.saturating_add(size);
            chunk.push(record);
        }
        delivered += chunk.len();
        self.batch(chunk, millis_behind_latest).await?;
        Ok(Delivered {
            records: delivered,
            last: converter.last,
        })
    }

    /// Sends a final event (`ShardEnd`, `ShardNotFound`, `Failed`).
    ///
    /// # Errors
    /// [`ConsumerGone`] when the consumer stopped listening.
    pub async fn send(&self, event: PublisherEvent) -> Result<(), ConsumerGone> {
        self.tx.send(event).await.map_err(|_| ConsumerGone)
    }

    /// True once the consumer dropped its [`RecordsPublisher`].
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// Turns Kinesis records into processor [`Record`]s, for any publisher: KPL aggregates
/// are unpacked; a record whose sequence number cannot be parsed is left out (it could
/// not be ordered, checkpointed or resumed after) with an error log and
/// `kcl_records_invalid_sequence_number_total`; a malformed aggregate (one that does
/// not decode, or whose keys break Kinesis's limits) is delivered whole, marked
/// [`Record::malformed_aggregate`], logged and counted. Returns the records and the
/// sequence number of the last Kinesis record that was parsed.
///
/// This holds every user record at once; publishers use [`PublisherSink::deliver`],
/// which converts the same way but queues the records in batches that fit the
/// prefetch limits.
pub fn records_from_kinesis(
    stream_name: &str,
    shard_id: &str,
    records: Vec<aws_sdk_kinesis::types::Record>,
) -> (Vec<Record>, Option<SequenceNumber>) {
    let mut converter = Converter::new(stream_name, shard_id, records);
    let out = converter.by_ref().collect();
    (out, converter.last)
}

/// Kinesis records turned into processor records one at a time, as
/// [`records_from_kinesis`] describes: an aggregate's user records are decoded only as
/// they are taken.
struct Converter<'a> {
    stream_name: &'a str,
    shard_id: &'a str,
    records: std::vec::IntoIter<aws_sdk_kinesis::types::Record>,
    /// The user records of the aggregate being unpacked.
    current: Option<aggregation::UserRecords>,
    /// The sequence number of the last Kinesis record parsed so far.
    last: Option<SequenceNumber>,
}

impl<'a> Converter<'a> {
    fn new(stream_name: &'a str, shard_id: &'a str, records: Vec<aws_sdk_kinesis::types::Record>) -> Self {
        Self {
            stream_name,
            shard_id,
            records: records.into_iter(),
            current: None,
            last: None,
        }
    }

    /// The next Kinesis record as a processor record (not de-aggregated yet), or `None`
    /// when its sequence number does not parse (counted, logged).
    fn parse(&self, r: aws_sdk_kinesis::types::Record) -> Option<Record> {
        let arrival = r
            .approximate_arrival_timestamp()
            .and_then(|t| SystemTime::try_from(*t).ok());
        let aws_sdk_kinesis::types::Record {
            sequence_number,
            data,
            partition_key,
            ..
        } = r;
        let sequence_number = match SequenceNumber::parse_owned(sequence_number) {
            Ok(s) => s,
            Err(e) => {
                metrics::invalid_sequence_number(self.stream_name, self.shard_id);
                error!(
                    shard_id = self.shard_id,
                    sequence_number = %e.0,
                    "record with an unparseable sequence number skipped"
                );
                return None;
            }
        };
        let mut record = Record::new(
            bytes::Bytes::from(data.into_inner()),
            partition_key.unwrap_or_default(),
            sequence_number,
        );
        record.approximate_arrival_timestamp = arrival;
        Some(record)
    }
}

impl Iterator for Converter<'_> {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            if let Some(user) = self.current.as_mut().and_then(Iterator::next) {
                return Some(user);
            }
            self.current = None;
            let raw = self.records.next()?;
            let Some(mut record) = self.parse(raw) else {
                continue;
            };
            self.last = Some(record.sequence_number.clone());
            if !aggregation::may_be_aggregated(&record.data) {
                // A plain record (nearly all of them): no copy, no de-aggregation.
                return Some(record);
            }
            match aggregation::user_records(record.clone()) {
                Ok(user_records) => self.current = Some(user_records),
                Err(e) => {
                    // Delivered as it is, marked: losing it would be worse than a record
                    // the processor may not be able to parse.
                    metrics::malformed_aggregate(self.stream_name, self.shard_id);
                    warn!(shard_id = self.shard_id, error = %ErrorChain(&e), sequence_number = %record.sequence_number, "malformed aggregated record delivered without de-aggregation");
                    record.malformed_aggregate = true;
                    return Some(record);
                }
            }
        }
    }
}

/// What [`PublisherSink::deliver`] queued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivered {
    /// Records queued (after de-aggregation and the caller's filter).
    pub records: usize,
    /// The sequence number of the last Kinesis record that was parsed, admitted or not:
    /// where a publisher resumes after.
    pub last: Option<SequenceNumber>,
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
        let (out, last) = ::metrics::with_local_recorder(&counting, || {
            records_from_kinesis("stream", "shardId-000000000000", records)
        });
        assert_eq!(out.len(), 2, "only the unparseable record is left out");
        assert_eq!(out[0].sequence_number.as_str(), "100");
        assert!(!out[0].malformed_aggregate);
        assert_eq!(out[1].sequence_number.as_str(), "101");
        assert!(out[1].malformed_aggregate, "marked for the processor");
        assert_eq!(out[1].data.as_ref(), &malformed[..], "delivered as it is");
        assert_eq!(counting.get("kcl_records_invalid_sequence_number_total"), 1);
        assert_eq!(counting.get("kcl_records_malformed_aggregate_total"), 1);
        assert_eq!(last.as_ref().map(SequenceNumber::as_str), Some("101"));
    }

    /// Keys take memory too: a batch's share of the byte budget is its records' data
    /// and keys (before, data alone: a record of empty data and a 256-character key
    /// counted 0 bytes, so a batch of such records never filled the budget).
    #[tokio::test]
    async fn the_byte_budget_counts_keys() {
        let (sink, mut publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: 3,
            max_records: 1_000,
            max_bytes: 1_000,
        });
        let mut record = Record::new(
            bytes::Bytes::from_static(b"x"),
            "k".repeat(256),
            SequenceNumber::parse("1").expect("valid"),
        );
        record.explicit_hash_key = Some("42".into());
        sink.batch(vec![record.clone(); 4], None).await.expect("sent");
        assert_eq!(sink.budget.bytes.load(Ordering::SeqCst), 4 * (1 + 256 + 2));
        assert!(
            !sink.budget.has_room(),
            "1,036 bytes of data and keys queued: over 1,000"
        );
        drop(publisher.next().await);
        assert_eq!(sink.budget.bytes.load(Ordering::SeqCst), 0, "released");
    }

    /// Only a refusal that speaks of the retention restarts a shard at `TRIM_HORIZON`;
    /// Kinesis's other `InvalidArgumentException`s for a sequence number (its messages,
    /// as kinesalite reproduces them) and a missing message do not.
    #[test]
    fn only_retention_refusals_count_as_expired_checkpoints() {
        for expired in [
            "StartingSequenceNumber 123 is older than the stream's retention period",
            "The record was trimmed from the stream",
            "Sequence number has expired",
        ] {
            assert!(refused_for_retention(Some(expired)), "{expired}");
        }
        for other in [
            "Invalid StartingSequenceNumber. It encodes shardId-000000000007, while it was used in a call to a \
             shard with shardId-000000000000",
            "StartingSequenceNumber 123 used in GetShardIterator on shard shardId-000000000000 in stream s under \
             account 1 is invalid because it did not come from this stream.",
            "StartingSequenceNumber x used in GetShardIterator on shard shardId-000000000000 in stream s under \
             account 1 is invalid.",
            "injected by the test",
        ] {
            assert!(!refused_for_retention(Some(other)), "{other}");
        }
        assert!(!refused_for_retention(None));
    }

    #[tokio::test]
    async fn budget_blocks_until_a_batch_is_released() {
        let (sink, mut publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: 3,
            max_records: 10,
            max_bytes: 1000,
        });
        let records: Vec<Record> = (0..10)
            .map(|i| {
                Record::new(
                    bytes::Bytes::from_static(b"x"),
                    "k",
                    SequenceNumber::parse(&i.to_string()).expect("valid"),
                )
            })
            .collect();
        sink.batch(records, None).await.expect("sent");
        let waiter = tokio::spawn({
            let sink = sink.clone();
            async move { sink.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "10 records queued: at the limit");
        let event = publisher.next().await.expect("event");
        drop(event);
        waiter.await.expect("room once the batch is released");
        drop(publisher);
        assert!(sink.is_closed());
        assert_eq!(sink.batch(Vec::new(), Some(0)).await, Err(ConsumerGone));
    }
}
