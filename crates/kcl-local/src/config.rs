//! AWS SDK configuration for talking to a local backend.
//!
//! [`sdk_config_for_endpoint`] builds an [`SdkConfig`] synchronously — no environment,
//! profile or IMDS lookups, which would be slow and could pick up a developer's real
//! credentials — with static test credentials, the region, the endpoint URL, and an
//! explicit Tokio sleep implementation (retries and timeouts need one). Everything else
//! is the SDK's default for the latest behavior version: standard retries (3 attempts),
//! the default timeouts, and stalled-stream protection (which the SDK does not apply to
//! `SubscribeToShard`'s event stream).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_sdk_kinesis::config::{AsyncSleep, Sleep};
use aws_types::region::Region;
use aws_types::sdk_config::{SharedAsyncSleep, SharedTimeSource};
use aws_types::SdkConfig;

/// Access key id of the static credentials. The emulators check that requests are
/// signed, not by whom.
const ACCESS_KEY_ID: &str = "kcl-local";
/// Secret of the static credentials.
const SECRET_ACCESS_KEY: &str = "kcl-local-secret";
/// Provider name reported by the credentials, visible in SDK logs.
const PROVIDER_NAME: &str = "kcl-local";

/// Builds an [`SdkConfig`] for an already running backend: an embedded
/// [`LocalBackend`](crate::LocalBackend) (prefer its `kinesis_sdk_config` /
/// `dynamodb_sdk_config`), a `kcl-local serve` in another process, or any other emulator.
///
/// `endpoint` is a URL such as `http://127.0.0.1:4567`; `region` is for example
/// `us-east-1` (it appears in ARNs the emulator returns). The credentials are static and
/// fake: `kcl-local` / `kcl-local-secret`.
///
/// This does no I/O and needs no runtime; clients built from it must be used inside a
/// Tokio runtime.
pub fn sdk_config_for_endpoint(endpoint: &str, region: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            PROVIDER_NAME,
        )))
        .retry_config(RetryConfig::standard())
        .sleep_impl(SharedAsyncSleep::new(TokioSleep))
        .time_source(SharedTimeSource::default())
        .build()
}

/// The SDK's async sleep, on Tokio's timer. (The SDK has one too, but this crate does not
/// depend on the crate that exports it, and this is four lines.)
#[derive(Debug, Clone, Copy)]
struct TokioSleep;

impl AsyncSleep for TokioSleep {
    fn sleep(&self, duration: Duration) -> Sleep {
        Sleep::new(tokio::time::sleep(duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_carries_endpoint_region_credentials_and_sleep() {
        let config = sdk_config_for_endpoint("http://127.0.0.1:1234", "eu-west-1");
        assert_eq!(config.endpoint_url(), Some("http://127.0.0.1:1234"));
        assert_eq!(config.region().map(Region::as_ref), Some("eu-west-1"));
        assert!(config.credentials_provider().is_some());
        assert!(config.sleep_impl().is_some());
        assert!(config.time_source().is_some());
        assert_eq!(
            config.retry_config().map(RetryConfig::max_attempts),
            Some(RetryConfig::standard().max_attempts())
        );
    }
}
