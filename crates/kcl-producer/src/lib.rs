//! # kcl-producer
//!
//! The producer half of the Kinesis Client Library: an async [`KinesisProducer`] that
//! batches records into `PutRecords` calls, retries the entries a response marks as
//! failed, keeps each partition key's records in order, optionally packs small records
//! into KPL aggregated records (read back record for record by `kcl-core` and the Java
//! KCL), and slows the caller down, rather than provoking throttling storms, when the
//! buffer is full or a shard is at its limits.
//!
//! ```no_run
//! # async fn example(kinesis: aws_sdk_kinesis::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use kcl_producer::{KinesisProducer, ProducerConfig};
//!
//! let producer = KinesisProducer::try_new(kinesis, "orders", ProducerConfig::default())?;
//! // `put` waits for room in the buffer; the returned future for the acknowledgement.
//! let ack = producer.put("customer-42", bytes::Bytes::from_static(b"{\"total\":12}")).await?;
//! let result = ack.await?;
//! println!("{} {}", result.shard_id, result.sequence_number);
//! producer.close().await; // writes everything still buffered
//! # Ok(())
//! # }
//! ```
//!
//! Modules:
//! - [`config`]: [`ProducerConfig`], named after the KPL's settings.
//! - [`error`]: [`ProducerError`] and [`InvalidRecord`], one variant per way the caller
//!   reacts, and [`ConfigError`] for a config out of range.
//! - the producer itself ([`KinesisProducer`], [`PutRecordResult`], [`PutFuture`]), its
//!   shard map (hash key ranges, refreshed after a reshard), the exact size of an
//!   aggregate being packed, and the per-shard rate limiter are internal.
//!
//! ## Guarantees
//! - A record's future resolves exactly once: with its shard and sequence number (and
//!   sub-sequence number when aggregated), or with a typed error.
//! - Retries never duplicate a record whose failure the service reported. A call whose
//!   outcome is unknown (a timeout or a broken connection after the request was sent)
//!   is retried too, and may then write its records twice; such records report
//!   `PutRecordResult::maybe_duplicated`. The SDK client's own retries (on by
//!   default) resend such calls without the producer knowing: give the producer a
//!   client with `RetryConfig::disabled()` to have every such case reported (the
//!   producer retries throttling and server errors itself).
//! - With `ordered_per_key` (the default), a record is never sent while an earlier
//!   record of the same partition key is in flight or waiting to be retried, so per key
//!   the sequence numbers follow the put order. This holds across a reshard: with
//!   aggregation, records are ordered per predicted shard, and when a new shard map
//!   moves keys to other shards, records formed under the new map wait until every
//!   record formed under the old one is written or failed.
//!
//! ## Metrics
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `kcl_producer_user_records_put_total` | counter | | records acknowledged |
//! | `kcl_producer_kinesis_records_put_total` | counter | | Kinesis records written (aggregates count once) |
//! | `kcl_producer_bytes_put_total` | counter | | bytes of data acknowledged |
//! | `kcl_producer_retries_total` | counter | `reason` | entries sent again, by error code |
//! | `kcl_producer_throttles_total` | counter | | entries or calls refused for throughput |
//! | `kcl_producer_failures_total` | counter | `reason` | records that could not be written |
//! | `kcl_producer_buffered_records` | gauge | | records put and not yet resolved |
//! | `kcl_producer_buffered_bytes` | gauge | | their bytes |
//! | `kcl_producer_put_latency_seconds` | histogram | | from `put` to the acknowledgement |

mod aggregate;
pub mod config;
pub mod error;
mod limiter;
mod metrics;
mod producer;
mod shard_map;

pub use config::ProducerConfig;
pub(crate) use error::error_chain;
pub use error::{ConfigError, InvalidRecord, ProducerError};
pub use producer::{KinesisProducer, PutFuture, PutRecordResult};
