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
        registration_timeout: Duration::from_secs(20),
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

/// Writes rounds of `keys` records until `for_how_long` is over, then waits for the
/// producer; returns everything written.
async fn produce_for(env: &TestEnv, keys: usize, for_how_long: Duration) -> anyhow::Result<Vec<kcl_tests::Written>> {
    let stop = tokio_util::sync::CancellationToken::new();
    let producer = kcl_tests::spawn_keyed_producer(env.kinesis.clone(), env.stream.clone(), keys, stop.clone());
    tokio::time::sleep(for_how_long).await;
    stop.cancel();
    Ok(producer.await??.into_iter().map(|k| k.written).collect())
}

/// Resubscription: with subscriptions ended every 300 ms under a steady producer, the
/// publisher resubscribes many times from the last continuation; nothing is lost and
/// nothing reaches the processor twice, even from a backend that replays every
/// subscription from `TRIM_HORIZON`.
async fn resubscribes_without_loss_or_duplicates(
    env: TestEnv,
    replaying_backend: bool,
    min_subscriptions: usize,
) -> anyhow::Result<()> {
    let faults = FaultInjector::default();
    faults.replay_subscriptions_from_trim_horizon(replaying_backend);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
            subscription_lifetime: Duration::from_millis(300),
            ..fan_out()
        }))?
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    let written = produce_for(&env, 8, Duration::from_secs(3)).await?;
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(
        recorder.state().by_shard(),
        by_shard(&written),
        "nothing lost, nothing twice"
    );
    let subscriptions = faults.calls("SubscribeToShard");
    assert!(
        subscriptions >= min_subscriptions,
        "resubscribed many times: {subscriptions} subscriptions"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscriptions_lose_nothing_and_duplicate_nothing() -> anyhow::Result<()> {
    // ferrokinesis replays every subscription from the shard's start anyway. Two
    // shards for 3 s, each resubscribing at most once a second.
    resubscribes_without_loss_or_duplicates(TestEnv::start(2).await?, false, 6).await
}

/// On kinesis-mock, which honours the position (and sends an event a second, and frees
/// a shard's subscription slot only about a second after it was dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscriptions_lose_nothing_and_duplicate_nothing_on_kinesis_mock() -> anyhow::Result<()> {
    resubscribes_without_loss_or_duplicates(TestEnv::start_conformance(2).await?, false, 4).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_replaying_from_an_earlier_position_causes_no_duplicate() -> anyhow::Result<()> {
    // kinesis-mock honours positions: the rewritten requests are what replays here.
    resubscribes_without_loss_or_duplicates(TestEnv::start_conformance(2).await?, true, 4).await
}

/// The same application reads the same stream in polling and in fan-out mode, the mode
/// chosen by one configuration value (here parsed from JSON as a config file would be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_and_fan_out_are_one_config_value_apart() -> anyhow::Result<()> {
    let env = TestEnv::start(2).await?;
    let written = env.put(300, "mode").await?;
    let consumer = unique("consumer");
    for config in [
        r#"{"polling": {"idle_time_between_reads": "200ms"}}"#.to_owned(),
        format!(r#"{{"fan_out": {{"consumer_name": "{consumer}"}}}}"#),
    ] {
        let mode: RetrievalMode = serde_json::from_str(&config)?;
        let recorder = Recorder::default();
        let faults = FaultInjector::default();
        let scheduler = env
            .scheduler(&recorder, CheckpointMode::Never)
            .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
            .initial_position(InitialPositionInStream::TrimHorizon)
            .retrieval_mode(mode.clone())?
            .build()?;
        let (handle, task) = spawn_scheduler(scheduler);
        recorder.wait_for_records(written.len(), WAIT).await?;
        stop_scheduler(handle, task, WAIT).await??;
        assert_eq!(recorder.state().by_shard(), by_shard(&written), "{config}");
        let (polled, subscribed) = (faults.calls("GetRecords"), faults.calls("SubscribeToShard"));
        match mode {
            RetrievalMode::FanOut(_) => assert!(subscribed > 0 && polled == 0, "{config}: {polled} {subscribed}"),
            _ => assert!(polled > 0 && subscribed == 0, "{config}: {polled} {subscribed}"),
        }
    }
    Ok(())
}

/// A subscription refused with `ResourceInUseException` (another subscription of the
/// consumer to the shard is still open) or throttled is retried after a backoff;
/// nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscriptions_are_retried_without_loss() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(100, "refused").await?;
    let faults = FaultInjector::default();
    for fault in [
        "ResourceInUseException",
        "ResourceInUseException",
        "LimitExceededException",
    ] {
        faults.push("SubscribeToShard", kcl_tests::Fault::Error(fault));
    }
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
            retry: kcl_core::RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(100), None),
            // Read by subscriptions, not by the shard-end check (which runs while they
            // are refused, a second apart).
            shard_end_check_interval: Duration::from_secs(30),
            ..fan_out()
        }))?
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(faults.injected().len(), 3);
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

