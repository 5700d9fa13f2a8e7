//! Kinesis Client Library core (work in progress).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

pub mod error;
pub mod lease;
pub mod record;
pub mod sequence;

pub use error::{CheckpointError, ConfigError, LeaseStoreError, SchedulerError};
pub use lease::{Lease, LeaseStore};
pub use record::Record;
pub use sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};
