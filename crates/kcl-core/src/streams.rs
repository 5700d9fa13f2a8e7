//! The streams a scheduler consumes: one in single-stream mode, the
//! [`MultiStreamTracker`]'s in multi-stream mode. Each is a [`StreamHandle`]: its
//! identifier (which keys its leases), how Kinesis calls address it (by ARN where the
//! backend accepts it, by name otherwise), its initial position, retrieval and shard
//! detector.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::describe_stream_summary::{DescribeStreamSummaryError, DescribeStreamSummaryOutput};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::InitialPositionInStream;
use crate::error::{BoxError, ErrorChain, SchedulerError};
use crate::lease::Lease;
use crate::retrieval::RetrievalFactory;
use crate::retry::{retry, with_timeout, RetryPolicy};
use crate::shard_detector::ShardDetector;
use crate::stream::{MultiStreamTracker, StreamAddress, StreamConfig, StreamIdentifier};

/// One stream being consumed.
#[derive(Debug)]
pub(crate) struct StreamHandle {
    pub(crate) identifier: StreamIdentifier,
    /// The `streamName` attribute of its leases: the serialized identifier in
    /// multi-stream mode, `None` in single-stream mode.
    pub(crate) key: Option<String>,
    /// Set when Kinesis calls address the stream by ARN alone (it was configured by
    /// ARN and the backend accepts that); by name otherwise.
    pub(crate) arn: Option<String>,
    pub(crate) initial_position: InitialPositionInStream,
    pub(crate) retrieval: Arc<dyn RetrievalFactory>,
    pub(crate) detector: ShardDetector,
}

impl StreamHandle {
    pub(crate) fn new(
        identifier: StreamIdentifier,
        arn: Option<String>,
        initial_position: InitialPositionInStream,
        retrieval: Arc<dyn RetrievalFactory>,
        kinesis: aws_sdk_kinesis::Client,
        call_timeout: Duration,
    ) -> Self {
        let detector =
            ShardDetector::new(kinesis, identifier.stream_name().to_owned(), 1000, call_timeout).with_arn(arn.clone());
        Self {
            key: identifier.is_multi_stream().then(|| identifier.serialize()),
            identifier,
            arn,
            initial_position,
            retrieval,
            detector,
        }
    }

    /// The stream's name (metrics and spans carry it).
    pub(crate) fn name(&self) -> &str {
        self.identifier.stream_name()
    }

    /// Turns a lease keyed by shard id (as lineage code builds them) into this
    /// stream's lease: in multi-stream mode keyed `stream:shard` with `streamName` and
    /// `shardId`; parents and children stay shard ids, as the Java KCL writes them.
    pub(crate) fn qualify(&self, mut lease: Lease) -> Lease {
        if let Some(key) = &self.key {
            lease.shard_id = Some(std::mem::take(&mut lease.lease_key));
            lease.lease_key = self.identifier.lease_key(lease.shard());
            lease.stream_name = Some(key.clone());
        }
        lease
    }

    pub(crate) fn initial_timestamp(&self) -> Option<SystemTime> {
        match self.initial_position {
            InitialPositionInStream::AtTimestamp(t) => Some(t),
            _ => None,
        }
    }

    /// `DescribeStreamSummary` of this stream, by ARN or by name.
    pub(crate) async fn describe(
        &self,
        kinesis: &aws_sdk_kinesis::Client,
        call_timeout: Duration,
    ) -> Result<DescribeStreamSummaryOutput, SdkError<DescribeStreamSummaryError>> {
        let call = kinesis
            .describe_stream_summary()
            .set_stream_name(self.arn.is_none().then(|| self.name().to_owned()))
            .set_stream_arn(self.arn.clone())
            .send();
        with_timeout(call_timeout, call).await
    }

    /// Whether a description is of this stream's incarnation (in multi-stream mode the
    /// creation time must match: a stream created again under the same name is another).
    pub(crate) fn is_same_incarnation(&self, summary: &DescribeStreamSummaryOutput) -> bool {
        match self.identifier.creation_epoch() {
            Some(epoch) => creation_epoch(summary).is_none_or(|e| e == epoch),
            None => true,
        }
    }
}

fn creation_epoch(summary: &DescribeStreamSummaryOutput) -> Option<i64> {
    summary
        .stream_description_summary()
        .map(|s| s.stream_creation_timestamp().secs())
}

