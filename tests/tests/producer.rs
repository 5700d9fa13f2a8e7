//! Issue 12: the producer (`kcl-producer`) against the embedded backend: partial
//! failures and throttling injected by an SDK interceptor, per-key order, aggregation
//! read back by the consumer, typed input errors, close, and per-shard rate limits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::operation::put_records::{PutRecordsInput, PutRecordsOutput};
use aws_sdk_kinesis::types::PutRecordsResultEntry;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextMut, BeforeSerializationInterceptorContextMut,
    FinalizerInterceptorContextMut,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use bytes::Bytes;
use futures::FutureExt as _;
use kcl_core::SequenceNumber;
use kcl_producer::{ConfigError, InvalidRecord, KinesisProducer, ProducerConfig, ProducerError, PutRecordResult};
use kcl_tests::{CheckpointMode, Recorder, RecordingProcessor, TestEnv};

const WAIT: Duration = Duration::from_secs(120);

/// What the interceptor does to one call.
#[derive(Clone, Debug)]
enum Fault {
    /// The call is sent to a stream that does not exist (so nothing is written) and
    /// answered with `ProvisionedThroughputExceededException`.
    Throttle,
    /// These entries (position in the original request, error code) were taken out of
    /// the request and come back as failed entries of the response.
    Partial(Vec<(usize, &'static str)>),
}

impl Storable for Fault {
    type Storer = StoreReplace<Self>;
}

/// Injects whole-call throttling into every 7th `PutRecords` call and fails every 5th
/// entry of every 3rd call (alternately throttled and internal failures), without
/// writing anything it reports as failed.
#[derive(Clone, Debug, Default)]
struct PutRecordsFaults(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    calls: AtomicU64,
    throttled_calls: AtomicU64,
    failed_entries: AtomicU64,
}

const MISSING_STREAM: &str = "kcl-producer-test-no-such-stream";

impl Intercept for PutRecordsFaults {
    fn name(&self) -> &'static str {
        "PutRecordsFaults"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(input) = context.input_mut().downcast_mut::<PutRecordsInput>() else {
            return Ok(());
        };
        let call = self.0.calls.fetch_add(1, Ordering::Relaxed);
        if call % 7 == 3 {
            input.stream_name = Some(MISSING_STREAM.to_owned());
            self.0.throttled_calls.fetch_add(1, Ordering::Relaxed);
            cfg.interceptor_state().store_put(Fault::Throttle);
        } else if call.is_multiple_of(3) {
            let records = input.records.take().unwrap_or_default();
            let mut kept = Vec::new();
            let mut failed = Vec::new();
            for (i, record) in records.into_iter().enumerate() {
                if i % 5 == 1 {
                    let code = if failed.len() % 2 == 0 {
                        "ProvisionedThroughputExceededException"
                    } else {
                        "InternalFailure"
                    };
                    failed.push((i, code));
                } else {
                    kept.push(record);
                }
            }
            if kept.is_empty() {
                // A call needs a record: keep the first failure's place by failing none.
                return Err("the test fails calls of one or two records only whole".into());
            }
            self.0.failed_entries.fetch_add(failed.len() as u64, Ordering::Relaxed);
            input.records = Some(kept);
            cfg.interceptor_state().store_put(Fault::Partial(failed));
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(Fault::Throttle) = cfg.load::<Fault>() {
            let mut response = aws_smithy_runtime_api::http::Response::new(
                aws_smithy_runtime_api::http::StatusCode::try_from(400_u16)?,
                SdkBody::from(
                    r#"{"__type":"ProvisionedThroughputExceededException","message":"injected by the test"}"#,
                ),
            );
            response
                .headers_mut()
                .insert("content-type", "application/x-amz-json-1.1");
            *context.response_mut() = response;
        }
        Ok(())
    }

    fn modify_before_completion(
        &self,
        context: &mut FinalizerInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(Fault::Partial(failed)) = cfg.load::<Fault>().cloned() else {
            return Ok(());
        };
        let Some(Ok(output)) = context.output_or_error_mut() else {
            return Ok(());
        };
        let Some(output) = output.downcast_mut::<PutRecordsOutput>() else {
            return Ok(());
        };
        for (position, code) in &failed {
            let entry = PutRecordsResultEntry::builder()
                .error_code(*code)
                .error_message("injected by the test")
                .build();
            output.records.insert((*position).min(output.records.len()), entry);
        }
        output.failed_record_count = Some(output.failed_record_count.unwrap_or(0) + failed.len() as i32);
        Ok(())
    }
}

/// A client for the producer: the test's interceptor, and no SDK retries (the producer
/// retries itself).
fn client_with(env: &TestEnv, faults: Option<PutRecordsFaults>) -> aws_sdk_kinesis::Client {
    let mut builder = env.kinesis.config().to_builder().retry_config(RetryConfig::disabled());
    if let Some(faults) = faults {
        builder = builder.interceptor(faults);
    }
    aws_sdk_kinesis::Client::from_conf(builder.build())
}

fn quick_retries() -> ProducerConfig {
    let mut config = ProducerConfig::default();
    config.min_retry_backoff = Duration::from_millis(5);
    config.max_retry_backoff = Duration::from_millis(100);
    config.record_max_buffered_time = Duration::from_millis(5);
    config
}

/// Every record of the stream, read back with `GetRecords` from `TRIM_HORIZON`: (data,
/// shard, sequence number).
async fn read_back(env: &TestEnv) -> anyhow::Result<Vec<(Bytes, String, SequenceNumber)>> {
    let shards = env.kinesis.list_shards().stream_name(&env.stream).send().await?;
    let mut out = Vec::new();
    for shard in shards.shards() {
        let mut iterator = env
            .kinesis
            .get_shard_iterator()
            .stream_name(&env.stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator;
        while let Some(it) = iterator {
            let page = env
                .kinesis
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await?;
            for r in page.records() {
                out.push((
                    Bytes::copy_from_slice(r.data().as_ref()),
                    shard.shard_id().to_owned(),
                    SequenceNumber::parse(r.sequence_number())?,
                ));
            }
            if page.records().is_empty() {
                break;
            }
            iterator = page.next_shard_iterator;
        }
    }
    Ok(out)
}

/// Consumes the stream from `TRIM_HORIZON` with one scheduler until `records` records
/// were delivered; returns what its processors recorded.
async fn consume(env: &TestEnv, records: usize) -> anyhow::Result<Recorder> {
    let recorder = Recorder::default();
    let scheduler = {
        let recorder = recorder.clone();
        env.trim_horizon_builder(Arc::new(env.lease_store()), move |shard: &str| {
            RecordingProcessor::new(shard, recorder.clone(), CheckpointMode::EveryBatch)
        })
        .build()?
    };
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    recorder.wait_for_records(records, WAIT).await?;
    shutdown.shutdown();
    running.await??;
    Ok(recorder)
}

/// 100,000 records over 64 keys, with injected throttling and partial failures: every
/// record is acknowledged exactly once, is in the stream exactly once, and per key the
/// sequence numbers follow the put order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_is_acknowledged_once_in_order_per_key_despite_failures() -> anyhow::Result<()> {
    let env = TestEnv::start(4).await?;
    let faults = PutRecordsFaults::default();
    // 1,563 records per key, one in flight at a time: the last ones wait for their
    // predecessors far longer than the default time to live.
    let mut config = quick_retries();
    config.record_ttl = Duration::from_secs(600);
    let producer = KinesisProducer::new(client_with(&env, Some(faults.clone())), env.stream.clone(), config);
    const RECORDS: usize = 100_000;
    const KEYS: usize = 64;
    let started = Instant::now();
    let mut pending = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let key = format!("key-{}", i % KEYS);
        pending.push(producer.put(key, Bytes::from(format!("record-{i}"))).await?);
    }
    let results: Vec<PutRecordResult> = futures::future::try_join_all(pending).await?;
    let took = started.elapsed();
    eprintln!(
        "{RECORDS} records in {took:?}; {} calls, {} throttled whole, {} entries failed",
        faults.0.calls.load(Ordering::Relaxed),
        faults.0.throttled_calls.load(Ordering::Relaxed),
        faults.0.failed_entries.load(Ordering::Relaxed)
    );
    assert!(
        faults.0.throttled_calls.load(Ordering::Relaxed) > 0 && faults.0.failed_entries.load(Ordering::Relaxed) > 0
    );
    assert!(results.iter().any(|r| r.attempts > 1), "some records were retried");
    assert!(results.iter().all(|r| !r.maybe_duplicated));

    // Per key, in put order, strictly increasing sequence numbers (one shard per key).
    let mut last: HashMap<usize, &SequenceNumber> = HashMap::new();
    for (i, result) in results.iter().enumerate() {
        if let Some(previous) = last.insert(i % KEYS, &result.sequence_number) {
            assert!(
                *previous < result.sequence_number,
                "key {}: record {i} written before an earlier one",
                i % KEYS
            );
        }
    }
    // In the stream exactly once each, where the acknowledgement says.
    let stored = read_back(&env).await?;
    assert_eq!(stored.len(), RECORDS, "records in the stream");
    let by_data: HashMap<&Bytes, (&String, &SequenceNumber)> = stored.iter().map(|(d, s, q)| (d, (s, q))).collect();
    assert_eq!(by_data.len(), RECORDS, "no record twice");
    for (i, result) in results.iter().enumerate() {
        let data = Bytes::from(format!("record-{i}"));
        let (shard, sequence) = by_data.get(&data).context("acknowledged record in the stream")?;
        assert_eq!((*shard, *sequence), (&result.shard_id, &result.sequence_number));
    }
    producer.close().await;
    Ok(())
}

/// Aggregated records written by the producer (some with explicit hash keys) are read
/// back record for record by the consumer, with the sub-sequence numbers the
/// acknowledgements gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_are_read_back_record_for_record_by_the_consumer() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let mut config = quick_retries();
    config.aggregation_enabled = true;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
    // The shard map is read in the background; wait for it so records aggregate.
    const RECORDS: usize = 2000;
    let mut pending = Vec::new();
    let mut sent = Vec::new();
    for i in 0..RECORDS {
        // Every 100th record is too large to aggregate (50 KiB by default): it goes on
        // its own, in order with its key's aggregated records.
        let data = if i % 100 == 55 {
            Bytes::from(format!("agg-{i}-{}", "x".repeat(60 << 10)))
        } else {
            Bytes::from(format!("agg-{i}"))
        };
        let key = format!("user-{}", i % 37);
        // Every 10th record is routed by an explicit hash key (to the lowest shard).
        let ehk = (i % 10 == 0).then(|| "0".to_owned());
        pending.push(producer.put_with_hash_key(key, ehk, data.clone()).await?);
        sent.push(data);
    }
    let results: Vec<PutRecordResult> = futures::future::try_join_all(pending).await?;
    let aggregated = results.iter().filter(|r| r.sub_sequence_number.is_some()).count();
    let kinesis_records: HashSet<&SequenceNumber> = results.iter().map(|r| &r.sequence_number).collect();
    eprintln!(
        "{RECORDS} records in {} Kinesis records, {aggregated} aggregated",
        kinesis_records.len()
    );
    assert!(aggregated > RECORDS / 2, "most records were aggregated: {aggregated}");
    assert!(
        kinesis_records.len() < RECORDS / 10,
        "{} Kinesis records",
        kinesis_records.len()
    );
    assert!(results
        .iter()
        .skip(55)
        .step_by(100)
        .all(|r| r.sub_sequence_number.is_none()));
    // Per key (routed by its hash), in put order.
    let mut last: HashMap<usize, (&SequenceNumber, u64)> = HashMap::new();
    for (i, r) in results.iter().enumerate().filter(|(i, _)| i % 10 != 0) {
        let at = (&r.sequence_number, r.sub_sequence_number.unwrap_or(0));
        if let Some(previous) = last.insert(i % 37, at) {
            assert!(
                previous < at,
                "record {i} of key user-{} went before an earlier one",
                i % 37
            );
        }
    }
    producer.close().await;

