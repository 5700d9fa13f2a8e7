//! The one error type of this crate, [`LocalError`].
//!
//! Each variant says what went wrong and, by its kind, what the caller can do about it:
//! a [`LocalError::Bind`] usually means the port is taken (pick another, or `0`); a
//! [`LocalError::DataDir`] means the data directory is unusable; [`LocalError::Runtime`]
//! and [`LocalError::Server`] mean an emulator could not start (or died), which is a bug or
//! a resource problem, not something to retry; [`LocalError::Kinesis`] carries the typed
//! SDK error of a helper's request; [`LocalError::Timeout`] means a resource did not reach
//! the awaited state in time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong while starting, using or stopping the embedded backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// A loopback listener could not be bound (the port is in use, or not permitted).
    #[error("cannot bind the {service} emulator to {addr}: {source}")]
    Bind {
        /// `"kinesis"` or `"dynamodb"`.
        service: &'static str,
        /// The address that was asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// The data directory (or a file or folder in it) could not be created or used.
    #[error("cannot use the data directory {path}: {source}")]
    DataDir {
        /// The path that could not be used.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// The thread or Tokio runtime that hosts an emulator could not be created.
    #[error("cannot start a runtime thread for the {service} emulator: {source}")]
    Runtime {
        /// `"kinesis"` or `"dynamodb"`.
        service: &'static str,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },

    /// An emulator failed to start (for example its persisted state could not be loaded),
    /// or its thread ended before it reported that it was serving.
    #[error("the {service} emulator failed: {source}")]
    Server {
        /// `"kinesis"` or `"dynamodb"`.
        service: &'static str,
        /// What the emulator reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },

    /// A Kinesis request made by a helper of this crate failed.
    #[error("Kinesis {operation} failed: {source}")]
    Kinesis {
        /// The API operation, for example `"CreateStream"`.
        operation: &'static str,
        /// The typed SDK error; match on its variants (for example
        /// `ResourceInUseException` when the stream already exists).
        #[source]
        source: Box<aws_sdk_kinesis::Error>,
    },

    /// [`put_records`](crate::put_records) could not write a record for a reason
    /// retrying would not change (a missing stream, for example).
    #[error("writing records failed")]
    Producer {
        /// The producer's error.
        #[source]
        source: kcl_producer::ProducerError,
    },

    /// Some records were still refused after every retry of [`put_records`](crate::put_records).
    #[error("{failed} records could not be written after {attempts} attempts (last error code {last_error_code:?})")]
    PutRecordsIncomplete {
        /// How many records were not written.
        failed: usize,
        /// How many times they were sent.
        attempts: u32,
        /// The error code Kinesis gave the last failed entry.
        last_error_code: Option<String>,
    },

    /// A resource did not reach the awaited state in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited, for example `stream "orders" to become ACTIVE`.
        what: String,
        /// How long the helper waited.
        waited: Duration,
    },
}

impl LocalError {
    /// Wraps an SDK error of the Kinesis operation `operation`.
    pub(crate) fn kinesis(operation: &'static str, error: impl Into<aws_sdk_kinesis::Error>) -> Self {
        Self::Kinesis {
            operation,
            source: Box::new(error.into()),
        }
    }

    /// Wraps a start-up failure reported by an emulator.
    pub(crate) fn server(
        service: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self::Server {
            service,
            source: source.into(),
        }
    }
}
