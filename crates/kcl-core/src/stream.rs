//! Streams: how a stream is named in leases ([`StreamIdentifier`]), what to consume of
//! each ([`StreamConfig`]), and, for an application that reads many streams with one
//! fleet and one lease table, the [`MultiStreamTracker`] that says which (the Java KCL
//! 3.x's multi-stream mode, with its lease keys, so that a Java multi-stream table is
//! read as it is).
//!
//! In multi-stream mode each lease is keyed `account-id:stream-name:creation-epoch:shard-id`
//! and carries the attributes `streamName` (the first three parts) and `shardId`. The
//! single-stream mode ([`Scheduler::builder`](crate::Scheduler::builder)) keys leases by
//! shard id alone, as before.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::InitialPositionInStream;
use crate::error::{BoxError, ConfigError};
use crate::retrieval::RetrievalFactory;

/// Identifies a stream in leases (the Java KCL's `StreamIdentifier`). In multi-stream
/// mode it has the account id and the stream's creation time (seconds since the epoch),
/// so that a stream deleted and created again under the same name gets new leases.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamIdentifier {
    account_id: Option<String>,
    stream_name: String,
    creation_epoch: Option<i64>,
}

impl StreamIdentifier {
    /// The identifier of the one stream of a single-stream application: its name.
    pub fn single_stream(stream_name: impl Into<String>) -> Self {
        Self {
            account_id: None,
            stream_name: stream_name.into(),
            creation_epoch: None,
        }
    }

    /// A multi-stream identifier.
    pub fn multi_stream(account_id: impl Into<String>, stream_name: impl Into<String>, creation_epoch: i64) -> Self {
        Self {
            account_id: Some(account_id.into()),
            stream_name: stream_name.into(),
            creation_epoch: Some(creation_epoch),
        }
    }

    /// Parses the serialized multi-stream form `account-id:stream-name:creation-epoch`
    /// (the `streamName` attribute of a Java KCL multi-stream lease).
    ///
    /// # Errors
    /// [`ConfigError`] when it does not have that shape.
    pub fn parse_multi_stream(serialized: &str) -> Result<Self, ConfigError> {
        let bad = |why: &str| {
            ConfigError::new(
                "stream",
                format!("{serialized:?} is not a stream identifier (account-id:stream-name:creation-epoch): {why}"),
            )
        };
        let parts: Vec<&str> = serialized.split(':').collect();
        let [account, name, epoch] = parts.as_slice() else {
            return Err(bad("expected three parts separated by ':'"));
        };
        if account.is_empty() || !account.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("the account id must be digits"));
        }
        validate_stream_name(name).map_err(|e| bad(&e))?;
        let epoch: i64 = epoch
            .parse()
            .map_err(|_| bad("the creation epoch must be a number of seconds"))?;
        Ok(Self::multi_stream(*account, *name, epoch))
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The account id (multi-stream only).
    pub fn account_id(&self) -> Option<&str> {
        self.account_id.as_deref()
    }

    /// The stream's creation time in seconds since the epoch (multi-stream only).
    pub fn creation_epoch(&self) -> Option<i64> {
        self.creation_epoch
    }

    /// True for a multi-stream identifier.
    pub fn is_multi_stream(&self) -> bool {
        self.account_id.is_some()
    }

    /// `account-id:stream-name:creation-epoch` in multi-stream mode, the stream name
    /// otherwise (the Java KCL's `serialize()`).
    pub fn serialize(&self) -> String {
        match (&self.account_id, self.creation_epoch) {
            (Some(account), Some(epoch)) => format!("{account}:{}:{epoch}", self.stream_name),
            _ => self.stream_name.clone(),
        }
    }

    /// The lease key of one of this stream's shards: `serialized:shard_id` in
    /// multi-stream mode, the shard id otherwise.
    pub fn lease_key(&self, shard_id: &str) -> String {
        if self.is_multi_stream() {
            format!("{}:{shard_id}", self.serialize())
        } else {
            shard_id.to_owned()
        }
    }
}

impl fmt::Display for StreamIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.serialize())
    }
}

/// Checks a stream name as Kinesis does: 1 to 128 of `[a-zA-Z0-9_.-]`.
pub(crate) fn validate_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!("stream name {name:?} must be 1 to 128 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "stream name {name:?} may only have letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// How a [`StreamConfig`] names its stream.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum StreamAddress {
    /// By name, in the account of the Kinesis client.
    Name(String),
    /// By ARN: `arn:<partition>:kinesis:<region>:<account>:stream/<name>`.
    Arn { arn: String, account: String, name: String },
    /// By a full multi-stream identifier.
    Identifier(StreamIdentifier),
}