fn describe_retryable(e: &SdkError<DescribeStreamSummaryError>) -> bool {
    match e {
        SdkError::ServiceError(s) => matches!(s.err(), DescribeStreamSummaryError::LimitExceededException(_)),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        _ => false,
    }
}

fn is_not_found(e: &SdkError<DescribeStreamSummaryError>) -> bool {
    matches!(e, SdkError::ServiceError(s) if matches!(s.err(), DescribeStreamSummaryError::ResourceNotFoundException(_)))
}

/// `DescribeStreamSummary` by name or by ARN alone, bounded by `call_timeout` and
/// retried with backoff while throttled or failing transiently.
async fn describe_raw(
    kinesis: &aws_sdk_kinesis::Client,
    name: Option<&str>,
    arn: Option<&str>,
    call_timeout: Duration,
) -> Result<DescribeStreamSummaryOutput, SdkError<DescribeStreamSummaryError>> {
    let request = kinesis
        .describe_stream_summary()
        .set_stream_name(name.map(str::to_owned))
        .set_stream_arn(arn.map(str::to_owned));
    retry(&RetryPolicy::default(), describe_retryable, || {
        with_timeout(call_timeout, request.clone().send())
    })
    .await
}

/// [`SchedulerError::StreamNotFound`] for a missing stream, else a Kinesis error.
fn describe_error(e: SdkError<DescribeStreamSummaryError>, stream: &str) -> SchedulerError {
    if is_not_found(&e) {
        SchedulerError::StreamNotFound {
            stream: stream.to_owned(),
        }
    } else {
        SchedulerError::Kinesis {
            operation: "DescribeStreamSummary",
            source: BoxError::from(e),
        }
    }
}

/// Describes a stream by name (as a single-stream scheduler checks its stream at start).
///
/// # Errors
/// [`SchedulerError::StreamNotFound`], [`SchedulerError::Kinesis`].
pub(crate) async fn describe_stream(
    kinesis: &aws_sdk_kinesis::Client,
    name: &str,
    call_timeout: Duration,
) -> Result<DescribeStreamSummaryOutput, SchedulerError> {
    describe_raw(kinesis, Some(name), None, call_timeout)
        .await
        .map_err(|e| describe_error(e, name))
}

/// Describes the stream a config names and returns its multi-stream identifier and,
/// when calls should address it by ARN, the ARN.
///
/// A stream configured by ARN is first described by ARN alone; a backend that refuses
/// that (the embedded one does) makes calls address the stream by name from then on.
pub(crate) async fn resolve(
    kinesis: &aws_sdk_kinesis::Client,
    address: &StreamAddress,
    call_timeout: Duration,
) -> Result<(StreamIdentifier, Option<String>), SchedulerError> {
    let (summary, arn) = match address {
        StreamAddress::Name(name) => (describe_stream(kinesis, name, call_timeout).await?, None),
        StreamAddress::Identifier(id) => {
            let name = id.stream_name();
            let summary = describe_stream(kinesis, name, call_timeout).await?;
            // The identifier pins one incarnation of the stream: one created again
            // under the same name is another stream, and its shards are not this
            // identifier's.
            if creation_epoch(&summary).is_some_and(|e| Some(e) != id.creation_epoch()) {
                warn!(stream = %id, "a stream of this name exists, but was created at another time than the configured identifier says: not consuming it");
                return Err(SchedulerError::StreamNotFound { stream: id.serialize() });
            }
            return Ok((id.clone(), None));
        }
        StreamAddress::Arn { arn, name, .. } => match describe_raw(kinesis, None, Some(arn), call_timeout).await {
            Ok(summary) => (summary, Some(arn.clone())),
            Err(e) if is_not_found(&e) => return Err(describe_error(e, arn)),
            Err(e) => {
                info!(stream = %arn, error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "this Kinesis endpoint does not accept the stream's ARN alone; addressing it by name");
                (describe_stream(kinesis, name, call_timeout).await?, None)
            }
        },
    };
    let description = summary
        .stream_description_summary()
        .ok_or_else(|| SchedulerError::Kinesis {
            operation: "DescribeStreamSummary",
            source: "the response has no stream description".into(),
        })?;
    // arn:<partition>:kinesis:<region>:<account>:stream/<name>
    let account = description
        .stream_arn()
        .split(':')
        .nth(4)
        .filter(|a| !a.is_empty())
        .or(match address {
            StreamAddress::Arn { account, .. } => Some(account.as_str()),
            _ => None,
        })
        .ok_or_else(|| SchedulerError::Kinesis {
            operation: "DescribeStreamSummary",
            source: format!(
                "cannot read the account id from the stream ARN {:?}",
                description.stream_arn()
            )
            .into(),
        })?;
    let identifier =
        StreamIdentifier::multi_stream(account, address.name(), description.stream_creation_timestamp().secs());
    Ok((identifier, arn))
}