    let recorder = consume(&env, RECORDS).await?;

    let state = recorder.state();
    let delivered: BTreeMap<&Bytes, (&SequenceNumber, u64)> = state
        .deliveries
        .iter()
        .map(|d| (&d.data, (&d.sequence_number, d.sub_sequence_number)))
        .collect();
    assert_eq!(state.deliveries.len(), RECORDS, "each record delivered once");
    for (data, result) in sent.iter().zip(&results) {
        let (sequence, sub) = delivered.get(data).context("record delivered")?;
        assert_eq!(*sequence, &result.sequence_number);
        assert_eq!(*sub, result.sub_sequence_number.unwrap_or(0));
    }
    // Explicitly routed records went to the shard holding hash key 0.
    let lowest = results[0].shard_id.clone();
    assert!(results.iter().step_by(10).all(|r| r.shard_id == lowest));
    Ok(())
}

/// Oversized records, empty and too long partition keys, and bad explicit hash keys
/// are refused with typed errors before anything is sent; after `close`, `put` says so.
#[tokio::test]
async fn invalid_records_get_typed_errors() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), ProducerConfig::default());
    let refused = |r: Result<kcl_producer::PutFuture, ProducerError>| match r {
        Err(ProducerError::InvalidRecord(why)) => why,
        other => panic!("expected InvalidRecord, got {other:?}"),
    };
    assert_eq!(
        refused(producer.put("", Bytes::from_static(b"x")).await),
        InvalidRecord::EmptyPartitionKey
    );
    assert_eq!(
        refused(producer.put("k".repeat(257), Bytes::from_static(b"x")).await),
        InvalidRecord::PartitionKeyTooLong { chars: 257 }
    );
    // 256 characters are fine. (The embedded backend counts bytes, not characters, so
    // the test stays within ASCII.)
    let ok = producer.put("k".repeat(256), Bytes::from_static(b"x")).await?;
    let r = ok.await;
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(
        refused(producer.put("k", Bytes::from(vec![0u8; 1 << 20])).await),
        InvalidRecord::TooLarge {
            bytes: (1 << 20) + 1,
            limit: 1 << 20
        }
    );
    for bad in ["", "12a", "340282366920938463463374607431768211456"] {
        assert_eq!(
            refused(
                producer
                    .put_with_hash_key("k", Some(bad.to_owned()), Bytes::from_static(b"x"))
                    .await
            ),
            InvalidRecord::InvalidExplicitHashKey(bad.to_owned())
        );
    }
    producer.close().await;
    assert!(matches!(
        producer.put("k", Bytes::from_static(b"x")).await,
        Err(ProducerError::Closed)
    ));
    Ok(())
}

