//! [`LocalOptions`]: how the embedded backend is started (ports, data directory, region,
//! stream delays, shard limit).
//!
//! A leaf of the crate: read by [`LocalBackend`](crate::LocalBackend) and by the two
//! emulator modules (`kinesis`, `dynamodb`), which depend on nothing else of the backend.

use std::path::PathBuf;
use std::time::Duration;

/// Options for the embedded backend.
///
/// Start from [`LocalOptions::default`] and change the fields you need:
///
/// ```
/// let mut options = kcl_local::LocalOptions::default();
/// options.shard_limit = 50;
/// options.stream_delay = std::time::Duration::ZERO;
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LocalOptions {
    /// Port of the Kinesis emulator on `127.0.0.1`. Default `0`: any free port (read the
    /// real one from [`LocalBackend::kinesis_endpoint`](crate::LocalBackend::kinesis_endpoint)).
    pub kinesis_port: u16,
    /// Port of the DynamoDB emulator on `127.0.0.1`. Default `0`: any free port.
    pub dynamodb_port: u16,
    /// Where to keep state across restarts. Default `None`: everything is in memory and
    /// gone at shutdown. With a directory, DynamoDB tables live in the SQLite file
    /// `dynamodb.sqlite` and Kinesis streams and records in the folder `kinesis/`.
    /// Kinesis persistence writes the whole store on every mutation: fine for
    /// development, too slow for benchmarks.
    pub data_dir: Option<PathBuf>,
    /// The AWS region the emulators report in ARNs, and that the SDK configs use.
    /// Default `us-east-1`.
    pub region: String,
    /// How long a stream stays `CREATING` (or `UPDATING` after `UpdateShardCount`,
    /// `SplitShard`, `MergeShards`; `DELETING` after `DeleteStream`) before the change
    /// takes effect. Default 10 ms: short for fast tests, but not zero, so code that
    /// forgets to wait for `ACTIVE` still fails. AWS takes tens of seconds.
    pub stream_delay: Duration,
    /// The most open shards all streams together may have; more gives
    /// `LimitExceededException`. Default 1000 (ferrokinesis's own default is 10).
    pub shard_limit: u32,
}

impl Default for LocalOptions {
    fn default() -> Self {
        Self {
            kinesis_port: 0,
            dynamodb_port: 0,
            data_dir: None,
            region: "us-east-1".to_owned(),
            stream_delay: Duration::from_millis(10),
            shard_limit: 1000,
        }
    }
}
