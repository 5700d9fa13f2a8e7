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

/// Multi-stream: a stream deleted while it is consumed stops with a warning, its leases
/// are deleted after the delay, and the other stream goes on (the scheduler does not
/// stop, as a single-stream one does). Shard consumers' spans name their stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_stops_with_a_warning_while_the_others_go_on() -> anyhow::Result<()> {
    use kcl_core::{
        stream_processor_factory, FormerStreamsLeasesDeletion, LeaseStore as _, MultiStreamConfig, Scheduler,
        StreamConfig, StreamIdentifier,
    };
    let logs = capture_logs();
    let env = TestEnv::start(1).await?;
    let doomed = kcl_tests::unique("doomed");
    kcl_local::create_stream(&env.kinesis, &doomed, 1).await?;
    let doomed_id = kcl_tests::stream_identifier(&env.kinesis, &doomed).await?.serialize();
    let th = |s: &str| StreamConfig::new(s).map(|c| c.initial_position(InitialPositionInStream::TrimHorizon));
    let recorder = Recorder::default();
    let factory_recorder = recorder.clone();
    let scheduler = kcl_tests::fast_config(
        Scheduler::multi_stream_builder(vec![th(&env.stream)?, th(&doomed)?])
            .kinesis_client(env.kinesis.clone())
            .lease_store(env.lease_store()),
    )
    .coordinator_config(kcl_core::CoordinatorConfig {
        shard_sync_interval: Duration::from_millis(500),
        ..Default::default()
    })
    .multi_stream_config(MultiStreamConfig {
        stream_tracker_interval: Duration::from_secs(1),
        former_streams_leases_deletion: FormerStreamsLeasesDeletion::AfterDelay(Duration::from_secs(3)),
    })
    .processor_factory(stream_processor_factory(
        move |stream: &StreamIdentifier, shard: &str| {
            kcl_tests::RecordingProcessor::new(
                &format!("{}/{shard}", stream.stream_name()),
                factory_recorder.clone(),
                CheckpointMode::EveryBatch,
            )
        },
    ))
    .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    kcl_tests::put_records(&env.kinesis, &env.stream, 5, "kept").await?;
    kcl_tests::put_records(&env.kinesis, &doomed, 5, "doomed").await?;
    recorder.wait_for_records(10, WAIT).await?;
    // The consumer's span names the stream and the shard.
    let span = format!("shard_consumer{{stream={doomed} shard_id=shardId-000000000000}}");
    logs.wait_for(&span, WAIT).await?;

    env.kinesis.delete_stream().stream_name(&doomed).send().await?;
    logs.wait_for("the stream was deleted", WAIT).await?;
    let store = env.lease_store();
    let deadline = tokio::time::Instant::now() + WAIT;
    while store
        .list_leases()
        .await?
        .iter()
        .any(|l| l.stream_name.as_deref() == Some(doomed_id.as_str()))
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the deleted stream's leases stay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kcl_tests::put_records(&env.kinesis, &env.stream, 5, "after").await?;
    recorder.wait_for_records(15, WAIT).await?;
    assert!(!task.is_finished(), "the scheduler goes on with the other stream");
    stop_scheduler(handle, task, WAIT).await??;
    Ok(())
}

/// A checkpoint Kinesis refuses as past the stream's retention is resumed at
/// `TRIM_HORIZON`, and the log says what that means: the checkpointed record is gone,
/// but the records after it that are still in the stream are read from there (only
/// those older than the retention are lost). Before, it said records past the
/// checkpoint "were trimmed unread", as if everything after it were gone. (The message
/// is illustrative: Kinesis does not document its exact text for this case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_checkpoint_says_the_records_after_it_may_still_be_in_the_stream() -> anyhow::Result<()> {
    use kcl_core::retrieval::{PublisherStart, RetrievalFactory, StartingPosition};
    let logs = capture_logs();
    let env = TestEnv::start(1).await?;
    let written = env.put(3, "expired").await?;
    let faults = FaultInjector::default();
    faults.push(
        "GetShardIterator",
        Fault::ErrorMessage(
            "InvalidArgumentException",
            format!(
                "StartingSequenceNumber {} is older than the stream's retention period (trimmed)",
                written[0].sequence_number
            ),
        ),
    );
    let factory = kcl_core::PollingRetrievalFactory::new(RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        ..RetrievalConfig::default()
    });
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut publisher = factory.start(PublisherStart::new(
        faults.client(&env.backend.kinesis_sdk_config()),
        env.stream.clone(),
        "shardId-000000000000".to_owned(),
        StartingPosition::new(
            kcl_core::ExtendedSequenceNumber::new(written[0].sequence_number.clone(), 0),
            None,
        ),
        cancel.clone(),
    ));
    let event = tokio::time::timeout(WAIT, publisher.next()).await?;
    cancel.cancel();
    assert!(
        matches!(&event, Some(kcl_core::retrieval::PublisherEvent::Batch(b)) if !b.records.is_empty()),
        "resumed at TRIM_HORIZON: {event:?}"
    );
    logs.wait_for("TRIM_HORIZON", WAIT).await?;
    let contents = logs.contents();
    let line = contents
        .lines()
        .find(|l| l.contains("TRIM_HORIZON"))
        .unwrap_or_default();
    assert!(
        line.contains("still in the stream"),
        "the log says the records after the checkpoint may still be there: {line}"
    );
    Ok(())
}