/// `close` with records buffered (and a long linger) writes them all before it
/// returns: every future is already resolved, and the stream holds every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_writes_everything_buffered_before_returning() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let mut config = ProducerConfig::default();
    config.record_max_buffered_time = Duration::from_secs(60);
    config.aggregation_enabled = true;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
    let mut pending = Vec::new();
    for i in 0..5000 {
        pending.push(
            producer
                .put(format!("k{}", i % 100), Bytes::from(format!("close-{i}")))
                .await?,
        );
    }
    producer.close().await;
    let mut written = 0;
    for future in pending {
        // Unconstrained: tokio's cooperative budget would make the 129th poll in a row
        // say "pending" however resolved the future is.
        let result = tokio::task::unconstrained(future)
            .now_or_never()
            .with_context(|| format!("record {written} resolved by the time close returned"))?;
        result?;
        written += 1;
    }
    assert_eq!(written, 5000);
    // Aggregated or not, every user record is in the stream.
    let stored = read_back(&env).await?;
    let users = stored
        .into_iter()
        .map(|(data, shard, sequence)| {
            let _ = shard;
            kcl_core::aggregation::deaggregate(kcl_core::Record::new(data, "k", sequence)).map(|v| v.len())
        })
        .collect::<Result<Vec<usize>, _>>()?
        .into_iter()
        .sum::<usize>();
    assert_eq!(users, 5000);
    Ok(())
}

