//! The producer: a handle ([`KinesisProducer`]) that admits records into a bounded
//! buffer, and one task that owns everything else (lanes that keep each key's order,
//! open aggregates, the shard map, rate limits, calls in flight).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardFilter, ShardFilterType};
use bytes::Bytes;
use kcl_core::aggregation::encode_aggregated;
use kcl_core::{RetryPolicy, SequenceNumber};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument as _};

use crate::aggregate::AggregateSize;
use crate::config::ProducerConfig;
use crate::error::{BoxError, ConfigError, InvalidRecord, ProducerError};
use crate::limiter::TokenBucket;
use crate::metrics;
use crate::shard_map::{hash_of_partition_key, ShardMap};

/// Kinesis's limits on one `PutRecords` call (a larger record goes alone) and on a
/// partition key; the record limit is `ProducerConfig::max_record_size`.
const MAX_RECORDS_PER_CALL: usize = 500;
const MAX_BYTES_PER_CALL: usize = 5 << 20;
const MAX_PARTITION_KEY_CHARS: usize = 256;
/// The shard map is not read again sooner than this after the last read.
const SHARD_MAP_MIN_REFRESH: Duration = Duration::from_secs(1);
/// Backoff between failed reads of the shard map (at least `SHARD_MAP_MIN_REFRESH`
/// apart, too); retried for the producer's life.
const SHARD_MAP_RETRY: RetryPolicy = RetryPolicy {
    initial_backoff: Duration::from_secs(2),
    max_backoff: Duration::from_secs(30),
    max_attempts: None,
};

/// What a written record's future resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutRecordResult {
    /// The shard Kinesis wrote it to.
    pub shard_id: String,
    /// The sequence number of the Kinesis record holding it.
    pub sequence_number: SequenceNumber,
    /// Its index within an aggregated record; `None` when it was sent on its own.
    pub sub_sequence_number: Option<u64>,
    /// How many times it was sent.
    pub attempts: u32,
    /// True when an earlier attempt's outcome was unknown (a timeout or a broken
    /// connection after sending): the record may then be in the stream twice.
    pub maybe_duplicated: bool,
}

/// Resolves when the record is acknowledged by Kinesis, or cannot be written.
#[derive(Debug)]
#[must_use = "the record's outcome is only known by awaiting this future"]
pub struct PutFuture {
    reply: oneshot::Receiver<Result<PutRecordResult, ProducerError>>,
}

impl Future for PutFuture {
    type Output = Result<PutRecordResult, ProducerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.reply)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ProducerError::Closed)))
    }
}

/// An async Kinesis producer (the KPL's `KinesisProducer`): records are batched into
/// `PutRecords` calls, failed entries retried with backoff within `record_ttl`, each
/// partition key's records kept in order, small records optionally aggregated, and
/// each shard held to the service's limits. Cheap to clone; every clone feeds the same
/// buffer. Call [`KinesisProducer::close`] (or [`KinesisProducer::flush`]) before the
/// process exits: records still buffered are otherwise written only as long as the
/// runtime runs.
#[derive(Clone, Debug)]
pub struct KinesisProducer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    stream: String,
    config: ProducerConfig,
    /// The way into the producer's task; `None` once [`KinesisProducer::close`] took it.
    /// A `put` sends its record while holding the lock, and `close` takes the sender
    /// under it: a record is either in the channel before the task learns that no more
    /// will come (and is then written like every other), or refused with
    /// [`ProducerError::Closed`]. A std mutex: it is held for a synchronous send only.
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    closed: AtomicBool,
    /// Becomes true (or its sender is dropped) when the task has resolved every record
    /// and stopped: what `close` waits for.
    stopped: watch::Receiver<bool>,
}

#[derive(Debug)]
enum Command {
    Put(Box<UserRecord>),
    Flush(oneshot::Sender<()>),
}

