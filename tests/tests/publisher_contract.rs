//! The retrieval seam's contract (`kcl_core::retrieval`), checked the same way against
//! every implementation: polling (`PollingRetrievalFactory`) and enhanced fan-out
//! (`kcl_efo::FanOutRetrievalFactory`), each on the embedded backend and kinesis-mock.
//! The publishers are driven directly, without a scheduler or leases.
//!
//! - every record of the shard, in order; repeats are allowed (the consumer drops them),
//!   gaps are not;
//! - after a closed shard's last record, `ShardEnd`, and nothing after it;
//! - a shard Kinesis does not know ends with `ShardNotFound`;
//! - the publisher stops when its `cancel` token fires.

use std::time::Duration;

use anyhow::Context as _;
use kcl_core::retrieval::{PublisherEvent, PublisherStart, RecordsPublisher, RetrievalFactory, StartingPosition};
use kcl_core::{ExtendedSequenceNumber, PollingRetrievalFactory, RetrievalConfig, SequenceNumber};
use kcl_efo::{FanOutConfig, FanOutRetrievalFactory};
use kcl_tests::{split_shard_in_half, unique, TestEnv};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const SHARD0: &str = "shardId-000000000000";

/// The two implementations, ready to start publishers on `env`'s stream.
async fn factories(env: &TestEnv) -> anyhow::Result<Vec<(&'static str, Box<dyn RetrievalFactory>)>> {
    let polling = PollingRetrievalFactory::new(RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        ..RetrievalConfig::default()
    });
    let fan_out = FanOutRetrievalFactory::new(FanOutConfig {
        shard_end_check_interval: Duration::from_millis(500),
        ..FanOutConfig::new(unique("contract"))
    })?;
    let factories: Vec<(&'static str, Box<dyn RetrievalFactory>)> =
        vec![("polling", Box::new(polling)), ("fan-out", Box::new(fan_out))];
    for (_, factory) in &factories {
        factory
            .initialize(&env.kinesis, &env.stream)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(factories)
}

fn start(
    env: &TestEnv,
    factory: &dyn RetrievalFactory,
    shard_id: &str,
    cancel: &CancellationToken,
) -> RecordsPublisher {
    factory.start(PublisherStart::new(
        env.kinesis.clone(),
        env.stream.clone(),
        shard_id.to_owned(),
        StartingPosition::new(ExtendedSequenceNumber::TRIM_HORIZON, None),
        cancel.clone(),
    ))
}

/// Reads events until `want` distinct records arrived (checking order: never a gap,
/// never backwards past what was seen, repeats dropped as the consumer does), or the
/// shard ended. Returns the distinct records in order and whether `ShardEnd` came.
async fn read(
    publisher: &mut RecordsPublisher,
    want: usize,
    until_end: bool,
) -> anyhow::Result<(Vec<SequenceNumber>, bool)> {
    let mut seen: Vec<SequenceNumber> = Vec::new();
    loop {
        if !until_end && seen.len() >= want {
            return Ok((seen, false));
        }
        let event = tokio::time::timeout(WAIT, publisher.next())
            .await
            .with_context(|| format!("no event after {} records", seen.len()))?
            .context("the publisher stopped without an end")?;
        match event {
            PublisherEvent::Batch(batch) => {
                for record in &batch.records {
                    if seen.last().is_none_or(|last| record.sequence_number > *last) {
                        seen.push(record.sequence_number.clone());
                    }
                }
            }
            PublisherEvent::ShardEnd { .. } => return Ok((seen, true)),
            other => anyhow::bail!("unexpected event {other:?}"),
        }
    }
}

async fn contract(env: TestEnv) -> anyhow::Result<()> {
    // An open shard: every record, in order.
    let written = env.put(50, "contract").await?;
    let expected: Vec<SequenceNumber> = written.iter().map(|w| w.sequence_number.clone()).collect();
    for (name, factory) in factories(&env).await? {
        let cancel = CancellationToken::new();
        let mut publisher = start(&env, factory.as_ref(), SHARD0, &cancel);
        let (seen, ended) = read(&mut publisher, expected.len(), false).await?;
        assert!(!ended, "{name}: an open shard does not end");
        assert_eq!(seen, expected, "{name}: every record, in order");
        // Stops when cancelled: the channel closes.
        cancel.cancel();
        let drained = tokio::time::timeout(WAIT, async { while publisher.next().await.is_some() {} }).await;
        assert!(drained.is_ok(), "{name}: the publisher stops when cancelled");
    }

    // A closed shard: every record, then ShardEnd, and nothing after it.
    split_shard_in_half(&env.kinesis, &env.stream, SHARD0).await?;
    for (name, factory) in factories(&env).await? {
        let cancel = CancellationToken::new();
        let mut publisher = start(&env, factory.as_ref(), SHARD0, &cancel);
        let (seen, ended) = read(&mut publisher, expected.len(), true).await?;
        assert!(ended, "{name}: ShardEnd");
        assert_eq!(seen, expected, "{name}: every record before the end");
        let after = tokio::time::timeout(WAIT, publisher.next()).await?;
        assert!(after.is_none(), "{name}: nothing after ShardEnd: {after:?}");
    }

    // A shard Kinesis does not know.
    for (name, factory) in factories(&env).await? {
        let cancel = CancellationToken::new();
        let mut publisher = start(&env, factory.as_ref(), "shardId-000000009999", &cancel);
        // kinesis-mock accepts a subscription to any shard id and sends empty events:
        // the publisher's own check finds out.
        let event = tokio::time::timeout(WAIT, async {
            loop {
                match publisher.next().await {
                    Some(PublisherEvent::Batch(batch)) if batch.records.is_empty() => continue,
                    other => return other,
                }
            }
        })
        .await?;
        assert!(
            matches!(event, Some(PublisherEvent::ShardNotFound { .. })),
            "{name}: {event:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_publishers_keep_the_contract_on_the_embedded_backend() -> anyhow::Result<()> {
    contract(TestEnv::start(1).await?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_publishers_keep_the_contract_on_kinesis_mock() -> anyhow::Result<()> {
    contract(TestEnv::start_conformance(1).await?).await
}

/// Nearly Kinesis's largest record (10 MiB of data and key together): a multiple of 3.
const LARGEST_DATA: usize = 10 * 1024 * 1024 - 4;

/// A Kinesis record of `LARGEST_DATA` bytes (`x`), as a JSON member of `Records`.
fn largest_record_json(sequence_number: &str) -> String {
    // 3 bytes "xxx" are 4 base64 characters "eHh4"; LARGEST_DATA is a multiple of 3.
    let data = "eHh4".repeat(LARGEST_DATA / 3);
    format!(
        r#"{{"SequenceNumber":"{sequence_number}","Data":"{data}","PartitionKey":"big","ApproximateArrivalTimestamp":1700000000.0}}"#
    )
}

/// Kinesis allows records of up to 10 MiB: a record larger than the whole prefetch byte
/// budget (1 MiB here) is still delivered, in a batch of its own, and the records after
/// it follow (no stall). The backends refuse records over 1 MiB, so the 10 MiB record is
/// a crafted response (`GetRecords` for polling, one subscription event for fan-out)
/// ahead of the stream's real records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_publishers_deliver_a_record_larger_than_the_byte_budget() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(3, "after-big").await?;
    let faults = kcl_tests::FaultInjector::default();
    let kinesis = faults.client(&env.backend.kinesis_sdk_config());
    let polling = PollingRetrievalFactory::new(RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        max_prefetch_bytes: 1024 * 1024,
        ..RetrievalConfig::default()
    });
    let fan_out = FanOutRetrievalFactory::new(FanOutConfig {
        max_prefetch_bytes: 1024 * 1024,
        ..FanOutConfig::new(unique("big"))
    })?;
    fan_out
        .initialize(&env.kinesis, &env.stream)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let factories: [(&str, &dyn RetrievalFactory); 2] = [("polling", &polling), ("fan-out", &fan_out)];
    for (name, factory) in factories {
        if name == "polling" {
            let iterator = env
                .kinesis
                .get_shard_iterator()
                .stream_name(&env.stream)
                .shard_id(SHARD0)
                .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator
                .context("iterator")?;
            let body = format!(
                r#"{{"Records":[{}],"NextShardIterator":"{iterator}","MillisBehindLatest":0}}"#,
                largest_record_json("1")
            );
            faults.push("GetRecords", kcl_tests::Fault::Body(body));
        } else {
            let event = format!(
                r#"{{"Records":[{}],"ContinuationSequenceNumber":"1","MillisBehindLatest":0}}"#,
                largest_record_json("1")
            );
            faults.push(
                "SubscribeToShard",
                kcl_tests::Fault::EventStream(vec![kcl_tests::StreamMessage::Event(event)]),
            );
        }
        let cancel = CancellationToken::new();
        let mut publisher = factory.start(PublisherStart::new(
            kinesis.clone(),
            env.stream.clone(),
            SHARD0.to_owned(),
            StartingPosition::new(ExtendedSequenceNumber::TRIM_HORIZON, None),
            cancel.clone(),
        ));
        let mut batches: Vec<Vec<(SequenceNumber, usize)>> = Vec::new();
        let mut real = 0;
        while real < written.len() {
            let event = tokio::time::timeout(WAIT, publisher.next())
                .await
                .with_context(|| format!("{name}: stalled after {batches:?}"))?
                .context("the publisher stopped")?;
            match event {
                PublisherEvent::Batch(batch) if batch.records.is_empty() => {}
                PublisherEvent::Batch(batch) => {
                    real += batch.records.iter().filter(|r| r.data.len() < 100).count();
                    batches.push(
                        batch
                            .records
                            .iter()
                            .map(|r| (r.sequence_number.clone(), r.data.len()))
                            .collect(),
                    );
                }
                other => anyhow::bail!("{name}: unexpected event {other:?}"),
            }
        }
        cancel.cancel();
        assert_eq!(
            batches.first().map(Vec::as_slice),
            Some(&[(SequenceNumber::parse("1")?, LARGEST_DATA)][..]),
            "{name}: the 10 MiB record first, alone"
        );
        let rest: Vec<SequenceNumber> = batches[1..].iter().flatten().map(|(s, _)| s.clone()).collect();
        assert_eq!(
            rest,
            written.iter().map(|w| w.sequence_number.clone()).collect::<Vec<_>>(),
            "{name}: then the records after it"
        );
    }
    Ok(())
}

/// The KMS errors retrying cannot fix: the stream's key is not allowed to this worker,
/// disabled, in a state that cannot be used, missing, or its account not opted in.
const KMS_ERRORS: [&str; 5] = [
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSInvalidStateException",
    "KMSNotFoundException",
    "KMSOptInRequired",
];

/// Waits for the publisher's final event, skipping batches.
async fn final_event(publisher: &mut RecordsPublisher, wait: Duration) -> anyhow::Result<PublisherEvent> {
    tokio::time::timeout(wait, async {
        loop {
            match publisher.next().await {
                Some(PublisherEvent::Batch(_)) => continue,
                Some(event) => return Ok(event),
                None => anyhow::bail!("the publisher stopped without a final event"),
            }
        }
    })
    .await
    .context("no final event: the error was retried")?
}

/// A KMS error retrying cannot fix ends both publishers alike, with `Failed` whose error
/// names the cause: from `GetRecords` (polling), from `SubscribeToShard` itself and from
/// inside a subscription's event stream (fan-out). Before, polling and the event stream
/// retried them forever (the shard silently stalled), and `SubscribeToShard` retried
/// `KMSOptInRequired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kms_errors_end_both_publishers_with_failed() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    env.put(5, "kms").await?;
    let polling = PollingRetrievalFactory::new(RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        retry: kcl_core::RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50), None),
        ..RetrievalConfig::default()
    });
    let fan_out = FanOutRetrievalFactory::new(FanOutConfig {
        retry: kcl_core::RetryPolicy::new(Duration::from_millis(10), Duration::from_millis(50), None),
        ..FanOutConfig::new(unique("kms"))
    })?;
    fan_out
        .initialize(&env.kinesis, &env.stream)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    for code in KMS_ERRORS {
        let message = format!("injected {code}");
        let cases: [(&str, &dyn RetrievalFactory, &'static str, kcl_tests::Fault); 3] = [
            ("polling", &polling, "GetRecords", kcl_tests::Fault::Error(code)),
            ("fan-out", &fan_out, "SubscribeToShard", kcl_tests::Fault::Error(code)),
            (
                "fan-out event stream",
                &fan_out,
                "SubscribeToShard",
                kcl_tests::Fault::EventStream(vec![kcl_tests::StreamMessage::Exception(code, message.clone())]),
            ),
        ];
        for (name, factory, operation, fault) in cases {
            let faults = kcl_tests::FaultInjector::default();
            faults.set_sticky(operation, None, fault);
            let cancel = CancellationToken::new();
            let mut publisher = factory.start(PublisherStart::new(
                faults.client(&env.backend.kinesis_sdk_config()),
                env.stream.clone(),
                SHARD0.to_owned(),
                StartingPosition::new(ExtendedSequenceNumber::TRIM_HORIZON, None),
                cancel.clone(),
            ));
            let event = final_event(&mut publisher, Duration::from_secs(10))
                .await
                .with_context(|| format!("{name}, {code}"))?;
            cancel.cancel();
            let PublisherEvent::Failed { source, .. } = event else {
                anyhow::bail!("{name}, {code}: expected Failed, got {event:?}");
            };
            let text = kcl_core::error::ErrorChain(source.as_ref()).to_string();
            assert!(
                text.contains(code) && text.contains("KMS key"),
                "{name}, {code}: the error names the cause: {text}"
            );
        }
    }
    Ok(())
}

