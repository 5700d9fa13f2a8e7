//! Issue 13: environment variables override the config file (a test binary of its own:
//! it sets process-wide variables).

use std::path::PathBuf;
use std::time::Duration;

use shardwise::config_file::AppConfig;

#[test]
fn environment_variables_win_over_the_file() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shardwise.toml");
    std::env::set_var("SHARDWISE_LEASE__FAILOVER_TIME", "20s");
    std::env::set_var("SHARDWISE_LEASE__RENEWAL_INTERVAL", "5s");
    std::env::set_var("SHARDWISE_LEASE__LEASE_STORE_CALL_TIMEOUT", "5s");
    std::env::set_var("SHARDWISE_APPLICATION__WORKER_ID", "env-worker");
    let config = AppConfig::load(Some(&path)).expect("valid");
    assert_eq!(config.lease.failover_time, Duration::from_secs(20));
    assert_eq!(config.application.worker_id.as_deref(), Some("env-worker"));
    // The file's other values stay.
    assert_eq!(config.application.stream_name, "my-stream");
    // A bad value from the environment names the key and where it came from.
    std::env::set_var("SHARDWISE_LEASE__FAILOVER_TIME", "soon");
    let error = AppConfig::load(Some(&path)).expect_err("bad duration");
    let text = error.to_string();
    assert!(text.starts_with("lease.failover_time"), "{text}");
    assert!(text.contains("SHARDWISE_"), "{text}");
}
