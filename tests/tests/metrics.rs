//! The counters and gauges an operator watches, read through a `metrics` recorder
//! installed for this test binary alone (the recorder is process-wide, so these tests
//! live in their own binary, and each reads only its own stream's labels or totals it
//! alone moves).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kcl_core::{InitialPositionInStream, LeaseStore};
use kcl_tests::{CheckpointMode, Fault, FaultInjector, Recorder, TestEnv};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

const WAIT: Duration = Duration::from_secs(90);

/// Keeps every counter and gauge by name and labels.
#[derive(Debug, Default)]
struct TestRecorder {
    values: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    fn handle(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .clone()
    }

    fn counter(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map_or(0, |v| v.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.get(name).map(|v| f64::from_bits(v.load(Ordering::SeqCst)))
    }
}

impl metrics::Recorder for &'static TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<&'static TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder: &'static TestRecorder = Box::leak(Box::default());
        // Only this binary installs one; a second call (none here) would fail harmlessly.
        let _ = metrics::set_global_recorder(recorder);
        recorder
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_leases_throttles_and_lost_leases_are_counted() -> anyhow::Result<()> {
    let metrics = recorder();
    let env = TestEnv::start(2).await?;
    let written = env.put(200, "metrics").await?;
    let faults = FaultInjector::default();
    faults.push("GetRecords", Fault::Throttle);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .build()?;
    let handle = scheduler.shutdown_handle();
    let task = tokio::spawn(scheduler.run());
    recorder.wait_for_records(200, WAIT).await?;

    assert_eq!(metrics.gauge("kcl_leases_held{}"), Some(2.0));
    assert_eq!(metrics.counter("kcl_throttles_total{operation=GetRecords}"), 1);

    // Another worker takes a lease: this one's renewal is refused and counted as lost.
    let store = env.lease_store();
    let shard = store
        .list_leases()
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("lease"))?
        .lease_key;
    kcl_tests::steal_lease(&store, &shard, "thief").await?;
    recorder
        .wait_until("lease_lost", WAIT, |s| {
            s.count(|e| matches!(e, kcl_tests::Event::LeaseLost { .. })) == 1
        })
        .await?;
    assert_eq!(metrics.counter("kcl_leases_lost_total{}"), 1);
    assert_eq!(metrics.gauge("kcl_leases_held{}"), Some(1.0));

    handle.shutdown();
    tokio::time::timeout(WAIT, task).await???;
    assert_eq!(metrics.gauge("kcl_leases_held{}"), Some(0.0), "released at shutdown");
    assert_eq!(metrics.gauge("kcl_streams_consumed{}"), Some(1.0));
    // Counted once `process_records` returned: final now that the scheduler stopped.
    for (shard, seqs) in &kcl_tests::by_shard(&written) {
        let name = format!("kcl_records_processed_total{{shard_id={shard},stream={}}}", env.stream);
        assert_eq!(metrics.counter(&name), seqs.len() as u64, "{name}");
        let behind = format!("kcl_millis_behind_latest{{shard_id={shard},stream={}}}", env.stream);
        assert!(metrics.gauge(&behind).is_some(), "{behind} is published");
    }

    // Multi-stream: two streams, each shard's series labelled with its stream.
    let second = kcl_tests::unique("second");
    kcl_local::create_stream(&env.kinesis, &second, 1).await?;
    let more = [
        (env.stream.clone(), env.put(20, "multi").await?),
        (
            second.clone(),
            kcl_tests::put_records(&env.kinesis, &second, 30, "multi").await?,
        ),
    ];
    let streams = [env.stream.as_str(), second.as_str()]
        .iter()
        .map(|s| kcl_core::StreamConfig::new(*s).map(|c| c.initial_position(InitialPositionInStream::TrimHorizon)))
        .collect::<Result<Vec<_>, _>>()?;
    let recorder = Recorder::default();
    let factory_recorder = recorder.clone();
    let scheduler = kcl_tests::fast_config(
        kcl_core::Scheduler::multi_stream_builder(streams)
            .kinesis_client(env.kinesis.clone())
            .lease_store(kcl_dynamo::DynamoLeaseStore::new(
                env.dynamodb.clone(),
                kcl_tests::unique("multi"),
            )),
    )
    .processor_factory(move |shard: &str| {
        kcl_tests::RecordingProcessor::new(shard, factory_recorder.clone(), CheckpointMode::EveryBatch)
    })
    .build()?;
    let handle = scheduler.shutdown_handle();
    let task = tokio::spawn(scheduler.run());
    // The first stream's records of the first run are read again: a new lease table.
    recorder.wait_for_records(written.len() + 50, WAIT).await?;
    assert_eq!(metrics.gauge("kcl_streams_consumed{}"), Some(2.0));
    handle.shutdown();
    tokio::time::timeout(WAIT, task).await???;
    let mut all = kcl_tests::by_shard(&written);
    for (shard, seqs) in kcl_tests::by_shard(&more[0].1) {
        all.entry(shard).or_default().extend(seqs);
    }
    for (stream, expected) in [(&env.stream, all), (&second, kcl_tests::by_shard(&more[1].1))] {
        for (shard, seqs) in expected {
            let name = format!("kcl_records_processed_total{{shard_id={shard},stream={stream}}}");
            // The first stream's shards were counted by the single-stream run too.
            let before = if stream == &env.stream {
                kcl_tests::by_shard(&written).get(&shard).map_or(0, Vec::len)
            } else {
                0
            };
            assert_eq!(metrics.counter(&name), (before + seqs.len()) as u64, "{name}");
        }
    }
    Ok(())
}