/// A record put by the caller, until it is resolved.
#[derive(Debug)]
struct UserRecord {
    id: u64,
    partition_key: String,
    explicit_hash_key: Option<String>,
    hash: u128,
    data: Bytes,
    put_at: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<PutRecordResult, ProducerError>>,
    /// Its room in the buffer, given back when it is resolved.
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl KinesisProducer {
    /// A producer writing to `stream` through `kinesis`. Starts its task on the
    /// current tokio runtime, which reads the stream's shard map (for aggregation and
    /// rate limits) in the background.
    ///
    /// # Panics
    /// Outside a tokio runtime, and when `config` is invalid (with the
    /// [`ConfigError`]'s message): use [`KinesisProducer::try_new`] to get the error.
    pub fn new(kinesis: aws_sdk_kinesis::Client, stream: impl Into<String>, config: ProducerConfig) -> Self {
        match Self::try_new(kinesis, stream, config) {
            Ok(producer) => producer,
            Err(e) => panic!("{e}"),
        }
    }

    /// As [`KinesisProducer::new`], refusing an invalid config instead of panicking.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first setting out of its range (see
    /// [`ProducerConfig::validate`]); nothing is started then.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn try_new(
        kinesis: aws_sdk_kinesis::Client,
        stream: impl Into<String>,
        config: ProducerConfig,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let stream = stream.into();
        let (commands, rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = watch::channel(false);
        let shared = Arc::new(Shared {
            stream: stream.clone(),
            // Validated: at least 1, and at least the record limit.
            records: Arc::new(Semaphore::new(config.max_buffered_records.min(Semaphore::MAX_PERMITS))),
            bytes: Arc::new(Semaphore::new(config.max_buffered_bytes.min(Semaphore::MAX_PERMITS))),
            config: config.clone(),
            commands: Mutex::new(Some(commands)),
            closed: AtomicBool::new(false),
            stopped,
        });
        let span = tracing::info_span!("producer", stream = %stream);
        let pipeline = Pipeline::new(kinesis, stream, config);
        // Detached: the task ends by itself once every handle is gone (or `close` took
        // the sender) and every record is resolved.
        drop(tokio::spawn(pipeline.run(rx, stopped_tx).instrument(span)));
        Ok(Self { shared })
    }

    /// The stream this producer writes to.
    pub fn stream_name(&self) -> &str {
        &self.shared.stream
    }

    /// Puts a record routed by the MD5 hash of `partition_key`. Waits while the buffer
    /// is full (`max_buffered_records`, `max_buffered_bytes`); returns a future that
    /// resolves when Kinesis acknowledges the record, or it cannot be written.
    ///
    /// # Errors
    /// [`ProducerError::InvalidRecord`] for an empty or too long partition key or a
    /// record over `max_record_size` (1 MiB by default);
    /// [`ProducerError::Closed`] after [`KinesisProducer::close`].
    pub async fn put(&self, partition_key: impl Into<String>, data: Bytes) -> Result<PutFuture, ProducerError> {
        self.put_with_hash_key(partition_key, None, data).await
    }

    /// As [`KinesisProducer::put`], routed by `explicit_hash_key` (a decimal number
    /// below 2^128) instead of the partition key's hash when given.
    ///
    /// # Errors
    /// As [`KinesisProducer::put`], and [`InvalidRecord::InvalidExplicitHashKey`].
    pub async fn put_with_hash_key(
        &self,
        partition_key: impl Into<String>,
        explicit_hash_key: Option<String>,
        data: Bytes,
    ) -> Result<PutFuture, ProducerError> {
        let partition_key = partition_key.into();
        // The hash key predicts the shard, which only aggregation and rate limits need.
        let predicts = self.shared.config.aggregation_enabled || self.shared.config.rate_limit_enabled;
        let limit = self.shared.config.max_record_size;
        let hash = validate(&partition_key, explicit_hash_key.as_deref(), &data, predicts, limit)?;
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(ProducerError::Closed);
        }
        let closed = || ProducerError::Closed;
        let record_permit = Arc::clone(&self.shared.records)
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let byte_permit = match u32::try_from(data.len()) {
            Ok(0) => None,
            Ok(n) => Some(
                Arc::clone(&self.shared.bytes)
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| closed())?,
            ),
            Err(_) => {
                return Err(InvalidRecord::TooLarge {
                    bytes: data.len(),
                    limit,
                }
                .into())
            }
        };
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let record = UserRecord {
            id: 0,
            partition_key,
            explicit_hash_key,
            hash,
            data,
            put_at: now,
            deadline: now + self.shared.config.record_ttl,
            reply,
            _permits: (record_permit, byte_permit),
        };
        self.send(Command::Put(Box::new(record))).map_err(|_| closed())?;
        Ok(PutFuture { reply: rx })
    }

    /// Sends a command to the task, unless the producer is closed (then the command
    /// comes back).
    fn send(&self, command: Command) -> Result<(), Command> {
        let commands = self.shared.commands.lock().unwrap_or_else(|p| p.into_inner());
        match commands.as_ref() {
            Some(tx) => tx.send(command).map_err(|e| e.0),
            None => Err(command),
        }
    }

    /// Waits until every record put before this call is resolved (written or failed),
    /// sending buffered records at once instead of after `record_max_buffered_time`.
    /// After [`KinesisProducer::close`], waits as `close` does.
    ///
    /// # Cancel safety
    /// Cancelling it only stops the wait.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Command::Flush(tx)).is_ok() {
            let _ = rx.await;
        } else {
            self.stopped().await;
        }
    }

    /// Refuses further records and waits until every record whose `put` returned `Ok`
    /// is resolved: written, or failed with its own error (each within its
    /// `record_ttl`, so `close` takes at most about `record_ttl` plus
    /// `request_timeout`); then the producer's task stops. Puts waiting for room in
    /// the buffer when `close` is called, and puts after it, return
    /// [`ProducerError::Closed`]. Every clone is closed; calling it again (from any
    /// clone) waits for the same end.
    ///
    /// # Cancel safety
    /// Cancelling it only stops the wait: the producer is closed from the first poll
    /// and its task still writes what was accepted.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        // Dropping the sender (under the lock puts send under) is the end of the input:
        // the task sees it after every record accepted before it, and drains.
        drop(self.shared.commands.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.shared.records.close();
        self.shared.bytes.close();
        self.stopped().await;
    }

    /// Waits until the task has stopped.
    async fn stopped(&self) {
        let mut stopped = self.shared.stopped.clone();
        // An error means the task is gone, which is stopped too.
        let _ = stopped.wait_for(|stopped| *stopped).await;
    }
}