/// Per-shard rate limits slow a hot key down to the configured rate instead of
/// letting it run into throttling: 600 records of one key at 200 records a second take
/// at least two seconds (the bucket's first 200 go at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_held_to_the_shard_rate_limit() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let mut config = ProducerConfig::default();
    config.per_shard_records_per_second = 200;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
    // The producer reads the shard map before its first call: the limit applies from
    // the first record, and the shard's bucket starts full (200).
    let started = Instant::now();
    let mut pending = Vec::new();
    for i in 0..600 {
        pending.push(producer.put("hot", Bytes::from(format!("hot-{i}"))).await?);
    }
    futures::future::try_join_all(pending).await?;
    let took = started.elapsed();
    eprintln!("600 records at 200/s took {took:?}");
    assert!(took >= Duration::from_millis(1900), "took {took:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    producer.close().await;
    Ok(())
}

/// After a reshard the predicted shard map is stale: the first aggregate that lands on
/// another shard than predicted makes the producer read the shards again, later records
/// are predicted onto the children, and every record is still acknowledged and read
/// back by the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_refreshes_the_shard_map_and_loses_nothing() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let mut config = quick_retries();
    config.aggregation_enabled = true;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
    let put_round = |round: usize| {
        let producer = producer.clone();
        async move {
            let mut acks = Vec::new();
            for i in 0..500 {
                acks.push(
                    producer
                        .put(format!("key-{}", i % 50), Bytes::from(format!("r{round}-{i}")))
                        .await?,
                );
            }
            futures::future::try_join_all(acks).await.map_err(anyhow::Error::from)
        }
    };
    let before = put_round(0).await?;
    assert!(before.iter().all(|r| r.shard_id == "shardId-000000000000"));
    kcl_tests::split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    // Rounds after the split go by the stale map (to the closed parent, which Kinesis
    // routes to a child) until the map is read again (at most once a second): then a
    // round spreads over both children.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut rounds = 1;
    loop {
        let results = put_round(rounds).await?;
        rounds += 1;
        let shards: HashSet<&str> = results.iter().map(|r| r.shard_id.as_str()).collect();
        assert!(
            !shards.contains("shardId-000000000000"),
            "nothing goes to the closed parent"
        );
        if shards.len() == 2 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the shard map was not read again");
    }
    eprintln!("{rounds} rounds until the map was read again");
    producer.close().await;

    let recorder = consume(&env, 500 * rounds).await?;
    let delivered: HashSet<Bytes> = recorder.state().deliveries.iter().map(|d| d.data.clone()).collect();
    for round in 0..rounds {
        for i in 0..500 {
            assert!(
                delivered.contains(&Bytes::from(format!("r{round}-{i}"))),
                "r{round}-{i} delivered"
            );
        }
    }
    assert_eq!(before.len(), 500);
    Ok(())
}

