//! # kcl-core: the Kinesis Client Library for Rust
//!
//! A consumer framework for Amazon Kinesis Data Streams in the spirit of the Java KCL:
//! workers share a stream's shards through leases kept in a lease table, hand each
//! shard's records in order to your [`RecordProcessor`], and record progress as
//! checkpoints in the lease. This crate has no DynamoDB dependency: the lease table is a
//! [`LeaseStore`], implemented on DynamoDB by the crate `kcl-dynamo`.
//!
//! ```no_run
//! use kcl_core::{ProcessRecordsInput, RecordProcessor, ProcessorError, Scheduler};
//!
//! struct Printer;
//!
//! #[async_trait::async_trait]
//! impl RecordProcessor for Printer {
//!     async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
//!         for record in &input.records {
//!             println!("{} bytes at {}", record.data.len(), record.sequence_number);
//!         }
//!         input.checkpointer.checkpoint().await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn run(kinesis: aws_sdk_kinesis::Client, store: impl kcl_core::LeaseStore) -> Result<(), Box<dyn std::error::Error>> {
//! let scheduler = Scheduler::builder("my-stream")
//!     .kinesis_client(kinesis)
//!     .lease_store(store)
//!     .processor_factory(|_shard_id: &str| Printer)
//!     .build()?;
//! let shutdown = scheduler.shutdown_handle();
//! tokio::spawn(async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     shutdown.shutdown();
//! });
//! scheduler.run().await?;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//! - [`processor`]: the [`RecordProcessor`] trait you implement, its inputs, and the factory.
//! - [`checkpoint`]: the [`Checkpointer`] (validated, fenced) and two-phase checkpoints.
//! - [`scheduler`]: the [`Scheduler`] that runs a worker, its builder and shutdown handle.
//! - [`stream`]: stream identifiers, per-stream settings and the [`MultiStreamTracker`]
//!   of an application that consumes many streams with one fleet and lease table.
//! - [`config`]: one config struct per area, with the Java KCL's defaults.
//! - [`lease`]: the [`Lease`] model, the [`LeaseStore`] trait, and lease management
//!   (renewing, taking, handing over, cleaning up, the leader), one role per file.
//! - [`consumer`]: the per-shard state machine ([`ShardConsumerState`], [`ShutdownReason`]).
//! - [`record`]: the [`Record`] handed to processors.
//! - [`sequence`]: sequence numbers, checkpoint sentinels, [`ExtendedSequenceNumber`].
//! - [`aggregation`]: KPL aggregated-record de-aggregation (and aggregation, for tests).
//! - [`retry`]: the one retry policy (exponential backoff, full jitter).
//! - [`retrieval`]: how shards are read, behind one seam ([`RetrievalFactory`],
//!   [`RecordsPublisher`]): polling `GetRecords` here, enhanced fan-out in `kcl-efo`.
//! - [`metrics`]: the counters and gauges emitted, through the `metrics` facade.
//! - [`error`]: typed errors, one variant per way to react.
//!
//! Internal modules: `shard_detector` (`ListShards`), `shard_sync` (lease creation for
//! the shards listed), `streams` (the streams a scheduler consumes now), `limits` (the
//! bound every configured duration shares).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

pub mod aggregation;
pub mod checkpoint;
pub mod config;
pub mod consumer;
pub mod error;
pub mod lease;
mod limits;
pub mod metrics;
pub mod processor;
pub mod record;
pub mod retrieval;
pub mod retry;
pub mod scheduler;
pub mod sequence;
mod shard_detector;
mod shard_sync;
pub mod stream;
mod streams;

pub use checkpoint::{Checkpointer, PreparedCheckpointer};
pub use config::{
    check_max_durations, CoordinatorConfig, InitialPositionInStream, LeaseBalancing, LeaseManagementConfig,
    OnProcessorFailure, ProcessorErrorPolicy, RetrievalConfig, MAX_DURATION,
};
pub use consumer::{ShardConsumerState, ShutdownReason};
pub use error::{CheckpointError, ConfigError, LeaseStoreError, ProcessorError, SchedulerError};
pub use lease::{InMemoryLeaseStore, LeaderLock, Lease, LeaseListing, LeaseStore};
pub use processor::{
    stream_processor_factory, DeadLetterInput, DeadLetterSink, InitializationInput, LeaseLostInput,
    ProcessRecordsInput, RecordProcessor, RecordProcessorFactory, ShardEndedInput, ShutdownRequestedInput,
};
pub use record::Record;
pub use retrieval::{PollingRetrievalFactory, RecordsPublisher, RetrievalFactory};
pub use retry::RetryPolicy;
pub use scheduler::{Scheduler, SchedulerBuilder, ShutdownHandle};
pub use sequence::{Checkpoint, ExtendedSequenceNumber, SequenceNumber};
pub use stream::{FormerStreamsLeasesDeletion, MultiStreamConfig, MultiStreamTracker, StreamConfig, StreamIdentifier};
