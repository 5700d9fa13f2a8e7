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
//!   backoff, prefetch limits) and [`RetrievalMode`]; a leaf the other modules use.
//! - `builder`: [`SchedulerBuilderExt`], which applies a [`RetrievalMode`] to the
//!   scheduler builder.
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
//! Checked by experiment (and the tests in `tests/tests/fan_out.rs`), against the
//! DESIGN notes' doubts. The publisher is correct on all three.
//!
//! | | AWS | ferrokinesis 0.7 (embedded) | kinesis-mock 0.6 (npm) |
//! |---|---|---|---|
//! | starting position | honoured | **only `TRIM_HORIZON` and `LATEST`**: `AT_`/`AFTER_SEQUENCE_NUMBER` and `AT_TIMESTAMP` are dropped by its request validation, every subscription starts at the shard's first record | all honoured (a sequence number not in the shard falls back to `TRIM_HORIZON`) |
//! | events | at least every 5 s | the backlog (up to 10,000 records) at once, then every 200 ms | the backlog, then every second; `send()` itself waits for the first event |
//! | continuation | the last record's | past the last record (not a record's number) | the last record's |
//! | shard end | `ChildShards`, empty continuation | `ChildShards` on every event of a closed shard, then the stream ends | **never** on the subscription; `GetRecords` shows it |
//! | second subscription, same shard | `ResourceInUseException` | allowed | `ResourceInUseException` in the event stream (HTTP 200), until about a second after the first was dropped |
//! | consumer `ACTIVE` after | seconds | 500 ms | the configured transition (200 ms in the tests) |
//!
//! What follows for the publisher: records before the requested position are dropped
//! (so a replaying backend causes no duplicate, even before the consumer has delivered
//! anything); a record-less event with `ChildShards` ends the shard; a shard that stays
//! quiet is checked with `GetRecords`; refusals are recognised in the response and in the
//! event stream. Calls by `StreamARN` alone fail on ferrokinesis except the consumer
//! APIs, so streams are named, and the stream ARN is only used to register consumers.
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod builder;
mod config;
mod error;
mod publisher;
mod registration;

pub use builder::SchedulerBuilderExt;
pub use config::{FanOutConfig, RetrievalMode};
pub use error::FanOutError;
pub use publisher::FanOutRetrievalFactory;
pub use registration::{deregister_stream_consumer, register_stream_consumer, stream_arn, StreamConsumer};