/// The streams a scheduler consumes now.
#[derive(Debug)]
pub(crate) struct Streams {
    /// By the `streamName` of their leases (`None`: the single stream).
    active: HashMap<Option<String>, Arc<StreamHandle>>,
    tracker: Option<Arc<dyn MultiStreamTracker>>,
    /// Tracker entries (as configured) resolved to a lease key, so that each is
    /// described once.
    resolved: HashMap<String, String>,
    /// Streams Kinesis reported deleted: not consumed again, even if still listed.
    gone: HashSet<String>,
    interval: Duration,
    next_poll: Option<Instant>,
}

impl Streams {
    pub(crate) fn single(handle: StreamHandle) -> Self {
        crate::metrics::streams_consumed(1);
        Self {
            active: HashMap::from([(None, Arc::new(handle))]),
            tracker: None,
            resolved: HashMap::new(),
            gone: HashSet::new(),
            interval: Duration::MAX,
            next_poll: None,
        }
    }

    pub(crate) fn multi(tracker: Arc<dyn MultiStreamTracker>, interval: Duration) -> Self {
        Self {
            active: HashMap::new(),
            tracker: Some(tracker),
            resolved: HashMap::new(),
            gone: HashSet::new(),
            interval,
            next_poll: Some(Instant::now()),
        }
    }

    pub(crate) fn is_multi(&self) -> bool {
        self.tracker.is_some()
    }

    /// The stream a lease belongs to, if it is consumed now.
    pub(crate) fn of(&self, lease: &Lease) -> Option<&Arc<StreamHandle>> {
        self.active.get(&lease.stream_name)
    }

    /// The stream of `streamName` `key`, if it is consumed now.
    pub(crate) fn by_key(&self, key: Option<&str>) -> Option<&Arc<StreamHandle>> {
        self.active.get(&key.map(str::to_owned))
    }

    pub(crate) fn is_active(&self, lease: &Lease) -> bool {
        self.active.contains_key(&lease.stream_name)
    }

    pub(crate) fn all(&self) -> Vec<Arc<StreamHandle>> {
        let mut all: Vec<_> = self.active.values().cloned().collect();
        all.sort_by(|a, b| a.identifier.cmp(&b.identifier));
        all
    }

    /// When the tracker is asked next (never in single-stream mode).
    pub(crate) fn next_poll(&self) -> Option<Instant> {
        self.next_poll
    }

    /// Stops consuming a stream Kinesis says was deleted.
    pub(crate) fn mark_gone(&mut self, key: &str) -> Option<Arc<StreamHandle>> {
        let handle = self.active.remove(&Some(key.to_owned()))?;
        warn!(stream = %handle.identifier, "the stream was deleted; its consumers stop and its leases are handled as a former stream's");
        self.gone.insert(key.to_owned());
        self.resolved.retain(|_, k| k != key);
        crate::metrics::streams_consumed(self.active.len());
        Some(handle)
    }

