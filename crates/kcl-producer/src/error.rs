//! [`ProducerError`]: why a record was not written, one variant per way the caller
//! reacts; [`InvalidRecord`]: why `put` refused a record outright.

/// The error type of this crate.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a record was not written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProducerError {
    /// The record breaks a Kinesis limit: fix the input (nothing was sent).
    #[error("invalid record: {0}")]
    InvalidRecord(#[from] InvalidRecord),
    /// The record was refused for a reason retrying would not change (for example a
    /// KMS key the stream cannot use): the service's error code and message.
    #[error("record rejected: {code}: {message}")]
    Rejected {
        /// The service's error code, such as `KMSAccessDeniedException`.
        code: String,
        /// The service's message.
        message: String,
    },
    /// The record could not be written within `record_ttl`, after `attempts`
    /// attempts that failed for reasons worth retrying (throttling, internal
    /// failures, timeouts): the stream is overloaded or unreachable. It may be put
    /// again later. `last_error` is the last failure's code or description.
    #[error("record not written within its time to live after {attempts} attempts; last error: {last_error}")]
    Expired {
        /// How many times it was sent.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
    /// The stream does not exist (or is being deleted).
    #[error("stream {stream:?} not found")]
    StreamNotFound {
        /// The stream's name.
        stream: String,
    },
    /// A `PutRecords` call failed for a reason retrying would not change (access
    /// denied, a malformed request): the whole call's records fail with it.
    #[error("PutRecords failed")]
    Kinesis {
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// The producer was closed before the record was put.
    #[error("the producer is closed")]
    Closed,
}

/// Why `put` refused a record before sending it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRecord {
    /// The partition key is empty.
    #[error("the partition key is empty")]
    EmptyPartitionKey,
    /// The partition key is longer than 256 Unicode characters.
    #[error("the partition key has {chars} characters; at most 256 are allowed")]
    PartitionKeyTooLong {
        /// Its length in characters.
        chars: usize,
    },
    /// The data and partition key together exceed the producer's `max_record_size`
    /// (1 MiB unless raised, at most 10 MiB).
    #[error(
        "the record is {bytes} bytes (data and partition key); at most {limit} bytes are allowed (max_record_size)"
    )]
    TooLarge {
        /// Data and partition key, in bytes.
        bytes: usize,
        /// The limit: `max_record_size`.
        limit: usize,
    },
    /// The explicit hash key is not a decimal number below 2^128.
    #[error("the explicit hash key {0:?} is not a decimal number below 2^128")]
    InvalidExplicitHashKey(String),
}

/// Why a [`crate::ProducerConfig`] was refused (by [`crate::ProducerConfig::validate`]
/// and [`crate::KinesisProducer::try_new`]): fix the config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of its range.
    #[error("invalid producer config: {field} is {value}; {requirement}")]
    Invalid {
        /// The field of [`crate::ProducerConfig`], such as `record_ttl`.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// What it must be.
        requirement: &'static str,
    },
}

/// An error with its whole source chain, for logs.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
