//! Enhanced fan-out end to end, on the embedded backend and on kinesis-mock: delivery
//! and order, resubscription, failover, resharding, the switch between polling and
//! fan-out by configuration alone, and bad input.

use std::time::Duration;

use kcl_core::InitialPositionInStream;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
use kcl_tests::{by_shard, spawn_scheduler, stop_scheduler, unique, CheckpointMode, FaultInjector, Recorder, TestEnv};

const WAIT: Duration = Duration::from_secs(90);

/// Fan-out settings for tests: a fresh consumer name, quick shard-end checks.
fn fan_out() -> FanOutConfig {
    FanOutConfig {
        shard_end_check_interval: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(10),
        ..FanOutConfig::new(unique("consumer"))
    }
}

/// Every record of a multi-shard stream reaches the processor through fan-out, in
/// order per shard, exactly once for one worker.
async fn every_record_exactly_once_in_order(env: TestEnv, records: usize) -> anyhow::Result<()> {
    let written = env.put(records, "efo").await?;
    let faults = FaultInjector::default();
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_mode(RetrievalMode::FanOut(fan_out()))?
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(
        recorder.state().by_shard(),
        by_shard(&written),
        "exactly once, in order"
    );
    let shards = by_shard(&written).len();
    assert!(
        faults.calls("SubscribeToShard") >= shards,
        "read through SubscribeToShard"
    );
    assert_eq!(faults.calls("GetRecords"), 0, "not by polling");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_exactly_once_in_order_on_the_embedded_backend() -> anyhow::Result<()> {
    every_record_exactly_once_in_order(TestEnv::start(4).await?, 2000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_exactly_once_in_order_on_kinesis_mock() -> anyhow::Result<()> {
    every_record_exactly_once_in_order(TestEnv::start_conformance(2).await?, 200).await
}
