//! The failure paths production brings (the hardening issue), one test each, on the
//! embedded backend: shards and streams that disappear, iterators that expire before
//! anything was read, lease writes that land but report failure, hung calls, a failing
//! `initialize`, failing shards, a checkpoint older than the retention, and error logs
//! that name their cause. Each test's doc comment says what it guards; every fault is
//! injected through the SDK (an interceptor, a hanging HTTP client) or the
//! fault-injecting lease store, never by skipping the path.
//!
//! Item 13 (error logs name their cause) is in `error_logs.rs`: it installs a global
//! log subscriber, so it has a test binary of its own. The unit-level items live next
//! to their code: linear lineage walks
//! (`shard_sync`), cleanup of orphaned finished leases and releasing only the consumer's
//! own lease period (`coordinator`), config validation (`config`), unparseable sequence
//! numbers (`retrieval`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use kcl_core::{
    Checkpoint, CoordinatorConfig, ExtendedSequenceNumber, InitialPositionInStream, InitializationInput,
    LeaseManagementConfig, LeaseStore, OnProcessorFailure, ProcessRecordsInput, ProcessorError, ProcessorErrorPolicy,
    RecordProcessor, RetrievalConfig, RetryPolicy, SchedulerError,
};
use kcl_tests::{
    by_shard, fast_config, spawn_scheduler, split_shard_in_half, steal_lease, stop_scheduler, CheckpointMode, Event,
    Fault, FaultInjector, FaultyLeaseStore, HangingHttpClient, Recorder, RecordingProcessor, TestEnv,
};

const WAIT: Duration = Duration::from_secs(60);
const SHARD0: &str = "shardId-000000000000";

fn initialized(recorder: &Recorder, shard: &str) -> usize {
    recorder
        .state()
        .count(|e| matches!(e, Event::Initialized { shard_id, .. } if shard_id == shard))
}

fn lease_losses(recorder: &Recorder) -> usize {
    recorder.state().count(|e| matches!(e, Event::LeaseLost { .. }))
}

/// Retrieval that retries quickly, for tests that inject many faults.
fn quick_retrieval() -> RetrievalConfig {
    RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        retry: RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(100), None),
        ..RetrievalConfig::default()
    }
}

/// Guards item 1: a shard Kinesis no longer knows (`ResourceNotFoundException`, as for
/// a shard aged out past retention) has ended: `SHARD_END` is written, its children are
/// learned from `ListShards` and read. Before, the parent's lease bounced between
/// passes (`initialize` again and again) and the children waited on it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_kinesis_no_longer_knows_has_ended_and_its_children_are_read() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    split_shard_in_half(&env.kinesis, &env.stream, SHARD0).await?;
    let written = env.put(100, "children").await?;
    let faults = FaultInjector::default();
    faults.set_sticky("GetShardIterator", Some(SHARD0), Fault::ResourceNotFound);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;

    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    assert_eq!(
        initialized(&recorder, SHARD0),
        1,
        "the gone shard's lease did not bounce"
    );
    assert_eq!(
        recorder
            .state()
            .count(|e| matches!(e, Event::ShardEnded { shard_id } if shard_id == SHARD0)),
        1
    );
    let parent = env.lease_store().get_lease(SHARD0).await?.context("parent lease")?;
    assert!(parent.checkpoint.is_shard_end());
    assert_eq!(parent.child_shard_ids.len(), 2, "children learned from ListShards");
    Ok(())
}

/// Guards item 1: a stream deleted under a running worker ends `run()` with the typed
/// `StreamNotFound`, instead of shards failing and being retaken forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_stream_ends_run_with_stream_not_found() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(10, "before").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (_handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(10, WAIT).await?;
    env.kinesis
        .delete_stream()
        .stream_name(&env.stream)
        .enforce_consumer_deletion(true)
        .send()
        .await?;
    let result = tokio::time::timeout(WAIT, task)
        .await
        .context("run() did not return after the stream was deleted")??;
    match result {
        Err(SchedulerError::StreamNotFound { stream }) => assert_eq!(stream, env.stream),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    Ok(())
}