impl StreamAddress {
    pub(crate) fn parse(stream: &str) -> Result<Self, ConfigError> {
        if stream.starts_with("arn:") {
            let bad = || {
                ConfigError::new(
                    "stream",
                    format!("{stream:?} is not a Kinesis stream ARN (arn:aws:kinesis:region:account:stream/name)"),
                )
            };
            let parts: Vec<&str> = stream.splitn(6, ':').collect();
            let [_, _, service, _, account, resource] = parts.as_slice() else {
                return Err(bad());
            };
            let name = resource.strip_prefix("stream/").ok_or_else(bad)?;
            if *service != "kinesis" || account.is_empty() || validate_stream_name(name).is_err() {
                return Err(bad());
            }
            return Ok(Self::Arn {
                arn: stream.to_owned(),
                account: (*account).to_owned(),
                name: name.to_owned(),
            });
        }
        if stream.contains(':') {
            return StreamIdentifier::parse_multi_stream(stream).map(Self::Identifier);
        }
        validate_stream_name(stream).map_err(|e| ConfigError::new("stream", e))?;
        Ok(Self::Name(stream.to_owned()))
    }

    pub(crate) fn name(&self) -> &str {
        match self {
            Self::Name(name) | Self::Arn { name, .. } => name,
            Self::Identifier(id) => id.stream_name(),
        }
    }
}

/// One stream a multi-stream application consumes (the Java KCL's `StreamConfig`).
#[derive(Clone)]
pub struct StreamConfig {
    stream: String,
    address: StreamAddress,
    initial_position: InitialPositionInStream,
    retrieval: Option<Arc<dyn RetrievalFactory>>,
}

impl fmt::Debug for StreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamConfig")
            .field("stream", &self.stream)
            .field("initial_position", &self.initial_position)
            .field("retrieval", &self.retrieval)
            .finish()
    }
}

impl StreamConfig {
    /// A stream, named by its name (in the Kinesis client's account), its ARN
    /// (`arn:aws:kinesis:region:account:stream/name`), or its multi-stream identifier
    /// (`account-id:stream-name:creation-epoch`, pinning one incarnation of the stream).
    /// Starts at [`InitialPositionInStream::Latest`] and reads with the scheduler's
    /// retrieval unless set otherwise.
    ///
    /// # Errors
    /// [`ConfigError`] when `stream` is none of those.
    pub fn new(stream: impl Into<String>) -> Result<Self, ConfigError> {
        let stream = stream.into();
        let address = StreamAddress::parse(&stream)?;
        Ok(Self {
            stream,
            address,
            initial_position: InitialPositionInStream::default(),
            retrieval: None,
        })
    }

    /// Where this stream's shards without a checkpoint start.
    #[must_use]
    pub fn initial_position(mut self, position: InitialPositionInStream) -> Self {
        self.initial_position = position;
        self
    }

    /// How this stream is read, when not as the scheduler's
    /// [`retrieval_factory`](crate::SchedulerBuilder::retrieval_factory) says (for
    /// example enhanced fan-out for one hot stream, polling for the rest).
    #[must_use]
    pub fn retrieval_factory(mut self, factory: impl RetrievalFactory) -> Self {
        self.retrieval = Some(Arc::new(factory));
        self
    }

    /// [`retrieval_factory`](Self::retrieval_factory), already shared.
    #[must_use]
    pub fn shared_retrieval_factory(mut self, factory: Arc<dyn RetrievalFactory>) -> Self {
        self.retrieval = Some(factory);
        self
    }

    /// The stream as given to [`StreamConfig::new`].
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        self.address.name()
    }

    /// Where shards without a checkpoint start.
    pub fn position(&self) -> InitialPositionInStream {
        self.initial_position
    }

    pub(crate) fn address(&self) -> &StreamAddress {
        &self.address
    }

    pub(crate) fn retrieval(&self) -> Option<&Arc<dyn RetrievalFactory>> {
        self.retrieval.as_ref()
    }
}

/// Says which streams a multi-stream application consumes (the Java KCL's
/// `MultiStreamTracker`). The scheduler asks at start and then every
/// [`MultiStreamConfig::stream_tracker_interval`]: a stream that appears is consumed
/// from then on; one that is no longer listed stops (its processors get
/// `shutdown_requested` and may checkpoint, its leases are released) and its leases
/// are deleted later by [`FormerStreamsLeasesDeletion`].
///
/// Every worker of the application asks its own tracker: they should agree, give or
/// take one interval. A `Vec<StreamConfig>` is a tracker of a fixed list.
#[async_trait]
pub trait MultiStreamTracker: Send + Sync + fmt::Debug + 'static {
    /// The streams to consume now. Two entries naming the same stream are one.
    ///
    /// # Errors
    /// Any error is logged and the previous list kept until the next interval.
    async fn stream_config_list(&self) -> Result<Vec<StreamConfig>, BoxError>;
}

#[async_trait]
impl<T: MultiStreamTracker + ?Sized> MultiStreamTracker for Arc<T> {
    async fn stream_config_list(&self) -> Result<Vec<StreamConfig>, BoxError> {
        (**self).stream_config_list().await
    }
}

#[async_trait]
impl MultiStreamTracker for Vec<StreamConfig> {
    async fn stream_config_list(&self) -> Result<Vec<StreamConfig>, BoxError> {
        Ok(self.clone())
    }
}

