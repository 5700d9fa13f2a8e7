//! The bound every configured duration shares, and its check. Its own module so that
//! both the configuration and the [`RetryPolicy`](crate::RetryPolicy) it holds use it
//! without depending on each other; both are re-exported from [`config`](crate::config).

use std::time::Duration;

use crate::error::ConfigError;

/// The longest duration any setting may have (365 days): far beyond any useful
/// value, and far from where `Instant + Duration` overflows. `build()` refuses more.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Refuses the first of `fields` (`(name, value)`) longer than [`MAX_DURATION`].
///
/// # Errors
/// [`ConfigError`] naming the field.
pub fn check_max_durations(fields: &[(&'static str, Duration)]) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, d)| *d > MAX_DURATION) {
        Some((field, d)) => Err(ConfigError::new(field, format!("must be at most 365 days; got {d:?}"))),
        None => Ok(()),
    }
}