/// Issue: `close` racing many puts on a small buffer. Every put that returned `Ok` is
/// resolved by the time `close` returns; an acknowledged record is in the stream, and
/// no record is reported failed (least of all `Closed`) while it was written. Puts
/// parked on the full buffer when `close` starts either get in (and are written) or
/// are refused with `Closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_racing_puts_writes_or_reports_every_accepted_record() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let mut config = quick_retries();
    config.max_buffered_records = 8;
    let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
    const PUTTERS: usize = 32;
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut putters = Vec::new();
    for t in 0..PUTTERS {
        let producer = producer.clone();
        let accepted_tx = accepted_tx.clone();
        putters.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..100_000 {
                let data = Bytes::from(format!("race-{t}-{i}"));
                match producer.put(format!("key-{t}"), data.clone()).await {
                    Ok(future) => {
                        accepted.push((data, future));
                        let _ = accepted_tx.send(());
                    }
                    Err(ProducerError::Closed) => break,
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(accepted)
        }));
    }
    drop(accepted_tx);
    // Close while every putter is busy (most parked on the full buffer).
    for _ in 0..400 {
        accepted_rx.recv().await.context("putters stopped early")?;
    }
    tokio::time::timeout(WAIT, producer.close())
        .await
        .context("close returned")?;
    let mut outcomes = Vec::new();
    for putter in putters {
        for (data, future) in putter.await?? {
            let outcome = tokio::task::unconstrained(future)
                .now_or_never()
                .with_context(|| format!("{data:?} not resolved when close returned"))?;
            outcomes.push((data, outcome));
        }
    }
    let stored: HashSet<Bytes> = read_back(&env).await?.into_iter().map(|(d, _, _)| d).collect();
    let mut written = 0;
    for (data, outcome) in &outcomes {
        match outcome {
            Ok(_) => {
                anyhow::ensure!(stored.contains(data), "{data:?} acknowledged but not in the stream");
                written += 1;
            }
            Err(e) => anyhow::bail!(
                "{data:?} was accepted, then reported {e} (in the stream: {})",
                stored.contains(data)
            ),
        }
    }
    assert_eq!(
        stored.len(),
        written,
        "the stream holds exactly the acknowledged records"
    );
    eprintln!("{} records accepted and written around close", outcomes.len());
    Ok(())
}

/// The hash key Kinesis routes a partition key by (MD5, big-endian).
fn hash_of(partition_key: &str) -> u128 {
    use md5::Digest as _;
    u128::from_be_bytes(md5::Md5::digest(partition_key.as_bytes()).into())
}

/// Every shard's hash key range, by shard id.
async fn shard_ranges(env: &TestEnv) -> anyhow::Result<HashMap<String, (u128, u128)>> {
    let mut ranges = HashMap::new();
    for shard in kcl_tests::list_shards(&env.kinesis, &env.stream).await? {
        let range = shard.hash_key_range().context("hash key range")?;
        ranges.insert(
            shard.shard_id().to_owned(),
            (range.starting_hash_key().parse()?, range.ending_hash_key().parse()?),
        );
    }
    Ok(ranges)
}

/// Puts `n` records over 40 keys and waits for them: (partition key, result).
async fn put_keyed_round(
    producer: &KinesisProducer,
    tag: &str,
    n: usize,
) -> anyhow::Result<Vec<(String, PutRecordResult)>> {
    let mut acks = Vec::new();
    for i in 0..n {
        let key = format!("key-{}", i % 40);
        acks.push((key.clone(), producer.put(key, Bytes::from(format!("{tag}-{i}"))).await?));
    }
    let mut out = Vec::new();
    for (key, ack) in acks {
        out.push((key, ack.await?));
    }
    Ok(out)
}

/// Whether a round was aggregated by a right shard map: some records aggregated, and
/// every record on the shard whose hash key range holds its key (an aggregate packed
/// by a stale map holds keys of several shards, and lands whole on one of them).
fn predicted_right(round: &[(String, PutRecordResult)], ranges: &HashMap<String, (u128, u128)>) -> bool {
    round.iter().any(|(_, r)| r.sub_sequence_number.is_some())
        && round.iter().all(|(key, r)| {
            ranges
                .get(&r.shard_id)
                .is_some_and(|(start, end)| (*start..=*end).contains(&hash_of(key)))
        })
}

/// Issue: a failing first `ListShards` left the producer without a shard map for
/// good (no aggregation, no rate limits). It is read again, with backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_first_list_shards_is_retried() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let faults = kcl_tests::FaultInjector::default();
    faults.push(
        "ListShards",
        kcl_tests::Fault::InternalFailure("injected: the first ListShards fails".to_owned()),
    );
    let mut config = quick_retries();
    config.aggregation_enabled = true;
    let client = faults.client(&env.backend.kinesis_sdk_config());
    let producer = KinesisProducer::new(client, env.stream.clone(), config);
    let ranges = shard_ranges(&env).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for round in 0.. {
        let results = put_keyed_round(&producer, &format!("round-{round}"), 100).await?;
        if predicted_right(&results, &ranges) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "after {round} rounds nothing is aggregated: the shard map was not read again ({} ListShards calls)",
            faults.calls("ListShards")
        );
    }
    anyhow::ensure!(faults.calls("ListShards") >= 2, "read again");
    producer.close().await;
    Ok(())
}