/// Checks Kinesis's limits; returns the record's hash key (0 when `predicts` is false
/// and there is no explicit hash key: nothing reads it then).
fn validate(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    data: &Bytes,
    predicts: bool,
    limit: usize,
) -> Result<u128, InvalidRecord> {
    if partition_key.is_empty() {
        return Err(InvalidRecord::EmptyPartitionKey);
    }
    let chars = partition_key.chars().count();
    if chars > MAX_PARTITION_KEY_CHARS {
        return Err(InvalidRecord::PartitionKeyTooLong { chars });
    }
    let bytes = data.len() + partition_key.len();
    if bytes > limit {
        return Err(InvalidRecord::TooLarge { bytes, limit });
    }
    match explicit_hash_key {
        None if predicts => Ok(hash_of_partition_key(partition_key)),
        None => Ok(0),
        Some(ehk) => {
            if ehk.is_empty() || !ehk.bytes().all(|b| b.is_ascii_digit()) {
                return Err(InvalidRecord::InvalidExplicitHashKey(ehk.to_owned()));
            }
            ehk.parse::<u128>()
                .map_err(|_| InvalidRecord::InvalidExplicitHashKey(ehk.to_owned()))
        }
    }
}

/// Records sent in order: a partition key's (or, aggregated, a predicted shard's) when
/// order is kept, else one lane per Kinesis record.
///
/// Ordered lanes carry the epoch of the shard map they were formed under. With
/// aggregation a key's lane is its predicted shard's, so a new map moves the key to
/// another lane; a lane of a newer epoch is therefore held until every lane of older
/// epochs has drained (written, or failed), so that a key's new records never overtake
/// its older ones still queued or being retried under the old map. Without
/// aggregation lanes are per key and the epoch stays 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Lane {
    Key(u64, String),
    Shard(u64, String),
    Single(u64),
}

impl Lane {
    /// The shard map epoch of an ordered lane.
    fn epoch(&self) -> Option<u64> {
        match self {
            Self::Key(epoch, _) | Self::Shard(epoch, _) => Some(*epoch),
            Self::Single(_) => None,
        }
    }
}

/// One Kinesis record to send: a user record, or an aggregate of several.
#[derive(Debug)]
struct Entry {
    lane: Lane,
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
    users: Vec<UserRecord>,
    aggregated: bool,
    predicted_shard: Option<String>,
    attempts: u32,
    maybe_duplicated: bool,
    last_error: String,
}

impl Entry {
    /// An entry not yet sent, without its user records.
    fn new(
        lane: Lane,
        partition_key: String,
        explicit_hash_key: Option<String>,
        data: Bytes,
        predicted_shard: Option<String>,
    ) -> Self {
        Self {
            lane,
            partition_key,
            explicit_hash_key,
            data,
            users: Vec::new(),
            aggregated: false,
            predicted_shard,
            attempts: 0,
            maybe_duplicated: false,
            last_error: String::new(),
        }
    }

    /// One user record sent as it is.
    fn single(lane: Lane, user: UserRecord, predicted_shard: Option<String>) -> Self {
        let mut entry = Self::new(
            lane,
            user.partition_key.clone(),
            user.explicit_hash_key.clone(),
            user.data.clone(),
            predicted_shard,
        );
        entry.users.push(user);
        entry
    }

    fn deadline(&self) -> Instant {
        self.users.iter().map(|u| u.deadline).min().unwrap_or_else(Instant::now)
    }

    fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    fn fail(self, error: impl Fn() -> ProducerError, reason: &'static str) {
        metrics::failed(reason, self.users.len());
        for user in self.users {
            let _ = user.reply.send(Err(error()));
        }
    }
}

/// Records of one shard being packed into an aggregate.
#[derive(Debug)]
struct OpenAggregate {
    users: Vec<UserRecord>,
    /// Its exact size as a Kinesis record, kept as records are added.
    size: AggregateSize,
    opened: Instant,
}

/// How a call ended.
enum CallOutcome {
    Done(PutRecordsOutput),
    /// Failed for a reason worth retrying; `unknown` when the records may have been
    /// written.
    Retry {
        reason: String,
        unknown: bool,
        throttled: bool,
    },
    /// Failed for good.
    Fail(ProducerError),
}

