//! # kcl-efo: enhanced fan-out for the Kinesis Client Library
//!
//! Enhanced fan-out gives an application its own 2 MB/s per shard, pushed over
//! `SubscribeToShard` instead of polled with `GetRecords`, through a *stream consumer*
//! registered on the stream. This crate is the fan-out implementation of `kcl-core`'s
//! retrieval seam: the processor code is the same as with polling, and one configuration
//! value, [`RetrievalMode`], selects either.
//!
//! ```no_run
//! use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
//! # async fn run(kinesis: aws_sdk_kinesis::Client, store: impl kcl_core::LeaseStore,
//! #   factory: impl kcl_core::RecordProcessorFactory) -> Result<(), Box<dyn std::error::Error>> {
//! let scheduler = kcl_core::Scheduler::builder("my-stream")
//!     .kinesis_client(kinesis)
//!     .lease_store(store)
//!     .processor_factory(factory)
//!     .retrieval_mode(RetrievalMode::FanOut(FanOutConfig::new("my-application")))?
//!     .build()?;
//! scheduler.run().await?;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//! - `config`: [`FanOutConfig`] (consumer name, subscription lifetime, idle timeout,
//!   backoff, prefetch limits) and [`RetrievalMode`] with [`SchedulerBuilderExt`].
//! - `registration`: [`register_stream_consumer`] (idempotent, waits for `ACTIVE`) and
//!   [`deregister_stream_consumer`], an explicit operation never done by a worker that
//!   merely stops.
//! - `publisher`: [`FanOutRetrievalFactory`] and the per-shard `SubscribeToShard` task
//!   with resubscription, backpressure and shard-end detection.
//! - `error`: [`FanOutError`].
//!
//! ## Metrics
//! Besides the per-shard metrics every retrieval has (`kcl_records_processed_total`,
//! `kcl_millis_behind_latest`): `kcl_fanout_resubscriptions_total{shard_id}` (every
//! subscription after a shard's first) and `kcl_fanout_subscription_errors_total{shard_id}`
//! (refused subscriptions and failed event streams).
//!
//! ## What the local backends do
//! See the crate README's table (checked by the tests in `tests/tests/fan_out.rs`).
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod config;
mod error;
mod publisher;
mod registration;

pub use config::{FanOutConfig, RetrievalMode, SchedulerBuilderExt};
pub use error::FanOutError;
pub use publisher::FanOutRetrievalFactory;
pub use registration::{deregister_stream_consumer, register_stream_consumer, stream_arn, StreamConsumer};