/// Issue: the shard map's re-read had no timeout, so one hung `ListShards` stopped
/// every later refresh. The hung call times out (`request_timeout`) and the map is
/// read again: after a split, aggregates are packed per child shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_list_shards_times_out_and_the_map_is_read_again() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let sdk_config = env.backend.kinesis_sdk_config();
    let http = kcl_tests::HangingHttpClient::new(&sdk_config);
    let faults = kcl_tests::FaultInjector::default();
    let mut config = quick_retries();
    config.aggregation_enabled = true;
    config.request_timeout = Duration::from_secs(1);
    let producer = KinesisProducer::new(
        http.kinesis_client(&sdk_config, Some(&faults)),
        env.stream.clone(),
        config,
    );
    let first = put_keyed_round(&producer, "before", 200).await?;
    anyhow::ensure!(predicted_right(&first, &shard_ranges(&env).await?), "before the split");
    http.hang_next("ListShards", 1);
    kcl_tests::split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    let ranges = shard_ranges(&env).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for round in 0.. {
        let results = put_keyed_round(&producer, &format!("after-{round}"), 200).await?;
        if predicted_right(&results, &ranges) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "after {round} rounds the map is still stale: {} ListShards calls, {} hung",
            faults.calls("ListShards"),
            http.hanging("ListShards")
        );
    }
    anyhow::ensure!(http.hanging("ListShards") == 1, "the re-read hung once");
    producer.close().await;
    Ok(())
}

/// Fails every `PutRecords` entry whose data starts with a given prefix while set
/// (throttled entries; a call of only such entries is throttled whole), writes the
/// others, and notes what it saw: the data of entries let through, failures, finished
/// `ListShards` calls.
#[derive(Clone, Debug, Default)]
struct DataFaults(Arc<DataFaultsState>);

#[derive(Debug, Default)]
struct DataFaultsState {
    failing: std::sync::Mutex<Option<String>>,
    sent: std::sync::Mutex<Vec<Bytes>>,
    failures: AtomicU64,
    list_shards: AtomicU64,
    changed: tokio::sync::Notify,
}

impl DataFaults {
    fn fail_data(&self, prefix: Option<&str>) {
        *self.0.failing.lock().unwrap_or_else(|p| p.into_inner()) = prefix.map(str::to_owned);
    }

    fn sent(&self) -> Vec<Bytes> {
        self.0.sent.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `done` holds; fails after `timeout`.
    async fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Self) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.0.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(self) {
                return Ok(());
            }
            tokio::time::timeout_at(deadline, changed)
                .await
                .with_context(|| format!("timed out waiting for {what}"))?;
        }
    }
}

impl Intercept for DataFaults {
    fn name(&self) -> &'static str {
        "DataFaults"
    }

    fn modify_before_serialization(
        &self,
        context: &mut BeforeSerializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(input) = context.input_mut().downcast_mut::<PutRecordsInput>() else {
            return Ok(());
        };
        let failing = self.0.failing.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let records = input.records.take().unwrap_or_default();
        let (mut kept, mut failed) = (Vec::new(), Vec::new());
        for (i, record) in records.into_iter().enumerate() {
            if failing
                .as_deref()
                .is_some_and(|prefix| record.data.as_ref().starts_with(prefix.as_bytes()))
            {
                failed.push((i, "ProvisionedThroughputExceededException"));
            } else {
                kept.push(record);
            }
        }
        self.0.failures.fetch_add(failed.len() as u64, Ordering::Relaxed);
        self.0
            .sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(kept.iter().map(|r| Bytes::copy_from_slice(r.data().as_ref())));
        if kept.is_empty() {
            input.stream_name = Some(MISSING_STREAM.to_owned());
            cfg.interceptor_state().store_put(Fault::Throttle);
            // Not written: keep the request valid for the missing stream.
            input.records = Some(vec![aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key("x")
                .data(aws_smithy_types::Blob::new("x"))
                .build()?]);
        } else {
            input.records = Some(kept);
            if !failed.is_empty() {
                cfg.interceptor_state().store_put(Fault::Partial(failed));
            }
        }
        self.0.changed.notify_waiters();
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        PutRecordsFaults::default().modify_before_deserialization(context, runtime_components, cfg)
    }

    fn modify_before_completion(
        &self,
        context: &mut FinalizerInterceptorContextMut<'_>,
        runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| m.name().to_owned());
        if operation.as_deref() == Some("ListShards") {
            self.0.list_shards.fetch_add(1, Ordering::Relaxed);
            self.0.changed.notify_waiters();
        }
        PutRecordsFaults::default().modify_before_completion(context, runtime_components, cfg)
    }
}