/// The task that owns the buffer.
struct Pipeline {
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    config: ProducerConfig,
    next_id: u64,
    lanes: HashMap<Lane, VecDeque<Entry>>,
    /// Lanes whose head may be sent now, with since when.
    ready: VecDeque<(Lane, Instant)>,
    /// Lanes waiting for a retry backoff or a shard's rate limit.
    timers: BinaryHeap<Reverse<(Instant, Lane)>>,
    /// Lanes with a record in flight.
    busy: HashSet<Lane>,
    aggregates: HashMap<String, OpenAggregate>,
    shard_map: ShardMap,
    map_read_at: Option<Instant>,
    map_reading: bool,
    /// A read of the shard map is wanted and not yet started.
    map_stale: bool,
    /// Reads of the shard map failed in a row (each `ListShards` call bounded by
    /// `request_timeout`): the next one is due at `map_retry_at`, after a backoff.
    map_failures: u32,
    map_retry_at: Option<Instant>,
    buckets: HashMap<String, TokenBucket>,
    /// The epoch of the shard map new ordered lanes are formed under: bumped when a
    /// new map changes which lane a key goes to (aggregation with order kept).
    lane_epoch: u64,
    /// The oldest epoch that may still have lanes queued or in flight; lanes of later
    /// epochs wait in `held` until it catches up.
    oldest_epoch: u64,
    held: Vec<(Lane, Instant)>,
    in_flight: usize,
    /// Ids of user records not yet resolved, for flushes.
    outstanding: BTreeSet<u64>,
    outstanding_bytes: usize,
    /// Flushes waiting for every record up to an id.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    /// False once no more commands can come (closed, or every handle gone): everything
    /// buffered is then sent at once, as for a flush, and the task ends when it is all
    /// resolved.
    accepting: bool,
    done_tx: mpsc::UnboundedSender<(Vec<Entry>, CallOutcome)>,
    done_rx: mpsc::UnboundedReceiver<(Vec<Entry>, CallOutcome)>,
    map_tx: mpsc::UnboundedSender<Result<ShardMap, BoxError>>,
    map_rx: mpsc::UnboundedReceiver<Result<ShardMap, BoxError>>,
}

impl Pipeline {
    fn new(kinesis: aws_sdk_kinesis::Client, stream: String, config: ProducerConfig) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (map_tx, map_rx) = mpsc::unbounded_channel();
        Self {
            kinesis,
            stream,
            config,
            next_id: 0,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            timers: BinaryHeap::new(),
            busy: HashSet::new(),
            aggregates: HashMap::new(),
            shard_map: ShardMap::default(),
            map_read_at: None,
            map_reading: false,
            map_stale: false,
            map_failures: 0,
            map_retry_at: None,
            buckets: HashMap::new(),
            lane_epoch: 0,
            oldest_epoch: 0,
            held: Vec::new(),
            in_flight: 0,
            outstanding: BTreeSet::new(),
            outstanding_bytes: 0,
            flushes: Vec::new(),
            accepting: true,
            done_tx,
            done_rx,
            map_tx,
            map_rx,
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, stopped: watch::Sender<bool>) {
        if self.predicts() {
            // Read before the first call (puts queue meanwhile), so that aggregation and
            // rate limits apply from the first record; when it fails, in the background
            // with backoff.
            self.map_read_at = Some(Instant::now());
            let read = read_shard_map(&self.kinesis, &self.stream, self.config.request_timeout).await;
            self.map_read(read);
        }
        loop {
            let now = Instant::now();
            if self.map_stale || self.map_retry_at.is_some_and(|at| at <= now) {
                self.refresh_shard_map();
            }
            self.fire_timers(now);
            self.close_aggregates(now);
            self.advance_epochs();
            self.send_batches(now);
            if !self.accepting && self.outstanding.is_empty() && self.in_flight == 0 {
                break;
            }
            let wake = self.next_wake(now);
            tokio::select! {
                command = commands.recv(), if self.accepting => match command {
                    Some(Command::Put(record)) => self.admit(*record),
                    Some(Command::Flush(tx)) => self.flushes.push((self.next_id, tx)),
                    // Closed, or every handle is gone: write what is buffered (every
                    // record accepted came before this), then stop.
                    None => self.accepting = false,
                },
                Some((entries, outcome)) = self.done_rx.recv() => self.completed(entries, outcome),
                Some(read) = self.map_rx.recv() => {
                    self.map_reading = false;
                    self.map_read(read);
                }
                () = sleep_until_or_never(wake) => {}
            }
            self.resolve_flushes();
            metrics::buffered(self.outstanding.len(), self.outstanding_bytes);
        }
        self.resolve_flushes();
        metrics::buffered(0, 0);
        debug!("producer task stopped");
        let _ = stopped.send(true);
    }

    /// Whether records' shards are predicted: only aggregation and rate limits need it.
    fn predicts(&self) -> bool {
        self.config.aggregation_enabled || self.config.rate_limit_enabled
    }

    /// Takes the outcome of a read of the shard map: the new map, or a retry after a
    /// backoff (the old map, if any, stays meanwhile).
    fn map_read(&mut self, read: Result<ShardMap, BoxError>) {
        match read {
            Ok(map) => {
                self.map_failures = 0;
                self.map_retry_at = None;
                if map != self.shard_map && self.config.aggregation_enabled && self.config.ordered_per_key {
                    // What is packed so far belongs to the old map's lanes.
                    let open: Vec<String> = self.aggregates.keys().cloned().collect();
                    for shard in open {
                        self.close_aggregate(&shard);
                    }
                    self.lane_epoch += 1;
                    debug!(
                        epoch = self.lane_epoch,
                        "new shard map: new lanes wait for the old ones to drain"
                    );
                }
                self.shard_map = map;
            }
            Err(e) => {
                self.map_failures = self.map_failures.saturating_add(1);
                let backoff = SHARD_MAP_RETRY.backoff(self.map_failures);
                self.map_retry_at = Some(Instant::now() + backoff);
                warn!(
                    error = %crate::error_chain(e.as_ref()),
                    failures = self.map_failures,
                    retry_in = ?backoff,
                    "cannot read the stream's shards; until they are read, records are not aggregated or rate limited (or by the last map read)"
                );
            }
        }
    }