/// What happens to the leases of a stream that left the tracker's list or was
/// deleted (the Java KCL's `FormerStreamsLeasesDeletionStrategy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FormerStreamsLeasesDeletion {
    /// Keep them: should the stream come back, it resumes from its checkpoints.
    Keep,
    /// Delete them once nobody has written them for this long (a lease another
    /// worker still renews, because its tracker still lists the stream, is not
    /// deleted). Should the stream come back afterwards, it starts at its initial
    /// position.
    AfterDelay(#[serde(with = "humantime_serde")] Duration),
}

impl Default for FormerStreamsLeasesDeletion {
    fn default() -> Self {
        Self::AfterDelay(Duration::from_secs(3600))
    }
}

/// Multi-stream settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MultiStreamConfig {
    /// How often the [`MultiStreamTracker`] is asked for the streams. Default 60 s
    /// (the Java KCL checks for new streams every minute).
    #[serde(with = "humantime_serde")]
    pub stream_tracker_interval: Duration,
    /// What happens to the leases of streams no longer consumed. Default: deleted
    /// after an hour.
    pub former_streams_leases_deletion: FormerStreamsLeasesDeletion,
}

impl Default for MultiStreamConfig {
    fn default() -> Self {
        Self {
            stream_tracker_interval: Duration::from_secs(60),
            former_streams_leases_deletion: FormerStreamsLeasesDeletion::default(),
        }
    }
}

impl MultiStreamConfig {
    /// Checks the settings (as `build()` does).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::config::check_max_durations(&[("multi_stream.stream_tracker_interval", self.stream_tracker_interval)])?;
        if let FormerStreamsLeasesDeletion::AfterDelay(delay) = self.former_streams_leases_deletion {
            crate::config::check_max_durations(&[("multi_stream.former_streams_leases_deletion", delay)])?;
        }
        if self.stream_tracker_interval.is_zero() {
            return Err(ConfigError::new(
                "multi_stream.stream_tracker_interval",
                "must be above zero",
            ));
        }
        if let FormerStreamsLeasesDeletion::AfterDelay(delay) = self.former_streams_leases_deletion {
            // Workers ask their trackers at different moments: a stream one worker has
            // just added is "former" to the others until their next poll.
            if delay < self.stream_tracker_interval.saturating_mul(2) {
                return Err(ConfigError::new(
                    "multi_stream.former_streams_leases_deletion",
                    format!(
                        "the delay ({delay:?}) must be at least twice the stream_tracker_interval ({:?}), so that a \
                         stream another worker has just started is never taken for a former one",
                        self.stream_tracker_interval
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_serialize_and_key_leases_as_the_java_kcl() {
        let id = StreamIdentifier::parse_multi_stream("123456789012:orders:1700000000").expect("valid");
        assert_eq!(id.account_id(), Some("123456789012"));
        assert_eq!(id.stream_name(), "orders");
        assert_eq!(id.creation_epoch(), Some(1_700_000_000));
        assert_eq!(id.serialize(), "123456789012:orders:1700000000");
        assert_eq!(
            id.lease_key("shardId-000000000001"),
            "123456789012:orders:1700000000:shardId-000000000001"
        );
        let single = StreamIdentifier::single_stream("orders");
        assert!(!single.is_multi_stream());
        assert_eq!(single.lease_key("shardId-000000000001"), "shardId-000000000001");
        for bad in [
            "orders",
            "1:2",
            "acct:orders:1",
            "1:or/ders:1",
            "1:orders:soon",
            "1:orders:1:shard",
        ] {
            assert!(StreamIdentifier::parse_multi_stream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_configs_accept_names_arns_and_identifiers() {
        let by_name = StreamConfig::new("orders").expect("name");
        assert_eq!(by_name.address(), &StreamAddress::Name("orders".into()));
        let arn = "arn:aws:kinesis:eu-west-1:123456789012:stream/orders";
        let by_arn = StreamConfig::new(arn).expect("arn");
        assert_eq!(
            by_arn.address(),
            &StreamAddress::Arn {
                arn: arn.into(),
                account: "123456789012".into(),
                name: "orders".into()
            }
        );
        assert_eq!(by_arn.stream_name(), "orders");
        let by_id = StreamConfig::new("123456789012:orders:17").expect("identifier");
        assert_eq!(by_id.stream_name(), "orders");
        for bad in [
            "",
            "or ders",
            "arn:aws:s3:::bucket",
            "arn:aws:kinesis:eu-west-1:123:table/x",
            "a:b",
        ] {
            assert!(StreamConfig::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_deletion_delay_shorter_than_two_tracker_intervals_is_refused() {
        let mut config = MultiStreamConfig::default();
        assert!(config.validate().is_ok());
        config.former_streams_leases_deletion = FormerStreamsLeasesDeletion::AfterDelay(Duration::from_secs(90));
        assert!(config.validate().is_err());
        config.former_streams_leases_deletion = FormerStreamsLeasesDeletion::Keep;
        assert!(config.validate().is_ok());
    }
}