/// Issue: with aggregation, order is kept per predicted-shard lane; after the shard map
/// changed, a key's new records went out in an idle lane of a child shard while its
/// older record was still being retried in the parent's lane. The key's records must
/// be written in put order across the map change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_order_holds_across_a_reshard_with_aggregation() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let faults = DataFaults::default();
    let client = aws_sdk_kinesis::Client::from_conf(
        env.kinesis
            .config()
            .to_builder()
            .retry_config(RetryConfig::disabled())
            .interceptor(faults.clone())
            .build(),
    );
    let mut config = quick_retries();
    config.aggregation_enabled = true;
    // Records of 200 bytes go on their own (so the interceptor can fail one of them),
    // in their shard's lane as aggregates would.
    config.aggregation_max_size = 150;
    let producer = KinesisProducer::new(client, env.stream.clone(), config);
    let record = |name: &str| Bytes::from(format!("{name:<200}"));
    producer.put("other", record("warm-up")).await?.await?;
    kcl_tests::split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;

    faults.fail_data(Some("slow-0"));
    let other = producer.put("other", record("other-0")).await?;
    let mut slow = vec![producer.put("slow", record("slow-0")).await?];
    // other-0 lands on a child, not the predicted parent: the map is read again.
    other.await?;
    faults
        .wait("the map read again", WAIT, |f| {
            f.0.list_shards.load(Ordering::Relaxed) >= 2
        })
        .await?;
    // slow-0 keeps failing (in the parent's lane) after the new map is in.
    let failed = faults.0.failures.load(Ordering::Relaxed);
    faults
        .wait("slow-0 retried", WAIT, |f| {
            f.0.failures.load(Ordering::Relaxed) >= failed + 2
        })
        .await?;
    for i in 1..=5 {
        slow.push(producer.put("slow", record(&format!("slow-{i}"))).await?);
    }
    // Give the later records the chance to overtake: until one is sent, or slow-0 has
    // failed 5 more times.
    let failed = faults.0.failures.load(Ordering::Relaxed);
    let later_sent = |f: &DataFaults| f.sent().iter().any(|d| d.starts_with(b"slow-"));
    faults
        .wait("slow-1.. sent or slow-0 retried", WAIT, |f| {
            later_sent(f) || f.0.failures.load(Ordering::Relaxed) >= failed + 5
        })
        .await?;
    let overtook = later_sent(&faults);
    faults.fail_data(None);
    let results = futures::future::try_join_all(slow).await?;

    let stored = read_back(&env).await?;
    let order: Vec<String> = {
        let mut slow: Vec<_> = stored.iter().filter(|(d, _, _)| d.starts_with(b"slow-")).collect();
        slow.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        slow.iter()
            .map(|(d, s, _)| format!("{}@{s}", String::from_utf8_lossy(d).trim_end()))
            .collect()
    };
    eprintln!("stored order of key slow: {order:?}");
    let shards: HashSet<&str> = results.iter().map(|r| r.shard_id.as_str()).collect();
    anyhow::ensure!(shards.len() == 1, "one key, one shard: {shards:?}");
    for pair in results.windows(2) {
        anyhow::ensure!(
            pair[0].sequence_number < pair[1].sequence_number,
            "key slow written out of put order (a later record sent while slow-0 was retried: {overtook}): {order:?}"
        );
    }
    anyhow::ensure!(
        !overtook,
        "a later record of the key was sent while slow-0 was being retried"
    );
    producer.close().await;
    Ok(())
}

/// Issue: the aggregate size estimate ignored the explicit hash key table. Records with
/// distinct explicit hash keys are packed into aggregates that stay within
/// `aggregation_max_size` (by default, 50 KiB), and, with the aggregate size at the
/// record limit (1 MiB), no aggregate exceeds the limit: before, such an aggregate made
/// its whole `PutRecords` call fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_with_explicit_hash_keys_stay_within_their_limits() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    for (max_size, max_count, records) in [(50 << 10, 1000, 3000), (1 << 20, 1_000_000, 40_000)] {
        let mut config = quick_retries();
        config.aggregation_enabled = true;
        config.aggregation_max_size = max_size;
        config.aggregation_max_count = max_count;
        // Aggregates close when full (or at the flush), not after a linger.
        config.record_max_buffered_time = Duration::from_secs(60);
        let producer = KinesisProducer::new(client_with(&env, None), env.stream.clone(), config);
        let mut pending = Vec::new();
        for i in 0..records {
            // A distinct 39-digit explicit hash key each (all in the one shard).
            let ehk = (u128::MAX - i as u128 * 7_919).to_string();
            pending.push(
                producer
                    .put_with_hash_key("k", Some(ehk), Bytes::from(format!("{max_size}-{i:06}")))
                    .await?,
            );
        }
        producer.flush().await;
        let results = futures::future::try_join_all(pending)
            .await
            .with_context(|| format!("aggregates of at most {max_size} bytes"))?;
        anyhow::ensure!(results.iter().any(|r| r.sub_sequence_number.is_some()), "aggregated");
        producer.close().await;
    }
    for (data, _, sequence) in read_back(&env).await? {
        let size = data.len() + 1; // the aggregate's partition key is "k"
        let users = kcl_core::aggregation::deaggregate(kcl_core::Record::new(data, "k", sequence))?;
        let limit = if users.first().is_some_and(|u| u.data.starts_with(b"51200-")) {
            50 << 10
        } else {
            1 << 20
        };
        anyhow::ensure!(
            size <= limit,
            "an aggregate of {} records is {size} bytes; at most {limit} allowed",
            users.len()
        );
    }
    Ok(())
}