/// Guards item 2: an iterator that expires before anything was fetched from a `LATEST`
/// start resumes where the first iterator stood (`AT_TIMESTAMP` of when it was asked
/// for), not at a new `LATEST` that skips what was written in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iterator_expiring_before_the_first_read_does_not_skip_records() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let faults = FaultInjector::default();
    // Hold the first reads back until the records below are written.
    faults.set_sticky("GetRecords", None, Fault::Throttle);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .retrieval_config(quick_retrieval())
        .initial_position(InitialPositionInStream::Latest)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    // A throttled read means the LATEST iterator was obtained.
    faults.wait_injected("GetRecords", 1, WAIT).await?;
    // The embedded Kinesis keeps arrival times in whole seconds: write in a later
    // second than the iterator's, or an AT_TIMESTAMP read could not tell them apart.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let written = env.put(20, "in-between").await?;
    faults.push("GetRecords", Fault::ExpiredIterator);
    faults.clear_sticky("GetRecords");
    recorder
        .wait_for_records(written.len(), Duration::from_secs(20))
        .await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    assert!(faults.injected().contains(&("GetRecords", Fault::ExpiredIterator)));
    Ok(())
}

/// A scheduler on `store` with a long failover time (renewals every 30 s), so that
/// no renewal runs between the checkpoints a test makes.
fn with_store(env: &TestEnv, recorder: &Recorder, store: &FaultyLeaseStore) -> anyhow::Result<kcl_core::Scheduler> {
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_secs(90));
    lease.lease_taking_interval = Duration::from_millis(500);
    Ok(env
        .scheduler(recorder, CheckpointMode::EveryBatch)
        .lease_store(store.clone())
        .lease_config(lease)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?)
}

/// Writes `rounds` rounds of 20 records, each after the previous one was delivered, so
/// that each round is its own batch and checkpoint (the processor checkpoints every
/// batch, and gets the next only after that). Returns everything written.
async fn rounds(env: &TestEnv, recorder: &Recorder, rounds: usize) -> anyhow::Result<Vec<kcl_tests::Written>> {
    let mut written = Vec::new();
    for round in 0..rounds {
        written.extend(env.put(20, &format!("round{round}")).await?);
        recorder.wait_for_records(written.len(), WAIT).await?;
    }
    Ok(written)
}

async fn stored_checkpoint(env: &TestEnv) -> anyhow::Result<ExtendedSequenceNumber> {
    Ok(env.lease_store().get_lease(SHARD0).await?.context("lease")?.checkpoint)
}

/// Runs `n_rounds` rounds (a batch and a checkpoint each) where the first checkpoint
/// lands but reports failure and the next `failed_reads` reads of the lease fail, and
/// checks that the lease was never lost, that the processor saw `expected_errors`
/// checkpoint errors, and that the last record ended up checkpointed.
async fn checkpoints_after_a_landed_failure(
    failed_reads: usize,
    n_rounds: usize,
    expected_errors: usize,
) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::start(1).await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    store.land_then_fail_checkpoints.store(1, SeqCst);
    store.fail_get_lease.store(failed_reads, SeqCst);
    let recorder = Recorder::default();
    let (handle, task) = spawn_scheduler(with_store(&env, &recorder, &store)?);
    let written = rounds(&env, &recorder, n_rounds).await?;
    // The graceful shutdown waits for the last round's `process_records`, and with it
    // the round's checkpoint, before `shutdown_requested` checkpoints once more.
    stop_scheduler(handle, task, WAIT).await??;
    assert!(
        store.checkpoints.load(SeqCst) > n_rounds,
        "a checkpoint per round, and one at shutdown"
    );
    assert_eq!(lease_losses(&recorder), 0, "{:?}", recorder.state().events);
    let errors = recorder.state().checkpoint_errors.clone();
    assert_eq!(errors.len(), expected_errors, "{errors:?}");
    let last = written.last().context("written")?;
    assert_eq!(
        stored_checkpoint(&env).await?.checkpoint,
        Checkpoint::Sequence(last.sequence_number.clone())
    );
    Ok(())
}

/// Guards item 3: a checkpoint write that landed but reported failure moved the
/// counter; the next checkpoint must adopt the stored lease (it is still ours) and
/// succeed, not declare the lease lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_landed_but_reported_failure_does_not_lose_the_lease() -> anyhow::Result<()> {
    // The checkpointer retries the injected failure itself: none reaches the processor.
    checkpoints_after_a_landed_failure(0, 2, 0).await
}

/// Guards item 3: a failing verification read after a refused checkpoint is a
/// retryable failure, not a lost lease; the checkpoint after it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_verification_read_is_a_retry_not_a_lost_lease() -> anyhow::Result<()> {
    // The landed write, then the failed read: both retried inside the checkpointer.
    checkpoints_after_a_landed_failure(1, 3, 0).await
}

