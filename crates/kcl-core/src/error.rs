//! Typed errors. Each enum has one variant per way the caller should react: back off
//! and retry, stop and not checkpoint, fix the input, or fix the deployment.

use std::error::Error as StdError;

/// A boxed error from a dependency (an AWS SDK call, a processor), kept as the source.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Displays an error with its whole `source()` chain, `outer: cause: root cause`, the way
/// every error is logged by this library (an AWS SDK error alone says only `service
/// error` or `dispatch failure`; its sources say which service error and why). A source
/// whose text the chain already shows is not repeated.
///
/// ```
/// use kcl_core::error::ErrorChain;
/// let io = std::io::Error::new(std::io::ErrorKind::Other, "connection reset");
/// let e = kcl_core::LeaseStoreError::Dependency { message: "renewal".into(), source: io.into() };
/// assert_eq!(ErrorChain(&e).to_string(), "lease store request failed: renewal: connection reset");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.to_string();
        let mut source = self.0.source();
        // Bounded: a cyclic chain (a bug elsewhere) must not hang logging.
        for _ in 0..32 {
            let Some(e) = source else { break };
            let text = e.to_string();
            if !text.is_empty() && !shown.contains(&text) {
                shown.push_str(": ");
                shown.push_str(&text);
            }
            source = e.source();
        }
        f.write_str(&shown)
    }
}

/// The error a [`RecordProcessor`](crate::RecordProcessor) method returns. Anything that
/// converts into a boxed error works with `?`, `anyhow::Error` included.
pub type ProcessorError = BoxError;

/// A string that is not a Kinesis sequence number or checkpoint sentinel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sequence number {0:?}: expected decimal digits or a KCL sentinel")]
pub struct InvalidSequenceNumber(pub String);

/// Errors of a [`LeaseStore`](crate::LeaseStore).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseStoreError {
    /// The store throttled the request: back off and retry.
    #[error("lease store throttled the request")]
    Throttled(#[source] BoxError),
    /// A transient failure (network, timeout, 5xx): the outcome is unknown; retry.
    #[error("lease store request failed: {message}")]
    Dependency {
        /// What was being done.
        message: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// The lease table does not exist (and was not created).
    #[error("lease table {table:?} does not exist")]
    TableNotFound {
        /// The table name.
        table: String,
    },
    /// A table with the lease table's name exists but cannot be a lease table: fix the
    /// deployment (another application name, or another table).
    #[error("table {table:?} is not a usable lease table: {reason}")]
    InvalidTable {
        /// The table name.
        table: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A lease item has an attribute that cannot be read. The lease is left alone.
    #[error("lease {lease_key:?} has a corrupt attribute {attribute:?}: {reason}")]
    CorruptLease {
        /// The item's `leaseKey`.
        lease_key: String,
        /// The attribute that could not be read.
        attribute: String,
        /// Why.
        reason: String,
    },
}

impl LeaseStoreError {
    /// True when retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Dependency { .. })
    }
}

/// Why a requested checkpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidCheckpointReason {
    /// Before the checkpoint already stored: checkpoints never move backwards.
    Backwards,
    /// After the last record delivered to the processor.
    BeyondLastDelivered,
    /// `SHARD_END` requested before the shard was read to its end.
    ShardNotEnded,
}

/// Errors of a [`Checkpointer`](crate::Checkpointer).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// This worker no longer holds the shard's lease (another worker took it, or the
    /// consumer is shutting down after losing it). Stop processing; do not retry. The
    /// Java KCL's `ShutdownException`.
    #[error("lease for shard {shard_id} is lost; the checkpoint was not written")]
    LeaseLost {
        /// The shard.
        shard_id: String,
    },
    /// The requested position is not a valid checkpoint now; fix the caller.
    #[error("invalid checkpoint {requested} for shard {shard_id}: {reason:?}")]
    InvalidSequenceNumber {
        /// The shard.
        shard_id: String,
        /// The requested position.
        requested: String,
        /// Why it was refused.
        reason: InvalidCheckpointReason,
    },
    /// The checkpointer cannot be used in this state, for example a checkpoint before
    /// any record was delivered or after the processor returned from shutdown.
    #[error("cannot checkpoint shard {shard_id}: {reason}")]
    InvalidState {
        /// The shard.
        shard_id: String,
        /// Why.
        reason: String,
    },
    /// The lease store throttled the write: back off and retry the checkpoint.
    #[error("checkpoint of shard {shard_id} was throttled")]
    Throttled {
        /// The shard.
        shard_id: String,
        /// The store's error.
        #[source]
        source: LeaseStoreError,
    },
    /// The lease store failed; the checkpoint may or may not be stored. Retrying is safe.
    #[error("checkpoint of shard {shard_id} failed")]
    Dependency {
        /// The shard.
        shard_id: String,
        /// The store's error.
        #[source]
        source: LeaseStoreError,
    },
    /// The lease table cannot take the write and retrying will not change that: it is
    /// gone, it is not a lease table, or the shard's lease item cannot be read. The
    /// checkpoint was not written. Stop processing the shard and have an operator look
    /// at the table (the Java KCL's `InvalidStateException`).
    #[error("checkpoint of shard {shard_id} cannot be written to the lease table")]
    LeaseTableUnusable {
        /// The shard.
        shard_id: String,
        /// The store's error, naming the table or the item.
        #[source]
        source: LeaseStoreError,
    },
}

impl CheckpointError {
    /// True when the same checkpoint may succeed later (throttled, or the store failed):
    /// retry it, or let a later checkpoint cover it.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Dependency { .. })
    }

    /// True when this worker no longer holds the lease: stop processing the shard, do not
    /// retry; the next owner resumes after the last stored checkpoint.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, Self::LeaseLost { .. })
    }
}

/// A configuration value that cannot work, reported by a builder's `build()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration `{field}`: {reason}")]
pub struct ConfigError {
    /// The field, as `area.field`.
    pub field: &'static str,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Errors that end [`Scheduler::run`](crate::Scheduler::run).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stream does not exist (or is not visible with these credentials).
    #[error("stream {stream:?} not found")]
    StreamNotFound {
        /// The stream name or ARN.
        stream: String,
    },
    /// The lease store cannot be used (wrong table shape, corrupt lease, persistent failure).
    #[error("lease store failed")]
    LeaseStore(#[from] LeaseStoreError),
    /// A Kinesis call failed in a way retries did not fix.
    #[error("kinesis {operation} failed")]
    Kinesis {
        /// The API operation.
        operation: &'static str,
        /// The SDK error.
        #[source]
        source: BoxError,
    },
    /// The retrieval could not be set up: for enhanced fan-out, the stream consumer could
    /// not be registered or did not become active. The source says why (for fan-out, a
    /// `kcl_efo::FanOutError`).
    #[error("retrieval could not be set up")]
    Retrieval {
        /// The retrieval's error.
        #[source]
        source: BoxError,
    },
    /// A processor kept failing on a batch and the
    /// [`ProcessorErrorPolicy`](crate::config::ProcessorErrorPolicy) says to stop.
    /// Nothing past the shard's last checkpoint was skipped.
    #[error("record processor for shard {shard_id} failed")]
    ProcessorFailed {
        /// The shard.
        shard_id: String,
        /// The processor's last error (or a description of its panic).
        #[source]
        source: BoxError,
    },
}
