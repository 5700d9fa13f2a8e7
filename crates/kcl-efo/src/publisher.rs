//! The fan-out publisher (the Java KCL's `FanOutRecordsPublisher`): one task per shard
//! consumer that subscribes with `SubscribeToShard` and hands each event's records on,
//! in order, through the bounded channel of the retrieval seam.
//!
//! Positions: the first subscription starts at the checkpoint (`AT_SEQUENCE_NUMBER`, so
//! that the rest of a partly processed KPL aggregate is read again; the consumer drops
//! what it delivered already) or the initial position. Every later one starts
//! `AFTER_SEQUENCE_NUMBER` of the last event's continuation sequence number (or, where a
//! backend sends none, its last record); a `LATEST` start that received nothing yet
//! resumes `AT_TIMESTAMP` of the first subscription, so nothing written in between is
//! skipped.
//!
//! A subscription is replaced when it ends (Kinesis ends each after 5 minutes), after
//! [`subscription_lifetime`](crate::FanOutConfig::subscription_lifetime), when it sends
//! nothing for [`idle_timeout`](crate::FanOutConfig::idle_timeout), when its stream
//! fails, and after a refused (`ResourceInUseException`) or throttled subscription,
//! with backoff; each replacement is counted. Two subscriptions of a shard are always
//! at least a second apart (Kinesis's limit), however a subscription ended.
//!
//! Shard end: an event with `ChildShards` and no continuation sequence number. Where a
//! backend never sends one, the publisher asks `GetRecords` whether the shard is closed
//! and read through once the subscription has delivered no records for
//! [`shard_end_check_interval`](crate::FanOutConfig::shard_end_check_interval) (also
//! while subscriptions are refused), and
//! hands on any records it finds on the way (they follow the last delivered one). A
//! check makes at most 3 `GetRecords` calls, each with a `Limit` of 1,000 and at least
//! 200 ms after the previous one, to spare the shard's read limits.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::operation::describe_stream_consumer::DescribeStreamConsumerError;
use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardError;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{ShardIteratorType, SubscribeToShardEventStream};
use aws_smithy_types::DateTime;
use kcl_core::error::{BoxError, ErrorChain};
use kcl_core::retrieval::{
    refused_for_retention, ChildShard, Delivered, PrefetchLimits, PublisherEvent, PublisherSink, PublisherStart,
    RecordsPublisher, RetrievalError, RetrievalFactory,
};
use kcl_core::retry::with_timeout;
use kcl_core::{Checkpoint, ConfigError, SequenceNumber};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::FanOutConfig;
use crate::registration::{register_stream_consumer, StreamConsumer};

/// Enhanced fan-out retrieval: registers (or finds) the stream consumer when the
/// scheduler starts, then reads every shard with `SubscribeToShard`. Hand it to
/// `SchedulerBuilder::retrieval_factory`, or select it with
/// [`RetrievalMode::FanOut`](crate::RetrievalMode::FanOut). One factory per scheduler;
/// in multi-stream mode it registers the consumer (of the same name) on each stream it
/// reads.
#[derive(Debug)]
pub struct FanOutRetrievalFactory {
    config: FanOutConfig,
    /// Per stream name, set by `initialize`; `start` is only called after it.
    consumers: Mutex<HashMap<String, StreamConsumer>>,
}

impl FanOutRetrievalFactory {
    /// Fan-out with `config`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field that cannot work.
    pub fn new(config: FanOutConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            consumers: Mutex::new(HashMap::new()),
        })
    }

    /// The stream consumer, once the scheduler registered it (of the first stream, in
    /// name order, in multi-stream mode; see [`consumer_of`](Self::consumer_of)).
    pub fn consumer(&self) -> Option<StreamConsumer> {
        let consumers = self.consumers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        consumers
            .iter()
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(_, consumer)| consumer.clone())
    }

    /// The stream consumer registered on `stream_name`.
    pub fn consumer_of(&self, stream_name: &str) -> Option<StreamConsumer> {
        let consumers = self.consumers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        consumers.get(stream_name).cloned()
    }
}