/// Guards item 3: a take that landed but reported failure is a success: the shard is
/// consumed at once, with one take, instead of waiting for its own lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_that_landed_but_reported_failure_is_a_success() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(10, "take").await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    store.land_then_fail_takes.store(1, std::sync::atomic::Ordering::SeqCst);
    let recorder = Recorder::default();
    let (handle, task) = spawn_scheduler(with_store(&env, &recorder, &store)?);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(store.takes.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

/// Guards item 6: a `GetRecords` call that never answers is abandoned after
/// `kinesis_call_timeout` and retried; the shard does not stall while its lease stays
/// renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_get_records_call_does_not_stall_the_shard() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(20, "hung").await?;
    let config = env.backend.kinesis_sdk_config();
    let http = HangingHttpClient::new(&config);
    http.hang_next("GetRecords", 1);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(http.kinesis_client(&config, None))
        .retrieval_config(RetrievalConfig {
            kinesis_call_timeout: Duration::from_secs(1),
            ..quick_retrieval()
        })
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder
        .wait_for_records(written.len(), Duration::from_secs(30))
        .await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(http.hanging("GetRecords"), 1);
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

/// Guards item 6: with the lease table hanging (every call, the lease-taking scan
/// included, never answers), a graceful shutdown still returns within
/// `graceful_shutdown_timeout + lease_store_call_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_returns_in_time_while_the_lease_table_hangs() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(10, "hang").await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::from_secs(3600), 0);
    let recorder = Recorder::default();
    let graceful = Duration::from_secs(2);
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .lease_store(store.clone())
        .coordinator_config(CoordinatorConfig {
            graceful_shutdown_timeout: graceful,
            ..CoordinatorConfig::default()
        })
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let call_timeout = LeaseManagementConfig::with_failover_time(Duration::from_secs(3)).lease_store_call_timeout;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    store.partitioned.store(true, std::sync::atomic::Ordering::SeqCst);
    store.wait_hung_scans(1, WAIT).await?;
    let asked = Instant::now();
    let result = stop_scheduler(handle, task, Duration::from_secs(30)).await?;
    let took = asked.elapsed();
    result?;
    // The bound, plus room for a loaded machine.
    assert!(
        took < graceful + call_timeout + Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    Ok(())
}

/// Guards item 7: `build()` refuses a renewal interval that cannot renew a lease
/// within its provable window (half the failover time or more).
#[tokio::test]
async fn build_refuses_a_renewal_interval_that_loses_every_lease() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let failover = Duration::from_secs(10);
    let lease = LeaseManagementConfig {
        renewal_interval: failover / 2,
        lease_store_call_timeout: Duration::from_millis(100),
        ..LeaseManagementConfig::with_failover_time(failover)
    };
    let err = env
        .scheduler(&recorder, CheckpointMode::Never)
        .lease_config(lease)
        .build()
        .expect_err("refused");
    assert_eq!(err.field, "lease.renewal_interval");
    assert!(err.reason.contains("failover_time"), "says what to set: {}", err.reason);
    Ok(())
}

/// A processor whose `initialize` always fails (noted as `Event::Failed`), recording
/// any batch it is handed anyway.
#[derive(Debug)]
struct FailingInit(RecordingProcessor, Recorder, String);

#[async_trait]
impl RecordProcessor for FailingInit {
    async fn initialize(&mut self, _input: InitializationInput) -> Result<(), ProcessorError> {
        self.1.note(Event::Failed {
            shard_id: self.2.clone(),
        });
        Err("initialize fails on purpose".into())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.0.process_records(input).await
    }
}

/// Guards item 9: `SkipBatch` skips batches only. A failing `initialize` is retried,
/// then stops the consumer (which is started again after a backoff); an uninitialized
/// processor never gets records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_initialize_is_never_skipped() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(10, "init").await?;
    let recorder = Recorder::default();
    let factory_recorder = recorder.clone();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .processor_factory(move |shard_id: &str| {
            FailingInit(
                RecordingProcessor::new(shard_id, factory_recorder.clone(), CheckpointMode::EveryBatch),
                factory_recorder.clone(),
                shard_id.to_owned(),
            )
        })
        .processor_error_policy(ProcessorErrorPolicy {
            retry: RetryPolicy::no_sleep(Some(2)),
            on_exhausted: OnProcessorFailure::SkipBatch,
        })
        .coordinator_config(CoordinatorConfig {
            shard_failure_backoff: RetryPolicy::new(Duration::from_millis(100), Duration::from_millis(200), None),
            ..CoordinatorConfig::default()
        })
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    // Two consumers' worth of attempts, or a delivery (the bug).
    recorder
        .wait_until("four initialize attempts or a delivery", WAIT, |s| {
            !s.deliveries.is_empty() || s.count(|e| matches!(e, Event::Failed { .. })) >= 4
        })
        .await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert!(
        recorder.state().deliveries.is_empty(),
        "records reached an uninitialized processor"
    );
    Ok(())
}

