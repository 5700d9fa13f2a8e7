//! Smoke tests of the conformance backends (kinesis-mock and dynalite from
//! `tests/conformance`, started as child processes): they start, listen on loopback only,
//! and show the behaviours the framework relies on — records round-trip, `ListShards`
//! pages, and a split parent shard ends with `ChildShards` naming both children.
//!
//! Needs `npm ci --prefix tests/conformance` (CI runs it). Each test prints its timings.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{ShardFilter, ShardFilterType, ShardIteratorType, StreamStatus};
use kcl_tests::conformance::ConformanceBackend;
use kcl_tests::unique;

/// Upper bound of a wait for a stream or table to become `ACTIVE` after an update.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Prints how long a step took, from `since`.
fn timing(step: &str, since: Instant) {
    eprintln!("[timing] {step}: {:?}", since.elapsed());
}

async fn start() -> anyhow::Result<ConformanceBackend> {
    let started = Instant::now();
    let backend = ConformanceBackend::start().await?;
    timing("start kinesis-mock + dynalite", started);
    eprintln!(
        "kinesis-mock at {}, dynalite at {}, logs in {}",
        backend.kinesis_endpoint(),
        backend.dynamodb_endpoint(),
        backend.log_dir().display()
    );
    Ok(backend)
}

/// Shuts the backend down, timed. Drop the clients before: kinesis-mock's graceful exit
/// waits for their idle connections (then `shutdown` SIGKILLs it after a second).
async fn stop(backend: ConformanceBackend) {
    let started = Instant::now();
    backend.shutdown().await;
    timing("shutdown", started);
}

