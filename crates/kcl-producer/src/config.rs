//! [`ProducerConfig`]: buffering, batching, retries, ordering, aggregation and rate
//! limits, named after the KPL's settings where one exists.

use std::time::Duration;

/// How a [`crate::KinesisProducer`] buffers, batches and retries.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// How long a record may wait for others to fill its `PutRecords` call while
    /// another call is in flight (the KPL's `RecordMaxBufferedTime`). With no call in
    /// flight a record is sent at once. Default 20 ms.
    pub record_max_buffered_time: Duration,
    /// How long a record may take, retries included, before its future fails with
    /// [`crate::ProducerError::Expired`] (the KPL's `RecordTtl`). Default 30 s.
    pub record_ttl: Duration,
    /// The most `PutRecords` calls in flight at once (the KPL's `MaxConnections`).
    /// Default 16.
    pub max_in_flight_calls: usize,
    /// Bound of one `PutRecords` call; a call that takes longer counts as failed with
    /// an unknown outcome (the KPL's `RequestTimeout`). Default 6 s.
    pub request_timeout: Duration,
    /// The most records buffered (put and not yet resolved): `put` waits for room
    /// beyond it. Default 100,000.
    pub max_buffered_records: usize,
    /// The most bytes of data buffered: `put` waits for room beyond it. Default 64 MiB.
    pub max_buffered_bytes: usize,
    /// Keep each partition key's records in order: a record is not sent while an
    /// earlier record of its key is in flight or waiting to be retried. Turn off for
    /// throughput when order does not matter (records of one key are then sent
    /// together and retried independently). With aggregation, order is kept per
    /// predicted shard; after the stream is resharded, new records wait until the
    /// records put before the new shard map was read are written or failed. Default on.
    pub ordered_per_key: bool,
    /// Pack records whose keys map to the same shard into KPL aggregated records (the
    /// KPL's `AggregationEnabled`). Consumers de-aggregate them: `kcl-core` and the
    /// Java KCL do. Default off.
    pub aggregation_enabled: bool,
    /// The most bytes of one aggregated record (the KPL's `AggregationMaxSize`).
    /// Default 50 KiB.
    pub aggregation_max_size: usize,
    /// The most records in one aggregated record (the KPL's `AggregationMaxCount`).
    /// Default 1,000.
    pub aggregation_max_count: usize,
    /// Hold each shard to `per_shard_records_per_second` and `per_shard_bytes_per_second`
    /// (the service's limits), so a hot key slows the caller instead of being
    /// throttled (the KPL's `RateLimit`). Default on.
    pub rate_limit_enabled: bool,
    /// Records a second one shard accepts. Default 1,000 (the service limit).
    pub per_shard_records_per_second: u32,
    /// Bytes a second one shard accepts. Default 1 MiB (the service limit).
    pub per_shard_bytes_per_second: u32,
    /// The first retry's backoff; it doubles per attempt, with jitter. Default 100 ms.
    pub min_retry_backoff: Duration,
    /// The longest retry backoff. Default 5 s.
    pub max_retry_backoff: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            record_max_buffered_time: Duration::from_millis(20),
            record_ttl: Duration::from_secs(30),
            max_in_flight_calls: 16,
            request_timeout: Duration::from_secs(6),
            max_buffered_records: 100_000,
            max_buffered_bytes: 64 << 20,
            ordered_per_key: true,
            aggregation_enabled: false,
            aggregation_max_size: 50 << 10,
            aggregation_max_count: 1000,
            rate_limit_enabled: true,
            per_shard_records_per_second: 1000,
            per_shard_bytes_per_second: 1 << 20,
            min_retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(5),
        }
    }
}