/// Guards item 10: a failing shard backs off exponentially on this worker (keeping its
/// lease) instead of being released and retaken at every lease-taking pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_shard_backs_off_exponentially_and_keeps_its_lease() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let initial = Duration::from_millis(1500);
    let scheduler = env
        .failing_factory_scheduler(&recorder, RetryPolicy::new(initial, Duration::from_secs(30), None))
        .build()?;
    let worker_id = scheduler.worker_id().to_owned();
    let (handle, task) = spawn_scheduler(scheduler);
    recorder
        .wait_until("three factory calls", WAIT, |s| {
            s.count(|e| matches!(e, Event::Failed { .. })) >= 3
        })
        .await?;
    let lease = env.lease_store().get_lease(SHARD0).await?.context("lease")?;
    stop_scheduler(handle, task, WAIT).await??;
    let calls: Vec<Instant> = recorder
        .state()
        .timeline
        .iter()
        .filter(|(_, e)| matches!(e, Event::Failed { .. }))
        .map(|(at, _)| *at)
        .collect();
    let (first, second) = (calls[1] - calls[0], calls[2] - calls[1]);
    assert!(first >= initial, "first wait {first:?}");
    assert!(second >= initial * 2, "second wait {second:?} doubles");
    assert_eq!(
        lease.lease_owner.as_deref(),
        Some(worker_id.as_str()),
        "kept while backing off"
    );
    Ok(())
}

/// Guards item 14: a checkpoint Kinesis refuses as invalid (older than the stream's
/// retention) resumes at `TRIM_HORIZON` with nothing at or below the checkpoint
/// delivered again, on the first try, instead of bouncing the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_older_than_the_retention_resumes_at_trim_horizon() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let first = env.put(20, "first").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(first.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    let last = first.last().context("written")?;
    assert_eq!(
        stored_checkpoint(&env).await?.checkpoint,
        Checkpoint::Sequence(last.sequence_number.clone())
    );

    let second = env.put(10, "second").await?;
    let faults = FaultInjector::default();
    let refusal = Fault::ErrorMessage(
        "InvalidArgumentException",
        format!(
            "StartingSequenceNumber {} is older than the stream's retention period (trimmed)",
            last.sequence_number
        ),
    );
    faults.push_for_shard("GetShardIterator", SHARD0, refusal.clone());
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(second.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(faults.injected(), [("GetShardIterator", refusal)]);
    assert_eq!(initialized(&recorder, SHARD0), 1, "resumed on the first try, no bounce");
    assert_eq!(
        recorder.state().by_shard(),
        by_shard(&second),
        "nothing before the checkpoint again"
    );
    Ok(())
}

/// A release that fails (a timed-out write, at shutdown) is tried once more after a
/// read, so that the lease is free at once for the next worker instead of waiting for
/// the failover time; before, a single failed write left it in the stopped worker's
/// name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_fails_once_is_tried_again() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::start(1).await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    let recorder = Recorder::default();
    let (handle, task) = spawn_scheduler(with_store(&env, &recorder, &store)?);
    rounds(&env, &recorder, 1).await?;
    store.fail_evictions.store(1, SeqCst);
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(store.fail_evictions.load(SeqCst), 0, "the injected failure was hit");
    let lease = env
        .lease_store()
        .get_lease("shardId-000000000000")
        .await?
        .context("the lease")?;
    assert_eq!(lease.lease_owner, None, "released: {lease:?}");
    Ok(())
}