    /// Whether buffered records go out at once: a flush waits, or the producer drains.
    fn flushing(&self) -> bool {
        !self.flushes.is_empty() || !self.accepting
    }

    /// Takes a new user record into a lane (or an open aggregate).
    fn admit(&mut self, mut record: UserRecord) {
        self.next_id += 1;
        record.id = self.next_id;
        self.outstanding.insert(record.id);
        self.outstanding_bytes += record.data.len();
        let predicted = self.shard_map.shard_for(record.hash).map(str::to_owned);
        if self.config.aggregation_enabled {
            if let Some(shard) = predicted.clone() {
                // An aggregate is one Kinesis record: it must fit in one. Sizes are
                // exact (both key tables counted), so no slack is needed.
                let max_size = self.config.aggregation_max_size.min(self.config.max_record_size);
                let (pk, ehk, data) = (
                    record.partition_key.as_str(),
                    record.explicit_hash_key.as_deref(),
                    record.data.len(),
                );
                if AggregateSize::default().with(pk, ehk, data) > max_size {
                    // Sent on its own, after the records of its shard put before it.
                    self.close_aggregate(&shard);
                } else {
                    let full = self.aggregates.get(&shard).is_some_and(|a| {
                        a.size.with(pk, ehk, data) > max_size || a.users.len() >= self.config.aggregation_max_count
                    });
                    if full {
                        self.close_aggregate(&shard);
                    }
                    let aggregate = self.aggregates.entry(shard).or_insert_with(|| OpenAggregate {
                        users: Vec::new(),
                        size: AggregateSize::default(),
                        opened: Instant::now(),
                    });
                    aggregate.size.add(pk, ehk, data);
                    aggregate.users.push(record);
                    return;
                }
            }
        }
        let lane = if !self.config.ordered_per_key {
            Lane::Single(record.id)
        } else if self.config.aggregation_enabled {
            // Aggregates and single records of a shard share its lane, in order.
            let epoch = self.lane_epoch;
            predicted.clone().map_or_else(
                || Lane::Key(epoch, record.partition_key.clone()),
                |shard| Lane::Shard(epoch, shard),
            )
        } else {
            Lane::Key(self.lane_epoch, record.partition_key.clone())
        };
        self.enqueue(Entry::single(lane, record, predicted));
    }

    /// Appends an entry to its lane, scheduling the lane when it was idle.
    fn enqueue(&mut self, entry: Entry) {
        let lane = entry.lane.clone();
        let queue = self.lanes.entry(lane.clone()).or_default();
        queue.push_back(entry);
        if queue.len() == 1 && !self.busy.contains(&lane) {
            self.ready.push_back((lane, Instant::now()));
        }
    }

    /// Closes aggregates that are old enough (or all, when flushing).
    fn close_aggregates(&mut self, now: Instant) {
        let linger = self.config.record_max_buffered_time;
        let flushing = self.flushing();
        let due: Vec<String> = self
            .aggregates
            .iter()
            .filter(|(_, a)| flushing || a.opened + linger <= now)
            .map(|(s, _)| s.clone())
            .collect();
        for shard in due {
            self.close_aggregate(&shard);
        }
    }

    /// Turns a shard's open aggregate into an entry: a KPL aggregated record routed by
    /// its first record's hash key (a lone record is sent as it is).
    fn close_aggregate(&mut self, shard: &str) {
        let Some(aggregate) = self.aggregates.remove(shard) else {
            return;
        };
        let mut users = aggregate.users;
        let lane = if self.config.ordered_per_key {
            Lane::Shard(self.lane_epoch, shard.to_owned())
        } else {
            Lane::Single(users.first().map_or(0, |u| u.id))
        };
        let predicted = Some(shard.to_owned());
        let entry = if users.len() == 1 {
            Entry::single(lane, users.remove(0), predicted)
        } else {
            let parts: Vec<(String, Option<String>, Bytes)> = users
                .iter()
                .map(|u| (u.partition_key.clone(), u.explicit_hash_key.clone(), u.data.clone()))
                .collect();
            let (partition_key, hash) = (users[0].partition_key.clone(), users[0].hash);
            let mut entry = Entry::new(
                lane,
                partition_key,
                Some(hash.to_string()),
                encode_aggregated(&parts),
                predicted,
            );
            entry.users = users;
            entry.aggregated = true;
            entry
        };
        self.enqueue(entry);
    }

    /// After a change of the shard map: once no lane of an older epoch is queued or in
    /// flight, lets the held lanes of the next epoch go.
    fn advance_epochs(&mut self) {
        if self.oldest_epoch == self.lane_epoch {
            return;
        }
        // A scan of the lanes, only while a map change is being drained.
        let oldest = self
            .lanes
            .keys()
            .chain(self.busy.iter())
            .filter_map(Lane::epoch)
            .min()
            .unwrap_or(self.lane_epoch);
        if oldest == self.oldest_epoch {
            return;
        }
        self.oldest_epoch = oldest;
        let (go, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(lane, _)| lane.epoch().is_none_or(|epoch| epoch <= oldest));
        self.held = wait;
        debug!(epoch = oldest, lanes = go.len(), "lanes of an older shard map drained");
        self.ready.extend(go);
    }