/// Bad input: a consumer name Kinesis would refuse, a registration the backend refuses,
/// and a backend without enhanced fan-out each end `run()` with a typed error naming
/// the cause, before any shard is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_that_cannot_be_registered_are_typed_errors() -> anyhow::Result<()> {
    use kcl_core::SchedulerError;
    use kcl_efo::FanOutError;
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let err = env
        .scheduler(&recorder, CheckpointMode::Never)
        .retrieval_mode(RetrievalMode::FanOut(FanOutConfig::new("bad name!")))
        .expect_err("refused by the builder");
    assert_eq!(err.field, "fan_out.consumer_name");

    let cases = [
        ("RegisterStreamConsumer", "InvalidArgumentException"),
        ("DescribeStreamConsumer", "UnknownOperationException"),
    ];
    for (operation, error) in cases {
        let faults = FaultInjector::default();
        faults.set_sticky(operation, None, kcl_tests::Fault::Error(error));
        let scheduler = env
            .scheduler(&recorder, CheckpointMode::Never)
            .kinesis_client(faults.client(&env.backend.kinesis_sdk_config()))
            .retrieval_mode(RetrievalMode::FanOut(fan_out()))?
            .build()?;
        let result = tokio::time::timeout(WAIT, scheduler.run()).await?;
        let Err(SchedulerError::Retrieval { source }) = result else {
            panic!("{operation} {error}: expected a retrieval error, got {result:?}");
        };
        let fan_out_error = source.downcast_ref::<FanOutError>().expect("a FanOutError");
        match (operation, fan_out_error) {
            ("RegisterStreamConsumer", FanOutError::RegistrationRefused { .. })
            | ("DescribeStreamConsumer", FanOutError::NotSupported { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(recorder.state().deliveries.is_empty());
    Ok(())
}

/// What each backend does with a `SubscribeToShard` starting position, as the crate
/// docs of `kcl-efo` state: kinesis-mock honours `AFTER_SEQUENCE_NUMBER`; ferrokinesis
/// 0.7 ignores it and sends the shard from its first record. The publisher is correct
/// either way (see the resubscription tests); this pins the fact the docs state.
async fn first_record_after(env: &TestEnv) -> anyhow::Result<(Vec<kcl_tests::Written>, String)> {
    use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition, SubscribeToShardEventStream};
    let written = env.put(10, "position").await?;
    let shard = written[0].shard_id.clone();
    let in_shard: Vec<_> = written.iter().filter(|w| w.shard_id == shard).cloned().collect();
    anyhow::ensure!(in_shard.len() >= 3, "records on {shard}");
    let consumer = kcl_efo::register_stream_consumer(
        &env.kinesis,
        &env.stream,
        &unique("probe"),
        Duration::from_secs(20),
        Duration::from_secs(10),
    )
    .await?;
    let output = env
        .kinesis
        .subscribe_to_shard()
        .consumer_arn(&consumer.consumer_arn)
        .shard_id(&shard)
        .starting_position(
            StartingPosition::builder()
                .r#type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(in_shard[1].sequence_number.as_str())
                .build()?,
        )
        .send()
        .await?;
    let mut events = output.event_stream;
    loop {
        let event = tokio::time::timeout(WAIT, events.recv()).await??;
        if let Some(SubscribeToShardEventStream::SubscribeToShardEvent(event)) = event {
            if let Some(first) = event.records().first() {
                return Ok((in_shard, first.sequence_number().to_owned()));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferrokinesis_ignores_the_subscription_position() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let (in_shard, first) = first_record_after(&env).await?;
    assert_eq!(
        first,
        in_shard[0].sequence_number.as_str(),
        "from the shard's first record"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_mock_honours_the_subscription_position() -> anyhow::Result<()> {
    let env = TestEnv::start_conformance(1).await?;
    let (in_shard, first) = first_record_after(&env).await?;
    assert_eq!(
        first,
        in_shard[2].sequence_number.as_str(),
        "after the requested record"
    );
    Ok(())
}

/// A `SubscribeToShard` call whose answer never comes is abandoned after
/// `call_timeout` and made again; the shard does not stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_subscription_is_abandoned_and_made_again() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(50, "hung").await?;
    let config = env.backend.kinesis_sdk_config();
    let http = kcl_tests::HangingHttpClient::new(&config);
    http.hang_next("SubscribeToShard", 1);
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(http.kinesis_client(&config, None))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
            call_timeout: Duration::from_secs(1),
            ..fan_out()
        }))?
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder
        .wait_for_records(written.len(), Duration::from_secs(30))
        .await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(http.hanging("SubscribeToShard"), 1);
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

/// A subscription that sends nothing for `idle_timeout` is replaced: with every answer
/// held back by a slow network (the proxy), the publisher subscribes again and again;
/// once the network recovers, everything arrives, once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_replaced_after_the_idle_timeout() -> anyhow::Result<()> {
    use kcl_tests::proxy::{ChaosProxy, ProxyFault};
    let env = TestEnv::start(1).await?;
    let upstream: std::net::SocketAddr = env.backend.kinesis_endpoint().trim_start_matches("http://").parse()?;
    let proxy = ChaosProxy::start(upstream).await?;
    let faults = FaultInjector::default();
    let config = kcl_local::sdk_config_for_endpoint(&proxy.endpoint(), "us-east-1");
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .kinesis_client(faults.client(&config))
        .initial_position(InitialPositionInStream::TrimHorizon)
        .retrieval_mode(RetrievalMode::FanOut(FanOutConfig {
            idle_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(20),
            ..fan_out()
        }))?
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    let mut written = env.put(10, "before").await?;
    recorder.wait_for_records(written.len(), WAIT).await?;
    let before = faults.calls("SubscribeToShard");
    proxy.set(ProxyFault::Slow(Duration::from_secs(3)));
    // Subscriptions last 5 minutes: only the idle timeout replaces them this soon.
    faults.wait_calls("SubscribeToShard", before + 2, WAIT).await?;
    proxy.set(ProxyFault::None);
    written.extend(env.put(10, "after").await?);
    recorder.wait_for_records(written.len(), WAIT).await?;
    stop_scheduler(handle, task, WAIT).await??;
    assert_eq!(recorder.state().by_shard(), by_shard(&written));
    Ok(())
}

/// Each `GetRecords` request a client sent: when, and whether it set `Limit`.
#[derive(Debug, Clone, Default)]
struct GetRecordsLog(std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, bool)>>>);

impl GetRecordsLog {
    fn calls(&self) -> Vec<(std::time::Instant, bool)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl aws_sdk_kinesis::config::Intercept for GetRecordsLog {
    fn name(&self) -> &'static str {
        "GetRecordsLog"
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &aws_sdk_kinesis::config::RuntimeComponents,
        cfg: &mut aws_sdk_kinesis::config::ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let get_records = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .is_some_and(|m| m.name() == "GetRecords");
        if get_records {
            let body = context.request().body().bytes().unwrap_or_default();
            let limit = std::str::from_utf8(body).is_ok_and(|b| b.contains("\"Limit\""));
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((std::time::Instant::now(), limit));
        }
        Ok(())
    }
}

/// The shard-end check (for backends that never send `ChildShards`) reads the shard
/// with `GetRecords`, whose limits (5 calls/s, 2 MB/s per shard) every reader of the
/// shard shares: each call sets `Limit`, calls are at least 200 ms apart, and a check
/// makes few of them. Here subscriptions fail and every `GetRecords` finds a
/// record (so the check never sees the end). Before, one check made up to 100 calls
/// back to back, without `Limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shard_end_check_spares_the_shard_read_limits() -> anyhow::Result<()> {
    use kcl_core::retrieval::{PublisherEvent, PublisherStart, RetrievalFactory, StartingPosition};
    let env = TestEnv::start(1).await?;
    let faults = FaultInjector::default();
    // Each subscription fails in its stream at once (and is made again after a backoff).
    faults.set_sticky(
        "SubscribeToShard",
        None,
        kcl_tests::Fault::EventStream(vec![kcl_tests::StreamMessage::Exception(
            "ResourceInUseException",
            "another subscription is open".to_owned(),
        )]),
    );
    faults.set_sticky(
        "GetRecords",
        None,
        kcl_tests::Fault::Body(
            r#"{"Records":[{"SequenceNumber":"5","Data":"eA==","PartitionKey":"k"}],"NextShardIterator":"more","MillisBehindLatest":0}"#
                .to_owned(),
        ),
    );
    let log = GetRecordsLog::default();
    let conf = aws_sdk_kinesis::config::Builder::from(&env.backend.kinesis_sdk_config())
        .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
        .interceptor(faults.clone())
        .interceptor(log.clone())
        .build();
    let factory = kcl_efo::FanOutRetrievalFactory::new(FanOutConfig {
        shard_end_check_interval: Duration::from_millis(100),
        retry: kcl_core::RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50), None),
        ..fan_out()
    })?;
    factory
        .initialize(&env.kinesis, &env.stream)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut publisher = factory.start(PublisherStart::new(
        aws_sdk_kinesis::Client::from_conf(conf),
        env.stream.clone(),
        "shardId-000000000000".to_owned(),
        StartingPosition::new(kcl_core::ExtendedSequenceNumber::TRIM_HORIZON, None),
        cancel.clone(),
    ));
    let window = Duration::from_secs(2);
    let drained = tokio::time::timeout(window, async {
        while let Some(event) = publisher.next().await {
            if !matches!(event, PublisherEvent::Batch(_)) {
                return Some(event);
            }
        }
        None
    })
    .await;
    cancel.cancel();
    assert!(drained.is_err(), "the publisher ended: {drained:?}");
    let calls = log.calls();
    assert!(!calls.is_empty(), "the check ran");
    assert!(calls.len() <= 11, "{} GetRecords calls in {window:?}", calls.len());
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(
        calls.iter().all(|(_, limit)| *limit),
        "every GetRecords sets Limit: {} calls in {window:?}, {} without, smallest gap {:?}",
        calls.len(),
        calls.iter().filter(|(_, limit)| !limit).count(),
        gaps.iter().min()
    );
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(190)),
        "{} GetRecords calls in {window:?}, gaps {gaps:?}",
        calls.len()
    );
    Ok(())
}