    /// Asks the tracker for the streams and brings the active set in line: new
    /// streams are described and their retrieval initialized (a stream that fails
    /// either is tried again at the next poll), streams no longer listed are removed.
    /// Returns the streams added.
    pub(crate) async fn poll_tracker(
        &mut self,
        kinesis: &aws_sdk_kinesis::Client,
        default_retrieval: &Arc<dyn RetrievalFactory>,
        call_timeout: Duration,
    ) -> Vec<Arc<StreamHandle>> {
        let mut added = Vec::new();
        let Some(tracker) = self.tracker.clone() else {
            return added;
        };
        self.next_poll = Some(Instant::now() + self.interval);
        let configs: Vec<StreamConfig> = match tokio::time::timeout(call_timeout, tracker.stream_config_list()).await {
            Ok(Ok(configs)) => configs,
            Ok(Err(e)) => {
                warn!(error = %ErrorChain(e.as_ref()), "the stream tracker failed; keeping the streams consumed until the next poll");
                return added;
            }
            Err(_) => {
                warn!(timeout = ?call_timeout, "the stream tracker did not answer in time; keeping the streams consumed until the next poll");
                return added;
            }
        };
        let mut wanted: HashSet<String> = HashSet::new();
        for config in configs {
            if let Some(key) = self.resolved.get(config.stream()) {
                wanted.insert(key.clone());
                continue;
            }
            let (identifier, arn) = match resolve(kinesis, config.address(), call_timeout).await {
                Ok(resolved) => resolved,
                Err(e) => {
                    warn!(stream = config.stream(), error = %ErrorChain(&e), "cannot consume a stream the tracker lists; trying again at the next poll");
                    continue;
                }
            };
            let key = identifier.serialize();
            if self.gone.contains(&key) {
                continue;
            }
            wanted.insert(key.clone());
            if self.active.contains_key(&Some(key.clone())) {
                self.resolved.insert(config.stream().to_owned(), key);
                continue;
            }
            let retrieval = config.retrieval().cloned().unwrap_or_else(|| default_retrieval.clone());
            if let Err(source) = retrieval.initialize(kinesis, identifier.stream_name()).await {
                let e = SchedulerError::Retrieval { source };
                warn!(stream = %identifier, error = %ErrorChain(&e), "cannot start the retrieval of a stream; trying again at the next poll");
                wanted.remove(&key);
                continue;
            }
            info!(stream = %identifier, by_arn = arn.is_some(), position = ?config.position(), "consuming a new stream");
            let handle = Arc::new(StreamHandle::new(
                identifier,
                arn,
                config.position(),
                retrieval,
                kinesis.clone(),
                call_timeout,
            ));
            self.resolved.insert(config.stream().to_owned(), key.clone());
            self.active.insert(Some(key), handle.clone());
            added.push(handle);
        }
        let removed: Vec<Option<String>> = self
            .active
            .keys()
            .filter(|k| k.as_ref().is_some_and(|k| !wanted.contains(k)))
            .cloned()
            .collect();
        for key in removed {
            if let Some(handle) = self.active.remove(&key) {
                info!(stream = %handle.identifier, "the stream tracker no longer lists the stream; stopping its consumers");
            }
        }
        self.resolved.retain(|_, k| wanted.contains(k));
        crate::metrics::streams_consumed(self.active.len());
        added
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_resolve_by_name_arn_and_identifier_and_a_stale_identifier_is_not_found() {
        let backend = kcl_local::LocalBackend::start().await.expect("backend");
        let kinesis = backend.kinesis_client();
        kcl_local::create_stream(&kinesis, "resolved", 1).await.expect("stream");
        let timeout = Duration::from_secs(10);
        let (by_name, arn) = resolve(&kinesis, &StreamAddress::parse("resolved").expect("name"), timeout)
            .await
            .expect("by name");
        assert!(by_name.is_multi_stream() && arn.is_none(), "{by_name}");
        let summary = kinesis
            .describe_stream_summary()
            .stream_name("resolved")
            .send()
            .await
            .expect("describe");
        let d = summary.stream_description_summary().expect("description");
        assert_eq!(by_name.creation_epoch(), Some(d.stream_creation_timestamp().secs()));
        // The embedded backend refuses calls by ARN alone: the ARN resolves to the same
        // identifier, addressed by name.
        let by_arn = resolve(&kinesis, &StreamAddress::parse(d.stream_arn()).expect("arn"), timeout)
            .await
            .expect("by ARN");
        assert_eq!(by_arn, (by_name.clone(), None));
        let pinned = StreamAddress::parse(&by_name.serialize()).expect("identifier");
        assert_eq!(resolve(&kinesis, &pinned, timeout).await.expect("pinned").0, by_name);
        let epoch = by_name.creation_epoch().expect("epoch");
        let account = by_name.account_id().expect("account");
        let stale = StreamAddress::Identifier(StreamIdentifier::multi_stream(account, "resolved", epoch - 100));
        assert!(matches!(
            resolve(&kinesis, &stale, timeout).await,
            Err(SchedulerError::StreamNotFound { .. })
        ));
        assert!(matches!(
            resolve(&kinesis, &StreamAddress::parse("missing").expect("name"), timeout).await,
            Err(SchedulerError::StreamNotFound { .. })
        ));
        backend.shutdown().await;
    }
}
