//! Resharding: splits and merges under a steady producer with two workers, checked for
//! loss and for per-key order across parent and child shards; parents before children;
//! initial positions on a resharded stream; cleanup of finished parent leases.
//!
//! On the embedded backend, `GetRecords` never names child shards, so children are
//! found through `ListShards` lineage; the conformance variants (kinesis-mock) exercise
//! the `ChildShards` path. The fan-out variants read through `SubscribeToShard`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use kcl_core::{
    InitialPositionInStream, LeaseManagementConfig, LeaseStore, Scheduler, SchedulerError, SequenceNumber,
    ShutdownHandle,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
use kcl_tests::{
    assert_keyed_order, fast_config, list_shards, merge_shards, spawn_keyed_producer, split_shard_in_half,
    CheckpointMode, Event, Recorder, RecordingProcessor, TestEnv,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(180);

fn worker(
    env: &TestEnv,
    table: &str,
    id: &str,
    recorder: &Recorder,
    position: InitialPositionInStream,
) -> anyhow::Result<(ShutdownHandle, JoinHandle<Result<(), SchedulerError>>)> {
    worker_reading(env, table, id, recorder, position, None)
}

/// A worker reading through enhanced fan-out with the stream consumer `fan_out`, or
/// by polling with `None`.
fn worker_reading(
    env: &TestEnv,
    table: &str,
    id: &str,
    recorder: &Recorder,
    position: InitialPositionInStream,
    fan_out: Option<&str>,
) -> anyhow::Result<(ShutdownHandle, JoinHandle<Result<(), SchedulerError>>)> {
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_secs(3));
    lease.lease_taking_interval = Duration::from_millis(500);
    lease.completed_lease_cleanup_delay = Duration::from_secs(1);
    let recorder = recorder.clone();
    let scheduler = fast_config(
        Scheduler::builder(env.stream.clone())
            .kinesis_client(env.kinesis.clone())
            .lease_store(DynamoLeaseStore::new(env.dynamodb.clone(), table.to_owned())),
    )
    .lease_config(lease)
    // Empty batches too: a first (empty) read tells a test that a LATEST iterator exists.
    // A frequent shard sync creates child leases while parents are still being read, so
    // that children must wait for their parents.
    .coordinator_config(kcl_core::CoordinatorConfig {
        parent_shard_poll_interval: Duration::from_millis(200),
        shard_sync_interval: Duration::from_millis(300),
        call_process_records_even_for_empty_list: true,
        ..Default::default()
    })
    .worker_id(id)
    .initial_position(position)
    .processor_factory(move |shard: &str| RecordingProcessor::new(shard, recorder.clone(), CheckpointMode::EveryBatch));
    let scheduler = match fan_out {
        Some(consumer) => scheduler.retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
            shard_end_check_interval: Duration::from_millis(500),
            ..FanOutConfig::new(consumer)
        }))?,
        None => scheduler,
    }
    .build()?;
    Ok((scheduler.shutdown_handle(), tokio::spawn(scheduler.run())))
}

async fn stop(w: (ShutdownHandle, JoinHandle<Result<(), SchedulerError>>)) -> anyhow::Result<()> {
    w.0.shutdown();
    tokio::time::timeout(WAIT, w.1).await.context("scheduler stops")???;
    Ok(())
}

/// Shard id -> its parents, from `ListShards`.
async fn lineage(env: &TestEnv) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    Ok(list_shards(&env.kinesis, &env.stream)
        .await?
        .iter()
        .map(|s| {
            let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
                .into_iter()
                .flatten();
            (s.shard_id().to_owned(), parents.map(str::to_owned).collect())
        })
        .collect())
}

/// Every parent's records were all delivered before any record of its children (in
/// the recorder's delivery order, a total order across workers sharing it).
fn assert_parents_before_children(recorder: &Recorder, lineage: &BTreeMap<String, Vec<String>>) {
    let state = recorder.state();
    let mut first: HashMap<&str, usize> = HashMap::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, d) in state.deliveries.iter().enumerate() {
        first.entry(d.shard_id.as_str()).or_insert(i);
        last.insert(d.shard_id.as_str(), i);
    }
    let ended: HashMap<&str, std::time::Instant> = state
        .timeline
        .iter()
        .filter_map(|(at, e)| match e {
            Event::ShardEnded { shard_id } => Some((shard_id.as_str(), *at)),
            _ => None,
        })
        .collect();
    for (child, parents) in lineage {
        let Some(child_first) = first.get(child.as_str()) else {
            continue;
        };
        let child_first_at = state.deliveries[*child_first].at;
        for parent in parents {
            if let Some(parent_last) = last.get(parent.as_str()) {
                assert!(
                    parent_last < child_first,
                    "{child} delivered before its parent {parent} was read to the end"
                );
                let end = ended
                    .get(parent.as_str())
                    .unwrap_or_else(|| panic!("{parent} never reached SHARD_END"));
                assert!(
                    *end <= child_first_at,
                    "{child} delivered before {parent} reached SHARD_END"
                );
            }
        }
    }
}