/// Waits until `stream` is `ACTIVE` again (after `SplitShard`).
async fn wait_stream_active(client: &aws_sdk_kinesis::Client, stream: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let summary = client.describe_stream_summary().stream_name(stream).send().await?;
        let status = summary.stream_description_summary().map(|s| s.stream_status().clone());
        if status == Some(StreamStatus::Active) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{stream} not ACTIVE after {ACTIVE_TIMEOUT:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kinesis_mock_round_trips_a_record_and_pages_list_shards() -> anyhow::Result<()> {
    let backend = start().await?;
    let client = backend.kinesis_client();
    let stream = unique("conformance");

    let step = Instant::now();
    kcl_local::create_stream(&client, &stream, 2).await?;
    timing("create_stream (2 shards, until ACTIVE)", step);

    let step = Instant::now();
    let put = client
        .put_record()
        .stream_name(&stream)
        .partition_key("pk")
        .data(Blob::new(b"hello kinesis-mock".to_vec()))
        .send()
        .await?;
    let iterator = client
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(put.shard_id())
        .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
        .starting_sequence_number(put.sequence_number())
        .send()
        .await?
        .shard_iterator
        .context("no shard iterator")?;
    let records = client.get_records().shard_iterator(iterator).send().await?;
    timing("PutRecord + GetShardIterator + GetRecords", step);
    let first = records.records().first().context("GetRecords returned no record")?;
    assert_eq!(first.data().as_ref(), b"hello kinesis-mock");
    assert_eq!(first.sequence_number(), put.sequence_number());
    assert_eq!(first.partition_key(), Some("pk"));
    assert!(
        records.next_shard_iterator().is_some(),
        "an open shard has a next iterator"
    );

    // ListShards, one shard per page: the second call carries only the NextToken.
    let step = Instant::now();
    let mut shard_ids = Vec::new();
    let mut pages = 0;
    let mut page = client.list_shards().stream_name(&stream).max_results(1).send().await?;
    loop {
        pages += 1;
        assert!(page.shards().len() <= 1, "max_results 1 returned {:?}", page.shards());
        shard_ids.extend(page.shards().iter().map(|s| s.shard_id().to_owned()));
        let Some(token) = page.next_token() else { break };
        ensure!(pages < 10, "ListShards keeps returning a NextToken: {shard_ids:?}");
        page = client.list_shards().next_token(token).max_results(1).send().await?;
    }
    timing("ListShards paged", step);
    eprintln!("ListShards max_results=1: {pages} page(s): {shard_ids:?}");
    assert_eq!(shard_ids.len(), 2, "{shard_ids:?}");
    assert_ne!(shard_ids[0], shard_ids[1]);
    assert!(pages >= 2, "one page for two shards with max_results 1");

    drop(client);
    stop(backend).await;
    Ok(())
}

#[tokio::test]
async fn kinesis_mock_split_parent_ends_with_child_shards() -> anyhow::Result<()> {
    let backend = start().await?;
    let client = backend.kinesis_client();
    let stream = unique("conformance-split");

    let step = Instant::now();
    kcl_local::create_stream(&client, &stream, 2).await?;
    timing("create_stream (2 shards, until ACTIVE)", step);

    let shards = client.list_shards().stream_name(&stream).send().await?;
    let parent = shards.shards().first().context("no shard")?.clone();
    let parent_id = parent.shard_id().to_owned();
    let range = parent.hash_key_range().context("no hash key range")?;
    let start: u128 = range.starting_hash_key().parse()?;
    let end: u128 = range.ending_hash_key().parse()?;
    let middle = start + (end - start) / 2;

    // Records on the parent before the split, routed to it by hash key.
    let step = Instant::now();
    let mut written = Vec::new();
    for i in 0..5 {
        let put = client
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("pk-{i}"))
            .explicit_hash_key(start.to_string())
            .data(Blob::new(format!("before-split-{i}").into_bytes()))
            .send()
            .await?;
        assert_eq!(put.shard_id(), parent_id);
        written.push(put.sequence_number().to_owned());
    }
    timing("5 x PutRecord", step);

    let step = Instant::now();
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent_id)
        .new_starting_hash_key((middle + 1).to_string())
        .send()
        .await?;
    wait_stream_active(&client, &stream).await?;
    timing("SplitShard until ACTIVE", step);

    let listed = client.list_shards().stream_name(&stream).send().await?;
    let children: Vec<String> = listed
        .shards()
        .iter()
        .filter(|s| s.parent_shard_id() == Some(parent_id.as_str()))
        .map(|s| s.shard_id().to_owned())
        .collect();
    eprintln!("ListShards after the split: {:#?}", listed.shards());
    assert_eq!(children.len(), 2, "ListShards lineage: {:?}", listed.shards());
    let parent_after = listed
        .shards()
        .iter()
        .find(|s| s.shard_id() == parent_id)
        .context("the parent is no longer listed")?;
    let parent_end = parent_after
        .sequence_number_range()
        .and_then(|r| r.ending_sequence_number())
        .context("the closed parent has no EndingSequenceNumber")?;
    eprintln!("parent {parent_id} closed at {parent_end}");

    // Only the open shards with ShardFilter AT_LATEST: the other original and the children.
    let open = client
        .list_shards()
        .stream_name(&stream)
        .shard_filter(ShardFilter::builder().r#type(ShardFilterType::AtLatest).build()?)
        .send()
        .await?;
    let mut open_ids: Vec<String> = open.shards().iter().map(|s| s.shard_id().to_owned()).collect();
    open_ids.sort();
    eprintln!("ListShards AT_LATEST: {open_ids:?}");
    assert_eq!(open_ids.len(), 3, "{open_ids:?}");
    assert!(!open_ids.contains(&parent_id), "{open_ids:?}");

    // Read the parent to its end.
    let step = Instant::now();
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(&parent_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await?
        .shard_iterator;
    let mut read = Vec::new();
    let mut calls = 0;
    let mut child_shards = Vec::new();
    while let Some(current) = iterator {
        calls += 1;
        if calls > 50 {
            bail!("the parent never ended after {calls} GetRecords; read {read:?}");
        }
        let answer = client.get_records().shard_iterator(current).limit(2).send().await?;
        read.extend(answer.records().iter().map(|r| r.sequence_number().to_owned()));
        eprintln!(
            "GetRecords #{calls}: {} record(s), next iterator: {}, millis_behind_latest: {:?}, child_shards: {:?}",
            answer.records().len(),
            answer.next_shard_iterator().is_some(),
            answer.millis_behind_latest(),
            answer.child_shards()
        );
        if answer.next_shard_iterator().is_some() {
            assert!(
                answer.child_shards().is_empty(),
                "ChildShards before the end of the shard: {:?}",
                answer.child_shards()
            );
        } else {
            child_shards = answer.child_shards().to_vec();
        }
        iterator = answer.next_shard_iterator;
    }
    timing("GetRecords on the parent to its end", step);
    assert_eq!(read, written, "the parent's records, in order");

    let mut named: Vec<String> = child_shards.iter().map(|c| c.shard_id().to_owned()).collect();
    named.sort();
    let mut expected = children;
    expected.sort();
    assert_eq!(named, expected, "ChildShards at the parent's end: {child_shards:?}");
    for child in &child_shards {
        assert_eq!(child.parent_shards(), std::slice::from_ref(&parent_id), "{child:?}");
    }

    // A consumer resuming from a checkpoint at the parent's last record: one GetRecords
    // with nothing left, no next iterator, and the children again.
    let step = Instant::now();
    let last = written.last().context("nothing written")?;
    let resumed = client
        .get_shard_iterator()
        .stream_name(&stream)
        .shard_id(&parent_id)
        .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
        .starting_sequence_number(last)
        .send()
        .await?
        .shard_iterator
        .context("no iterator after the last record of a closed shard")?;
    let answer = client.get_records().shard_iterator(resumed).send().await?;
    timing("resume after the parent's last record", step);
    eprintln!(
        "GetRecords after the last record: {} record(s), next iterator: {}, child_shards: {:?}",
        answer.records().len(),
        answer.next_shard_iterator().is_some(),
        answer.child_shards()
    );
    assert!(answer.records().is_empty(), "{:?}", answer.records());
    assert!(answer.next_shard_iterator().is_none(), "the closed parent has ended");
    let mut again: Vec<String> = answer.child_shards().iter().map(|c| c.shard_id().to_owned()).collect();
    again.sort();
    assert_eq!(again, expected, "ChildShards when resuming at the parent's end");

    drop(client);
    stop(backend).await;
    Ok(())
}

#[tokio::test]
async fn dynalite_round_trips_an_item() -> anyhow::Result<()> {
    let backend = start().await?;
    let client = backend.dynamodb_client();
    let table = unique("conformance");

    let step = Instant::now();
    client
        .create_table()
        .table_name(&table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await?;
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let described = client.describe_table().table_name(&table).send().await?;
        let status = described.table().and_then(|t| t.table_status().cloned());
        if status == Some(TableStatus::Active) {
            break;
        }
        ensure!(Instant::now() < deadline, "{table} not ACTIVE: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    timing("CreateTable until ACTIVE", step);

    let step = Instant::now();
    client
        .put_item()
        .table_name(&table)
        .item("pk", AttributeValue::S("shard-000000000000".into()))
        .item(
            "checkpoint",
            AttributeValue::S("49590338271490256608559692538361571095921575989136588898".into()),
        )
        .item("counter", AttributeValue::N("7".into()))
        .send()
        .await?;
    let got = client
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("shard-000000000000".into()))
        .consistent_read(true)
        .send()
        .await?;
    timing("PutItem + GetItem", step);
    let item = got.item().context("GetItem found nothing")?;
    assert_eq!(
        item.get("checkpoint"),
        Some(&AttributeValue::S(
            "49590338271490256608559692538361571095921575989136588898".into()
        ))
    );
    assert_eq!(item.get("counter"), Some(&AttributeValue::N("7".into())));

    drop(client);
    stop(backend).await;
    Ok(())
}

/// The emulators must not be reachable from other machines: their listening sockets are
/// bound to 127.0.0.1 (kinesis-mock through the loopback preload, since it hard-codes
/// 0.0.0.0). Read from the kernel's socket tables, so Linux only.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn both_listen_on_loopback_only() -> anyhow::Result<()> {
    let backend = start().await?;
    let endpoints = [
        ("kinesis-mock", backend.kinesis_endpoint()),
        ("dynalite", backend.dynamodb_endpoint()),
    ];
    // Local address and state of every listening socket, from /proc/net/tcp{,6}.
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).with_context(|| format!("reading {table}"))?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 3 && fields[3] == "0A" {
                let (address, port) = fields[1].split_once(':').context("bad socket line")?;
                listening.push((address.to_owned(), u16::from_str_radix(port, 16)?));
            }
        }
    }
    for (name, endpoint) in endpoints {
        let port: u16 = endpoint.rsplit(':').next().context("no port")?.parse()?;
        let addresses: Vec<&String> = listening.iter().filter(|(_, p)| *p == port).map(|(a, _)| a).collect();
        assert!(!addresses.is_empty(), "{name}: nothing listens on {port}");
        // 0100007F is 127.0.0.1 in /proc/net/tcp's byte order.
        assert!(
            addresses.iter().all(|a| a.as_str() == "0100007F"),
            "{name} listens on {addresses:?}, not only on 127.0.0.1"
        );
    }
    stop(backend).await;
    Ok(())
}
