//! One worker, end to end, on the embedded backend: delivery, order, restart,
//! fencing, initial positions, graceful shutdown, processor failures, injected
//! Kinesis faults, and bad input.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use kcl_core::{
    Checkpoint, CheckpointError, ExtendedSequenceNumber, InitialPositionInStream, LeaseManagementConfig, LeaseStore,
    LeaseStoreError, OnProcessorFailure, ProcessRecordsInput, ProcessorError, ProcessorErrorPolicy, RecordProcessor,
    RetryPolicy, Scheduler, SchedulerError, SequenceNumber,
};
use kcl_tests::{by_shard, fast_config, CheckpointMode, Event, Fault, FaultInjector, Recorder, TestEnv};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(90);

fn spawn(scheduler: Scheduler) -> (kcl_core::ShutdownHandle, JoinHandle<Result<(), SchedulerError>>) {
    let handle = scheduler.shutdown_handle();
    (handle, tokio::spawn(scheduler.run()))
}

async fn stop(
    handle: kcl_core::ShutdownHandle,
    task: JoinHandle<Result<(), SchedulerError>>,
) -> anyhow::Result<Result<(), SchedulerError>> {
    handle.shutdown();
    Ok(tokio::time::timeout(WAIT, task)
        .await
        .context("scheduler did not stop")??)
}

/// Every delivered sequence number per shard, checked for order and duplicates.
fn assert_in_order_without_duplicates(recorder: &Recorder) -> BTreeMap<String, Vec<SequenceNumber>> {
    let delivered = recorder.state().by_shard();
    for (shard, seqs) in &delivered {
        for pair in seqs.windows(2) {
            assert!(
                pair[0] < pair[1],
                "shard {shard}: {} delivered before {}",
                pair[0],
                pair[1]
            );
        }
    }
    delivered
}

/// Runs a `TRIM_HORIZON` scheduler until `n` records were delivered, then stops it
/// gracefully.
async fn consume(env: &TestEnv, recorder: &Recorder, mode: CheckpointMode, n: usize) -> anyhow::Result<()> {
    consume_from(env, recorder, mode, InitialPositionInStream::TrimHorizon, n).await
}

