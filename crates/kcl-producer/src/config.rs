//! [`ProducerConfig`]: buffering, batching, retries, ordering, aggregation and rate
//! limits, named after the KPL's settings where one exists.

use std::time::Duration;

use crate::error::ConfigError;

/// How a [`crate::KinesisProducer`] buffers, batches and retries. Checked by
/// [`ProducerConfig::validate`] when the producer is made; every duration is at most
/// [`ProducerConfig::MAX_DURATION`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ProducerConfig {
    /// How long a record may wait for others to fill its `PutRecords` call while
    /// another call is in flight (the KPL's `RecordMaxBufferedTime`). With no call in
    /// flight a record is sent at once. Zero allowed. Default 20 ms.
    pub record_max_buffered_time: Duration,
    /// How long a record may take, retries included, before its future fails with
    /// [`crate::ProducerError::Expired`] (the KPL's `RecordTtl`). Above zero.
    /// Default 30 s.
    pub record_ttl: Duration,
    /// The most `PutRecords` calls in flight at once (the KPL's `MaxConnections`).
    /// At least 1. Default 16.
    pub max_in_flight_calls: usize,
    /// Bound of one `PutRecords` call; a call that takes longer counts as failed with
    /// an unknown outcome (the KPL's `RequestTimeout`). Default 6 s.
    pub request_timeout: Duration,
    /// The most records buffered (put and not yet resolved): `put` waits for room
    /// beyond it. At least 1. Default 100,000.
    pub max_buffered_records: usize,
    /// The most bytes of data buffered: `put` waits for room beyond it. At least
    /// `max_record_size`, so that any valid record fits. Default 64 MiB.
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
    /// From 1 byte to `max_record_size`. Default 50 KiB.
    pub aggregation_max_size: usize,
    /// The most records in one aggregated record (the KPL's `AggregationMaxCount`).
    /// At least 1. Default 1,000.
    pub aggregation_max_count: usize,
    /// Hold each shard to `per_shard_records_per_second` and `per_shard_bytes_per_second`
    /// (the service's limits), so a hot key slows the caller instead of being
    /// throttled (the KPL's `RateLimit`). Default on.
    pub rate_limit_enabled: bool,
    /// Records a second one shard accepts. At least 1 (checked even with rate limits
    /// off). Default 1,000 (the service limit).
    pub per_shard_records_per_second: u32,
    /// Bytes a second one shard accepts. At least 1. Default 1 MiB (the service limit).
    pub per_shard_bytes_per_second: u32,
    /// The first retry's backoff; it doubles per attempt, with jitter. Above zero and
    /// at most `max_retry_backoff`. Default 100 ms.
    pub min_retry_backoff: Duration,
    /// The longest retry backoff. Default 5 s.
    pub max_retry_backoff: Duration,
    /// The largest record `put` accepts, data and partition key together, in bytes:
    /// larger ones are refused with [`crate::InvalidRecord::TooLarge`]. Kinesis takes
    /// records up to 1 MiB by default and up to 10 MiB on a stream whose maximum was
    /// raised (`UpdateMaxRecordSize`); set this to the stream's maximum. A record over
    /// 5 MiB (the most one `PutRecords` call carries otherwise) is sent in a call of
    /// its own. From 1 byte to [`ProducerConfig::MAX_RECORD_SIZE`] (10 MiB). Default
    /// 1 MiB.
    pub max_record_size: usize,
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
            max_record_size: 1 << 20,
        }
    }
}

impl ProducerConfig {
    /// The longest duration any setting may have (365 days): far beyond any useful
    /// value, and far from where `Instant + Duration` overflows.
    pub const MAX_DURATION: Duration = kcl_core::MAX_DURATION;

    /// The largest `max_record_size` (10 MiB), Kinesis's largest record.
    pub const MAX_RECORD_SIZE: usize = 10 << 20;