#[async_trait]
impl RetrievalFactory for FanOutRetrievalFactory {
    async fn initialize(&self, kinesis: &aws_sdk_kinesis::Client, stream_name: &str) -> Result<(), BoxError> {
        let consumer = register_stream_consumer(
            kinesis,
            stream_name,
            &self.config.consumer_name,
            self.config.registration_timeout,
            self.config.call_timeout,
        )
        .await?;
        let mut consumers = self.consumers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(existing) = consumers.get(stream_name) {
            if existing != &consumer {
                return Err("a FanOutRetrievalFactory serves one scheduler; build one per scheduler".into());
            }
        }
        consumers.insert(stream_name.to_owned(), consumer);
        Ok(())
    }

    fn start(&self, start: PublisherStart) -> RecordsPublisher {
        let (sink, publisher) = RecordsPublisher::channel(PrefetchLimits {
            max_batches: self.config.max_pending_batches,
            max_records: self.config.max_prefetch_records,
            max_bytes: self.config.max_prefetch_bytes,
        });
        let span = tracing::Span::current();
        let cancel = start.cancel.clone();
        let consumer = self.consumer_of(&start.stream_name);
        let config = self.config.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let Some(consumer) = consumer else {
                    let source = "the fan-out retrieval was not initialized by the scheduler".into();
                    let _ = sink
                        .send(PublisherEvent::Failed {
                            operation: "SubscribeToShard",
                            source,
                        })
                        .await;
                    return;
                };
                let position = Position::from_start(&start.position.checkpoint.checkpoint, start.position.timestamp);
                let task = FanOutPublisher {
                    kinesis: start.kinesis,
                    stream_name: start.stream_name,
                    stream_arn: start.stream_arn,
                    shard_id: start.shard_id,
                    consumer,
                    config,
                    sink,
                    last_get_records: Mutex::new(None),
                };
                tokio::select! {
                    // Cancel safety: dropping the subscription loses nothing; the
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

/// Where the next subscription (or shard-end check) starts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Position {
    TrimHorizon,
    Latest,
    AtTimestamp(SystemTime),
    AtSequence(SequenceNumber),
    AfterSequence(String),
}

impl Position {
    fn from_start(checkpoint: &Checkpoint, timestamp: Option<SystemTime>) -> Self {
        match checkpoint {
            Checkpoint::TrimHorizon | Checkpoint::ShardEnd => Self::TrimHorizon,
            Checkpoint::Latest => Self::Latest,
            Checkpoint::AtTimestamp => Self::AtTimestamp(timestamp.unwrap_or(SystemTime::UNIX_EPOCH)),
            Checkpoint::Sequence(s) => Self::AtSequence(s.clone()),
        }
    }

    fn kind(&self) -> ShardIteratorType {
        match self {
            Self::TrimHorizon => ShardIteratorType::TrimHorizon,
            Self::Latest => ShardIteratorType::Latest,
            Self::AtTimestamp(_) => ShardIteratorType::AtTimestamp,
            Self::AtSequence(_) => ShardIteratorType::AtSequenceNumber,
            Self::AfterSequence(_) => ShardIteratorType::AfterSequenceNumber,
        }
    }

    fn sequence_number(&self) -> Option<&str> {
        match self {
            Self::AtSequence(s) => Some(s.as_str()),
            Self::AfterSequence(s) => Some(s),
            _ => None,
        }
    }

    fn timestamp(&self) -> Option<DateTime> {
        match self {
            Self::AtTimestamp(t) => Some(DateTime::from(*t)),
            _ => None,
        }
    }

    /// Whether a record at `sequence_number` lies at or after this position (records
    /// before it were asked not to be sent). Positions without a sequence number admit
    /// everything.
    fn admits(&self, sequence_number: &SequenceNumber) -> bool {
        match self {
            Self::AtSequence(at) => sequence_number >= at,
            Self::AfterSequence(after) => match SequenceNumber::parse(after) {
                Ok(after) => *sequence_number > after,
                Err(_) => true,
            },
            _ => true,
        }
    }

    fn starting_position(&self) -> Result<aws_sdk_kinesis::types::StartingPosition, BoxError> {
        Ok(aws_sdk_kinesis::types::StartingPosition::builder()
            .r#type(self.kind())
            .set_sequence_number(self.sequence_number().map(str::to_owned))
            .set_timestamp(self.timestamp())
            .build()?)
    }
}

/// Why a subscription was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replaced {
    /// It ended, or reached the configured lifetime.
    Ended,
    /// It sent nothing for the idle timeout.
    Idle,
    /// It failed, or was refused.
    Failed,
    /// Its stream said `ResourceNotFoundException`.
    NotFound,
}

/// What a shard-end check found.
enum EndCheck {
    /// The shard is open (or not read through yet).
    Open,
    /// The publisher is done (shard end or a final event was sent, or the consumer left).
    Done,
}

struct FanOutPublisher {
    kinesis: aws_sdk_kinesis::Client,
    stream_name: String,
    /// Set when calls address the stream by ARN alone.
    stream_arn: Option<String>,
    shard_id: String,
    consumer: StreamConsumer,
    config: FanOutConfig,
    sink: PublisherSink,
    /// When the shard-end check last called `GetRecords`, to keep its calls apart (a
    /// `Mutex` because the publisher's methods take `&self` across awaits; never
    /// contended).
    last_get_records: Mutex<Option<Instant>>,
}

/// The least time between two `SubscribeToShard` calls for one shard: Kinesis allows
/// one a second per consumer and shard, and refuses more with `LimitExceededException`.
const SUBSCRIBE_SPACING: std::time::Duration = std::time::Duration::from_secs(1);

/// When the next `SubscribeToShard` may go out, the last one having been sent at
/// `sent`: after `backoff` from `now`, and never within [`SUBSCRIBE_SPACING`] of `sent`
/// (a subscription that ended at once, or a jittered backoff near zero, must not make
/// back-to-back calls).
fn subscribe_due(sent: Instant, now: Instant, backoff: std::time::Duration) -> Instant {
    (now + backoff).max(sent + SUBSCRIBE_SPACING)
}

/// `GetRecords` calls one shard-end check makes at most.
const SHARD_END_CHECK_CALLS: usize = 3;

/// `Limit` of each of them: enough to see the end of a read-through shard, small
/// against the shard's 2 MB/s.
const SHARD_END_CHECK_LIMIT: i32 = 1_000;

/// The least time between two of them (Kinesis allows 5 `GetRecords` per shard per
/// second, shared by all readers).
const GET_RECORDS_SPACING: std::time::Duration = std::time::Duration::from_millis(200);

impl FanOutPublisher {
    async fn run(self, mut position: Position) {
        let mut failures = 0u32;
        // When records last reached the sink (or the publisher started).
        let mut quiet_since = Instant::now();
        // When the last `SubscribeToShard` was sent, and the backoff after it.
        let mut last_subscribe: Option<Instant> = None;
        let mut backoff = std::time::Duration::ZERO;
        loop {
            if self.sink.is_closed() {
                return;
            }
            if let Some(sent) = last_subscribe {
                tokio::time::sleep_until(subscribe_due(sent, Instant::now(), backoff)).await;
                let (resubscriptions, _) = counters(&self.stream_name, &self.shard_id);
                resubscriptions.increment(1);
            }
            backoff = std::time::Duration::ZERO;
            let asked_at = SystemTime::now();
            last_subscribe = Some(Instant::now());
            match self.subscribe(&position).await {
                Ok(subscription) => {
                    if position == Position::Latest {
                        // Nothing received yet: a new subscription must not skip what is
                        // written from now on.
                        position = Position::AtTimestamp(asked_at);
                    }
                    let (replaced, done) = self.read(subscription, &mut position, &mut quiet_since).await;
                    if done {
                        return;
                    }
                    match replaced {
                        Replaced::NotFound => match self.not_found("the subscription's stream: not found".into()).await
                        {
                            Subscribe::Final(event) => {
                                let _ = self.sink.send(event).await;
                                return;
                            }
                            _ => {
                                failures = failures.saturating_add(1);
                                backoff = self.config.retry.backoff(failures);
                            }
                        },
                        Replaced::Ended => failures = 0,
                        Replaced::Idle => {
                            warn!(idle_timeout = ?self.config.idle_timeout, "the subscription sent nothing; subscribing again");
                        }
                        Replaced::Failed => {
                            failures = failures.saturating_add(1);
                            backoff = self.config.retry.backoff(failures);
                        }
                    }
                }
                // Refused or failed: the shard-end check below still runs, so that a
                // closed shard whose subscriptions keep being refused still ends.
                Err(Subscribe::Retry) => {
                    failures = failures.saturating_add(1);
                    backoff = self.config.retry.backoff(failures);
                }
                Err(Subscribe::CheckpointExpired(error)) => {
                    let checkpoint = position.sequence_number().unwrap_or_default().to_owned();
                    kcl_core::retrieval::checkpoint_expired(&self.stream_name, &self.shard_id, &checkpoint, &error);
                    position = Position::TrimHorizon;
                    continue;
                }
                Err(Subscribe::Final(event)) => {
                    let _ = self.sink.send(event).await;
                    return;
                }
            }
            if quiet_since.elapsed() >= self.config.shard_end_check_interval {
                match self.check_shard_end(&mut position).await {
                    EndCheck::Done => return,
                    EndCheck::Open => quiet_since = Instant::now(),
                }
            }
        }
    }

