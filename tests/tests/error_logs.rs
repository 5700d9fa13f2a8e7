//! Errors are logged with their whole cause chain (hardening item 13). This binary
//! installs the capturing global log subscriber ([`kcl_tests::capture_logs`]), so it
//! holds only tests that read logs.

use std::time::Duration;

use kcl_core::{InitialPositionInStream, RetrievalConfig, RetryPolicy};
use kcl_tests::{
    capture_logs, spawn_scheduler, stop_scheduler, CheckpointMode, Fault, FaultInjector, Recorder, TestEnv,
};

const WAIT: Duration = Duration::from_secs(60);

/// Guards item 13: an SDK error is logged with its whole chain: the service's own
/// message, not only `service error` or an error code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_errors_are_logged_with_their_cause() -> anyhow::Result<()> {
    let logs = capture_logs();
    let env = TestEnv::start(1).await?;
    let written = env.put(5, "logs").await?;
    let faults = FaultInjector::default();
    faults.push("GetRecords", Fault::InternalFailure("backend-cause-7f3a".to_owned()));
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .retrieval_config(RetrievalConfig {
            idle_time_between_reads: Duration::from_millis(200),
            retry: RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(100), None),
            ..RetrievalConfig::default()
        })
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    logs.wait_for("backend-cause-7f3a", WAIT).await?;
    let contents = logs.contents();
    let line = contents
        .lines()
        .find(|l| l.contains("backend-cause-7f3a"))
        .unwrap_or_default();
    assert!(
        line.contains("kcl_core") && line.contains("GetRecords failed"),
        "the library's own log line names the cause: {line}"
    );
    stop_scheduler(handle, task, WAIT).await??;
    Ok(())
}

/// The capture itself: what is logged on any thread is captured and can be awaited,
/// filtered as documented, without ANSI colors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_every_thread_are_captured_and_awaited() -> anyhow::Result<()> {
    let logs = capture_logs();
    tracing::debug!(target: "elsewhere", "filtered-out-debug");
    tracing::debug!(target: "kcl_core::lease", "library-debug");
    std::thread::spawn(|| tracing::warn!(shard = "shardId-1", "warning-from-another-thread"))
        .join()
        .map_err(|_| anyhow::anyhow!("the logging thread panicked"))?;
    logs.wait_for("warning-from-another-thread", Duration::from_secs(5))
        .await?;
    let text = logs.contents();
    assert!(text.contains("WARN") && text.contains("shard=\"shardId-1\""), "{text}");
    assert!(text.contains("library-debug"), "{text}");
    assert!(!text.contains("filtered-out-debug"), "{text}");
    assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text}");
    assert!(logs.wait_for("never-logged", Duration::from_millis(20)).await.is_err());
    Ok(())
}