/// An `InvalidArgumentException` for a checkpoint's sequence number that is not about
/// the retention (here Kinesis's message for a sequence number of another shard) is not
/// an expired checkpoint: both publishers end with `Failed` naming the checkpoint and
/// Kinesis's message, and deliver nothing. Before, any such refusal restarted the shard
/// at `TRIM_HORIZON` (re-reading up to a year of data; polling), or reported an
/// `InvalidArgumentException` at `TRIM_HORIZON` (fan-out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_number_refused_for_another_reason_fails_both_publishers() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(5, "refused").await?;
    let message = "Invalid StartingSequenceNumber. It encodes shardId-000000000001, while it was used in a call \
                   to a shard with shardId-000000000000";
    for (name, factory) in factories(&env).await? {
        let faults = kcl_tests::FaultInjector::default();
        let operation = if name == "polling" {
            "GetShardIterator"
        } else {
            "SubscribeToShard"
        };
        faults.push(
            operation,
            kcl_tests::Fault::ErrorMessage("InvalidArgumentException", message.to_owned()),
        );
        let cancel = CancellationToken::new();
        let mut publisher = factory.start(PublisherStart::new(
            faults.client(&env.backend.kinesis_sdk_config()),
            env.stream.clone(),
            SHARD0.to_owned(),
            StartingPosition::new(ExtendedSequenceNumber::new(written[2].sequence_number.clone(), 0), None),
            cancel.clone(),
        ));
        let event = tokio::time::timeout(WAIT, publisher.next())
            .await
            .with_context(|| format!("{name}: no event"))?;
        cancel.cancel();
        let Some(PublisherEvent::Failed { source, .. }) = event else {
            anyhow::bail!("{name}: expected Failed, got {event:?}");
        };
        let text = kcl_core::error::ErrorChain(source.as_ref()).to_string();
        assert!(
            text.contains("checkpoint") && text.contains("It encodes shardId-000000000001"),
            "{name}: names the checkpoint and Kinesis's message: {text}"
        );
    }
    Ok(())
}