/// A worker that stops while a lease given to it (assigned, or handed over) is not
/// taken yet, with no other live worker to pass it to, lets it go: before, it stayed in
/// the stopped worker's name until the failover time (90 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_given_to_a_stopping_worker_but_not_taken_is_released() -> anyhow::Result<()> {
    use std::sync::atomic::Ordering::SeqCst;
    let env = TestEnv::start(1).await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    store.create_lease_table_if_not_exists().await?;
    let mut lease = kcl_core::Lease::new(SHARD0, ExtendedSequenceNumber::TRIM_HORIZON);
    store.create_lease_if_not_exists(&lease).await?;
    let recorder = Recorder::default();
    let scheduler = with_store(&env, &recorder, &store)?;
    let worker = scheduler.worker_id().to_owned();
    // Given to the worker, which cannot take it.
    store.fail_takes.store(usize::MAX, SeqCst);
    assert!(store.assign_lease(&mut lease, &worker).await?);
    let (handle, task) = spawn_scheduler(scheduler);
    let deadline = tokio::time::Instant::now() + WAIT;
    while store.takes.load(SeqCst) == 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the worker never tried to take it"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_scheduler(handle, task, WAIT).await??;
    let stored = env.lease_store().get_lease(SHARD0).await?.context("the lease")?;
    assert_eq!(stored.lease_owner, None, "released: {stored:?}");
    Ok(())
}

/// User records in the hostile aggregate of the review (a ~1 MB record: one 400 KB
/// partition key and 100,000 empty user records that all use it).
const HOSTILE_USER_RECORDS: usize = 100_000;

/// A KPL aggregate with one partition key of `key_len` bytes and `n` empty user records
/// that all use it, encoded by hand (the key once, as the KPL does).
fn hostile_aggregate(key_len: usize, n: usize) -> Vec<u8> {
    use md5::Digest as _;
    fn varint(mut v: usize, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut protobuf = vec![0x0A]; // partition_key_table, length-delimited
    varint(key_len, &mut protobuf);
    protobuf.resize(protobuf.len() + key_len, b'k');
    for _ in 0..n {
        // records: { partition_key_index: 0, data: "" }
        protobuf.extend_from_slice(&[0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]);
    }
    let mut data = kcl_core::aggregation::AGGREGATED_RECORD_MAGIC.to_vec();
    data.extend_from_slice(&protobuf);
    data.extend_from_slice(&md5::Md5::digest(&protobuf));
    data
}

/// One hostile KPL aggregate must not take down the worker that reads its shard (nor
/// the next owner): its 400 KB partition key is beyond Kinesis's 256 characters, so the
/// record is a malformed aggregate, delivered as it is (marked) and counted, and the
/// records after it are read. Before, every user record got its own copy of the key
/// (100,000 x 400 KB = 40 GB: the process aborted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_aggregate_with_a_huge_shared_key_does_not_take_the_worker_down() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let data = hostile_aggregate(400_000, HOSTILE_USER_RECORDS);
    anyhow::ensure!(data.len() <= 1 << 20, "fits in one record: {} bytes", data.len());
    env.kinesis
        .put_record()
        .stream_name(&env.stream)
        .partition_key("hostile")
        .data(aws_sdk_kinesis::primitives::Blob::new(data.to_vec()))
        .send()
        .await?;
    let after = env.put(3, "after").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    let got = recorder.wait_for_records(1 + after.len(), WAIT).await;
    stop_scheduler(handle, task, WAIT).await??;
    got?;
    let state = recorder.state();
    let first = state.deliveries.first().context("a delivery")?;
    assert!(
        first.malformed_aggregate && first.data == data,
        "the hostile record is delivered whole, marked ({} deliveries)",
        state.deliveries.len()
    );
    let rest: Vec<_> = state.deliveries[1..]
        .iter()
        .map(|d| d.sequence_number.clone())
        .collect();
    assert_eq!(
        rest,
        after.iter().map(|w| w.sequence_number.clone()).collect::<Vec<_>>(),
        "the records after it are read"
    );
    Ok(())
}

/// After throttling, the next `GetRecords` waits at least 200 ms (Kinesis allows five
/// reads per shard per second, shared by every reader of the shard), whatever the
/// backoff policy says: with a policy of 10 ms to 100 ms, five throttled calls in a row
/// take at least a second. Before, the jittered backoff alone decided, and could be
/// about 0 ms: a throttled reader hammered the shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_get_records_is_retried_no_sooner_than_200_ms() -> anyhow::Result<()> {
    use kcl_core::retrieval::{PublisherStart, RetrievalFactory, StartingPosition};
    let env = TestEnv::start(1).await?;
    let faults = FaultInjector::default();
    faults.set_sticky("GetRecords", None, Fault::Throttle);
    let factory = kcl_core::PollingRetrievalFactory::new(quick_retrieval());
    let cancel = tokio_util::sync::CancellationToken::new();
    let _publisher = factory.start(PublisherStart::new(
        faults.client(&env.backend.kinesis_sdk_config()),
        env.stream.clone(),
        SHARD0.to_owned(),
        StartingPosition::new(ExtendedSequenceNumber::TRIM_HORIZON, None),
        cancel.clone(),
    ));
    faults.wait_calls("GetRecords", 1, WAIT).await?;
    let first = Instant::now();
    faults.wait_calls("GetRecords", 6, WAIT).await?;
    let elapsed = first.elapsed();
    cancel.cancel();
    assert!(
        elapsed >= Duration::from_millis(5 * 200),
        "5 retries after throttling in {elapsed:?}: under 200 ms apart"
    );
    Ok(())
}