    /// Checks every setting against its documented range.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first field out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, value: impl std::fmt::Debug, requirement: &'static str) -> ConfigError {
            ConfigError::Invalid {
                field,
                value: format!("{value:?}"),
                requirement,
            }
        }
        let durations = [
            ("record_max_buffered_time", self.record_max_buffered_time, false),
            ("record_ttl", self.record_ttl, true),
            ("request_timeout", self.request_timeout, true),
            ("min_retry_backoff", self.min_retry_backoff, true),
            ("max_retry_backoff", self.max_retry_backoff, true),
        ];
        for (field, value, above_zero) in durations {
            if value > Self::MAX_DURATION {
                return Err(invalid(field, value, "it must be at most 365 days"));
            }
            if above_zero && value.is_zero() {
                return Err(invalid(field, value, "it must be above zero"));
            }
        }
        if self.min_retry_backoff > self.max_retry_backoff {
            return Err(invalid(
                "min_retry_backoff",
                self.min_retry_backoff,
                "it must be at most max_retry_backoff",
            ));
        }
        let at_least_one = [
            ("max_in_flight_calls", self.max_in_flight_calls),
            ("max_buffered_records", self.max_buffered_records),
            ("aggregation_max_count", self.aggregation_max_count),
            ("aggregation_max_size", self.aggregation_max_size),
            ("max_record_size", self.max_record_size),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return Err(invalid(field, value, "it must be at least 1"));
            }
        }
        for (field, value) in [
            ("per_shard_records_per_second", self.per_shard_records_per_second),
            ("per_shard_bytes_per_second", self.per_shard_bytes_per_second),
        ] {
            if value == 0 {
                return Err(invalid(field, value, "it must be at least 1"));
            }
        }
        if self.max_record_size > Self::MAX_RECORD_SIZE {
            return Err(invalid(
                "max_record_size",
                self.max_record_size,
                "it must be at most 10 MiB (10485760 bytes), Kinesis's largest record",
            ));
        }
        if self.aggregation_max_size > self.max_record_size {
            return Err(invalid(
                "aggregation_max_size",
                self.aggregation_max_size,
                "it must be at most max_record_size",
            ));
        }
        if self.max_buffered_bytes < self.max_record_size {
            return Err(invalid(
                "max_buffered_bytes",
                self.max_buffered_bytes,
                "it must be at least max_record_size, so that any record fits",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &ProducerConfig) -> Option<&'static str> {
        match config.validate() {
            Ok(()) => None,
            Err(ConfigError::Invalid { field, .. }) => Some(field),
        }
    }

    #[test]
    fn the_default_is_valid_and_each_bad_field_is_named() {
        assert_eq!(ProducerConfig::default().validate(), Ok(()));
        type Change = fn(&mut ProducerConfig);
        let cases: [(&str, Change); 17] = [
            ("max_record_size", |c| c.max_record_size = 0),
            ("max_record_size", |c| c.max_record_size = (10 << 20) + 1),
            ("max_buffered_bytes", |c| {
                c.max_record_size = 10 << 20;
                c.max_buffered_bytes = 5 << 20;
            }),
            ("record_max_buffered_time", |c| {
                c.record_max_buffered_time = Duration::MAX
            }),
            ("record_ttl", |c| c.record_ttl = Duration::ZERO),
            ("record_ttl", |c| {
                c.record_ttl = ProducerConfig::MAX_DURATION + Duration::from_secs(1)
            }),
            ("request_timeout", |c| c.request_timeout = Duration::ZERO),
            ("min_retry_backoff", |c| c.min_retry_backoff = Duration::ZERO),
            ("min_retry_backoff", |c| c.min_retry_backoff = Duration::from_secs(10)),
            ("max_retry_backoff", |c| c.max_retry_backoff = Duration::MAX),
            ("max_in_flight_calls", |c| c.max_in_flight_calls = 0),
            ("max_buffered_records", |c| c.max_buffered_records = 0),
            ("aggregation_max_count", |c| c.aggregation_max_count = 0),
            ("aggregation_max_size", |c| c.aggregation_max_size = (1 << 20) + 1),
            ("per_shard_records_per_second", |c| c.per_shard_records_per_second = 0),
            ("per_shard_bytes_per_second", |c| c.per_shard_bytes_per_second = 0),
            ("max_buffered_bytes", |c| c.max_buffered_bytes = 1000),
        ];
        for (field, change) in cases {
            let mut config = ProducerConfig::default();
            change(&mut config);
            assert_eq!(field_of(&config), Some(field), "{config:?}");
        }
        let large = ProducerConfig {
            max_record_size: 10 << 20,
            aggregation_max_size: 10 << 20,
            ..ProducerConfig::default()
        };
        assert_eq!(large.validate(), Ok(()));
        let zero_linger = ProducerConfig {
            record_max_buffered_time: Duration::ZERO,
            ..ProducerConfig::default()
        };
        assert_eq!(zero_linger.validate(), Ok(()));
        let message = ProducerConfig {
            per_shard_records_per_second: 0,
            ..ProducerConfig::default()
        }
        .validate()
        .expect_err("zero rate")
        .to_string();
        assert_eq!(
            message,
            "invalid producer config: per_shard_records_per_second is 0; it must be at least 1"
        );
    }
}