    /// Reads one subscription until it is to be replaced. Returns why, and whether the
    /// publisher is done (shard end sent, or the consumer left).
    async fn read(
        &self,
        mut subscription: aws_sdk_kinesis::primitives::event_stream::EventReceiver<
            SubscribeToShardEventStream,
            aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError,
        >,
        position: &mut Position,
        quiet_since: &mut Instant,
    ) -> (Replaced, bool) {
        let ends_at = Instant::now() + self.config.subscription_lifetime;
        loop {
            // Backpressure: the subscription is not read while the processor is behind,
            // and that wait is not idleness.
            self.sink.wait_for_room().await;
            let now = Instant::now();
            if now >= ends_at {
                return (Replaced::Ended, false);
            }
            let limit = self.config.idle_timeout.min(ends_at - now);
            let next = match tokio::time::timeout(limit, subscription.recv()).await {
                Ok(next) => next,
                Err(_) if Instant::now() >= ends_at => return (Replaced::Ended, false),
                Err(_) => return (Replaced::Idle, false),
            };
            let event = match next {
                Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => event,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    debug!("the subscription ended");
                    return (Replaced::Ended, false);
                }
                Err(e) => {
                    let (_, errors) = counters(&self.stream_name, &self.shard_id);
                    errors.increment(1);
                    // Some backends refuse a subscription in its event stream rather than
                    // in the response (kinesis-mock: HTTP 200, then an exception event).
                    if let SdkError::ServiceError(s) = &e {
                        if s.err().is_resource_not_found_exception() {
                            return (Replaced::NotFound, false);
                        }
                        if s.err().is_resource_in_use_exception() {
                            debug!("the shard's subscription is still in use; retrying");
                            return (Replaced::Failed, false);
                        }
                        // Kinesis ends a subscription with these when the stream's key
                        // stops being usable: as in polling, retrying cannot fix them.
                        if matches!(
                            s.err(),
                            SubscribeToShardEventStreamError::KmsAccessDeniedException(_)
                                | SubscribeToShardEventStreamError::KmsDisabledException(_)
                                | SubscribeToShardEventStreamError::KmsInvalidStateException(_)
                                | SubscribeToShardEventStreamError::KmsNotFoundException(_)
                                | SubscribeToShardEventStreamError::KmsOptInRequired(_)
                        ) {
                            let code = s.err().meta().code().map(str::to_owned);
                            let _ = self.sink.send(kms_failed(code.as_deref(), BoxError::from(e))).await;
                            return (Replaced::Ended, true);
                        }
                    }
                    warn!(error = %DisplayErrorContext(&e), "the subscription failed; subscribing again");
                    return (Replaced::Failed, false);
                }
            };
            // Required in the SDK's model, so a closed shard's "none" arrives empty.
            let continuation = Some(event.continuation_sequence_number.clone()).filter(|c| !c.is_empty());
            let child_shards: Vec<ChildShard> = event.child_shards().iter().map(ChildShard::from).collect();
            let delivered_any = !event.records.is_empty();
            // A backend that ignores the requested position replays from earlier; what
            // lies before the position is not handed on (the consumer would drop it too,
            // except while it has delivered nothing yet).
            let admitted = position.clone();
            let delivered = self
                .sink
                .deliver(
                    &self.stream_name,
                    &self.shard_id,
                    event.records,
                    Some(event.millis_behind_latest),
                    |r| admitted.admits(&r.sequence_number),
                )
                .await;
            let Ok(Delivered { records, last, .. }) = delivered else {
                return (Replaced::Ended, true);
            };
            if records > 0 {
                *quiet_since = Instant::now();
            }
            match (&continuation, last) {
                (Some(c), _) => *position = Position::AfterSequence(c.clone()),
                (None, Some(last)) => *position = Position::AfterSequence(last.as_str().to_owned()),
                (None, None) => {}
            }
            // The end: `ChildShards` with no continuation (AWS), or with an event that has
            // no records left (a backend that names the children on every event of a
            // closed shard, records or not).
            if !child_shards.is_empty() && (continuation.is_none() || !delivered_any) {
                info!(children = ?child_shards.iter().map(|c| c.shard_id.as_str()).collect::<Vec<_>>(), "shard end reached");
                let _ = self.sink.send(PublisherEvent::ShardEnd { child_shards }).await;
                return (Replaced::Ended, true);
            }
            if quiet_since.elapsed() >= self.config.shard_end_check_interval {
                match self.check_shard_end(position).await {
                    EndCheck::Done => return (Replaced::Ended, true),
                    EndCheck::Open => *quiet_since = Instant::now(),
                }
            }
        }
    }