/// Guards issue 21 item 7: a consumer that cannot tell whether its stream still exists
/// (its shard is unknown to Kinesis, and `DescribeStreamSummary` keeps failing) still
/// watches its lease: losing the lease ends it (`lease_lost`), and when this worker
/// takes the lease back, a new consumer reads the shard. Before, the consumer retried
/// `DescribeStreamSummary` forever, and the retaken lease found the stuck task and
/// never started a consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_asking_whether_its_stream_exists_still_gives_up_a_lost_lease() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let before = env.put(20, "before").await?;
    let faults = FaultInjector::default();
    let recorder = Recorder::default();
    let scheduler = fast_config(env.scheduler(&recorder, CheckpointMode::EveryBatch))
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .retrieval_config(quick_retrieval())
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(before.len(), WAIT).await?;
    // The next iterator is refused as for a shard Kinesis does not know, and whether the
    // stream exists cannot be learned.
    faults.set_sticky("DescribeStreamSummary", None, Fault::InternalFailure("unknown".into()));
    faults.set_sticky("GetShardIterator", Some(SHARD0), Fault::ResourceNotFound);
    faults.push("GetRecords", Fault::ExpiredIterator);
    faults.wait_injected("DescribeStreamSummary", 2, WAIT).await?;
    steal_lease(&env.lease_store(), SHARD0, "thief").await?;
    recorder
        .wait_until("lease_lost", WAIT, |s| {
            s.count(|e| matches!(e, Event::LeaseLost { .. })) == 1
        })
        .await?;
    // The thief never renews: this worker takes the lease back after the failover time.
    faults.clear_sticky("DescribeStreamSummary");
    faults.clear_sticky("GetShardIterator");
    let after = env.put(10, "after").await?;
    recorder.wait_for_records(before.len() + after.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(
        initialized(&recorder, SHARD0),
        2,
        "a second consumer read the retaken lease"
    );
    let mut written = before;
    written.extend(after);
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

const SHARD1: &str = "shardId-000000000001";
const SHARD2: &str = "shardId-000000000002";
const SHARD3: &str = "shardId-000000000003";

/// Issue 21 item 10's lineage: shard 0 split into 1 and 2, which were then merged into
/// 3, with records in 1, 2 and 3. The leases are those left when 1's lease was never
/// created (its creation at 0's end and the shard syncs after failed): 0 and 2 at
/// `SHARD_END`, 3 at `TRIM_HORIZON` (2 created it at its end), none for 1. Returns the
/// records that are still to be read: 1's and 3's.
async fn merged_child_of_a_parent_without_lease(env: &TestEnv) -> anyhow::Result<Vec<kcl_tests::Written>> {
    split_shard_in_half(&env.kinesis, &env.stream, SHARD0).await?;
    let split = env.put(40, "split").await?;
    kcl_tests::merge_shards(&env.kinesis, &env.stream, SHARD1, SHARD2).await?;
    let merged = env.put(20, "merged").await?;
    let store = env.lease_store();
    store.create_lease_table_if_not_exists().await?;
    let lease = |shard: &str, checkpoint: ExtendedSequenceNumber, parents: &[&str], children: &[&str]| {
        let mut lease =
            kcl_core::Lease::new(shard.to_owned(), checkpoint).with_parents(parents.iter().map(|p| p.to_string()));
        lease.child_shard_ids = children.iter().map(|c| c.to_string()).collect();
        lease
    };
    for l in [
        lease(SHARD0, ExtendedSequenceNumber::SHARD_END, &[], &[SHARD1, SHARD2]),
        lease(SHARD2, ExtendedSequenceNumber::SHARD_END, &[SHARD0], &[SHARD3]),
        lease(SHARD3, ExtendedSequenceNumber::TRIM_HORIZON, &[SHARD1, SHARD2], &[]),
    ] {
        anyhow::ensure!(store.create_lease_if_not_exists(&l).await?, "{} existed", l.lease_key);
    }
    let expected: Vec<_> = split
        .iter()
        .filter(|w| w.shard_id == SHARD1)
        .chain(merged.iter())
        .cloned()
        .collect();
    anyhow::ensure!(expected.len() > merged.len(), "some records went to shard 1");
    Ok(expected)
}

/// Asserts that `expected` (from [`merged_child_of_a_parent_without_lease`]) was
/// delivered once, shard 1's records before any of shard 3's.
fn assert_parent_read_first(recorder: &Recorder, expected: &[kcl_tests::Written]) {
    let state = recorder.state();
    assert_eq!(state.by_shard(), by_shard(expected));
    let last_of_parent = state.deliveries.iter().rposition(|d| d.shard_id == SHARD1);
    let first_of_child = state.deliveries.iter().position(|d| d.shard_id == SHARD3);
    assert!(last_of_parent < first_of_child, "the parent was read first");
}

/// Guards issue 21 item 10, on the shard sync's side: a parent whose lease was never
/// created is not finished. 1's records are read, all before 3's. Before, the shard
/// sync took 3's lease for proof that 1 was read (and 3's consumer took the missing
/// lease for a finished parent): 1's records were skipped forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_whose_lease_was_never_created_is_read_before_its_child() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let expected = merged_child_of_a_parent_without_lease(&env).await?;
    let recorder = Recorder::default();
    let scheduler = fast_config(env.scheduler(&recorder, CheckpointMode::EveryBatch))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(expected.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_parent_read_first(&recorder, &expected);
    Ok(())
}

/// Guards issue 21 item 10, on the consumer's side: while the parent's lease cannot be
/// created (every creation fails), 3's consumer waits instead of taking the missing
/// lease for a finished parent; once creations succeed again, 1's records are read,
/// all before 3's. Before, 3 was read at once and, once 3 had checkpointed, no shard
/// sync created 1's lease any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_waits_for_a_parent_lease_that_cannot_be_created_yet() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let expected = merged_child_of_a_parent_without_lease(&env).await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    store.fail_creates.store(true, Ordering::SeqCst);
    let recorder = Recorder::default();
    let (handle, task) = spawn_scheduler(with_store(&env, &recorder, &store)?);
    // 3 is the only lease to take; its consumer starts after the take.
    store.wait_takes(1, WAIT).await?;
    let creates = store.creates.load(Ordering::SeqCst);
    let child_started = |s: &kcl_tests::RecorderState| {
        s.events
            .iter()
            .any(|e| matches!(e, Event::Initialized { shard_id, .. } if shard_id == SHARD3))
    };
    tokio::select! {
        // Two more creations: the consumer keeps trying while it waits.
        r = store.wait_creates(creates + 2, WAIT) => r?,
        r = recorder.wait_until("shard 3 initialized", WAIT, child_started) => {
            r?;
            panic!("shard 3 started while its parent shard 1 had no lease");
        }
    }
    store.fail_creates.store(false, Ordering::SeqCst);
    recorder.wait_for_records(expected.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_parent_read_first(&recorder, &expected);
    Ok(())
}

/// Issue 21 item 5's scenario: a lease started at `LATEST` changes hands before its
/// first checkpoint. A first worker starts it (`retrieval` picks polling or fan-out),
/// reads records written after it started and never checkpoints; it stops and a
/// second worker takes the lease over. The second must deliver every record the
/// first did (all written after the lease first started), not start at a new
/// `LATEST` that skips them. With `exact_timestamps` (the backend honours
/// `AT_TIMESTAMP`), records written before the lease started stay unread; without
/// (the embedded backend's `SubscribeToShard` starts at the shard's first record
/// instead), they may be read again, but nothing after them is skipped.
async fn a_latest_lease_handed_on_before_its_first_checkpoint_skips_nothing(
    retrieval: fn(kcl_core::SchedulerBuilder) -> anyhow::Result<kcl_core::SchedulerBuilder>,
    exact_timestamps: bool,
) -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(5, "before").await?;
    past_the_next_whole_second(std::time::SystemTime::now()).await;
    let first = Recorder::default();
    let scheduler = retrieval(env.scheduler(&first, CheckpointMode::Never))?
        .initial_position(InitialPositionInStream::Latest)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    // The lease's start is stored before `initialize`.
    first
        .wait_until("shard 0 initialized", WAIT, |s| {
            s.events
                .iter()
                .any(|e| matches!(e, Event::Initialized { shard_id, .. } if shard_id == SHARD0))
        })
        .await?;
    let lease = env.lease_store().get_lease(SHARD0).await?.context("lease")?;
    let started = lease
        .latest_start()
        .context("the first consumer stored where it started")?;
    past_the_next_whole_second(started).await;
    // Writes one record at a time until the first worker reads one: its reading
    // position is then settled.
    let mut probes = 0;
    while first.state().deliveries.is_empty() {
        anyhow::ensure!(probes < 60, "the first worker never read a record");
        env.put(1, "probe").await?;
        probes += 1;
        let _ = first
            .wait_until("a record read", Duration::from_secs(2), |s| !s.deliveries.is_empty())
            .await;
    }
    env.put(20, "after").await?;
    let read_so_far = first.state().deliveries.len();
    let read_by_first = records_read(&first, read_so_far + 20).await?;
    stop_scheduler(handle, task, WAIT).await??;
    let stored = env.lease_store().get_lease(SHARD0).await?.context("lease")?;
    assert_eq!(
        stored.checkpoint,
        ExtendedSequenceNumber::LATEST,
        "no checkpoint was written"
    );

    let second = Recorder::default();
    let scheduler = retrieval(env.scheduler(&second, CheckpointMode::EveryBatch))?
        .initial_position(InitialPositionInStream::Latest)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    second.wait_for_records(read_by_first.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    let by_second: Vec<_> = second
        .state()
        .deliveries
        .iter()
        .map(|d| d.sequence_number.clone())
        .collect();
    if exact_timestamps {
        assert_eq!(
            by_second, read_by_first,
            "the second worker read what the first read, no more"
        );
    } else {
        // Nothing skipped; what came before may be read again.
        assert!(
            by_second.ends_with(&read_by_first),
            "the second worker read all the first read: {by_second:?} vs {read_by_first:?}"
        );
    }
    Ok(())
}

/// Sleeps until the wall clock is past the whole second after `t`. The embedded
/// backend keeps arrival times in whole seconds (DESIGN.md's backends), so a record
/// written in the same second as an `AT_TIMESTAMP` start would fall before it: a wait
/// for a clock, not for an event.
async fn past_the_next_whole_second(t: std::time::SystemTime) {
    let since_epoch = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let next = std::time::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() + 1) + Duration::from_millis(50);
    if let Ok(wait) = next.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

/// Waits until `recorder` holds `n` deliveries; returns their sequence numbers.
async fn records_read(recorder: &Recorder, n: usize) -> anyhow::Result<Vec<kcl_core::SequenceNumber>> {
    recorder.wait_for_records(n, WAIT).await?;
    Ok(recorder
        .state()
        .deliveries
        .iter()
        .map(|d| d.sequence_number.clone())
        .collect())
}

/// Guards issue 21 item 5 with polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_lease_restarted_before_its_first_checkpoint_skips_nothing_polling() -> anyhow::Result<()> {
    a_latest_lease_handed_on_before_its_first_checkpoint_skips_nothing(Ok, true).await
}

