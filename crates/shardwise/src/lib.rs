//! # Shardwise
//!
//! A Kinesis Client Library for Rust, in one dependency: read a Kinesis stream with
//! many workers that share its shards through leases in DynamoDB, in the spirit of the
//! Java KCL (and its lease table, so a migrating team keeps its checkpoints).
//!
//! ```no_run
//! use shardwise::{ProcessRecordsInput, ProcessorError, RecordProcessor};
//!
//! #[derive(Debug)]
//! struct Printer;
//!
//! #[shardwise::async_trait]
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
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let aws = shardwise::aws_config::load_defaults(shardwise::aws_config::BehaviorVersion::latest()).await;
//! let config = shardwise::config_file::AppConfig::load(Some("shardwise.toml".as_ref()))?;
//! let scheduler = config
//!     .scheduler_builder(&aws)?
//!     .processor_factory(|_shard: &str| Printer)
//!     .build()?;
//! scheduler.run().await?;
//! # Ok(())
//! # }
//! ```
//!
//! What is here:
//! - everything of `kcl-core` at the root: [`RecordProcessor`], [`Scheduler`],
//!   [`Checkpointer`], the config structs, errors;
//! - [`ConfigsBuilder`] (feature `dynamodb`, default): a scheduler builder for an
//!   application and a stream from an [`aws_config::SdkConfig`];
//! - [`config_file`] (feature `config-file`, default): the same from a TOML file with
//!   human durations and environment overrides;
//! - [`dynamo`] (feature `dynamodb`): the DynamoDB lease store;
//! - `fan_out` (feature `fan-out`): enhanced fan-out;
//! - `producer` (feature `producer`): the producer (batched `PutRecords`, retries,
//!   per-key order, aggregation);
//! - `local` (feature `local`): an embedded Kinesis + DynamoDB for development and tests;
//! - `prometheus` (feature `prometheus`): a `/metrics` endpoint for the library's
//!   metrics;
//! - `admin` (feature `admin`): what the `shardwise-admin` binary does (leases,
//!   workers, lag, checkpoints, fan-out consumers, deleting an application).

pub use async_trait::async_trait;
pub use aws_config;
pub use kcl_core::*;

#[cfg(feature = "admin")]
pub mod admin;
#[cfg(feature = "config-file")]
pub mod config_file;
#[cfg(feature = "dynamodb")]
mod configs;
#[cfg(feature = "prometheus")]
pub mod prometheus;
#[cfg(feature = "dynamodb")]
pub use configs::ConfigsBuilder;

/// The DynamoDB lease store (`kcl-dynamo`).
#[cfg(feature = "dynamodb")]
pub use kcl_dynamo as dynamo;
/// Enhanced fan-out (`kcl-efo`).
#[cfg(feature = "fan-out")]
pub use kcl_efo as fan_out;
/// The embedded Kinesis + DynamoDB (`kcl-local`).
#[cfg(feature = "local")]
pub use kcl_local as local;
/// The producer (`kcl-producer`).
#[cfg(feature = "producer")]
pub use kcl_producer as producer;