    /// Subscribes at `position`.
    async fn subscribe(
        &self,
        position: &Position,
    ) -> Result<
        aws_sdk_kinesis::primitives::event_stream::EventReceiver<
            SubscribeToShardEventStream,
            aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError,
        >,
        Subscribe,
    > {
        let starting = position.starting_position().map_err(|source| {
            Subscribe::Final(PublisherEvent::Failed {
                operation: "SubscribeToShard",
                source,
            })
        })?;
        let call = self
            .kinesis
            .subscribe_to_shard()
            .consumer_arn(&self.consumer.consumer_arn)
            .shard_id(&self.shard_id)
            .starting_position(starting)
            .send();
        // A call that does not answer ends as the SDK's `TimeoutError`: retried below.
        let e = match with_timeout(self.config.call_timeout, call).await {
            Ok(output) => {
                debug!(?position, "subscribed");
                return Ok(output.event_stream);
            }
            Err(e) => e,
        };
        let (_, errors) = counters(&self.stream_name, &self.shard_id);
        errors.increment(1);
        let kind = match &e {
            SdkError::ServiceError(s) => Some(s.err()),
            _ => None,
        };
        match kind {
            Some(SubscribeToShardError::ResourceInUseException(_)) => {
                // Another subscription of this consumer to this shard is still open (ours,
                // ended a moment ago, or a worker that lost the lease): wait, then retry.
                debug!("the shard's subscription is still in use; retrying");
                Err(Subscribe::Retry)
            }
            Some(SubscribeToShardError::LimitExceededException(_)) => {
                metrics::counter!("kcl_throttles_total", "operation" => "SubscribeToShard").increment(1);
                Err(Subscribe::Retry)
            }
            Some(SubscribeToShardError::ResourceNotFoundException(_)) => Err(self.not_found(BoxError::from(e)).await),
            Some(SubscribeToShardError::InvalidArgumentException(refusal))
                if matches!(position, Position::AtSequence(_) | Position::AfterSequence(_)) =>
            {
                if refused_for_retention(refusal.message()) {
                    Err(Subscribe::CheckpointExpired(DisplayErrorContext(&e).to_string()))
                } else {
                    let source = RetrievalError::CheckpointRefused {
                        operation: "SubscribeToShard",
                        checkpoint: position.sequence_number().unwrap_or_default().to_owned(),
                        source: BoxError::from(e),
                    };
                    Err(Subscribe::Final(PublisherEvent::Failed {
                        operation: "SubscribeToShard",
                        source: source.into(),
                    }))
                }
            }
            Some(
                SubscribeToShardError::KmsAccessDeniedException(_)
                | SubscribeToShardError::KmsDisabledException(_)
                | SubscribeToShardError::KmsInvalidStateException(_)
                | SubscribeToShardError::KmsNotFoundException(_)
                | SubscribeToShardError::KmsOptInRequired(_),
            ) => {
                let code = e.as_service_error().and_then(|s| s.meta().code()).map(str::to_owned);
                Err(Subscribe::Final(kms_failed(code.as_deref(), BoxError::from(e))))
            }
            Some(
                SubscribeToShardError::AccessDeniedException(_) | SubscribeToShardError::InvalidArgumentException(_),
            ) => Err(Subscribe::Final(PublisherEvent::Failed {
                operation: "SubscribeToShard",
                source: BoxError::from(e),
            })),
            _ => {
                warn!(error = %DisplayErrorContext(&e), "SubscribeToShard failed; retrying");
                Err(Subscribe::Retry)
            }
        }
    }

