//! Configuration: [`FanOutConfig`], and [`RetrievalMode`], the one value that selects
//! polling or fan-out. A leaf of the crate: the builder extension that applies a mode
//! ([`SchedulerBuilderExt`](crate::SchedulerBuilderExt), in `builder`) and the publisher
//! use it, never the other way round.

use std::time::Duration;

use kcl_core::retry::RetryPolicy;
use kcl_core::{ConfigError, RetrievalConfig};
use serde::{Deserialize, Serialize};

/// Enhanced fan-out settings (the Java KCL's `FanOutConfig`). Durations are `Duration`
/// (serde: human readable strings such as `"30s"`), every field has a default except
/// the consumer name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanOutConfig {
    /// The stream consumer's name: registered when missing, shared by every worker of
    /// the application (the Java KCL uses the application name). 1 to 128 characters of
    /// `a-z A-Z 0-9 _ . -`. Required.
    pub consumer_name: String,
    /// How long start-up waits for the consumer to become `ACTIVE` (registration takes
    /// seconds on AWS). Default 2 min.
    #[serde(with = "humantime_serde")]
    pub registration_timeout: Duration,
    /// A subscription is ended and a new one started after this long, from the last
    /// position. Kinesis ends every subscription after 5 minutes anyway; a shorter value
    /// only costs a reconnection. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub subscription_lifetime: Duration,
    /// A subscription that sends no event at all for this long is restarted (Kinesis
    /// sends one at least every 5 s, even without records). Time spent waiting for the
    /// processor does not count. Default 60 s, as the Java KCL.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// While a subscription delivers no records for this long, the publisher asks
    /// whether the shard has ended (with `GetShardIterator`/`GetRecords`), for backends
    /// that never send `ChildShards` at a shard's end. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub shard_end_check_interval: Duration,
    /// Bound of one Kinesis call (`SubscribeToShard` until its first response,
    /// registration calls). Default 30 s.
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// Backoff between subscriptions after an error, a refused subscription
    /// (`ResourceInUseException`) or throttling. Never gives up (`max_attempts` is
    /// ignored). Default 200 ms doubling to 10 s.
    pub retry: RetryPolicy,
    /// Batches (events) queued ahead of the processor. Default 3.
    pub max_pending_batches: usize,
    /// Records queued ahead of the processor before the subscription is read no further.
    /// Default 30,000.
    pub max_prefetch_records: usize,
    /// Bytes of record data queued ahead of the processor. Default 8 MiB.
    pub max_prefetch_bytes: usize,
}

impl Default for FanOutConfig {
    fn default() -> Self {
        Self {
            consumer_name: String::new(),
            registration_timeout: Duration::from_secs(120),
            subscription_lifetime: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(60),
            shard_end_check_interval: Duration::from_secs(10),
            call_timeout: Duration::from_secs(30),
            retry: RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10), None),
            max_pending_batches: 3,
            max_prefetch_records: 30_000,
            max_prefetch_bytes: 8 * 1024 * 1024,
        }
    }
}

impl FanOutConfig {
    /// The defaults with a consumer name.
    pub fn new(consumer_name: impl Into<String>) -> Self {
        Self {
            consumer_name: consumer_name.into(),
            ..Self::default()
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first field that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(reason) = check_consumer_name(&self.consumer_name) {
            return Err(ConfigError {
                field: "fan_out.consumer_name",
                reason,
            });
        }
        let positive = [
            ("fan_out.registration_timeout", self.registration_timeout),
            ("fan_out.subscription_lifetime", self.subscription_lifetime),
            ("fan_out.idle_timeout", self.idle_timeout),
            ("fan_out.shard_end_check_interval", self.shard_end_check_interval),
            ("fan_out.call_timeout", self.call_timeout),
        ];
        kcl_core::check_max_durations(&positive)?;
        self.retry.validate("fan_out.retry")?;
        for (field, value) in positive {
            if value.is_zero() {
                return Err(ConfigError {
                    field,
                    reason: "must be above zero".into(),
                });
            }
        }
        if self.max_pending_batches == 0 || self.max_prefetch_records == 0 || self.max_prefetch_bytes == 0 {
            return Err(ConfigError {
                field: "fan_out.max_pending_batches",
                reason: "prefetch limits must be above zero".into(),
            });
        }
        Ok(())
    }
}

/// Checks a stream consumer name as Kinesis does: 1 to 128 characters of
/// `a-z A-Z 0-9 _ . -`.
pub(crate) fn check_consumer_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!("must be 1 to 128 characters, got {}", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("{c:?} is not allowed: use a-z, A-Z, 0-9, '_', '.', '-'"));
    }
    Ok(())
}

/// How the shards are read: the one configuration value that switches between polling
/// and enhanced fan-out, with no change to the processor. In a config file:
/// `{"polling": {...}}` or `{"fan_out": {"consumer_name": "my-app"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum RetrievalMode {
    /// `GetRecords` polling (the default).
    Polling(RetrievalConfig),
    /// `SubscribeToShard` through a registered stream consumer.
    FanOut(FanOutConfig),
}

impl Default for RetrievalMode {
    fn default() -> Self {
        Self::Polling(RetrievalConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_checked_as_kinesis_does() {
        assert!(check_consumer_name("my-app_1.0").is_ok());
        assert!(check_consumer_name("").is_err());
        assert!(check_consumer_name("bad name!").is_err());
        assert!(check_consumer_name(&"x".repeat(129)).is_err());
        assert_eq!(
            FanOutConfig::default().validate().map_err(|e| e.field),
            Err("fan_out.consumer_name"),
            "the name is required"
        );
        FanOutConfig::new("app").validate().expect("defaults are valid");
        let zero = FanOutConfig {
            idle_timeout: Duration::ZERO,
            ..FanOutConfig::new("app")
        };
        assert_eq!(zero.validate().map_err(|e| e.field), Err("fan_out.idle_timeout"));
        // Issue 21 item 12: a duration that would overflow `Instant + Duration` later.
        let huge = FanOutConfig {
            subscription_lifetime: Duration::MAX,
            ..FanOutConfig::new("app")
        };
        assert_eq!(
            huge.validate().map_err(|e| e.field),
            Err("fan_out.subscription_lifetime")
        );
        let mut huge = FanOutConfig::new("app");
        huge.retry.max_backoff = Duration::MAX;
        assert_eq!(huge.validate().map_err(|e| e.field), Err("fan_out.retry"));
    }

    #[test]
    fn the_mode_is_one_config_value() {
        let mode: RetrievalMode =
            serde_json::from_str(r#"{"fan_out": {"consumer_name": "app"}}"#).expect("fan-out parses");
        assert_eq!(mode, RetrievalMode::FanOut(FanOutConfig::new("app")));
        let mode: RetrievalMode = serde_json::from_str(r#"{"polling": {"max_records": 100}}"#).expect("polling parses");
        assert!(matches!(mode, RetrievalMode::Polling(c) if c.max_records == 100));
        assert!(serde_json::from_str::<RetrievalMode>(r#"{"fan_out": {"consumer_nam": "x"}}"#).is_err());
    }
}
