//! Multi-stream mode: one fleet and one lease table for several streams, with the Java
//! KCL 3.x multi-stream lease keys. Three streams on two workers (every record, in
//! order per shard, balanced; one stream resharded while the others flow); a stream
//! added at runtime and one removed (stopped with checkpoints, leases deleted after the
//! delay); a lease table in the Java multi-stream shape consumed from its checkpoints;
//! streams addressed by ARN on each backend; single-stream lease keys unchanged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context as _};
use aws_sdk_dynamodb::types::AttributeValue;
use kcl_core::{
    stream_processor_factory, FormerStreamsLeasesDeletion, InitialPositionInStream, Lease, LeaseStore,
    MultiStreamConfig, MultiStreamTracker, Scheduler, SchedulerError, SequenceNumber, ShutdownHandle, StreamConfig,
    StreamIdentifier,
};
use kcl_dynamo::DynamoLeaseStore;
use kcl_tests::{
    assert_keyed_order, fast_config, put_records, spawn_keyed_producer, split_shard_in_half, CheckpointMode, Event,
    Recorder, RecordingProcessor, TestEnv,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(120);

type Worker = (ShutdownHandle, JoinHandle<Result<(), SchedulerError>>);

/// A tracker the test changes while the workers run; counts how often it was asked,
/// and fails while `failing` is set.
#[derive(Clone, Debug, Default)]
struct SharedTracker {
    streams: Arc<Mutex<Vec<StreamConfig>>>,
    polls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl SharedTracker {
    fn new(streams: Vec<StreamConfig>) -> Self {
        let tracker = Self::default();
        tracker.set(streams);
        tracker
    }

    fn set(&self, streams: Vec<StreamConfig>) {
        *self.streams.lock().unwrap_or_else(|p| p.into_inner()) = streams;
    }

    fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl MultiStreamTracker for SharedTracker {
    async fn stream_config_list(&self) -> Result<Vec<StreamConfig>, kcl_core::error::BoxError> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err("the stream registry is unavailable".into());
        }
        Ok(self.streams.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// One recorder per stream name.
type Recorders = Arc<HashMap<String, Recorder>>;

fn recorders(streams: &[&str]) -> Recorders {
    Arc::new(streams.iter().map(|s| ((*s).to_owned(), Recorder::default())).collect())
}

fn trim_horizon(stream: &str) -> StreamConfig {
    StreamConfig::new(stream)
        .expect("a valid stream")
        .initial_position(InitialPositionInStream::TrimHorizon)
}

/// A multi-stream worker whose processors record into their stream's recorder.
fn worker(
    env: &TestEnv,
    id: &str,
    tracker: impl MultiStreamTracker,
    config: MultiStreamConfig,
    recorders: &Recorders,
    modes: HashMap<String, CheckpointMode>,
) -> anyhow::Result<Worker> {
    let recorders = recorders.clone();
    let scheduler = fast_config(
        Scheduler::multi_stream_builder(tracker)
            .kinesis_client(env.kinesis.clone())
            .lease_store(env.lease_store()),
    )
    .coordinator_config(kcl_core::CoordinatorConfig {
        parent_shard_poll_interval: Duration::from_millis(200),
        shard_sync_interval: Duration::from_millis(500),
        graceful_shutdown_timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .multi_stream_config(config)
    .worker_id(id)
    .processor_factory(stream_processor_factory(
        move |stream: &StreamIdentifier, shard: &str| {
            let name = stream.stream_name();
            let mode = modes.get(name).copied().unwrap_or(CheckpointMode::EveryBatch);
            let recorder = recorders.get(name).cloned().unwrap_or_default();
            RecordingProcessor::new(shard, recorder, mode)
        },
    ))
    .build()?;
    Ok((scheduler.shutdown_handle(), tokio::spawn(scheduler.run())))
}

async fn stop(w: Worker) -> anyhow::Result<()> {
    w.0.shutdown();
    tokio::time::timeout(WAIT, w.1).await.context("scheduler stops")???;
    Ok(())
}

/// Leases of the table whose `streamName` is `stream` (the serialized identifier).
fn of_stream<'a>(leases: &'a [Lease], stream: &str) -> Vec<&'a Lease> {
    leases
        .iter()
        .filter(|l| l.stream_name.as_deref() == Some(stream))
        .collect()
}

/// Polls the lease table until `pred` holds.
async fn wait_for_table(
    store: &DynamoLeaseStore,
    what: &str,
    pred: impl Fn(&[Lease]) -> bool,
) -> anyhow::Result<Vec<Lease>> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leases = match store.list_leases().await {
            Ok(leases) => leases,
            // The workers have not created it yet.
            Err(kcl_core::LeaseStoreError::TableNotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if pred(&leases) {
            return Ok(leases);
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            leases
                .iter()
                .map(|l| (&l.lease_key, &l.lease_owner, l.checkpoint.to_string()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Per shard, records first arrive in increasing sequence order (a record delivered
/// again after a lease moved is a duplicate, not a reordering).
fn assert_in_order_per_shard(stream: &str, recorder: &Recorder) {
    let state = recorder.state();
    let mut newest: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    let mut seen: HashSet<(&str, &SequenceNumber)> = HashSet::new();
    for d in &state.deliveries {
        let first = seen.insert((d.shard_id.as_str(), &d.sequence_number));
        let last = newest.entry(d.shard_id.as_str()).or_insert(&d.sequence_number);
        if first {
            assert!(
                &d.sequence_number >= *last,
                "{stream}/{}: {} first delivered after {}",
                d.shard_id,
                d.sequence_number,
                last
            );
            *last = &d.sequence_number;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_streams_on_two_workers_every_record_in_order_balanced_and_one_stream_resharded() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let streams = [
        env.stream.clone(),
        kcl_tests::unique("second"),
        kcl_tests::unique("third"),
    ];
    for s in &streams[1..] {
        kcl_local::create_stream(&env.kinesis, s, 2).await?;
    }
    let names: Vec<&str> = streams.iter().map(String::as_str).collect();
    let recorders = recorders(&names);
    let configs: Vec<StreamConfig> = names.iter().map(|s| trim_horizon(s)).collect();
    let config = MultiStreamConfig {
        stream_tracker_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let a = worker(&env, "a", configs.clone(), config.clone(), &recorders, HashMap::new())?;
    let b = worker(&env, "b", configs, config, &recorders, HashMap::new())?;

    let stop_producing = CancellationToken::new();
    let producers: Vec<_> = streams
        .iter()
        .map(|s| spawn_keyed_producer(env.kinesis.clone(), s.clone(), 6, stop_producing.clone()))
        .collect();
    for name in &names {
        recorders[*name].wait_for_records(30, WAIT).await?;
    }

    // One pool: six leases of three streams, three on each worker.
    let store = env.lease_store();
    let leases = wait_for_table(&store, "three leases on each worker", |leases| {
        leases.len() == 6
            && ["a", "b"].iter().all(|w| {
                leases
                    .iter()
                    .filter(|l| l.is_owned_by(w) && !l.is_handoff_pending())
                    .count()
                    == 3
            })
    })
    .await?;
    // Java KCL 3.x multi-stream keys and attributes.
    let mut ids = HashSet::new();
    for lease in &leases {
        let stream = lease.stream_name.as_deref().context("streamName")?;
        let shard = lease.shard_id.as_deref().context("shardId")?;
        assert_eq!(lease.lease_key, format!("{stream}:{shard}"));
        let id = StreamIdentifier::parse_multi_stream(stream)?;
        assert_eq!(id, kcl_tests::stream_identifier(&env.kinesis, id.stream_name()).await?);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 3, "{ids:?}");

    // Reshard the first stream while all three flow.
    let before: Vec<usize> = names.iter().map(|n| recorders[*n].state().deliveries.len()).collect();
    split_shard_in_half(&env.kinesis, &streams[0], "shardId-000000000000").await?;
    recorders[names[0]]
        .wait_until("records from both children of the split", WAIT, |s| {
            let shards: HashSet<&str> = s.deliveries.iter().map(|d| d.shard_id.as_str()).collect();
            shards.contains("shardId-000000000002") && shards.contains("shardId-000000000003")
        })
        .await?;
    for (i, name) in names.iter().enumerate().skip(1) {
        let since = before[i];
        recorders[*name]
            .wait_until("the other streams flowing during the reshard", WAIT, |s| {
                s.deliveries.len() > since + 30
            })
            .await?;
    }
    stop_producing.cancel();

    for (producer, name) in producers.into_iter().zip(&names) {
        let written = producer.await??;
        let wanted: HashSet<(String, SequenceNumber)> = written
            .iter()
            .map(|w| (w.written.shard_id.clone(), w.written.sequence_number.clone()))
            .collect();
        recorders[*name]
            .wait_until(&format!("every record of {name}"), WAIT, |s| {
                let seen: HashSet<(&str, &SequenceNumber)> = s
                    .deliveries
                    .iter()
                    .map(|d| (d.shard_id.as_str(), &d.sequence_number))
                    .collect();
                wanted.iter().all(|(shard, seq)| seen.contains(&(shard.as_str(), seq)))
            })
            .await?;
        assert_in_order_per_shard(name, &recorders[*name]);
        // Per key, across the parent and its children too.
        let rounds = written.iter().map(|w| w.n + 1).max().unwrap_or(0);
        let next = assert_keyed_order(&recorders[*name].state().deliveries)?;
        assert!(
            next.values().all(|n| *n == rounds),
            "{name}: every key complete: {next:?}"
        );
    }
    // The children's leases are multi-stream leases of the resharded stream, naming
    // their parent by shard id as the Java KCL does.
    let leases = store.list_leases().await?;
    let first = kcl_tests::stream_identifier(&env.kinesis, &streams[0])
        .await?
        .serialize();
    let child = leases
        .iter()
        .find(|l| l.lease_key == format!("{first}:shardId-000000000002"))
        .context("child lease")?;
    assert_eq!(child.stream_name.as_deref(), Some(first.as_str()));
    assert!(child.parent_shard_ids.contains("shardId-000000000000"), "{child:?}");
    stop(a).await?;
    stop(b).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_added_at_runtime_is_picked_up_and_a_removed_one_stops_with_checkpoints_and_is_cleaned_up(
) -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let (first, added) = (env.stream.clone(), kcl_tests::unique("added"));
    kcl_local::create_stream(&env.kinesis, &added, 2).await?;
    let recorders = recorders(&[&first, &added]);
    let tracker = SharedTracker::new(vec![trim_horizon(&first)]);
    let interval = Duration::from_secs(2);
    let config = MultiStreamConfig {
        stream_tracker_interval: interval,
        former_streams_leases_deletion: FormerStreamsLeasesDeletion::AfterDelay(Duration::from_secs(4)),
    };
    // The first stream checkpoints only when its processors are asked to shut down.
    let modes = HashMap::from([(first.clone(), CheckpointMode::OnShutdown)]);
    // A single-stream lease in the table is of the other mode: ignored, never deleted.
    let store = env.lease_store();
    store.create_lease_table_if_not_exists().await?;
    let foreign = Lease::new("shardId-000000000009", kcl_core::ExtendedSequenceNumber::TRIM_HORIZON);
    store.create_lease_if_not_exists(&foreign).await?;
    let w = worker(&env, "w", tracker.clone(), config, &recorders, modes)?;
    let written = put_records(&env.kinesis, &first, 40, "first").await?;
    recorders[&first].wait_for_records(written.len(), WAIT).await?;

    // Added: its leases exist after the tracker's first poll that lists it.
    let added_id = kcl_tests::stream_identifier(&env.kinesis, &added).await?.serialize();
    let polls_before = tracker.polls();
    tracker.set(vec![trim_horizon(&first), trim_horizon(&added)]);
    wait_for_table(&store, "the added stream's leases", |l| {
        of_stream(l, &added_id).len() == 2
    })
    .await?;
    assert!(
        tracker.polls() <= polls_before + 1,
        "picked up at the first poll after it was added ({} polls since)",
        tracker.polls() - polls_before
    );
    let written_added = put_records(&env.kinesis, &added, 20, "added").await?;
    recorders[&added].wait_for_records(written_added.len(), WAIT).await?;

    // Removed: its processors are asked to shut down and checkpoint; its leases are
    // released with the checkpoints, then deleted after the delay.
    let first_id = kcl_tests::stream_identifier(&env.kinesis, &first).await?.serialize();
    let last_per_shard: BTreeMap<String, SequenceNumber> = written
        .iter()
        .map(|w| (w.shard_id.clone(), w.sequence_number.clone()))
        .fold(BTreeMap::new(), |mut m, (shard, seq)| {
            let e = m.entry(shard).or_insert(seq.clone());
            if seq > *e {
                *e = seq;
            }
            m
        });
    tracker.set(vec![trim_horizon(&added)]);
    recorders[&first]
        .wait_until("shutdown_requested on both shards", WAIT, |s| {
            s.count(|e| matches!(e, Event::ShutdownRequested { .. })) == 2
        })
        .await?;
    let leases = wait_for_table(&store, "the removed stream's leases released", |l| {
        let mine = of_stream(l, &first_id);
        mine.len() == 2 && mine.iter().all(|l| l.lease_owner.is_none())
    })
    .await?;
    for lease in of_stream(&leases, &first_id) {
        let expected = last_per_shard.get(lease.shard()).context("a written shard")?;
        assert_eq!(
            lease.checkpoint.checkpoint.to_string(),
            expected.to_string(),
            "{} checkpointed at shutdown",
            lease.lease_key
        );
    }
    wait_for_table(&store, "the removed stream's leases deleted", |l| {
        of_stream(l, &first_id).is_empty()
    })
    .await?;
    // The other stream goes on; the removed one was not taken again.
    let more = put_records(&env.kinesis, &added, 10, "more").await?;
    recorders[&added]
        .wait_for_records(written_added.len() + more.len(), WAIT)
        .await?;
    assert_eq!(
        recorders[&first]
            .state()
            .count(|e| matches!(e, Event::Initialized { .. })),
        2,
        "the removed stream's shards were not started again"
    );
    let leases = store.list_leases().await?;
    assert_eq!(of_stream(&leases, &added_id).len(), 2);
    assert!(
        leases
            .iter()
            .any(|l| l.lease_key == foreign.lease_key && l.lease_owner.is_none()),
        "the single-stream lease is left alone: {leases:?}"
    );
    stop(w).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_multi_stream_lease_table_is_consumed_from_its_checkpoints() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let written = put_records(&env.kinesis, &env.stream, 60, "java").await?;
    let id = kcl_tests::stream_identifier(&env.kinesis, &env.stream).await?;
    // The Java KCL 3.x multi-stream items (DynamoDBMultiStreamLeaseSerializer): one
    // lease unowned, one owned by a Java worker that is gone; each checkpointed at the
    // 10th record of its shard.
    let store = env.lease_store();
    store.create_lease_table_if_not_exists().await?;
    let by_shard = kcl_tests::by_shard(&written);
    ensure!(by_shard.len() == 2, "records on both shards: {by_shard:?}");
    let mut expected: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
    for (i, (shard, seqs)) in by_shard.iter().enumerate() {
        let checkpoint = &seqs[9];
        let mut item = HashMap::from([
            ("leaseKey".to_owned(), AttributeValue::S(format!("{id}:{shard}"))),
            ("streamName".to_owned(), AttributeValue::S(id.serialize())),
            ("shardId".to_owned(), AttributeValue::S(shard.clone())),
            ("leaseCounter".to_owned(), AttributeValue::N("42".to_owned())),
            ("checkpoint".to_owned(), AttributeValue::S(checkpoint.to_string())),
            (
                "checkpointSubSequenceNumber".to_owned(),
                AttributeValue::N("0".to_owned()),
            ),
            (
                "ownerSwitchesSinceCheckpoint".to_owned(),
                AttributeValue::N("0".to_owned()),
            ),
            ("startingHashKey".to_owned(), AttributeValue::S("0".to_owned())),
            ("endingHashKey".to_owned(), AttributeValue::S("1".to_owned())),
        ]);
        if i == 1 {
            item.insert("leaseOwner".to_owned(), AttributeValue::S("java-host:1234".to_owned()));
        }
        env.dynamodb
            .put_item()
            .table_name(&env.table)
            .set_item(Some(item))
            .send()
            .await?;
        expected.insert(shard.clone(), seqs[10..].to_vec());
    }
    // The admin tools read the table as it is: streams, shards, lag per shard, and a
    // shard named by stream and shard id.
    let rows = shardwise::admin::leases(&store).await?;
    assert_eq!(
        rows.iter()
            .map(|r| (r.stream.clone(), r.shard_id.clone()))
            .collect::<Vec<_>>(),
        by_shard
            .keys()
            .map(|s| (Some(id.serialize()), s.clone()))
            .collect::<Vec<_>>()
    );
    let lag = shardwise::admin::lag(&store, &env.kinesis, None).await?;
    assert_eq!(lag.len(), 2);
    assert!(
        lag.iter()
            .all(|l| l.stream == id.stream_name() && l.millis_behind_latest.is_some()),
        "{lag:?}"
    );
    assert_eq!(
        shardwise::admin::find_lease_key(&store, Some(id.stream_name()), "shardId-000000000001").await?,
        format!("{id}:shardId-000000000001")
    );
    assert!(
        shardwise::admin::find_lease_key(&store, Some("other"), "shardId-000000000001")
            .await
            .is_err()
    );
    let recorders = recorders(&[&env.stream]);
    // TRIM_HORIZON would deliver the first ten records of each shard again, were the
    // checkpoints not read.
    let w = worker(
        &env,
        "rust",
        vec![trim_horizon(&env.stream)],
        MultiStreamConfig::default(),
        &recorders,
        HashMap::new(),
    )?;
    let total: usize = expected.values().map(Vec::len).sum();
    recorders[&env.stream].wait_for_records(total, WAIT).await?;
    assert_eq!(recorders[&env.stream].state().by_shard(), expected);
    let leases = store.list_leases().await?;
    assert_eq!(leases.len(), 2, "no lease created beside the Java ones: {leases:?}");
    assert!(leases.iter().all(|l| l.is_owned_by("rust")), "{leases:?}");
    stop(w).await?;
    Ok(())
}

/// A stream configured by ARN is consumed on `env`'s backend; `by_arn_alone` says
/// whether that backend accepts calls by `StreamARN` alone (checked directly first).
async fn consumed_by_arn(env: TestEnv, by_arn_alone: bool) -> anyhow::Result<()> {
    let summary = env
        .kinesis
        .describe_stream_summary()
        .stream_name(&env.stream)
        .send()
        .await?;
    let arn = summary
        .stream_description_summary()
        .context("description")?
        .stream_arn()
        .to_owned();
    let accepted = env
        .kinesis
        .describe_stream_summary()
        .stream_arn(&arn)
        .send()
        .await
        .is_ok()
        && env.kinesis.list_shards().stream_arn(&arn).send().await.is_ok()
        && env
            .kinesis
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id("shardId-000000000000")
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .is_ok();
    assert_eq!(
        accepted, by_arn_alone,
        "whether the backend accepts calls by StreamARN alone"
    );
    let written = put_records(&env.kinesis, &env.stream, 20, "arn").await?;
    let recorders = recorders(&[&env.stream]);
    // Built from a config file, as an operator would configure it.
    let config = shardwise::config_file::AppConfig::from_toml(&format!(
        "[application]\napplication_name = \"{}\"\nstreams = [{{ stream = \"{arn}\", initial_position = \"trim_horizon\" }}]\n",
        env.table
    ))?;
    let recorder = recorders[&env.stream].clone();
    let scheduler = fast_config(config.scheduler_builder_with_clients(env.kinesis.clone(), env.dynamodb.clone())?)
        .processor_factory(move |shard: &str| {
            RecordingProcessor::new(shard, recorder.clone(), CheckpointMode::EveryBatch)
        })
        .build()?;
    let w = (scheduler.shutdown_handle(), tokio::spawn(scheduler.run()));
    recorders[&env.stream].wait_for_records(written.len(), WAIT).await?;
    assert_eq!(recorders[&env.stream].state().by_shard(), kcl_tests::by_shard(&written));
    let id = kcl_tests::stream_identifier(&env.kinesis, &env.stream).await?;
    let leases = env.lease_store().list_leases().await?;
    assert!(
        leases
            .iter()
            .all(|l| l.stream_name.as_deref() == Some(id.serialize().as_str())),
        "{leases:?}"
    );
    stop(w).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_configured_by_arn_is_read_by_name_on_the_embedded_backend() -> anyhow::Result<()> {
    consumed_by_arn(TestEnv::start(2).await?, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_configured_by_arn_is_read_by_arn_on_the_conformance_backend() -> anyhow::Result<()> {
    consumed_by_arn(TestEnv::start_conformance(2).await?, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_stream_lease_keys_and_items_are_unchanged() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let handle = scheduler.shutdown_handle();
    let run = tokio::spawn(scheduler.run());
    let written = env.put(10, "single").await?;
    recorder.wait_for_records(written.len(), WAIT).await?;
    let items = env.dynamodb.scan().table_name(&env.table).send().await?;
    let mut keys: Vec<String> = Vec::new();
    for item in items.items() {
        if let Some(AttributeValue::S(key)) = item.get("leaseKey") {
            assert!(
                !item.contains_key("streamName") && !item.contains_key("shardId"),
                "{item:?}"
            );
            keys.push(key.clone());
        }
    }
    keys.sort();
    assert_eq!(keys, ["shardId-000000000000", "shardId-000000000001"]);
    handle.shutdown();
    tokio::time::timeout(WAIT, run).await???;
    Ok(())
}

/// Each stream may be read its own way: here the scheduler's retrieval is enhanced
/// fan-out (one factory, which registers its consumer on each stream it reads) and one
/// stream overrides it with polling. Every record arrives, and only the fan-out streams
/// have the consumer registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_read_by_fan_out_and_by_polling_side_by_side() -> anyhow::Result<()> {
    use kcl_efo::{FanOutConfig, RetrievalMode, SchedulerBuilderExt as _};
    let env = TestEnv::start(2).await?;
    let (fanned, polled) = (kcl_tests::unique("fanned"), kcl_tests::unique("polled"));
    for s in [&fanned, &polled] {
        kcl_local::create_stream(&env.kinesis, s, 1).await?;
    }
    let names = [env.stream.as_str(), fanned.as_str(), polled.as_str()];
    let recorders = recorders(&names);
    let consumer = kcl_tests::unique("consumer");
    let polling = kcl_core::PollingRetrievalFactory::new(kcl_core::RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        ..Default::default()
    });
    let streams = vec![
        trim_horizon(&env.stream),
        trim_horizon(&fanned),
        trim_horizon(&polled).retrieval_factory(polling),
    ];
    let factory_recorders = recorders.clone();
    let scheduler = fast_config(
        Scheduler::multi_stream_builder(streams)
            .kinesis_client(env.kinesis.clone())
            .lease_store(env.lease_store()),
    )
    .processor_factory(stream_processor_factory(
        move |stream: &StreamIdentifier, shard: &str| {
            let recorder = factory_recorders.get(stream.stream_name()).cloned().unwrap_or_default();
            RecordingProcessor::new(shard, recorder, CheckpointMode::EveryBatch)
        },
    ))
    .retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
        shard_end_check_interval: Duration::from_secs(1),
        registration_timeout: Duration::from_secs(20),
        ..FanOutConfig::new(consumer.clone())
    }))?
    .build()?;
    let w = (scheduler.shutdown_handle(), tokio::spawn(scheduler.run()));
    for name in names {
        let written = put_records(&env.kinesis, name, 30, "mixed").await?;
        recorders[name].wait_for_records(written.len(), WAIT).await?;
        assert_eq!(
            recorders[name].state().by_shard(),
            kcl_tests::by_shard(&written),
            "{name}"
        );
    }
    for (name, fan_out) in [(names[0], true), (names[1], true), (names[2], false)] {
        let consumers = shardwise::admin::consumers(&env.kinesis, name).await?;
        let registered = consumers.iter().any(|(n, _, _)| n == &consumer);
        assert_eq!(registered, fan_out, "{name}: {consumers:?}");
    }
    stop(w).await?;
    Ok(())
}

/// A worker that crashes (its `run` future dropped: nothing released, nothing renewed)
/// loses its leases of every stream to the other after the failover time; every record
/// of both streams is delivered, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_leases_of_every_stream_move_to_the_survivor() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let second = kcl_tests::unique("second");
    kcl_local::create_stream(&env.kinesis, &second, 2).await?;
    let names = [env.stream.as_str(), second.as_str()];
    let recorders = recorders(&names);
    let configs: Vec<StreamConfig> = names.iter().map(|s| trim_horizon(s)).collect();
    let a = worker(
        &env,
        "a",
        configs.clone(),
        MultiStreamConfig::default(),
        &recorders,
        HashMap::new(),
    )?;
    let b = worker(
        &env,
        "b",
        configs,
        MultiStreamConfig::default(),
        &recorders,
        HashMap::new(),
    )?;
    let stop_producing = CancellationToken::new();
    let producers: Vec<_> = names
        .iter()
        .map(|s| spawn_keyed_producer(env.kinesis.clone(), (*s).to_owned(), 4, stop_producing.clone()))
        .collect();
    let store = env.lease_store();
    wait_for_table(&store, "two leases on each worker", |leases| {
        leases.len() == 4
            && ["a", "b"].iter().all(|w| {
                leases
                    .iter()
                    .filter(|l| l.is_owned_by(w) && !l.is_handoff_pending())
                    .count()
                    == 2
            })
    })
    .await?;
    // The crash: the future is dropped mid-flight.
    a.1.abort();
    let _ = a.1.await;
    wait_for_table(&store, "every lease on the survivor", |leases| {
        leases.len() == 4 && leases.iter().all(|l| l.is_owned_by("b"))
    })
    .await?;
    stop_producing.cancel();
    for (producer, name) in producers.into_iter().zip(names) {
        let written = producer.await??;
        let rounds = written.iter().map(|w| w.n + 1).max().unwrap_or(0);
        recorders[name]
            .wait_until(&format!("every record of {name}"), WAIT, |s| {
                assert_keyed_order(&s.deliveries).is_ok_and(|next| next.values().all(|n| *n == rounds))
            })
            .await?;
    }
    stop(b).await?;
    Ok(())
}

/// A tracker that fails keeps the streams consumed; a listed stream that does not exist
/// yet is picked up at the first poll after it was created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_tracker_keeps_the_streams_and_a_stream_created_later_is_picked_up() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let later = kcl_tests::unique("later");
    let recorders = recorders(&[&env.stream, &later]);
    let tracker = SharedTracker::new(vec![trim_horizon(&env.stream), trim_horizon(&later)]);
    let config = MultiStreamConfig {
        stream_tracker_interval: Duration::from_millis(500),
        ..Default::default()
    };
    let w = worker(&env, "w", tracker.clone(), config, &recorders, HashMap::new())?;
    let first = put_records(&env.kinesis, &env.stream, 10, "first").await?;
    recorders[&env.stream].wait_for_records(first.len(), WAIT).await?;

    // The tracker fails for a few polls: the stream stays consumed.
    tracker.failing.store(true, Ordering::SeqCst);
    let polls = tracker.polls();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tracker.polls() < polls + 3 {
        ensure!(tokio::time::Instant::now() < deadline, "the tracker is not polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let more = put_records(&env.kinesis, &env.stream, 10, "more").await?;
    recorders[&env.stream]
        .wait_for_records(first.len() + more.len(), WAIT)
        .await?;
    tracker.failing.store(false, Ordering::SeqCst);

    // Listed from the start, created now: consumed from then on.
    kcl_local::create_stream(&env.kinesis, &later, 1).await?;
    let written = put_records(&env.kinesis, &later, 10, "later").await?;
    recorders[&later].wait_for_records(written.len(), WAIT).await?;
    assert_eq!(recorders[&later].state().by_shard(), kcl_tests::by_shard(&written));
    stop(w).await?;
    Ok(())
}