async fn split_and_merge_under_load(env: TestEnv, fan_out: Option<&str>) -> anyhow::Result<()> {
    // Three shards: split 0, merge 1 and 2 (adjacent hash ranges).
    let recorder = Recorder::default();
    let th = InitialPositionInStream::TrimHorizon;
    let a = worker_reading(&env, &env.table, "a", &recorder, th, fan_out)?;
    let b = worker_reading(&env, &env.table, "b", &recorder, th, fan_out)?;
    let stop_producing = CancellationToken::new();
    let producer = spawn_keyed_producer(env.kinesis.clone(), env.stream.clone(), 12, stop_producing.clone());
    recorder.wait_for_records(100, WAIT).await?;

    split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    merge_shards(
        &env.kinesis,
        &env.stream,
        "shardId-000000000001",
        "shardId-000000000002",
    )
    .await?;
    let lineage = lineage(&env).await?;
    let children: HashSet<String> = lineage
        .iter()
        .filter(|(_, p)| !p.is_empty())
        .map(|(c, _)| c.clone())
        .collect();
    assert_eq!(children.len(), 3, "two from the split, one from the merge: {lineage:?}");
    // Keep producing until every child shard has delivered records.
    recorder
        .wait_until("records from every child shard", WAIT, |s| {
            let shards: HashSet<&str> = s.deliveries.iter().map(|d| d.shard_id.as_str()).collect();
            children.iter().all(|c| shards.contains(c.as_str()))
        })
        .await?;
    stop_producing.cancel();
    let written = producer.await??;

    // Every record is processed.
    let wanted: HashSet<SequenceNumber> = written.iter().map(|w| w.written.sequence_number.clone()).collect();
    recorder
        .wait_until("every record", WAIT, |s| {
            let seen: HashSet<&SequenceNumber> = s.deliveries.iter().map(|d| &d.sequence_number).collect();
            wanted.iter().all(|w| seen.contains(w))
        })
        .await?;

    // Per partition key, records first arrive in the order they were written, across
    // the parent and child shards.
    {
        let next = assert_keyed_order(&recorder.state().deliveries)?;
        let rounds = written.iter().map(|w| w.n + 1).max().unwrap_or(0);
        assert!(
            next.values().all(|n| *n == rounds),
            "every key complete: {next:?} of {rounds}"
        );
    }
    assert_parents_before_children(&recorder, &lineage);

    // Finished parents are cleaned up once their children have started.
    let store = DynamoLeaseStore::new(env.dynamodb.clone(), env.table.clone());
    let parents = ["shardId-000000000000", "shardId-000000000001", "shardId-000000000002"];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let keys: HashSet<String> = store.list_leases().await?.into_iter().map(|l| l.lease_key).collect();
        if parents.iter().all(|p| !keys.contains(*p)) {
            assert!(
                children.iter().all(|c| keys.contains(c)),
                "children leases kept: {keys:?}"
            );
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "parent leases not cleaned up: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(a).await?;
    stop(b).await?;
    Ok(())
}

async fn initial_positions_on_a_resharded_stream(env: TestEnv) -> anyhow::Result<()> {
    let old = env.put(40, "old").await?;
    split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    let new = env.put(40, "new").await?;
    let lineage = lineage(&env).await?;
    let closed = "shardId-000000000000";

    // LATEST: closed shards are not read at all; open shards only from now on.
    let latest = Recorder::default();
    let table = kcl_tests::unique("latest");
    let w = worker(&env, &table, "l", &latest, InitialPositionInStream::Latest)?;
    latest
        .wait_until("a first read of every open shard", WAIT, |s| {
            let read: HashSet<&str> = s
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Batch { shard_id, .. } => Some(shard_id.as_str()),
                    _ => None,
                })
                .collect();
            read.len() == 3
        })
        .await?;
    let after = env.put(30, "after").await?;
    latest.wait_for_records(30, WAIT).await?;
    stop(w).await?;
    {
        let state = latest.state();
        assert!(state
            .events
            .iter()
            .all(|e| !matches!(e, Event::Initialized { shard_id, .. } if shard_id == closed)));
        let got: HashSet<&SequenceNumber> = state.deliveries.iter().map(|d| &d.sequence_number).collect();
        let expected: HashSet<&SequenceNumber> = after.iter().map(|w| &w.sequence_number).collect();
        assert_eq!(got, expected, "only records written after the start");
    }
    let leases = DynamoLeaseStore::new(env.dynamodb.clone(), table).list_leases().await?;
    assert!(
        leases.iter().all(|l| l.lease_key != closed),
        "no lease for the closed shard"
    );

    // TRIM_HORIZON: everything, parents before children.
    let all = Recorder::default();
    let w = worker(
        &env,
        &kcl_tests::unique("trim"),
        "t",
        &all,
        InitialPositionInStream::TrimHorizon,
    )?;
    let total = old.len() + new.len() + after.len();
    all.wait_for_records(total, WAIT).await?;
    stop(w).await?;
    let got: HashSet<SequenceNumber> = all
        .state()
        .deliveries
        .iter()
        .map(|d| d.sequence_number.clone())
        .collect();
    for w in old.iter().chain(&new).chain(&after) {
        assert!(got.contains(&w.sequence_number), "record on {} missing", w.shard_id);
    }
    assert_parents_before_children(&all, &lineage);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_under_load_embedded() -> anyhow::Result<()> {
    split_and_merge_under_load(TestEnv::start(3).await?, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_positions_on_a_resharded_stream_embedded() -> anyhow::Result<()> {
    initial_positions_on_a_resharded_stream(TestEnv::start(2).await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_under_load_conformance() -> anyhow::Result<()> {
    split_and_merge_under_load(TestEnv::start_conformance(3).await?, None).await
}

/// Resharding while consuming through enhanced fan-out: parents before children,
/// nothing lost, per-key order kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_under_load_through_fan_out_embedded() -> anyhow::Result<()> {
    split_and_merge_under_load(TestEnv::start(3).await?, Some("resharding")).await
}

/// The same on kinesis-mock, which never ends a fan-out subscription at a shard's end:
/// the end is found through `GetRecords`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_under_load_through_fan_out_conformance() -> anyhow::Result<()> {
    split_and_merge_under_load(TestEnv::start_conformance(3).await?, Some("resharding")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_positions_on_a_resharded_stream_conformance() -> anyhow::Result<()> {
    initial_positions_on_a_resharded_stream(TestEnv::start_conformance(2).await?).await
}

/// Forgets to checkpoint `SHARD_END` the first `forget` times `shard_ended` is called.
struct ForgetfulAtShardEnd {
    inner: RecordingProcessor,
    forget: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl kcl_core::RecordProcessor for ForgetfulAtShardEnd {
    async fn initialize(&mut self, input: kcl_core::InitializationInput) -> Result<(), kcl_core::ProcessorError> {
        self.inner.initialize(input).await
    }
    async fn process_records(&mut self, input: kcl_core::ProcessRecordsInput) -> Result<(), kcl_core::ProcessorError> {
        self.inner.process_records(input).await
    }
    async fn shard_ended(&mut self, input: kcl_core::ShardEndedInput) -> Result<(), kcl_core::ProcessorError> {
        let left = self.forget.load(std::sync::atomic::Ordering::SeqCst);
        if left > 0 {
            self.forget.store(left - 1, std::sync::atomic::Ordering::SeqCst);
            return Ok(());
        }
        self.inner.shard_ended(input).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_end_without_the_checkpoint_is_retried_not_skipped() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let before = env.put(20, "parent").await?;
    split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    let after = env.put(20, "children").await?;
    let recorder = Recorder::default();
    let forget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_secs(3));
    lease.lease_taking_interval = Duration::from_millis(300);
    let factory_recorder = recorder.clone();
    let factory_forget = forget.clone();
    let scheduler = env
        .trim_horizon_builder(std::sync::Arc::new(env.lease_store()), move |shard: &str| {
            ForgetfulAtShardEnd {
                inner: RecordingProcessor::new(shard, factory_recorder.clone(), CheckpointMode::EveryBatch),
                forget: factory_forget.clone(),
            }
        })
        .lease_config(lease)
        // One attempt: a forgotten SHARD_END releases the lease, and the shard is read again.
        .processor_error_policy(kcl_core::ProcessorErrorPolicy {
            retry: kcl_core::RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(1), Some(1)),
            ..Default::default()
        })
        .build()?;
    let w = (scheduler.shutdown_handle(), tokio::spawn(scheduler.run()));
    recorder.wait_for_records(before.len() + after.len(), WAIT).await?;
    stop(w).await?;

    {
        let state = recorder.state();
        let parent = "shardId-000000000000";
        let ended = state.count(|e| matches!(e, Event::ShardEnded { shard_id } if shard_id == parent));
        assert_eq!(forget.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(
            ended, 1,
            "shard_ended checkpointed on the third call (the recorder sees the last one)"
        );
        let inits = state.count(|e| matches!(e, Event::Initialized { shard_id, .. } if shard_id == parent));
        assert!(
            inits >= 2,
            "the parent was picked up again after the forgotten checkpoint: {inits}"
        );
        let got: HashSet<&SequenceNumber> = state.deliveries.iter().map(|d| &d.sequence_number).collect();
        assert!(
            before.iter().chain(&after).all(|w| got.contains(&w.sequence_number)),
            "nothing skipped"
        );
    }
    assert_parents_before_children(&recorder, &lineage(&env).await?);
    Ok(())
}
