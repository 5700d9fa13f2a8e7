//! Issue 13: config files. The example file lists every setting with its default and
//! round-trips; typos, bad durations and contradicting settings are errors naming the
//! key.

use std::path::PathBuf;
use std::time::Duration;

use shardwise::config_file::{AppConfig, ConfigFileError};
use shardwise::InitialPositionInStream;

fn example_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/shardwise.toml")
}

fn example() -> String {
    std::fs::read_to_string(example_path()).expect("examples/shardwise.toml")
}

fn key_of(error: ConfigFileError) -> String {
    match error {
        ConfigFileError::Invalid { key, .. } => key,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn the_example_file_lists_every_setting_with_its_default_and_round_trips() {
    let loaded = AppConfig::from_toml(&example()).expect("the example file is valid");
    let mut defaults = AppConfig::default();
    defaults.application.application_name = "my-application".into();
    defaults.application.stream_name = "my-stream".into();
    assert_eq!(loaded, defaults, "the example's values are the defaults");
    // Every key of the defaults is in the file, and nothing else.
    let file: toml::Value = toml::from_str(&example()).expect("TOML");
    let serialized: toml::Value = toml::from_str(&defaults.to_toml().expect("serializable")).expect("TOML");
    assert_eq!(file, serialized);
    // And back.
    let again = AppConfig::from_toml(&loaded.to_toml().expect("serializable")).expect("valid");
    assert_eq!(again, loaded);
}

fn with(section: &str, line: &str) -> String {
    example().replacen(&format!("[{section}]\n"), &format!("[{section}]\n{line}\n"), 1)
}

#[test]
fn a_typo_names_the_key_and_what_is_allowed() {
    let error = AppConfig::from_toml(&with("lease", "failover_tiem = \"10s\"")).expect_err("unknown key");
    let text = error.to_string();
    assert_eq!(key_of(error), "lease.failover_tiem");
    assert!(text.contains("failover_time"), "{text}");
}

#[test]
fn a_bad_duration_names_the_key() {
    let text = example().replace("failover_time = \"10s\"", "failover_time = \"10 parsecs\"");
    let error = AppConfig::from_toml(&text).expect_err("bad duration");
    assert_eq!(key_of(error), "lease.failover_time");
}

#[test]
fn a_renewal_not_shorter_than_the_failover_time_names_the_key() {
    let text = example().replace(
        "renewal_interval = \"3s 333ms 333us 333ns\"",
        "renewal_interval = \"12s\"",
    );
    let error = AppConfig::from_toml(&text).expect_err("renewal too long");
    let message = error.to_string();
    assert_eq!(key_of(error), "lease.renewal_interval", "{message}");
}

#[test]
fn names_are_required_and_values_are_typed() {
    let error = AppConfig::from_toml("[application]\nstream_name = \"s\"\n").expect_err("no application name");
    assert_eq!(key_of(error), "application.application_name");
    let error = AppConfig::from_toml(&example().replace("max_records = 10000", "max_records = \"many\""))
        .expect_err("not a number");
    assert_eq!(key_of(error), "retrieval.max_records");
    let config = AppConfig::from_toml(
        "[application]\napplication_name = \"a\"\nstream_name = \"s\"\ninitial_position = { at_timestamp = \"2026-12-01T08:00:00Z\" }\n[lease]\nfailover_time = \"20s\"\nrenewal_interval = \"5s\"\nlease_store_call_timeout = \"5s\"\n",
    )
    .expect("valid");
    assert_eq!(config.lease.failover_time, Duration::from_secs(20));
    assert!(matches!(
        config.application.initial_position,
        shardwise::InitialPositionInStream::AtTimestamp(_)
    ));
}

#[test]
fn a_missing_file_is_not_found() {
    let error = AppConfig::load(Some(&example_path().with_file_name("no-such-file.toml"))).expect_err("missing");
    assert!(matches!(error, ConfigFileError::NotFound { .. }));
}

/// A Java KCL MultiLang `.properties` file: the settings that map are kept, the others
/// are reported, and a value that does not parse names its Java key.
#[test]
fn a_java_multilang_properties_file_keeps_the_settings_that_map() {
    let properties = "\
# The MultiLang daemon's sample, trimmed.
executableName = python3 sample_kclpy_app.py
streamName = kclpysample
applicationName = PythonKCLSample
AWSCredentialsProvider = DefaultCredentialsProvider
processingLanguage = python/3.11
initialPositionInStream = TRIM_HORIZON
regionName = us-east-1
failoverTimeMillis = 20000
workerId = worker-7
maxRecords = 500
idleTimeBetweenReadsInMillis = 750
maxLeasesToStealAtOneTime = 2
shardSyncIntervalMillis = 120000
callProcessRecordsEvenForEmptyRecordList = true
";
    let (config, ignored) = AppConfig::from_java_properties(properties).expect("valid");
    assert_eq!(config.application.stream_name, "kclpysample");
    assert_eq!(config.application.application_name, "PythonKCLSample");
    assert_eq!(config.application.worker_id.as_deref(), Some("worker-7"));
    assert_eq!(
        config.application.initial_position,
        shardwise::InitialPositionInStream::TrimHorizon
    );
    assert_eq!(config.lease.failover_time, Duration::from_secs(20));
    assert!(
        config.lease.renewal_interval < config.lease.failover_time,
        "derived from it"
    );
    assert_eq!(config.lease.max_leases_to_steal_at_one_time, 2);
    assert_eq!(config.retrieval.max_records, 500);
    assert_eq!(config.retrieval.idle_time_between_reads, Duration::from_millis(750));
    assert_eq!(config.coordinator.shard_sync_interval, Duration::from_secs(120));
    assert!(config.coordinator.call_process_records_even_for_empty_list);
    assert_eq!(
        ignored,
        [
            "AWSCredentialsProvider",
            "executableName",
            "processingLanguage",
            "regionName"
        ]
    );
    let error = AppConfig::from_java_properties(&properties.replace("maxRecords = 500", "maxRecords = lots"))
        .expect_err("not a number");
    assert_eq!(key_of(error), "maxRecords");
}

#[test]
fn a_multi_stream_application_lists_its_streams_with_their_positions() {
    let config = AppConfig::from_toml(
        r#"
        [application]
        application_name = "events"
        initial_position = "trim_horizon"
        streams = [
            { stream = "orders", initial_position = "latest" },
            { stream = "arn:aws:kinesis:eu-west-1:123456789012:stream/payments" },
            { stream = "123456789012:audit:1700000000" },
        ]
        [multi_stream]
        stream_tracker_interval = "10s"
        former_streams_leases_deletion = "keep"
        "#,
    )
    .expect("valid");
    let streams = config.stream_configs().expect("streams");
    let shown: Vec<(&str, InitialPositionInStream)> = streams.iter().map(|s| (s.stream_name(), s.position())).collect();
    assert_eq!(
        shown,
        [
            ("orders", InitialPositionInStream::Latest),
            ("payments", InitialPositionInStream::TrimHorizon),
            ("audit", InitialPositionInStream::TrimHorizon),
        ]
    );
    assert_eq!(
        config.multi_stream.former_streams_leases_deletion,
        shardwise::FormerStreamsLeasesDeletion::Keep
    );
    assert_eq!(config.multi_stream.stream_tracker_interval, Duration::from_secs(10));

    let both = "[application]\napplication_name = \"a\"\nstream_name = \"s\"\nstreams = [{ stream = \"t\" }]\n";
    assert_eq!(
        key_of(AppConfig::from_toml(both).expect_err("both")),
        "application.stream_name"
    );
    let bad =
        "[application]\napplication_name = \"a\"\nstreams = [{ stream = \"ok\" }, { stream = \"not a stream\" }]\n";
    assert_eq!(
        key_of(AppConfig::from_toml(bad).expect_err("bad stream")),
        "application.streams[1].stream"
    );
    let short = "[application]\napplication_name = \"a\"\nstreams = [{ stream = \"t\" }]\n\
                 [multi_stream]\nformer_streams_leases_deletion = { after_delay = \"1m\" }\n";
    assert_eq!(
        key_of(AppConfig::from_toml(short).expect_err("delay under two intervals")),
        "multi_stream.former_streams_leases_deletion"
    );
}
