//! [`FanOutError`]: why enhanced fan-out could not be set up, one variant per way the
//! caller should react.

use std::time::Duration;

use kcl_core::error::BoxError;

/// Why a stream consumer could not be registered or used. Reported by
/// [`register_stream_consumer`](crate::register_stream_consumer) and, as the source of
/// `SchedulerError::Retrieval`, by `Scheduler::run`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FanOutError {
    /// The consumer name is not one Kinesis accepts: fix the configuration.
    #[error("invalid stream consumer name {name:?}: {reason}")]
    InvalidConsumerName {
        /// The name.
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The stream does not exist (or is not visible with these credentials).
    #[error("stream {stream:?} not found")]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// The Kinesis endpoint does not offer enhanced fan-out (an emulator without it, or
    /// an operation it does not know): use polling.
    #[error("the Kinesis endpoint does not support enhanced fan-out ({operation} failed)")]
    NotSupported {
        /// The operation that was refused.
        operation: &'static str,
        /// Its error.
        #[source]
        source: BoxError,
    },
    /// Kinesis refused to register the consumer (for example the limit of consumers per
    /// stream is reached): fix the deployment.
    #[error("stream consumer {consumer_name:?} cannot be registered")]
    RegistrationRefused {
        /// The consumer name.
        consumer_name: String,
        /// Kinesis's error.
        #[source]
        source: BoxError,
    },
    /// The consumer did not become `ACTIVE` within the registration timeout; retrying
    /// later may work.
    #[error("stream consumer {consumer_name:?} is still {status} after {waited:?}")]
    ConsumerNotActive {
        /// The consumer name.
        consumer_name: String,
        /// Its last status (`CREATING`, `DELETING`, ...).
        status: String,
        /// How long was waited.
        waited: Duration,
    },
    /// A Kinesis call kept failing (throttled, timed out, a service error).
    #[error("kinesis {operation} failed")]
    Kinesis {
        /// The operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: BoxError,
    },
}
