//! An embedded Kinesis and DynamoDB on loopback, for developing, testing and benchmarking
//! Kinesis consumers without an AWS account.
//!
//! [`LocalBackend::start`] runs [ferrokinesis] (Kinesis) and [dynoxide] (DynamoDB on
//! SQLite) in-process on `127.0.0.1`, each on its own thread and Tokio runtime, in a few
//! milliseconds. They speak the real AWS wire protocols, so the stock SDK clients talk to
//! them: take [`LocalBackend::kinesis_sdk_config`] and [`LocalBackend::dynamodb_sdk_config`]
//! (or the ready-made clients) and hand them to the code under test. The `kcl-local serve`
//! binary runs the same backend as a process, for tests in other languages or processes;
//! point SDKs at it with [`sdk_config_for_endpoint`].
//!
//! Known gaps of the emulators are listed in the project's design notes (for example,
//! ferrokinesis never returns `ChildShards` from `GetRecords`); code under test must not
//! rely on an emulator's quirk.
//!
//! # Modules
//!
//! - `backend`: [`LocalBackend`], which starts, describes and stops both emulators.
//! - `options`: [`LocalOptions`], the backend's settings, read by `backend` and by both
//!   emulator modules.
//! - `kinesis`: the ferrokinesis server: an HTTP/1.1 + h2c accept loop with graceful
//!   shutdown, and durable state under the data directory.
//! - `dynamodb`: the dynoxide server, in memory or on a SQLite file.
//! - `thread`: runs each emulator on a dedicated thread with its own Tokio runtime, and
//!   waits for it without blocking the caller; binds the loopback listeners.
//! - `config`: [`sdk_config_for_endpoint`], SDK configuration with static test
//!   credentials.
//! - `setup`: [`create_stream`], a helper that creates a stream and waits for `ACTIVE`.
//! - `error`: [`LocalError`].
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use aws_sdk_kinesis::primitives::Blob;
//!
//! let backend = kcl_local::LocalBackend::start().await?;
//! let kinesis = backend.kinesis_client();
//! kcl_local::create_stream(&kinesis, "orders", 4).await?;
//! kinesis
//!     .put_record()
//!     .stream_name("orders")
//!     .partition_key("customer-1")
//!     .data(Blob::new("hello"))
//!     .send()
//!     .await?;
//! // Point the code under test at backend.kinesis_sdk_config() and
//! // backend.dynamodb_sdk_config().
//! backend.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! [ferrokinesis]: https://crates.io/crates/ferrokinesis
//! [dynoxide]: https://crates.io/crates/dynoxide-rs

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod backend;
mod config;
mod dynamodb;
mod error;
mod kinesis;
mod options;
mod setup;
mod thread;

pub use backend::LocalBackend;
pub use config::sdk_config_for_endpoint;
pub use error::LocalError;
pub use options::LocalOptions;
pub use setup::{create_stream, put_records, PutResult};