    /// Moves lanes whose wait is over to the ready queue.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, lane))) = self.timers.pop() {
                self.ready.push_back((lane, now));
            }
        }
    }

    /// Sends batches while calls may be started and records are ready: at once when
    /// nothing is in flight, a call is full, the oldest ready record has waited
    /// `record_max_buffered_time`, or a flush waits.
    fn send_batches(&mut self, now: Instant) {
        while self.in_flight < self.config.max_in_flight_calls {
            let Some((_, since)) = self.ready.front() else {
                return;
            };
            let full_call = self.ready.len() >= MAX_RECORDS_PER_CALL;
            let due = self.in_flight == 0
                || full_call
                || *since + self.config.record_max_buffered_time <= now
                || self.flushing();
            if !due {
                return;
            }
            let batch = self.take_batch(now);
            if batch.is_empty() {
                continue;
            }
            self.start_call(batch);
        }
    }

    /// Takes up to one call's worth of ready lanes' heads, holding each shard to its
    /// rate limit (a lane over it waits for its bucket).
    fn take_batch(&mut self, now: Instant) -> Vec<Entry> {
        let mut batch: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        while batch.len() < MAX_RECORDS_PER_CALL {
            let Some((lane, since)) = self.ready.pop_front() else {
                break;
            };
            if lane.epoch().is_some_and(|epoch| epoch > self.oldest_epoch) {
                self.held.push((lane, since));
                continue;
            }
            let Some(queue) = self.lanes.get_mut(&lane) else {
                continue;
            };
            let Some(head) = queue.front() else {
                self.lanes.remove(&lane);
                continue;
            };
            let size = head.size();
            // A record over a call's bytes (records of up to 10 MiB) goes in a call of
            // its own.
            if !batch.is_empty() && bytes + size > MAX_BYTES_PER_CALL {
                self.ready.push_front((lane, since));
                break;
            }
            if self.config.rate_limit_enabled {
                if let Some(shard) = head.predicted_shard.clone() {
                    let (rps, bps) = (
                        self.config.per_shard_records_per_second,
                        self.config.per_shard_bytes_per_second,
                    );
                    let bucket = self
                        .buckets
                        .entry(shard)
                        .or_insert_with(|| TokenBucket::full(rps, bps, now.into_std()));
                    if let Err(wait) = bucket.take(size, rps, bps, now.into_std()) {
                        self.timers.push(Reverse((now + wait, lane)));
                        continue;
                    }
                }
            }
            let Some(entry) = queue.pop_front() else {
                continue;
            };
            if queue.is_empty() {
                self.lanes.remove(&lane);
            } else if !self.config.ordered_per_key {
                self.ready.push_back((lane.clone(), since));
            }
            bytes += size;
            self.busy.insert(lane);
            batch.push(entry);
        }
        batch
    }

    fn start_call(&mut self, mut batch: Vec<Entry>) {
        self.in_flight += 1;
        for entry in &mut batch {
            entry.attempts += 1;
        }
        let request = batch
            .iter()
            .map(|e| {
                PutRecordsRequestEntry::builder()
                    .partition_key(&e.partition_key)
                    .set_explicit_hash_key(e.explicit_hash_key.clone())
                    .data(aws_smithy_types::Blob::new(e.data.to_vec()))
                    .build()
            })
            .collect::<Result<Vec<_>, _>>();
        let kinesis = self.kinesis.clone();
        let stream = self.stream.clone();
        let timeout = self.config.request_timeout;
        let done = self.done_tx.clone();
        tokio::spawn(
            async move {
                let outcome = match request {
                    Ok(entries) => {
                        let call = kinesis
                            .put_records()
                            .stream_name(&stream)
                            .set_records(Some(entries))
                            .send();
                        match tokio::time::timeout(timeout, call).await {
                            Ok(result) => classify(result, &stream),
                            Err(_) => CallOutcome::Retry {
                                reason: format!("PutRecords timed out after {timeout:?}"),
                                unknown: true,
                                throttled: false,
                            },
                        }
                    }
                    Err(e) => CallOutcome::Fail(ProducerError::Kinesis { source: Box::new(e) }),
                };
                let _ = done.send((batch, outcome));
            }
            .in_current_span(),
        );
    }

    /// Resolves, retries or fails each entry of a finished call.
    fn completed(&mut self, entries: Vec<Entry>, outcome: CallOutcome) {
        self.in_flight -= 1;
        match outcome {
            CallOutcome::Done(output) => {
                let results = output.records;
                let mut results = results.into_iter();
                for entry in entries {
                    match results.next() {
                        Some(r) => match (r.error_code, r.shard_id, r.sequence_number) {
                            (None, Some(shard_id), Some(sequence)) => self.written(entry, shard_id, &sequence),
                            (Some(code), _, _) => {
                                let message = r.error_message.unwrap_or_default();
                                if is_retryable_code(&code) {
                                    if code == "ProvisionedThroughputExceededException" {
                                        metrics::throttled();
                                    }
                                    self.retry(entry, code, false);
                                } else {
                                    self.release(&entry.lane);
                                    self.resolved(&entry);
                                    entry.fail(
                                        || ProducerError::Rejected {
                                            code: code.clone(),
                                            message: message.clone(),
                                        },
                                        "rejected",
                                    );
                                }
                            }
                            _ => self.retry(entry, "an incomplete result entry".to_owned(), true),
                        },
                        // Fewer results than records: the outcome is unknown.
                        None => self.retry(entry, "no result entry".to_owned(), true),
                    }
                }
            }
            CallOutcome::Retry {
                reason,
                unknown,
                throttled,
            } => {
                if throttled {
                    metrics::throttled();
                }
                debug!(records = entries.len(), reason = %reason, "PutRecords failed; retrying its records");
                for entry in entries {
                    self.retry(entry, reason.clone(), unknown);
                }
            }
            CallOutcome::Fail(error) => {
                warn!(records = entries.len(), error = %crate::error_chain(&error), "PutRecords failed for good");
                let message = crate::error_chain(&error);
                let not_found = matches!(error, ProducerError::StreamNotFound { .. });
                let stream = self.stream.clone();
                for entry in entries {
                    self.release(&entry.lane);
                    self.resolved(&entry);
                    if not_found {
                        entry.fail(
                            || ProducerError::StreamNotFound { stream: stream.clone() },
                            "stream_not_found",
                        );
                    } else {
                        let message = message.clone();
                        entry.fail(
                            move || ProducerError::Kinesis {
                                source: message.clone().into(),
                            },
                            "call_failed",
                        );
                    }
                }
            }
        }
    }

    fn written(&mut self, entry: Entry, shard_id: String, sequence: &str) {
        self.release(&entry.lane);
        self.resolved(&entry);
        if entry.predicted_shard.as_deref().is_some_and(|p| p != shard_id) {
            info!(predicted = ?entry.predicted_shard, actual = %shard_id, "a record went to another shard than predicted: the stream was resharded; reading its shards again");
            self.refresh_shard_map();
        }
        let sequence_number = match SequenceNumber::parse(sequence) {
            Ok(s) => s,
            Err(e) => {
                let text = e.to_string();
                entry.fail(
                    || ProducerError::Kinesis {
                        source: format!("unreadable sequence number in the response: {text}").into(),
                    },
                    "bad_response",
                );
                return;
            }
        };
        let now = Instant::now();
        let bytes = entry.users.iter().map(|u| u.data.len()).sum();
        let first_put = entry.users.iter().map(|u| u.put_at).min().unwrap_or(now);
        metrics::acknowledged(entry.users.len(), bytes, now.saturating_duration_since(first_put));
        for (index, user) in entry.users.into_iter().enumerate() {
            let _ = user.reply.send(Ok(PutRecordResult {
                shard_id: shard_id.clone(),
                sequence_number: sequence_number.clone(),
                sub_sequence_number: entry.aggregated.then_some(index as u64),
                attempts: entry.attempts,
                maybe_duplicated: entry.maybe_duplicated,
            }));
        }
    }

    /// Puts an entry back at the head of its lane after a backoff, or fails it when
    /// the backoff would pass its deadline.
    fn retry(&mut self, mut entry: Entry, reason: String, unknown: bool) {
        let now = Instant::now();
        let exponent = entry.attempts.saturating_sub(1).min(16);
        let backoff = self
            .config
            .min_retry_backoff
            .saturating_mul(1 << exponent)
            .min(self.config.max_retry_backoff)
            .mul_f64(rand::random_range(0.5..1.0));
        entry.maybe_duplicated |= unknown;
        metrics::retried(&reason);
        entry.last_error = reason;
        let lane = entry.lane.clone();
        self.busy.remove(&lane);
        if now + backoff > entry.deadline() {
            self.release_lane_head(&lane);
            self.resolved(&entry);
            let (attempts, last_error) = (entry.attempts, entry.last_error.clone());
            entry.fail(
                || ProducerError::Expired {
                    attempts,
                    last_error: last_error.clone(),
                },
                "expired",
            );
            return;
        }
        self.lanes.entry(lane.clone()).or_default().push_front(entry);
        self.timers.push(Reverse((now + backoff, lane)));
    }

    /// The lane's record in flight is done: the next one may go.
    fn release(&mut self, lane: &Lane) {
        self.busy.remove(lane);
        self.release_lane_head(lane);
    }

    fn release_lane_head(&mut self, lane: &Lane) {
        if self.config.ordered_per_key && self.lanes.get(lane).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back((lane.clone(), Instant::now()));
        }
    }

    fn resolved(&mut self, entry: &Entry) {
        for user in &entry.users {
            self.outstanding.remove(&user.id);
            self.outstanding_bytes = self.outstanding_bytes.saturating_sub(user.data.len());
        }
    }

    /// Answers the flushes whose records are all resolved.
    fn resolve_flushes(&mut self) {
        let oldest = self.outstanding.first().copied();
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(upto, _)| oldest.is_none_or(|o| o > *upto));
        self.flushes = waiting;
        for (_, tx) in done {
            let _ = tx.send(());
        }
    }

    fn next_wake(&self, now: Instant) -> Option<Instant> {
        let linger = self.config.record_max_buffered_time;
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        let ready = self.ready.front().map(|(_, since)| *since + linger);
        let aggregate = self.aggregates.values().map(|a| a.opened + linger).min();
        let map = self
            .map_read_at
            .filter(|_| self.map_stale && !self.map_reading)
            .map(|at| at + SHARD_MAP_MIN_REFRESH);
        let map_retry = self
            .map_retry_at
            .filter(|_| !self.map_reading)
            .map(|at| at.max(self.map_read_at.map_or(at, |read| read + SHARD_MAP_MIN_REFRESH)));
        [timer, ready, aggregate, map, map_retry]
            .into_iter()
            .flatten()
            .min()
            .map(|at| at.max(now + Duration::from_micros(100)))
    }

    /// Reads the stream's open shards in the background, at most once a second (a
    /// request sooner is carried out when the second has passed). Each `ListShards`
    /// call is bounded by `request_timeout`; a failed read is retried after a backoff
    /// ([`Pipeline::map_read`]), so neither a failure nor a hung call freezes the map.
    fn refresh_shard_map(&mut self) {
        self.map_stale = true;
        if self.map_reading || self.map_read_at.is_some_and(|at| at.elapsed() < SHARD_MAP_MIN_REFRESH) {
            return;
        }
        self.map_stale = false;
        self.map_reading = true;
        self.map_read_at = Some(Instant::now());
        self.map_retry_at = None;
        let kinesis = self.kinesis.clone();
        let stream = self.stream.clone();
        let timeout = self.config.request_timeout;
        let tx = self.map_tx.clone();
        tokio::spawn(
            async move {
                let _ = tx.send(read_shard_map(&kinesis, &stream, timeout).await);
            }
            .in_current_span(),
        );
    }
}

