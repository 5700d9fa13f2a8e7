//! One retry mechanism for the whole library: exponential backoff with full jitter,
//! bounded, with a preset for tests that never sleeps.

use std::time::Duration;

use rand::Rng;

use crate::error::ConfigError;

/// Exponential backoff with full jitter: the wait before attempt `n` (counting the
/// first retry as 1) is uniform in `[0, min(max_backoff, initial_backoff * 2^(n-1))]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Upper bound of the first wait. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of every wait. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Attempts in total (the first call included); `None` retries without end.
    /// Default `Some(10)`.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_attempts: Some(10),
        }
    }
}

impl RetryPolicy {
    /// A policy with the given bounds.
    pub fn new(initial_backoff: Duration, max_backoff: Duration, max_attempts: Option<u32>) -> Self {
        Self {
            initial_backoff,
            max_backoff,
            max_attempts,
        }
    }

    /// For tests: retries `max_attempts` times in total without sleeping.
    pub fn no_sleep(max_attempts: Option<u32>) -> Self {
        Self {
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
            max_attempts,
        }
    }

    /// Retries without end (for throttling, where giving up would lose progress).
    pub fn unbounded(mut self) -> Self {
        self.max_attempts = None;
        self
    }

    /// Refuses backoffs longer than [`MAX_DURATION`](crate::config::MAX_DURATION)
    /// (`field` names the policy in the error).
    ///
    /// # Errors
    /// [`ConfigError`] naming `field`.
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        crate::limits::check_max_durations(&[(field, self.initial_backoff), (field, self.max_backoff)])
    }

    /// True when a call that failed on attempt `attempt` (1-based) may be tried again.
    pub fn should_retry(&self, attempt: u32) -> bool {
        self.max_attempts.is_none_or(|max| attempt < max)
    }

    /// The ceiling of the wait after failed attempt `attempt` (1-based), before jitter.
    pub fn backoff_ceiling(&self, attempt: u32) -> Duration {
        let shift = attempt.saturating_sub(1).min(31);
        self.initial_backoff.saturating_mul(1u32 << shift).min(self.max_backoff)
    }

    /// The jittered wait after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.backoff_ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// Runs `op` until it succeeds, `is_retryable` says no, or the policy is exhausted,
/// sleeping the policy's backoff between attempts. Returns the last error.
///
/// # Cancel safety
/// Cancel safe when `op`'s futures are: dropping it between attempts loses nothing.
pub async fn retry<T, E, Fut>(
    policy: &RetryPolicy,
    mut is_retryable: impl FnMut(&E) -> bool,
    mut op: impl FnMut() -> Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if is_retryable(&e) && policy.should_retry(attempt) => {
                tokio::time::sleep(policy.backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Bounds one AWS SDK call: past `limit` the call is dropped and reported as the SDK's
/// own `TimeoutError`, which every caller already treats as transient. The Rust SDK
/// has no operation timeout unless the application configures one. Used by every
/// Kinesis call of this library and of `kcl-efo`.
///
/// # Errors
/// The call's own error, or `SdkError::TimeoutError` past `limit`.
///
/// # Cancel safety
/// Dropping the call leaves its outcome unknown, as any timeout does.
pub async fn with_timeout<T, E, R>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, aws_sdk_kinesis::error::SdkError<E, R>>>,
) -> Result<T, aws_sdk_kinesis::error::SdkError<E, R>> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(aws_sdk_kinesis::error::SdkError::timeout_error(format!(
            "no response within {limit:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_caps() {
        let p = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1), None);
        assert_eq!(p.backoff_ceiling(1), Duration::from_millis(100));
        assert_eq!(p.backoff_ceiling(2), Duration::from_millis(200));
        assert_eq!(p.backoff_ceiling(4), Duration::from_millis(800));
        assert_eq!(p.backoff_ceiling(5), Duration::from_secs(1));
        assert_eq!(p.backoff_ceiling(500), Duration::from_secs(1));
        for attempt in 1..10 {
            assert!(p.backoff(attempt) <= p.backoff_ceiling(attempt));
        }
    }

    #[test]
    fn attempts_are_bounded() {
        let p = RetryPolicy::no_sleep(Some(3));
        assert!(p.should_retry(1) && p.should_retry(2));
        assert!(!p.should_retry(3));
        assert!(RetryPolicy::no_sleep(None).should_retry(u32::MAX - 1));
    }

    #[tokio::test]
    async fn retry_stops_at_the_limit_and_on_fatal_errors() {
        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &RetryPolicy::no_sleep(Some(4)),
            |_| true,
            || {
                calls += 1;
                async { Err("transient") }
            },
        )
        .await;
        assert_eq!((r, calls), (Err("transient"), 4));

        let mut calls = 0;
        let r: Result<(), &str> = retry(
            &RetryPolicy::no_sleep(None),
            |e| *e != "fatal",
            || {
                calls += 1;
                let e = if calls < 3 { "transient" } else { "fatal" };
                async move { Err(e) }
            },
        )
        .await;
        assert_eq!((r, calls), (Err("fatal"), 3));
    }
}