/// Guards the review of issue 21 (fan-out gaps): a closed shard whose subscriptions
/// keep being refused (`ResourceInUseException`: a subscription of a worker that lost
/// the lease is still open) still ends, found by the shard-end check; and the refused
/// subscriptions are at least a second apart, however small the jittered backoff.
/// Before, a refused subscription skipped the shard-end check (the shard never ended)
/// and was made again after a backoff of ~0 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_shard_whose_subscriptions_are_refused_still_ends() -> anyhow::Result<()> {
    use kcl_core::retrieval::{PublisherEvent, PublisherStart, RetrievalFactory, StartingPosition};
    let env = TestEnv::start(1).await?;
    let written = env.put(10, "parent").await?;
    kcl_tests::split_shard_in_half(&env.kinesis, &env.stream, "shardId-000000000000").await?;
    let faults = FaultInjector::default();
    faults.set_sticky(
        "SubscribeToShard",
        None,
        kcl_tests::Fault::Error("ResourceInUseException"),
    );
    let factory = kcl_efo::FanOutRetrievalFactory::new(FanOutConfig {
        shard_end_check_interval: Duration::from_millis(500),
        retry: kcl_core::RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(5), None),
        ..fan_out()
    })?;
    factory
        .initialize(&env.kinesis, &env.stream)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    let mut publisher = factory.start(PublisherStart::new(
        faults.client(&env.backend.kinesis_sdk_config()),
        env.stream.clone(),
        "shardId-000000000000".to_owned(),
        StartingPosition::new(kcl_core::ExtendedSequenceNumber::TRIM_HORIZON, None),
        cancel.clone(),
    ));
    let mut records = 0;
    let end = tokio::time::timeout(WAIT, async {
        while let Some(event) = publisher.next().await {
            match event {
                PublisherEvent::Batch(batch) => records += batch.records.len(),
                other => return Some(other),
            }
        }
        None
    })
    .await;
    let elapsed = started.elapsed();
    cancel.cancel();
    assert!(
        matches!(end, Ok(Some(PublisherEvent::ShardEnd { .. }))),
        "the shard ended: {end:?}"
    );
    assert_eq!(records, written.len(), "its records were read by the check");
    let calls = faults.calls("SubscribeToShard");
    assert!(calls >= 1, "subscriptions were tried");
    let most = elapsed.as_secs() as usize + 1;
    assert!(
        calls <= most,
        "{calls} subscriptions in {elapsed:?}: not a second apart"
    );
    Ok(())
}