/// Guards issue 21 item 5 with fan-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_lease_restarted_before_its_first_checkpoint_skips_nothing_fan_out() -> anyhow::Result<()> {
    a_latest_lease_handed_on_before_its_first_checkpoint_skips_nothing(
        |builder| {
            use kcl_efo::SchedulerBuilderExt as _;
            let fan_out = kcl_efo::FanOutConfig {
                shard_end_check_interval: Duration::from_secs(1),
                registration_timeout: Duration::from_secs(20),
                ..kcl_efo::FanOutConfig::new(kcl_tests::unique("consumer"))
            };
            Ok(builder.retrieval_mode(kcl_efo::RetrievalMode::FanOut(fan_out))?)
        },
        false,
    )
    .await
}

/// Guards the review of issue 21 item 10: a lease at `TRIM_HORIZON` whose parent aged
/// out of the stream (its lease long deleted, its shard no longer listed: the common
/// case on a stream resharded long ago) starts without a shard sync of its own. Before,
/// every such consumer start read the whole lease table and listed the stream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_gone_from_the_stream_costs_no_sync() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(10, "child").await?;
    let store = env.lease_store();
    store.create_lease_table_if_not_exists().await?;
    let child = kcl_core::Lease::new(SHARD0, ExtendedSequenceNumber::TRIM_HORIZON)
        .with_parents(["shardId-000000000099".to_owned()]);
    anyhow::ensure!(store.create_lease_if_not_exists(&child).await?, "created");
    let faults = FaultInjector::default();
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    assert_eq!(faults.calls("ListShards"), 1, "the scheduler's first sync only");
    Ok(())
}