/// Issue: a zero per-shard rate panicked the producer's task (every record then
/// reported `Closed`), a huge `record_ttl` panicked `put` (`Instant + Duration`
/// overflow), and nothing was validated. `try_new` refuses such a config with a typed
/// error naming the field; `new` panics with it before starting anything.
#[tokio::test]
async fn an_invalid_config_is_refused_with_a_typed_error_naming_the_field() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let refused =
        |config: ProducerConfig| match KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), config) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid config, got {other:?}"),
        };
    let mut config = ProducerConfig::default();
    config.per_shard_records_per_second = 0;
    assert_eq!(refused(config), "per_shard_records_per_second");
    let mut config = ProducerConfig::default();
    config.per_shard_bytes_per_second = 0;
    assert_eq!(refused(config), "per_shard_bytes_per_second");
    let mut config = ProducerConfig::default();
    config.record_ttl = Duration::MAX;
    assert_eq!(refused(config), "record_ttl");
    let mut config = ProducerConfig::default();
    config.max_retry_backoff = Duration::from_secs(u64::MAX / 2);
    assert_eq!(refused(config), "max_retry_backoff");
    let mut config = ProducerConfig::default();
    config.max_in_flight_calls = 0;
    assert_eq!(refused(config), "max_in_flight_calls");
    let message = {
        let mut config = ProducerConfig::default();
        config.request_timeout = Duration::ZERO;
        KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), config)
            .expect_err("zero request timeout")
            .to_string()
    };
    assert!(message.contains("request_timeout"), "{message}");
    // A valid config still works end to end.
    let producer = KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), ProducerConfig::default())?;
    producer.put("k", Bytes::from_static(b"x")).await?.await?;
    producer.close().await;
    Ok(())
}

/// Records up to 10 MiB: the record limit is `max_record_size` (default 1 MiB, at most
/// 10 MiB). Over it, `put` refuses the record with `TooLarge` naming the limit; at
/// 10 MiB a 5 MiB record is accepted and sent (in a call of its own, over the 5 MiB
/// of a call). The embedded backend keeps the old 1 MiB limit even after
/// `UpdateMaxRecordSize`, so here the record's future reports the backend's refusal
/// as a typed `ProducerError::Kinesis` (against AWS, with the stream's maximum raised,
/// it is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_up_to_the_configured_max_record_size_are_accepted() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let refused = |r: Result<kcl_producer::PutFuture, ProducerError>| match r {
        Err(ProducerError::InvalidRecord(why)) => why,
        other => panic!("expected InvalidRecord, got {other:?}"),
    };
    let producer = KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), quick_retries())?;
    assert_eq!(
        refused(producer.put("k", Bytes::from(vec![0u8; 5 << 20])).await),
        InvalidRecord::TooLarge {
            bytes: (5 << 20) + 1,
            limit: 1 << 20
        }
    );
    producer.close().await;

    let stream_arn = env
        .kinesis
        .describe_stream_summary()
        .stream_name(&env.stream)
        .send()
        .await?
        .stream_description_summary()
        .map(|d| d.stream_arn().to_owned())
        .context("stream ARN")?;
    env.kinesis
        .update_max_record_size()
        .stream_arn(stream_arn)
        .max_record_size_in_kib(10 * 1024)
        .send()
        .await?;
    let mut config = quick_retries();
    config.max_record_size = 10 << 20;
    config.max_buffered_bytes = 32 << 20;
    let producer = KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), config.clone())?;
    assert_eq!(
        refused(producer.put("k", Bytes::from(vec![0u8; 10 << 20])).await),
        InvalidRecord::TooLarge {
            bytes: (10 << 20) + 1,
            limit: 10 << 20
        }
    );
    let small = producer.put("k", Bytes::from_static(b"small")).await?;
    let large = producer.put("k2", Bytes::from(vec![7u8; 5 << 20])).await?;
    small.await?;
    match tokio::time::timeout(WAIT, large).await? {
        Ok(written) => eprintln!("the backend took the 5 MiB record: {written:?}"),
        Err(ProducerError::Kinesis { source }) => {
            let text = format!("{source}");
            eprintln!("the embedded backend refused the 5 MiB record: {text}");
            anyhow::ensure!(
                text.contains("ValidationException") || text.contains("too large") || text.contains("1048576"),
                "{text}"
            );
        }
        Err(other) => anyhow::bail!("unexpected outcome of a 5 MiB record: {other:?}"),
    }
    producer.close().await;

    for bad in [0, (10 << 20) + 1] {
        let mut config = config.clone();
        config.max_record_size = bad;
        match KinesisProducer::try_new(client_with(&env, None), env.stream.clone(), config) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "max_record_size"),
            other => panic!("expected max_record_size refused, got {other:?}"),
        }
    }
    Ok(())
}