    /// After `ResourceNotFoundException` from `SubscribeToShard`: the consumer may be gone
    /// (deregistered: nothing to read through it, an operator's decision), or the shard
    /// (then the shard-consumer decides whether it ended). Never reports a missing
    /// consumer as a missing shard, which would end an open shard.
    async fn not_found(&self, source: BoxError) -> Subscribe {
        let describe = self
            .kinesis
            .describe_stream_consumer()
            .consumer_arn(&self.consumer.consumer_arn)
            .send();
        match with_timeout(self.config.call_timeout, describe).await {
            Ok(_) => {}
            Err(SdkError::ServiceError(s))
                if matches!(s.err(), DescribeStreamConsumerError::ResourceNotFoundException(_)) =>
            {
                let message = format!(
                    "stream consumer {:?} does not exist any more (deregistered?): {}",
                    self.consumer.consumer_name,
                    ErrorChain(source.as_ref())
                );
                return Subscribe::Final(PublisherEvent::Failed {
                    operation: "SubscribeToShard",
                    source: message.into(),
                });
            }
            _ => return Subscribe::Retry,
        }
        let probe = self
            .kinesis
            .get_shard_iterator()
            .set_stream_name(self.stream_arn.is_none().then(|| self.stream_name.clone()))
            .set_stream_arn(self.stream_arn.clone())
            .shard_id(&self.shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send();
        match with_timeout(self.config.call_timeout, probe).await {
            Err(SdkError::ServiceError(s))
                if matches!(s.err(), GetShardIteratorError::ResourceNotFoundException(_)) =>
            {
                Subscribe::Final(PublisherEvent::ShardNotFound {
                    operation: "SubscribeToShard",
                    source,
                })
            }
            _ => Subscribe::Retry,
        }
    }

    /// Asks `GetRecords` whether the shard is closed and read through after `position`;
    /// hands on any record found on the way and moves `position` past it.
    async fn check_shard_end(&self, position: &mut Position) -> EndCheck {
        debug!("no records for a while; checking whether the shard has ended");
        let request = self
            .kinesis
            .get_shard_iterator()
            .set_stream_name(self.stream_arn.is_none().then(|| self.stream_name.clone()))
            .set_stream_arn(self.stream_arn.clone())
            .shard_id(&self.shard_id)
            .shard_iterator_type(position.kind())
            .set_starting_sequence_number(position.sequence_number().map(str::to_owned))
            .set_timestamp(position.timestamp())
            .send();
        let mut iterator = match with_timeout(self.config.call_timeout, request).await {
            Ok(out) => match out.shard_iterator {
                Some(it) => it,
                None => return self.end(Vec::new()).await,
            },
            Err(SdkError::ServiceError(s))
                if matches!(s.err(), GetShardIteratorError::ResourceNotFoundException(_)) =>
            {
                return self
                    .shard_not_found("GetShardIterator", SdkError::ServiceError(s).into())
                    .await;
            }
            Err(e) => return Self::check_failed(&e),
        };
        // Bounded: a shard with a backlog is read by the subscription, not here. The
        // check shares the shard's read limits (5 calls/s, 2 MB/s) with every other
        // reader: few calls, each with a `Limit`, at least 200 ms apart.
        for _ in 0..SHARD_END_CHECK_CALLS {
            self.sink.wait_for_room().await;
            self.space_get_records().await;
            let call = self
                .kinesis
                .get_records()
                .shard_iterator(&iterator)
                .limit(SHARD_END_CHECK_LIMIT)
                .send();
            let out = match with_timeout(self.config.call_timeout, call).await {
                Ok(out) => out,
                Err(SdkError::ServiceError(s)) if matches!(s.err(), GetRecordsError::ResourceNotFoundException(_)) => {
                    return self
                        .shard_not_found("GetRecords", SdkError::ServiceError(s).into())
                        .await;
                }
                Err(e) => return Self::check_failed(&e),
            };
            let child_shards: Vec<ChildShard> = out.child_shards().iter().map(ChildShard::from).collect();
            let next = out.next_shard_iterator.clone();
            // No `millis_behind_latest`: an empty check hands nothing on.
            let delivered = self
                .sink
                .deliver(&self.stream_name, &self.shard_id, out.records, None, |_| true)
                .await;
            let Ok(Delivered { records, last, .. }) = delivered else {
                return EndCheck::Done;
            };
            let found = records > 0;
            if let Some(last) = last {
                *position = Position::AfterSequence(last.as_str().to_owned());
            }
            match next {
                None => return self.end(child_shards).await,
                Some(_) if !found => return EndCheck::Open,
                Some(next) => iterator = next,
            }
        }
        EndCheck::Open
    }

    /// Waits until [`GET_RECORDS_SPACING`] has passed since this publisher's last
    /// `GetRecords` call (of this check or an earlier one), and notes the new call.
    async fn space_get_records(&self) {
        let last = *self
            .last_get_records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(last) = last {
            tokio::time::sleep_until(last + GET_RECORDS_SPACING).await;
        }
        *self
            .last_get_records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// Kinesis does not know the shard: the consumer decides what that means.
    async fn shard_not_found(&self, operation: &'static str, source: BoxError) -> EndCheck {
        let _ = self
            .sink
            .send(PublisherEvent::ShardNotFound { operation, source })
            .await;
        EndCheck::Done
    }

    /// A shard-end check that could not be made is tried again later.
    fn check_failed<E: std::error::Error + 'static, R: std::fmt::Debug>(e: &SdkError<E, R>) -> EndCheck {
        debug!(error = %DisplayErrorContext(e), "shard-end check failed; trying later");
        EndCheck::Open
    }

    async fn end(&self, child_shards: Vec<ChildShard>) -> EndCheck {
        info!("shard end reached (found by GetRecords: the backend sent no ChildShards)");
        let _ = self.sink.send(PublisherEvent::ShardEnd { child_shards }).await;
        EndCheck::Done
    }
}

/// Why a subscription was not opened.
enum Subscribe {
    /// Try again after the backoff.
    Retry,
    /// The checkpoint is older than the retention (Kinesis's error, for the log):
    /// resume at `TRIM_HORIZON`.
    CheckpointExpired(String),
    /// Send this event and stop.
    Final(PublisherEvent),
}

/// `Failed` for a KMS error of `SubscribeToShard` (its response or its event stream),
/// as polling reports one of `GetRecords`.
fn kms_failed(code: Option<&str>, source: BoxError) -> PublisherEvent {
    PublisherEvent::Failed {
        operation: "SubscribeToShard",
        source: Box::new(RetrievalError::Kms {
            operation: "SubscribeToShard",
            code: code.unwrap_or("a KMS error").to_owned(),
            source,
        }),
    }
}

/// The shard's resubscription and subscription-error counters.
fn counters(stream: &str, shard_id: &str) -> (metrics::Counter, metrics::Counter) {
    let labels = [("stream", stream.to_owned()), ("shard_id", shard_id.to_owned())];
    (
        metrics::counter!("kcl_fanout_resubscriptions_total", &labels),
        metrics::counter!("kcl_fanout_subscription_errors_total", &labels),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: &str) -> SequenceNumber {
        SequenceNumber::parse(n).expect("valid")
    }

    /// Guards the review of issue 21: resubscriptions after a refusal (whose jittered
    /// backoff may be ~0 ms) or after a subscription that ended at once are spaced a
    /// second from the previous call; a longer backoff counts from now.
    #[test]
    fn subscriptions_are_at_least_a_second_apart() {
        let sent = Instant::now();
        let ms = std::time::Duration::from_millis;
        assert_eq!(subscribe_due(sent, sent + ms(5), ms(0)), sent + ms(1000));
        assert_eq!(subscribe_due(sent, sent + ms(5), ms(3)), sent + ms(1000));
        assert_eq!(subscribe_due(sent, sent + ms(300_000), ms(0)), sent + ms(300_000));
        assert_eq!(subscribe_due(sent, sent + ms(900), ms(2000)), sent + ms(2900));
    }

    #[test]
    fn records_before_the_requested_position_are_not_admitted() {
        let after = Position::AfterSequence("100".into());
        assert!(!after.admits(&seq("99")) && !after.admits(&seq("100")));
        assert!(after.admits(&seq("101")));
        let at = Position::AtSequence(seq("100"));
        assert!(!at.admits(&seq("99")) && at.admits(&seq("100")));
        // A continuation that is no record's number (ferrokinesis) still orders.
        let past = Position::AfterSequence("150".into());
        assert!(!past.admits(&seq("149")) && past.admits(&seq("151")));
        for open in [
            Position::TrimHorizon,
            Position::Latest,
            Position::AtTimestamp(SystemTime::UNIX_EPOCH),
        ] {
            assert!(open.admits(&seq("1")));
        }
    }

    #[test]
    fn a_checkpoint_is_read_again_and_sentinels_map_to_their_types() {
        let cp = Position::from_start(&Checkpoint::Sequence(seq("7")), None);
        assert_eq!(cp, Position::AtSequence(seq("7")));
        assert_eq!(cp.kind(), ShardIteratorType::AtSequenceNumber);
        assert_eq!(
            Position::from_start(&Checkpoint::TrimHorizon, None).kind(),
            ShardIteratorType::TrimHorizon
        );
        assert_eq!(
            Position::from_start(&Checkpoint::Latest, None).kind(),
            ShardIteratorType::Latest
        );
        let at = Position::from_start(&Checkpoint::AtTimestamp, Some(SystemTime::UNIX_EPOCH));
        assert_eq!(at.kind(), ShardIteratorType::AtTimestamp);
        assert!(at.starting_position().is_ok());
    }
}