/// Reads the stream's open shards, each `ListShards` call bounded by `timeout`.
async fn read_shard_map(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    timeout: Duration,
) -> Result<ShardMap, BoxError> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let request = match &next_token {
            Some(token) => kinesis.list_shards().next_token(token),
            None => kinesis
                .list_shards()
                .stream_name(stream)
                .shard_filter(ShardFilter::builder().r#type(ShardFilterType::AtLatest).build()?),
        };
        let out = tokio::time::timeout(timeout, request.send())
            .await
            .map_err(|_| format!("ListShards timed out after {timeout:?}"))??;
        shards.extend(out.shards().iter().cloned());
        match out.next_token {
            Some(token) => next_token = Some(token),
            None => break,
        }
    }
    let map = ShardMap::from_listed(&shards);
    if map.is_empty() {
        return Err(format!(
            "ListShards listed no open shard with a readable hash key range ({} shards)",
            shards.len()
        )
        .into());
    }
    Ok(map)
}

/// Error codes of a result entry worth retrying.
fn is_retryable_code(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "InternalFailure"
            | "InternalFailureException"
            | "KMSThrottlingException"
    ) || code.contains("Throttl")
        || code.contains("InternalFailure")
        || code.contains("ServiceUnavailable")
}

/// Sorts a failed call: the service refused it (retry when it is about throughput or
/// the service's own trouble, else fail), or the request or response was lost (retry,
/// outcome unknown).
fn classify(result: Result<PutRecordsOutput, SdkError<PutRecordsError>>, stream: &str) -> CallOutcome {
    match result {
        Ok(output) => CallOutcome::Done(output),
        Err(SdkError::ServiceError(e)) => {
            let status = e.raw().status().as_u16();
            match e.err() {
                PutRecordsError::ResourceNotFoundException(_) => CallOutcome::Fail(ProducerError::StreamNotFound {
                    stream: stream.to_owned(),
                }),
                PutRecordsError::ProvisionedThroughputExceededException(_)
                | PutRecordsError::KmsThrottlingException(_) => CallOutcome::Retry {
                    reason: "ProvisionedThroughputExceededException".to_owned(),
                    unknown: false,
                    throttled: true,
                },
                other if status >= 500 || other.meta().code().is_some_and(is_retryable_code) => CallOutcome::Retry {
                    reason: other.meta().code().unwrap_or("a server error").to_owned(),
                    unknown: false,
                    throttled: other
                        .meta()
                        .code()
                        .is_some_and(|c| c.contains("Throttl") || c.contains("LimitExceeded")),
                },
                _ if e.err().meta().code() == Some("LimitExceededException") => CallOutcome::Retry {
                    reason: "LimitExceededException".to_owned(),
                    unknown: false,
                    throttled: true,
                },
                _ => CallOutcome::Fail(ProducerError::Kinesis {
                    source: Box::new(SdkError::ServiceError(e)),
                }),
            }
        }
        Err(e @ SdkError::ConstructionFailure(_)) => CallOutcome::Fail(ProducerError::Kinesis { source: Box::new(e) }),
        // Not sent (no connection could be made): safe to retry.
        Err(SdkError::DispatchFailure(d)) if !d.is_io() && !d.is_timeout() => CallOutcome::Retry {
            reason: "the request could not be sent".to_owned(),
            unknown: false,
            throttled: false,
        },
        // Timeouts and broken connections: the records may have been written.
        Err(e) => CallOutcome::Retry {
            reason: format!("PutRecords failed: {e}"),
            unknown: true,
            throttled: false,
        },
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