/// Runs a scheduler starting at `position` until `n` records were delivered, then stops
/// it gracefully.
async fn consume_from(
    env: &TestEnv,
    recorder: &Recorder,
    mode: CheckpointMode,
    position: InitialPositionInStream,
    n: usize,
) -> anyhow::Result<()> {
    let scheduler = env.scheduler(recorder, mode).initial_position(position).build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(n, WAIT).await?;
    stop(handle, task).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_shards_ten_thousand_records_exactly_once_in_order() -> anyhow::Result<()> {
    let env = TestEnv::start(4).await?;
    let written = env.put(10_000, "e2e").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let started = std::time::Instant::now();
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(1, WAIT).await?;
    let first = started.elapsed();
    recorder.wait_for_records(10_000, WAIT).await?;
    let all = started.elapsed();
    eprintln!("first record after {first:?}; 10,000 records after {all:?}");
    stop(handle, task).await??;

    let delivered = assert_in_order_without_duplicates(&recorder);
    assert_eq!(
        delivered,
        by_shard(&written),
        "every record exactly once, in sequence order per shard"
    );
    assert_eq!(delivered.len(), 4, "all four shards were read");
    let payloads: HashSet<_> = recorder.state().deliveries.iter().map(|d| d.data.clone()).collect();
    assert_eq!(payloads.len(), 10_000, "payloads arrive intact");
    assert!(
        recorder.state().checkpoint_errors.is_empty(),
        "{:?}",
        recorder.state().checkpoint_errors
    );
    // The last checkpoint of each shard is its last record.
    for lease in env.lease_store().list_leases().await? {
        let last = by_shard(&written)[&lease.lease_key]
            .last()
            .cloned()
            .context("shard has records")?;
        assert_eq!(
            lease.checkpoint,
            ExtendedSequenceNumber::new(last, 0),
            "shard {}",
            lease.lease_key
        );
        assert_eq!(lease.lease_owner, None, "released at shutdown");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_after_the_checkpoints() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let first_half = env.put(2_000, "first").await?;
    // The first worker reads in small batches, checkpoints each, and is stopped partway.
    let recorder = Recorder::default();
    let retrieval = kcl_core::RetrievalConfig {
        max_records: 100,
        idle_time_between_reads: Duration::from_millis(200),
        ..Default::default()
    };
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::Never)
        .retrieval_config(retrieval)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .processor_factory({
            let recorder = recorder.clone();
            move |shard: &str| SlowCheckpointer {
                shard: shard.to_owned(),
                recorder: recorder.clone(),
            }
        })
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(500, WAIT).await?;
    stop(handle, task).await??;
    let before_restart = recorder.state().deliveries.len();
    assert!(before_restart < 2_000, "stopped partway ({before_restart} records)");

    let checkpoints: BTreeMap<String, ExtendedSequenceNumber> = env
        .lease_store()
        .list_leases()
        .await?
        .into_iter()
        .map(|l| (l.lease_key, l.checkpoint))
        .collect();
    assert!(
        checkpoints.values().any(|c| c.sequence_number().is_some()),
        "some shard checkpointed: {checkpoints:?}"
    );

    let second_half = env.put(1_000, "second").await?;
    let recorder2 = Recorder::default();
    let scheduler = env
        .scheduler(&recorder2, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    let mut expected = by_shard(&first_half);
    for (shard, seqs) in by_shard(&second_half) {
        expected.entry(shard).or_default().extend(seqs);
    }
    // What the second worker must deliver: everything after each shard's checkpoint.
    let remaining: BTreeMap<String, Vec<SequenceNumber>> = expected
        .iter()
        .map(|(shard, seqs)| {
            let after = seqs
                .iter()
                .filter(|s| match checkpoints.get(shard).map(|c| &c.checkpoint) {
                    Some(Checkpoint::Sequence(cp)) => *s > cp,
                    _ => true,
                })
                .cloned()
                .collect();
            (shard.clone(), after)
        })
        .collect();
    let total: usize = remaining.values().map(Vec::len).sum();
    recorder2.wait_for_records(total, WAIT).await?;
    stop(handle, task).await??;
    let delivered = assert_in_order_without_duplicates(&recorder2);
    let delivered: BTreeMap<_, _> = delivered.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    let remaining: BTreeMap<_, _> = remaining.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    assert_eq!(
        delivered, remaining,
        "resumed right after each checkpoint, nothing before it again"
    );
    Ok(())
}

/// Checkpoints every batch at its last record, so progress is stored in steps.
struct SlowCheckpointer {
    shard: String,
    recorder: Recorder,
}

#[async_trait::async_trait]
impl RecordProcessor for SlowCheckpointer {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let mut p = kcl_tests::RecordingProcessor::new(&self.shard, self.recorder.clone(), CheckpointMode::EveryBatch);
        p.process_records(input).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_after_another_worker_took_the_lease_fails_with_lease_lost() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(20, "fence").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::Never)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(20, WAIT).await?;

    // Worker B takes the lease with the counter it read. (The processor never
    // checkpoints, so the stored checkpoint cannot move while B takes it.)
    let store = env.lease_store();
    let lease = kcl_tests::steal_lease(&store, "shardId-000000000000", "worker-b").await?;
    let before = lease.checkpoint.clone();

    let checkpointer = recorder
        .state()
        .checkpointers
        .values()
        .next()
        .cloned()
        .context("a checkpointer")?;
    let err = checkpointer
        .checkpoint()
        .await
        .expect_err("the old owner cannot checkpoint");
    assert!(matches!(err, CheckpointError::LeaseLost { .. }), "got {err:?}");
    let stored = store.get_lease(&lease.lease_key).await?.context("lease")?;
    assert_eq!(stored.checkpoint, before, "stored checkpoint unchanged");
    assert_eq!(stored.lease_owner.as_deref(), Some("worker-b"));

    recorder
        .wait_until("lease_lost", WAIT, |s| {
            s.count(|e| matches!(e, Event::LeaseLost { .. })) == 1
        })
        .await?;
    stop(handle, task).await??;
    let stored = store.get_lease(&lease.lease_key).await?.context("lease")?;
    assert_eq!(
        stored.lease_owner.as_deref(),
        Some("worker-b"),
        "shutdown did not release B's lease"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_horizon_reads_existing_data() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let old = env.put(50, "old").await?;
    let recorder = Recorder::default();
    consume(&env, &recorder, CheckpointMode::EveryBatch, 50).await?;
    assert_eq!(recorder.state().by_shard(), by_shard(&old));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_skips_existing_data() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(50, "old").await?;
    let recorder = Recorder::default();
    // An empty batch tells the test that the LATEST iterator exists and was read once.
    let coordinator = kcl_core::CoordinatorConfig {
        call_process_records_even_for_empty_list: true,
        graceful_shutdown_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .coordinator_config(coordinator)
        .initial_position(InitialPositionInStream::Latest)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder
        .wait_until("a first read", WAIT, |s| {
            s.count(|e| matches!(e, Event::Batch { .. })) > 0
        })
        .await?;
    let new = env.put(10, "new").await?;
    recorder.wait_for_records(10, WAIT).await?;
    stop(handle, task).await??;
    assert_eq!(
        recorder.state().by_shard(),
        by_shard(&new),
        "only records written after the start"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_timestamp_starts_at_the_first_record_at_or_after_it() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(20, "before").await?;
    // The embedded Kinesis keeps arrival times in whole seconds: leave a clear gap on
    // both sides of the timestamp. (A real time gap is what is tested, not an event.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let timestamp = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = env.put(20, "after").await?;
    let recorder = Recorder::default();
    let position = InitialPositionInStream::AtTimestamp(timestamp);
    consume_from(&env, &recorder, CheckpointMode::EveryBatch, position, 20).await?;
    assert_eq!(
        recorder.state().by_shard(),
        by_shard(&after),
        "exactly the records after the timestamp"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_checkpoints_and_releases_every_lease() -> anyhow::Result<()> {
    let env = TestEnv::start(3).await?;
    let written = env.put(300, "graceful").await?;
    let recorder = Recorder::default();
    consume(&env, &recorder, CheckpointMode::OnShutdown, 300).await?;

    {
        let state = recorder.state();
        let requested = state.count(|e| matches!(e, Event::ShutdownRequested { .. }));
        assert_eq!(requested, 3, "{:?}", state.events);
        assert!(state.checkpoint_errors.is_empty(), "{:?}", state.checkpoint_errors);
    }
    let expected = by_shard(&written);
    let leases = env.lease_store().list_leases().await?;
    assert_eq!(leases.len(), 3);
    for lease in leases {
        assert_eq!(lease.lease_owner, None, "lease {} released", lease.lease_key);
        let last = expected[&lease.lease_key].last().cloned().context("records")?;
        assert_eq!(
            lease.checkpoint,
            ExtendedSequenceNumber::new(last, 0),
            "checkpoint of {} stored",
            lease.lease_key
        );
    }
    Ok(())
}

/// Fails (or panics) on its first `failures` calls, then records.
struct Flaky {
    inner: kcl_tests::RecordingProcessor,
    shard: String,
    recorder: Recorder,
    failures: usize,
    panic: bool,
}

#[async_trait::async_trait]
impl RecordProcessor for Flaky {
    async fn initialize(&mut self, input: kcl_core::InitializationInput) -> Result<(), ProcessorError> {
        self.inner.initialize(input).await
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        if self.failures > 0 && !input.records.is_empty() {
            self.failures -= 1;
            self.recorder.note(Event::Failed {
                shard_id: self.shard.clone(),
            });
            if self.panic {
                panic!("processor bug");
            }
            return Err("downstream unavailable".into());
        }
        self.inner.process_records(input).await
    }
}

fn flaky_scheduler(
    env: &TestEnv,
    recorder: &Recorder,
    failures: usize,
    panic: bool,
    policy: ProcessorErrorPolicy,
) -> anyhow::Result<Scheduler> {
    let recorder = recorder.clone();
    Ok(env
        .trim_horizon_builder(std::sync::Arc::new(env.lease_store()), move |shard: &str| Flaky {
            inner: kcl_tests::RecordingProcessor::new(shard, recorder.clone(), CheckpointMode::EveryBatch),
            shard: shard.to_owned(),
            recorder: recorder.clone(),
            failures,
            panic,
        })
        .processor_error_policy(policy)
        .build()?)
}

fn policy(attempts: u32, on_exhausted: OnProcessorFailure) -> ProcessorErrorPolicy {
    ProcessorErrorPolicy {
        retry: RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(5), Some(attempts)),
        on_exhausted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_panicking_batches_are_retried_without_loss() -> anyhow::Result<()> {
    for panic in [false, true] {
        let env = TestEnv::start(1).await?;
        let written = env.put(100, "flaky").await?;
        let recorder = Recorder::default();
        let scheduler = flaky_scheduler(&env, &recorder, 3, panic, policy(5, OnProcessorFailure::StopScheduler))?;
        let (handle, task) = spawn(scheduler);
        recorder.wait_for_records(100, WAIT).await?;
        stop(handle, task).await??;
        assert_eq!(recorder.state().by_shard(), by_shard(&written), "panic={panic}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_keeps_failing_stops_the_scheduler_without_checkpointing() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(10, "poison").await?;
    let recorder = Recorder::default();
    let scheduler = flaky_scheduler(
        &env,
        &recorder,
        usize::MAX,
        false,
        policy(3, OnProcessorFailure::StopScheduler),
    )?;
    let result = tokio::time::timeout(WAIT, scheduler.run())
        .await
        .context("run returns")?;
    match result {
        Err(SchedulerError::ProcessorFailed { shard_id, source }) => {
            assert_eq!(shard_id, "shardId-000000000000");
            assert!(source.to_string().contains("downstream unavailable"), "{source}");
        }
        other => panic!("expected ProcessorFailed, got {other:?}"),
    }
    let lease = env.lease_store().list_leases().await?.pop().context("lease")?;
    assert_eq!(
        lease.checkpoint,
        ExtendedSequenceNumber::TRIM_HORIZON,
        "nothing was marked processed"
    );
    assert_eq!(lease.lease_owner, None, "lease released");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_batch_policy_moves_on() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let first = env.put(10, "skipped").await?;
    let recorder = Recorder::default();
    let scheduler = flaky_scheduler(&env, &recorder, 2, false, policy(2, OnProcessorFailure::SkipBatch))?;
    let (handle, task) = spawn(scheduler);
    // Both attempts at the first batch failed: the policy skips it.
    recorder
        .wait_until("two failures", WAIT, |s| {
            s.count(|e| matches!(e, Event::Failed { .. })) == 2
        })
        .await?;
    let second = env.put(10, "delivered").await?;
    recorder.wait_for_records(10, WAIT).await?;
    stop(handle, task).await??;
    let delivered = recorder.state().by_shard();
    let first_seqs: HashSet<_> = first.iter().map(|w| w.sequence_number.clone()).collect();
    let delivered_seqs: Vec<_> = delivered.values().flatten().cloned().collect();
    assert!(
        delivered_seqs.iter().all(|s| !first_seqs.contains(s)),
        "the failing batch was skipped"
    );
    assert_eq!(delivered, by_shard(&second));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_expired_iterators_are_recovered_without_loss_or_duplicates() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(300, "faults").await?;
    let faults = FaultInjector::default();
    for _ in 0..3 {
        faults.push("GetRecords", Fault::Throttle);
    }
    faults.push("GetRecords", Fault::ExpiredIterator);
    faults.push("GetShardIterator", Fault::Throttle);
    faults.push("GetRecords", Fault::Throttle);
    let kinesis = faults.client(&env.backend.kinesis_sdk_config());
    let recorder = Recorder::default();
    let retrieval = kcl_core::RetrievalConfig {
        max_records: 50,
        idle_time_between_reads: Duration::from_millis(200),
        ..Default::default()
    };
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(kinesis)
        .retrieval_config(retrieval)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(300, WAIT).await?;
    stop(handle, task).await??;
    assert_eq!(
        faults.injected().len(),
        6,
        "every queued fault was injected: {:?}",
        faults.injected()
    );
    let delivered = assert_in_order_without_duplicates(&recorder);
    assert_eq!(delivered, by_shard(&written));
    Ok(())
}

#[tokio::test]
async fn a_missing_stream_is_a_typed_error() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let scheduler = fast_config(
        Scheduler::builder("no-such-stream")
            .kinesis_client(env.kinesis.clone())
            .lease_store(env.lease_store()),
    )
    .processor_factory({
        let recorder = recorder.clone();
        move |shard: &str| kcl_tests::RecordingProcessor::new(shard, recorder.clone(), CheckpointMode::Never)
    })
    .build()?;
    match scheduler.run().await {
        Err(SchedulerError::StreamNotFound { stream }) => assert_eq!(stream, "no-such-stream"),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn a_lease_table_with_the_wrong_key_schema_is_a_typed_error() -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::{AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType};
    let env = TestEnv::start(1).await?;
    env.dynamodb
        .create_table()
        .table_name(&env.table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .send()
        .await?;
    let recorder = Recorder::default();
    let result = env.scheduler(&recorder, CheckpointMode::Never).build()?.run().await;
    match result {
        Err(SchedulerError::LeaseStore(LeaseStoreError::InvalidTable { table, reason })) => {
            assert_eq!(table, env.table);
            assert!(reason.contains("id"), "the reason names what was found: {reason}");
        }
        other => panic!("expected InvalidTable, got {other:?}"),
    }
    Ok(())
}

/// Guards hardening item 5: one corrupt lease item does not stop the worker. The item
/// is skipped (logged with its key and attribute, and counted), left untouched, and the
/// other shards are consumed; `list_leases` still reports it as a typed error for the
/// operator who must act.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_lease_item_is_skipped_and_the_other_shards_consumed() -> anyhow::Result<()> {
    use aws_sdk_dynamodb::types::AttributeValue;
    let env = TestEnv::start(2).await?;
    env.lease_store().create_lease_table_if_not_exists().await?;
    env.dynamodb
        .put_item()
        .table_name(&env.table)
        .item("leaseKey", AttributeValue::S("shardId-000000000000".into()))
        .item("leaseCounter", AttributeValue::S("not a number".into()))
        .item("checkpoint", AttributeValue::S("TRIM_HORIZON".into()))
        .send()
        .await?;
    let written = env.put(200, "corrupt").await?;
    let expected = by_shard(&written);
    let healthy = expected
        .get("shardId-000000000001")
        .context("records on shard 1")?
        .clone();
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder
        .wait_until("every record of the healthy shard", WAIT, |s| {
            s.by_shard().get("shardId-000000000001").map(Vec::len) == Some(healthy.len())
        })
        .await?;
    stop(handle, task).await??;
    let delivered = assert_in_order_without_duplicates(&recorder);
    assert_eq!(delivered.get("shardId-000000000001"), Some(&healthy));
    assert!(
        !delivered.contains_key("shardId-000000000000"),
        "the corrupt lease is not taken"
    );
    let raw = env
        .dynamodb
        .get_item()
        .table_name(&env.table)
        .key("leaseKey", AttributeValue::S("shardId-000000000000".into()))
        .send()
        .await?;
    assert_eq!(
        raw.item().and_then(|i| i.get("leaseCounter")),
        Some(&AttributeValue::S("not a number".into())),
        "left untouched"
    );
    match env.lease_store().list_leases().await {
        Err(LeaseStoreError::CorruptLease {
            lease_key, attribute, ..
        }) => {
            assert_eq!(lease_key, "shardId-000000000000");
            assert_eq!(attribute, "leaseCounter");
        }
        other => panic!("expected CorruptLease, got {other:?}"),
    }
    let readable = env.lease_store().list_readable_leases().await?;
    assert_eq!(readable.leases.len(), 1);
    assert_eq!(readable.corrupt.len(), 1);
    Ok(())
}

#[tokio::test]
async fn invalid_config_is_refused_by_build() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let mut lease = LeaseManagementConfig::default();
    lease.renewal_interval = lease.failover_time;
    let err = env
        .scheduler(&recorder, CheckpointMode::Never)
        .lease_config(lease)
        .build()
        .expect_err("invalid");
    assert_eq!(err.field, "lease.renewal_interval");
    assert!(err.to_string().contains("shorter than failover_time"), "{err}");

    let retrieval = kcl_core::RetrievalConfig {
        max_records: 20_000,
        ..Default::default()
    };
    let err = env
        .scheduler(&recorder, CheckpointMode::Never)
        .retrieval_config(retrieval)
        .build()
        .expect_err("invalid");
    assert_eq!(err.field, "retrieval.max_records");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_phase_checkpoints_store_a_pending_checkpoint_with_state() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(30, "two-phase").await?;
    let last = written.last().context("records")?.sequence_number.clone();
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::Never)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(30, WAIT).await?;
    let checkpointer = recorder
        .state()
        .checkpointers
        .values()
        .next()
        .cloned()
        .context("checkpointer")?;
    let store = env.lease_store();
    let shard = "shardId-000000000000";

    // Phase one: a pending checkpoint with application state; the committed one stays.
    let prepared = checkpointer
        .prepare_checkpoint(Some(bytes::Bytes::from_static(b"state-1")))
        .await?;
    let lease = store.get_lease(shard).await?.context("lease")?;
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::TRIM_HORIZON);
    assert_eq!(
        lease.pending_checkpoint,
        Some(ExtendedSequenceNumber::new(last.clone(), 0))
    );
    assert_eq!(lease.pending_checkpoint_state.as_deref(), Some(&b"state-1"[..]));
    // Phase two: commit; the pending checkpoint is cleared.
    prepared.checkpoint().await?;
    let lease = store.get_lease(shard).await?.context("lease")?;
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::new(last.clone(), 0));
    assert_eq!((lease.pending_checkpoint, lease.pending_checkpoint_state), (None, None));

    // A prepared, uncommitted checkpoint is what the next owner's `initialize` sees.
    let _uncommitted = checkpointer
        .prepare_checkpoint(Some(bytes::Bytes::from_static(b"state-2")))
        .await?;
    stop(handle, task).await??;
    let recorder2 = Recorder::default();
    let scheduler = env.scheduler(&recorder2, CheckpointMode::Never).build()?;
    let (handle, task) = spawn(scheduler);
    recorder2
        .wait_until("initialize", WAIT, |s| {
            s.count(|e| matches!(e, Event::Initialized { .. })) == 1
        })
        .await?;
    stop(handle, task).await??;
    let events = recorder2.state().events.clone();
    let Some(Event::Initialized {
        checkpoint, pending, ..
    }) = events.first()
    else {
        panic!("no initialize: {events:?}");
    };
    assert_eq!(checkpoint, &last.to_string());
    assert_eq!(
        pending,
        &Some((last.to_string(), Some(bytes::Bytes::from_static(b"state-2"))))
    );
    Ok(())
}

/// Writes one KPL aggregated record of `n` user records; returns its sequence number.
async fn put_aggregated(env: &TestEnv, tag: &str, n: usize) -> anyhow::Result<SequenceNumber> {
    let users: Vec<(String, Option<String>, bytes::Bytes)> = (0..n)
        .map(|i| (format!("{tag}-key-{i}"), None, bytes::Bytes::from(format!("{tag}-{i}"))))
        .collect();
    let data = kcl_core::aggregation::encode_aggregated(&users);
    let out = env
        .kinesis
        .put_record()
        .stream_name(&env.stream)
        .partition_key(format!("{tag}-outer"))
        .data(aws_sdk_kinesis::primitives::Blob::new(data.to_vec()))
        .send()
        .await?;
    Ok(SequenceNumber::parse(out.sequence_number())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_are_unpacked_and_resume_inside_an_aggregate() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let first = put_aggregated(&env, "a", 5).await?;
    let second = put_aggregated(&env, "b", 5).await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::Never)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = spawn(scheduler);
    recorder.wait_for_records(10, WAIT).await?;
    {
        let state = recorder.state();
        let got: Vec<(SequenceNumber, u64, String)> = state
            .deliveries
            .iter()
            .map(|d| {
                (
                    d.sequence_number.clone(),
                    d.sub_sequence_number,
                    String::from_utf8_lossy(&d.data).into_owned(),
                )
            })
            .collect();
        let expected: Vec<(SequenceNumber, u64, String)> = [(&first, "a"), (&second, "b")]
            .iter()
            .flat_map(|(seq, tag)| (0..5u64).map(move |i| ((*seq).clone(), i, format!("{tag}-{i}"))))
            .collect();
        assert_eq!(got, expected, "user records, in order, with sub-sequence numbers");
    }
    // Checkpoint in the middle of the second aggregate, then restart.
    let checkpointer = recorder
        .state()
        .checkpointers
        .values()
        .next()
        .cloned()
        .context("checkpointer")?;
    checkpointer.checkpoint_at(&second, 2).await?;
    stop(handle, task).await??;
    let recorder2 = Recorder::default();
    let (handle, task) = spawn(env.scheduler(&recorder2, CheckpointMode::Never).build()?);
    recorder2.wait_for_records(2, WAIT).await?;
    stop(handle, task).await??;
    let resumed: Vec<(SequenceNumber, u64)> = recorder2
        .state()
        .deliveries
        .iter()
        .map(|d| (d.sequence_number.clone(), d.sub_sequence_number))
        .collect();
    assert_eq!(
        resumed,
        [(second.clone(), 3), (second, 4)],
        "resumes right after the checkpointed user record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_aggregated_record_is_delivered_as_it_is() -> anyhow::Result<()> {
    use md5::Digest as _;
    let env = TestEnv::start(1).await?;
    // The KPL magic and a valid digest around bytes that are not an AggregatedRecord.
    let garbage = b"\xff\xff\xff\xff not protobuf".to_vec();
    let mut data = kcl_core::aggregation::AGGREGATED_RECORD_MAGIC.to_vec();
    data.extend_from_slice(&garbage);
    data.extend_from_slice(&md5::Md5::digest(&garbage));
    env.kinesis
        .put_record()
        .stream_name(&env.stream)
        .partition_key("bad")
        .data(aws_sdk_kinesis::primitives::Blob::new(data.clone()))
        .send()
        .await?;
    let after = env.put(3, "after").await?;
    let recorder = Recorder::default();
    consume(&env, &recorder, CheckpointMode::EveryBatch, 4).await?;
    let state = recorder.state();
    assert_eq!(
        state.deliveries[0].data.as_ref(),
        &data[..],
        "delivered unchanged, not dropped"
    );
    // Hardening item 12: marked, so that a processor can tell.
    assert!(state.deliveries[0].malformed_aggregate);
    assert!(state.deliveries[1..].iter().all(|d| !d.malformed_aggregate));
    let rest: Vec<_> = state.deliveries[1..]
        .iter()
        .map(|d| d.sequence_number.clone())
        .collect();
    assert_eq!(
        rest,
        after.iter().map(|w| w.sequence_number.clone()).collect::<Vec<_>>()
    );
    Ok(())
}
