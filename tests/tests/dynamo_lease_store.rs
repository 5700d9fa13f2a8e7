//! `kcl_dynamo::DynamoLeaseStore` against a real DynamoDB wire protocol: the embedded
//! DynamoDB of `kcl_local` (dynoxide) on loopback.
//!
//! Each test starts its own backend and uses a fresh table with a random suffix, so the
//! tests run in parallel. Raw items are written and read with the SDK directly to check
//! the Java KCL's item format in both directions and to plant corrupt or foreign items.
//! Throttling and transport failures, which the emulator does not produce, are injected
//! with an SDK interceptor and an unreachable endpoint.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode as SdkBillingMode, GlobalSecondaryIndex, KeySchemaElement,
    KeyType, Projection, ProjectionType, ScalarAttributeType, TableDescription,
};
use aws_sdk_dynamodb::Client;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use bytes::Bytes;
use kcl_core::lease::HashKeyRange;
use kcl_core::{ExtendedSequenceNumber, Lease, LeaseStore, LeaseStoreError, SequenceNumber};
use kcl_dynamo::{DynamoLeaseStore, TableNotActiveError};
use kcl_local::LocalBackend;

type Item = HashMap<String, AttributeValue>;

/// A running backend, a raw client, and a store on a fresh, not yet created, table.
struct Fixture {
    backend: LocalBackend,
    client: Client,
    table: String,
    store: DynamoLeaseStore,
}

impl Fixture {
    async fn start() -> anyhow::Result<Self> {
        kcl_tests::init_tracing();
        let backend = LocalBackend::start().await.context("starting kcl-local")?;
        let client = backend.dynamodb_client();
        let table = fresh_table_name();
        let store = DynamoLeaseStore::new(client.clone(), table.clone());
        Ok(Self {
            backend,
            client,
            table,
            store,
        })
    }

    /// A fixture whose lease table exists.
    async fn with_table() -> anyhow::Result<Self> {
        let fixture = Self::start().await?;
        ensure!(
            fixture.store.create_lease_table_if_not_exists().await?,
            "table not created"
        );
        Ok(fixture)
    }

    /// Writes `item` as is, bypassing the store.
    async fn put_raw(&self, item: Item) -> anyhow::Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await?;
        Ok(())
    }

    /// Reads the stored item for `lease_key`, bypassing the store.
    async fn get_raw(&self, lease_key: &str) -> anyhow::Result<Item> {
        self.client
            .get_item()
            .table_name(&self.table)
            .key("leaseKey", s(lease_key))
            .consistent_read(true)
            .send()
            .await?
            .item
            .context("item missing")
    }

    /// Creates the lease and reads it back as a worker would see it.
    async fn create_and_read(&self, lease: &Lease) -> anyhow::Result<Lease> {
        ensure!(self.store.create_lease_if_not_exists(lease).await?, "lease existed");
        self.store.get_lease(&lease.lease_key).await?.context("lease missing")
    }

    async fn shutdown(self) {
        self.backend.shutdown().await;
    }
}

fn fresh_table_name() -> String {
    kcl_tests::unique("leases")
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_owned())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn seq(value: &str) -> anyhow::Result<ExtendedSequenceNumber> {
    Ok(ExtendedSequenceNumber::new(SequenceNumber::parse(value)?, 0))
}

fn shard(i: usize) -> String {
    format!("shardId-{i:012}")
}

/// Creates a table with the given key schema by hand (all key attributes of type S).
async fn create_raw_table(client: &Client, table: &str, keys: &[(&str, KeyType)]) -> anyhow::Result<()> {
    let mut request = client
        .create_table()
        .table_name(table)
        .billing_mode(SdkBillingMode::PayPerRequest);
    for (name, key_type) in keys {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(*name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(*name)
                    .key_type(key_type.clone())
                    .build()?,
            );
    }
    request.send().await?;
    Ok(())
}

#[tokio::test]
async fn table_creation_is_idempotent_and_true_only_the_first_time() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    assert!(f.store.create_lease_table_if_not_exists().await?);
    assert!(!f.store.create_lease_table_if_not_exists().await?);
    let other_worker = DynamoLeaseStore::new(f.backend.dynamodb_client(), f.table.clone());
    assert!(!other_worker.create_lease_table_if_not_exists().await?);

    let table = f
        .client
        .describe_table()
        .table_name(&f.table)
        .send()
        .await?
        .table
        .context("no description")?;
    let keys: Vec<(&str, &KeyType)> = table
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    assert_eq!(keys, [("leaseKey", &KeyType::Hash)]);
    let billing = table.billing_mode_summary().and_then(|b| b.billing_mode());
    assert_eq!(billing, Some(&SdkBillingMode::PayPerRequest));
    assert!(f.store.list_leases().await?.is_empty());
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn concurrent_table_creation_reports_exactly_one_creator() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let stores: Vec<DynamoLeaseStore> = (0..4)
        .map(|_| DynamoLeaseStore::new(f.backend.dynamodb_client(), f.table.clone()))
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for store in stores {
        tasks.spawn(async move { store.create_lease_table_if_not_exists().await });
    }
    let mut created = 0;
    while let Some(result) = tasks.join_next().await {
        if result?? {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn table_with_another_key_schema_is_invalid() -> anyhow::Result<()> {
    let f = Fixture::start().await?;

    let wrong_hash_key = fresh_table_name();
    create_raw_table(&f.client, &wrong_hash_key, &[("id", KeyType::Hash)]).await?;
    let store = DynamoLeaseStore::new(f.client.clone(), wrong_hash_key.clone());
    match store.create_lease_table_if_not_exists().await {
        Err(LeaseStoreError::InvalidTable { table, reason }) => {
            assert_eq!(table, wrong_hash_key);
            assert!(reason.contains("id HASH"), "{reason}");
        }
        other => panic!("expected InvalidTable, got {other:?}"),
    }

    let with_range_key = fresh_table_name();
    create_raw_table(
        &f.client,
        &with_range_key,
        &[("leaseKey", KeyType::Hash), ("streamName", KeyType::Range)],
    )
    .await?;
    let store = DynamoLeaseStore::new(f.client.clone(), with_range_key.clone());
    match store.create_lease_table_if_not_exists().await {
        Err(LeaseStoreError::InvalidTable { table, reason }) => {
            assert_eq!(table, with_range_key);
            assert!(reason.contains("streamName RANGE"), "{reason}");
        }
        other => panic!("expected InvalidTable, got {other:?}"),
    }
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn create_lease_if_not_exists_is_true_then_false_and_writes_the_java_format() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let lease = Lease::new(shard(3), ExtendedSequenceNumber::TRIM_HORIZON)
        .with_parents([shard(1), shard(2)])
        .with_hash_key_range(HashKeyRange {
            starting_hash_key: "0".to_owned(),
            ending_hash_key: "170141183460469231731687303715884105727".to_owned(),
        });
    assert!(f.store.create_lease_if_not_exists(&lease).await?);

    let mut other = Lease::new(shard(3), ExtendedSequenceNumber::LATEST);
    other.lease_owner = Some("intruder".to_owned());
    assert!(!f.store.create_lease_if_not_exists(&other).await?);
    assert_eq!(f.store.get_lease(&shard(3)).await?.as_ref(), Some(&lease));

    let raw = f.get_raw(&shard(3)).await?;
    assert_eq!(raw.get("checkpoint"), Some(&s("TRIM_HORIZON")));
    assert_eq!(raw.get("leaseCounter"), Some(&n(0)));
    assert_eq!(raw.get("checkpointSubSequenceNumber"), Some(&n(0)));
    let parents: BTreeSet<&str> = match raw.get("parentShardId") {
        Some(AttributeValue::Ss(parents)) => parents.iter().map(String::as_str).collect(),
        other => panic!("parentShardId should be a string set, is {other:?}"),
    };
    assert_eq!(parents, BTreeSet::from([shard(1).as_str(), shard(2).as_str()]));
    assert!(!raw.contains_key("leaseOwner"), "unowned lease written with an owner");
    assert!(!raw.contains_key("childShardIds"), "empty set written");
    assert_eq!(f.store.get_lease(&shard(99)).await?, None);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_taken_lease_fences_the_previous_owner() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut a = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;

    assert!(f.store.take_lease(&mut a, "worker-a").await?);
    assert!(a.is_owned_by("worker-a"));
    assert_eq!(a.lease_counter, 1);
    assert!(f.store.renew_lease(&mut a).await?);
    assert_eq!(a.lease_counter, 2);
    a.checkpoint = seq("100")?;
    assert!(f.store.update_lease_checkpoint(&mut a).await?);
    assert_eq!(a.lease_counter, 3);
    assert_eq!(a.owner_switches_since_checkpoint, 0);

    // Worker B reads the lease and takes it with the counter it read.
    let mut b = f.store.get_lease(&shard(0)).await?.context("lease missing")?;
    assert_eq!(b.checkpoint, seq("100")?);
    assert!(f.store.take_lease(&mut b, "worker-b").await?);
    assert!(b.is_owned_by("worker-b"));
    assert_eq!(b.lease_counter, 4);
    assert_eq!(b.owner_switches_since_checkpoint, 1);

    // A still believes it holds the lease at counter 3.
    let before = a.clone();
    assert!(!f.store.renew_lease(&mut a).await?);
    assert_eq!(a, before, "a failed write must leave the lease untouched");
    a.checkpoint = seq("200")?;
    assert!(!f.store.update_lease_checkpoint(&mut a).await?);

    let stored = f.store.get_lease(&shard(0)).await?.context("lease missing")?;
    assert_eq!(stored.checkpoint, seq("100")?);
    assert!(stored.is_owned_by("worker-b"));
    assert_eq!(stored.lease_counter, 4);

    // A stale take (counter 3) fails too; B can go on.
    let mut stale = before;
    assert!(!f.store.take_lease(&mut stale, "worker-a").await?);
    assert!(f.store.renew_lease(&mut b).await?);
    b.checkpoint = seq("150")?;
    assert!(f.store.update_lease_checkpoint(&mut b).await?);
    assert_eq!(
        f.store.get_lease(&shard(0)).await?.context("missing")?.checkpoint,
        seq("150")?
    );
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn renew_recognises_its_own_applied_write() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    let counter = lease.lease_counter;

    // As if a first renewal attempt was applied but its response lost: the stored
    // counter is already one higher, the owner unchanged.
    let mut item = f.get_raw(&shard(0)).await?;
    item.insert("leaseCounter".to_owned(), n(counter + 1));
    f.put_raw(item).await?;
    assert!(f.store.renew_lease(&mut lease).await?);
    assert_eq!(lease.lease_counter, counter + 1);

    // Two ahead is somebody else's write: not ours.
    let mut item = f.get_raw(&shard(0)).await?;
    item.insert("leaseCounter".to_owned(), n(counter + 3));
    f.put_raw(item).await?;
    assert!(!f.store.renew_lease(&mut lease).await?);
    assert_eq!(lease.lease_counter, counter + 1);
    f.shutdown().await;
    Ok(())
}

/// Issue 11: `throughputKBps` is written as the Java KCL 3.x writes it (a number, with
/// renewals) and with checkpoints, left alone by writes that do not know it, and read
/// back.
#[tokio::test]
async fn throughput_is_written_with_renewals_and_checkpoints_and_kept_by_other_writes() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    assert!(!f.get_raw(&shard(0)).await?.contains_key("throughputKBps"));

    lease.throughput_kbps = Some(12.5);
    assert!(f.store.renew_lease(&mut lease).await?);
    match f.get_raw(&shard(0)).await?.get("throughputKBps") {
        Some(AttributeValue::N(v)) => assert_eq!(v.parse::<f64>()?, 12.5),
        other => anyhow::bail!("throughputKBps is not a number: {other:?}"),
    }
    lease.throughput_kbps = Some(40.0);
    lease.checkpoint = seq("49590338271490256608559692538361571095921575989136588898")?;
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    // A write that does not measure throughput (a take by another worker) keeps it.
    let mut theirs = f.store.get_lease(&shard(0)).await?.context("lease")?;
    assert_eq!(theirs.throughput_kbps, Some(40.0));
    theirs.throughput_kbps = None;
    assert!(f.store.take_lease(&mut theirs, "worker-b").await?);
    assert!(f.store.renew_lease(&mut theirs).await?);
    let stored = f.store.get_lease(&shard(0)).await?.context("lease")?;
    assert_eq!(stored.throughput_kbps, Some(40.0));
    assert!(stored.is_owned_by("worker-b"));
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn evict_clears_the_owner_only_for_the_owner_seen() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);

    let mut seen_by_b = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert!(f.store.evict_lease(&mut lease).await?);
    assert_eq!(lease.lease_owner, None);
    assert_eq!(lease.lease_counter, 2);
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored, lease);
    assert!(!f.get_raw(&shard(0)).await?.contains_key("leaseOwner"));

    // B saw worker-a as the owner; that is no longer true.
    let before = seen_by_b.clone();
    assert!(!f.store.evict_lease(&mut seen_by_b).await?);
    assert_eq!(seen_by_b, before);

    // The unowned lease can be taken at once, from "no owner".
    assert!(f.store.take_lease(&mut lease, "worker-b").await?);
    assert!(lease.is_owned_by("worker-b"));
    assert_eq!(lease.owner_switches_since_checkpoint, 2);
    f.shutdown().await;
    Ok(())
}

/// The cleanup's delete (issue 23, item 11): conditional on the counter and owners as
/// read, so that a lease taken or renewed after it was judged stale is kept.
#[tokio::test]
async fn delete_if_unchanged_keeps_a_lease_written_since_it_was_read() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let read = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    let mut taken = read.clone();
    assert!(f.store.take_lease(&mut taken, "worker-a").await?);
    assert!(
        !f.store.delete_lease_if_unchanged(&read).await?,
        "changed since the read"
    );
    assert_eq!(f.store.get_lease(&shard(0)).await?.context("kept")?, taken);
    assert!(
        f.store.delete_lease_if_unchanged(&taken).await?,
        "unchanged since this read"
    );
    assert!(f.store.get_lease(&shard(0)).await?.is_none());
    assert!(!f.store.delete_lease_if_unchanged(&taken).await?, "gone");
    f.shutdown().await;
    Ok(())
}

/// The Java KCL 3.x handoff on the wire: `initiateGracefulLeaseHandoff` sets
/// `leaseOwner` to the new owner and `checkpointOwner` to the old one without moving the
/// counter; the old owner's writes that did not expect it fail, those that do pass;
/// `evictLease` then removes `checkpointOwner` only; `assignLease` ends a handoff at once.
#[tokio::test]
async fn a_graceful_handoff_has_the_java_attributes_and_fences_as_java_does() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut a = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut a, "worker-a").await?);
    let counter = a.lease_counter;

    let mut seen_by_b = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert!(
        f.store
            .initiate_graceful_lease_handoff(&mut seen_by_b, "worker-b")
            .await?
    );
    assert_eq!(seen_by_b.lease_counter, counter, "the counter does not move");
    let raw = f.get_raw(&shard(0)).await?;
    assert_eq!(raw.get("leaseOwner"), Some(&s("worker-b")));
    assert_eq!(raw.get("checkpointOwner"), Some(&s("worker-a")));
    assert_eq!(raw.get("leaseCounter"), Some(&n(counter)));
    // Only one handoff at a time, and only from the owner seen.
    assert!(
        !f.store
            .initiate_graceful_lease_handoff(&mut seen_by_b.clone(), "worker-c")
            .await?
    );

    // The old owner, unaware, is refused; once it has read the handoff it renews and
    // checkpoints as the checkpoint owner.
    let unaware = a.clone();
    assert!(!f.store.renew_lease(&mut a).await?);
    assert_eq!(a, unaware);
    a.checkpoint = seq("100")?;
    assert!(!f.store.update_lease_checkpoint(&mut a).await?);
    let mut a = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(a.checkpoint_owner.as_deref(), Some("worker-a"));
    assert!(a.is_handoff_pending());
    assert_eq!(a.actual_owner(), Some("worker-a"));
    assert!(f.store.renew_lease(&mut a).await?);
    a.checkpoint = seq("100")?;
    assert!(f.store.update_lease_checkpoint(&mut a).await?);
    assert_eq!(
        a.checkpoint_owner.as_deref(),
        Some("worker-a"),
        "a checkpoint keeps the handoff"
    );

    // The release completes the handoff: the lease is worker-b's, the counter moved.
    assert!(f.store.evict_lease(&mut a).await?);
    assert_eq!(a.lease_owner.as_deref(), Some("worker-b"));
    assert_eq!(a.checkpoint_owner, None);
    assert_eq!(a.lease_counter, counter + 3);
    let raw = f.get_raw(&shard(0)).await?;
    assert!(!raw.contains_key("checkpointOwner"));
    assert_eq!(raw.get("checkpoint"), Some(&s("100")));
    let mut b = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert!(f.store.take_lease(&mut b, "worker-b").await?);

    // A handoff that does not complete is ended by an assignment, which fences the old
    // owner; a take of an expired lease in handoff clears it too.
    assert!(f.store.initiate_graceful_lease_handoff(&mut b, "worker-c").await?);
    let mut old_owner = f.store.get_lease(&shard(0)).await?.context("missing")?;
    let mut c = old_owner.clone();
    assert!(f.store.assign_lease(&mut c, "worker-c").await?);
    assert!(c.is_owned_by("worker-c") && !c.is_handoff_pending());
    assert_eq!(c.owner_switches_since_checkpoint, 1);
    assert!(!f.store.renew_lease(&mut old_owner).await?, "the old owner is fenced");
    assert!(f.store.initiate_graceful_lease_handoff(&mut c, "worker-d").await?);
    let mut d = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert!(f.store.take_lease(&mut d, "worker-e").await?);
    assert!(d.is_owned_by("worker-e") && !d.is_handoff_pending());
    assert!(!f.get_raw(&shard(0)).await?.contains_key("checkpointOwner"));
    f.shutdown().await;
    Ok(())
}

/// A Java KCL 3.x old owner completes a handoff with `assignLease(lease, receiver)`,
/// conditional on the `leaseOwner` it read and not on the counter its renewals moved;
/// a receiver that stopped meanwhile leaves the item so that this write lands.
#[tokio::test]
async fn a_handoff_is_completed_to_the_receiver_the_old_owner_read_whatever_its_renewals_did() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut a = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut a, "worker-a").await?);
    assert!(
        f.store
            .initiate_graceful_lease_handoff(&mut a.clone(), "worker-b")
            .await?
    );
    let read_by_old_owner = f.store.get_lease(&shard(0)).await?.context("missing")?;
    let counter = read_by_old_owner.lease_counter;
    let mut renewing = read_by_old_owner.clone();
    assert!(f.store.renew_lease(&mut renewing).await?);
    let mut stale = read_by_old_owner.clone();
    stale.lease_owner = Some("worker-x".into());
    assert!(
        !f.store.assign_lease(&mut stale, "worker-x").await?,
        "only from the receiver seen"
    );
    let mut old_owner = read_by_old_owner;
    assert!(f.store.assign_lease(&mut old_owner, "worker-b").await?);
    let raw = f.get_raw(&shard(0)).await?;
    assert_eq!(raw.get("leaseOwner"), Some(&s("worker-b")));
    assert!(!raw.contains_key("checkpointOwner"));
    assert_eq!(raw.get("leaseCounter"), Some(&n(counter + 2)));
    f.shutdown().await;
    Ok(())
}

/// The owner index as the Java KCL 3.x defines it: `LeaseOwnerToLeaseKeyIndex`, hash
/// `leaseOwner`, range `leaseKey`, keys only.
fn assert_owner_index(description: &TableDescription) -> anyhow::Result<()> {
    let index = description
        .global_secondary_indexes()
        .iter()
        .find(|i| i.index_name() == Some("LeaseOwnerToLeaseKeyIndex"))
        .context("the owner index exists")?;
    let keys: Vec<(&str, &KeyType)> = index
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    assert_eq!(keys, [("leaseOwner", &KeyType::Hash), ("leaseKey", &KeyType::Range)]);
    assert_eq!(
        index.projection().and_then(|p| p.projection_type()),
        Some(&ProjectionType::KeysOnly)
    );
    Ok(())
}

async fn describe(f: &Fixture, table: &str) -> anyhow::Result<TableDescription> {
    f.client
        .describe_table()
        .table_name(table)
        .send()
        .await?
        .table
        .context("table described")
}

/// Writes three leases, two owned by `worker-a`, and checks that the owner index lists
/// exactly those.
async fn assert_owner_listing(f: &Fixture) -> anyhow::Result<()> {
    for (i, owner) in [Some("worker-a"), Some("worker-b"), Some("worker-a"), None]
        .into_iter()
        .enumerate()
    {
        let mut lease = f
            .create_and_read(&Lease::new(shard(i), ExtendedSequenceNumber::TRIM_HORIZON))
            .await?;
        if let Some(owner) = owner {
            assert!(f.store.take_lease(&mut lease, owner).await?);
        }
    }
    // The index is eventually consistent: wait for it briefly.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut keys = f.store.list_lease_keys_for_owner("worker-a").await?;
        keys.sort();
        if keys == [shard(0), shard(2)] {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "owner listing {keys:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 11: a table this implementation creates has the Java KCL 3.x schema, owner
/// index included, and the owner index lists a worker's leases.
#[tokio::test]
async fn a_created_table_has_the_java_3x_owner_index() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    assert_owner_index(&describe(&f, &f.table).await?)?;
    assert_owner_listing(&f).await?;
    f.shutdown().await;
    Ok(())
}

/// Issue 11: a table the Java KCL 3.x created (built here from its documented schema:
/// `leaseKey` hash, the owner index) is used as it is; a Java 2.x table (no index) gets
/// the index added, and the owner listing works on both.
#[tokio::test]
async fn java_3x_and_2x_tables_are_used_and_a_2x_table_gets_the_owner_index() -> anyhow::Result<()> {
    // Java 3.x.
    let f = Fixture::start().await?;
    let key = |name: &str, key_type: KeyType| -> anyhow::Result<KeySchemaElement> {
        Ok(KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()?)
    };
    let definition = |name: &str| -> anyhow::Result<AttributeDefinition> {
        Ok(AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()?)
    };
    f.client
        .create_table()
        .table_name(&f.table)
        .billing_mode(SdkBillingMode::PayPerRequest)
        .attribute_definitions(definition("leaseKey")?)
        .attribute_definitions(definition("leaseOwner")?)
        .key_schema(key("leaseKey", KeyType::Hash)?)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("LeaseOwnerToLeaseKeyIndex")
                .key_schema(key("leaseOwner", KeyType::Hash)?)
                .key_schema(key("leaseKey", KeyType::Range)?)
                .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
                .build()?,
        )
        .send()
        .await?;
    assert!(!f.store.create_lease_table_if_not_exists().await?, "used as it is");
    assert_owner_index(&describe(&f, &f.table).await?)?;
    assert_owner_listing(&f).await?;
    f.shutdown().await;

    // Java 2.x: no index.
    let f = Fixture::start().await?;
    create_raw_table(&f.client, &f.table, &[("leaseKey", KeyType::Hash)]).await?;
    assert!(!f.store.create_lease_table_if_not_exists().await?);
    assert_owner_index(&describe(&f, &f.table).await?)?;
    assert_owner_listing(&f).await?;
    f.shutdown().await;
    Ok(())
}

/// The leader lock on DynamoDB: created with the lease table, written conditionally on
/// the version the writer saw.
#[tokio::test]
async fn the_leader_lock_is_written_only_over_the_version_seen() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    assert!(f.store.supports_leader_election());
    assert_eq!(f.store.read_leader_lock().await?, None);
    let first = f
        .store
        .write_leader_lock(None, "worker-a")
        .await?
        .context("first write")?;
    assert_eq!((first.owner.as_str(), first.version), ("worker-a", 1));
    assert_eq!(
        f.store.write_leader_lock(None, "worker-b").await?,
        None,
        "the lock exists"
    );
    let renewed = f
        .store
        .write_leader_lock(Some(&first), "worker-a")
        .await?
        .context("renewal")?;
    assert_eq!(renewed.version, 2);
    assert_eq!(
        f.store.write_leader_lock(Some(&first), "worker-b").await?,
        None,
        "a stale version"
    );
    assert_eq!(f.store.read_leader_lock().await?, Some(renewed));
    // Without leader election nothing else is created, and the store says so.
    let plain = DynamoLeaseStore::builder(f.client.clone(), fresh_table_name())
        .leader_election(false)
        .build()?;
    plain.create_lease_table_if_not_exists().await?;
    assert!(!plain.supports_leader_election());
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn taking_a_lease_one_already_owns_does_not_count_a_switch() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    assert_eq!(lease.owner_switches_since_checkpoint, 1);
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    assert_eq!(lease.owner_switches_since_checkpoint, 1);
    assert_eq!(lease.lease_counter, 2);
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored.owner_switches_since_checkpoint, 1);
    f.shutdown().await;
    Ok(())
}

/// Issue 21 item 5: where a `LATEST` lease first started is written with a checkpoint
/// write, kept by renewals, and removed by the first checkpoint past `LATEST`.
#[tokio::test]
async fn the_latest_start_is_kept_until_the_first_checkpoint() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    let started = std::time::UNIX_EPOCH + Duration::from_millis(1_764_700_000_123);
    lease.latest_start_timestamp = Some(started);
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    assert!(f.store.renew_lease(&mut lease).await?);
    let raw = f.get_raw(&shard(0)).await?;
    assert_eq!(raw.get("latestStartTimestamp"), Some(&n(1_764_700_000_123)));
    assert_eq!(raw.get("checkpoint"), Some(&s("LATEST")), "Java still reads LATEST");
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored.latest_start(), Some(started));

    lease.checkpoint = seq("10")?;
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    assert!(!f.get_raw(&shard(0)).await?.contains_key("latestStartTimestamp"));
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored.latest_start_timestamp, None);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn pending_checkpoint_with_state_round_trips_and_a_plain_checkpoint_removes_it() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);

    lease.checkpoint = seq("10")?;
    lease.pending_checkpoint = Some(ExtendedSequenceNumber::new(SequenceNumber::parse("20")?, 3));
    lease.pending_checkpoint_state = Some(Bytes::from_static(b"\x00\x01app-state\xff"));
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored, lease);
    assert_eq!(
        stored.pending_checkpoint,
        Some(ExtendedSequenceNumber::new(SequenceNumber::parse("20")?, 3))
    );
    assert_eq!(
        stored.pending_checkpoint_state.as_deref(),
        Some(&b"\x00\x01app-state\xff"[..])
    );
    let raw = f.get_raw(&shard(0)).await?;
    assert_eq!(raw.get("pendingCheckpoint"), Some(&s("20")));
    assert_eq!(raw.get("pendingCheckpointSubSequenceNumber"), Some(&n(3)));
    assert!(matches!(raw.get("pendingCheckpointState"), Some(AttributeValue::B(_))));

    lease.checkpoint = seq("20")?;
    lease.pending_checkpoint = None;
    lease.pending_checkpoint_state = None;
    lease.child_shard_ids = BTreeSet::from([shard(5), shard(6)]);
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    let raw = f.get_raw(&shard(0)).await?;
    for removed in [
        "pendingCheckpoint",
        "pendingCheckpointSubSequenceNumber",
        "pendingCheckpointState",
    ] {
        assert!(!raw.contains_key(removed), "{removed} still stored");
    }
    assert!(matches!(raw.get("childShardIds"), Some(AttributeValue::Ss(c)) if c.len() == 2));
    let stored = f.store.get_lease(&shard(0)).await?.context("missing")?;
    assert_eq!(stored, lease);
    assert_eq!(stored.child_shard_ids, BTreeSet::from([shard(5), shard(6)]));

    // A checkpoint without children leaves the stored children alone.
    lease.child_shard_ids.clear();
    lease.checkpoint = ExtendedSequenceNumber::SHARD_END;
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    assert_eq!(lease.child_shard_ids, BTreeSet::from([shard(5), shard(6)]));
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::SHARD_END);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn java_kcl_item_reads_back_and_stays_in_its_format() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    // Exactly as the Java KCL's DynamoDBLeaseSerializer writes a lease of a child shard.
    f.put_raw(HashMap::from([
        ("leaseKey".to_owned(), s("shardId-000000000004")),
        ("leaseOwner".to_owned(), s("ip-10-0-0-1:4c9f0e4a")),
        ("leaseCounter".to_owned(), n(1789)),
        (
            "checkpoint".to_owned(),
            s("49590338271490256608559692538361571095921575989136588898"),
        ),
        ("checkpointSubSequenceNumber".to_owned(), n(2)),
        ("ownerSwitchesSinceCheckpoint".to_owned(), n(1)),
        (
            "parentShardId".to_owned(),
            AttributeValue::Ss(vec![
                "shardId-000000000001".to_owned(),
                "shardId-000000000002".to_owned(),
            ]),
        ),
        (
            "startingHashKey".to_owned(),
            s("85070591730234615865843651857942052864"),
        ),
        ("endingHashKey".to_owned(), s("170141183460469231731687303715884105727")),
        ("throughputKBps".to_owned(), AttributeValue::N("12.5".to_owned())),
    ]))
    .await?;

    let leases = f.store.list_leases().await?;
    assert_eq!(leases.len(), 1);
    let mut lease = leases.into_iter().next().context("no lease")?;
    assert_eq!(lease.lease_key, "shardId-000000000004");
    assert!(lease.is_owned_by("ip-10-0-0-1:4c9f0e4a"));
    assert_eq!(lease.lease_counter, 1789);
    assert_eq!(
        lease.checkpoint,
        ExtendedSequenceNumber::new(
            SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")?,
            2
        )
    );
    assert_eq!(lease.owner_switches_since_checkpoint, 1);
    assert_eq!(
        lease.parent_shard_ids,
        BTreeSet::from(["shardId-000000000001".to_owned(), "shardId-000000000002".to_owned()])
    );
    assert_eq!(
        lease.hash_key_range,
        Some(HashKeyRange {
            starting_hash_key: "85070591730234615865843651857942052864".to_owned(),
            ending_hash_key: "170141183460469231731687303715884105727".to_owned(),
        })
    );
    assert_eq!(lease.pending_checkpoint, None);

    // Taking it over and checkpointing keeps the item readable by the Java KCL.
    assert!(f.store.take_lease(&mut lease, "rust-worker").await?);
    assert_eq!(lease.owner_switches_since_checkpoint, 2);
    lease.checkpoint = ExtendedSequenceNumber::new(
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588999")?,
        0,
    );
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    let raw = f.get_raw("shardId-000000000004").await?;
    assert_eq!(raw.get("leaseCounter"), Some(&n(1791)));
    assert_eq!(raw.get("leaseOwner"), Some(&s("rust-worker")));
    assert_eq!(raw.get("ownerSwitchesSinceCheckpoint"), Some(&n(0)));
    assert_eq!(raw.get("checkpointSubSequenceNumber"), Some(&n(0)));
    assert!(matches!(raw.get("parentShardId"), Some(AttributeValue::Ss(p)) if p.len() == 2));
    assert_eq!(raw.get("throughputKBps"), Some(&AttributeValue::N("12.5".to_owned())));
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn corrupt_items_are_reported_with_key_and_attribute() -> anyhow::Result<()> {
    let cases: [(&str, AttributeValue); 3] = [
        ("leaseCounter", s("not-a-number")),
        ("checkpoint", s("banana")),
        ("parentShardId", s("shardId-000000000000")),
    ];
    for (attribute, value) in cases {
        let f = Fixture::with_table().await?;
        assert!(
            f.store
                .create_lease_if_not_exists(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST))
                .await?
        );
        let mut item = HashMap::from([
            ("leaseKey".to_owned(), s(&shard(1))),
            ("leaseCounter".to_owned(), n(4)),
            ("checkpoint".to_owned(), s("TRIM_HORIZON")),
        ]);
        item.insert(attribute.to_owned(), value);
        f.put_raw(item).await?;

        for result in [
            f.store.list_leases().await.map(|_| ()),
            f.store.get_lease(&shard(1)).await.map(|_| ()),
        ] {
            match result {
                Err(LeaseStoreError::CorruptLease {
                    lease_key,
                    attribute: named,
                    ..
                }) => {
                    assert_eq!(lease_key, shard(1));
                    assert_eq!(named, attribute);
                }
                other => panic!("{attribute}: expected CorruptLease, got {other:?}"),
            }
        }
        // The healthy lease is still readable on its own.
        assert!(f.store.get_lease(&shard(0)).await?.is_some());
        f.shutdown().await;
    }
    Ok(())
}

#[tokio::test]
async fn items_of_other_kinds_are_ignored() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    assert!(
        f.store
            .create_lease_if_not_exists(&Lease::new(shard(0), ExtendedSequenceNumber::LATEST))
            .await?
    );
    // A KCL 3.x-style non-lease item: a key but no checkpoint.
    f.put_raw(HashMap::from([
        ("leaseKey".to_owned(), s("Migration3.0")),
        ("cv".to_owned(), n(3)),
        ("mb".to_owned(), s("CLIENT_VERSION_3X")),
    ]))
    .await?;
    let leases = f.store.list_leases().await?;
    let keys: Vec<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
    assert_eq!(keys, [shard(0).as_str()]);
    assert_eq!(f.store.get_lease("Migration3.0").await?, None);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn list_leases_returns_every_page() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let expected: BTreeSet<String> = (0..130).map(shard).collect();
    for key in &expected {
        let lease = Lease::new(key.clone(), ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(f.store.create_lease_if_not_exists(&lease).await?);
    }

    let all: BTreeSet<String> = f.store.list_leases().await?.into_iter().map(|l| l.lease_key).collect();
    assert_eq!(all, expected);

    // Small pages force several Scan calls.
    let paged = DynamoLeaseStore::builder(f.client.clone(), f.table.clone())
        .scan_page_size(7)
        .build()?;
    let leases = paged.list_leases().await?;
    assert_eq!(leases.len(), expected.len(), "a lease was listed twice or missed");
    let keys: BTreeSet<String> = leases.into_iter().map(|l| l.lease_key).collect();
    assert_eq!(keys, expected);
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn delete_lease_removes_the_item() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::SHARD_END))
        .await?;
    f.store.delete_lease(&lease).await?;
    assert_eq!(f.store.get_lease(&shard(0)).await?, None);
    // Deleting again is not an error.
    f.store.delete_lease(&lease).await?;
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn operations_on_a_missing_table_report_table_not_found() -> anyhow::Result<()> {
    let f = Fixture::start().await?;
    let mut lease = Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON);
    lease.lease_owner = Some("worker-a".to_owned());
    let results = [
        ("list_leases", f.store.list_leases().await.map(|_| ())),
        ("get_lease", f.store.get_lease(&shard(0)).await.map(|_| ())),
        (
            "create_lease",
            f.store.create_lease_if_not_exists(&lease).await.map(|_| ()),
        ),
        ("renew_lease", f.store.renew_lease(&mut lease.clone()).await.map(|_| ())),
        (
            "take_lease",
            f.store.take_lease(&mut lease.clone(), "worker-b").await.map(|_| ()),
        ),
        ("evict_lease", f.store.evict_lease(&mut lease.clone()).await.map(|_| ())),
        (
            "checkpoint",
            f.store.update_lease_checkpoint(&mut lease.clone()).await.map(|_| ()),
        ),
        ("delete_lease", f.store.delete_lease(&lease).await),
    ];
    for (operation, result) in results {
        match result {
            Err(LeaseStoreError::TableNotFound { table }) => {
                assert_eq!(table, f.table, "{operation}")
            }
            other => panic!("{operation}: expected TableNotFound, got {other:?}"),
        }
    }
    f.shutdown().await;
    Ok(())
}

/// Replaces every response with DynamoDB's throughput-exceeded error.
#[derive(Debug)]
struct InjectThroughputExceeded;

impl Intercept for InjectThroughputExceeded {
    fn name(&self) -> &'static str {
        "InjectThroughputExceeded"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        *context.response_mut() = HttpResponse::new(
            StatusCode::try_from(400_u16)?,
            SdkBody::from(
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException","message":"injected by the test"}"#,
            ),
        );
        Ok(())
    }
}

#[tokio::test]
async fn throttling_and_transport_failures_are_typed() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;

    let throttled_client = Client::from_conf(
        f.client
            .config()
            .to_builder()
            .interceptor(InjectThroughputExceeded)
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let throttled = DynamoLeaseStore::new(throttled_client, f.table.clone());
    let error = throttled
        .take_lease(&mut lease, "worker-a")
        .await
        .expect_err("throttled");
    assert!(matches!(error, LeaseStoreError::Throttled(_)), "{error:?}");
    assert!(error.is_retryable());
    let error = throttled.list_leases().await.expect_err("throttled");
    assert!(matches!(error, LeaseStoreError::Throttled(_)), "{error:?}");
    assert_eq!(lease.lease_owner, None, "a failed call must leave the lease untouched");

    // Nothing listens on a port that was just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let unreachable_client = Client::from_conf(
        f.client
            .config()
            .to_builder()
            .endpoint_url(format!("http://{closed}"))
            .retry_config(RetryConfig::disabled())
            .build(),
    );
    let unreachable = DynamoLeaseStore::new(unreachable_client, f.table.clone());
    match unreachable.renew_lease(&mut lease).await {
        Err(error @ LeaseStoreError::Dependency { .. }) => {
            assert!(error.is_retryable());
            assert!(std::error::Error::source(&error).is_some(), "SDK error kept as source");
        }
        other => panic!("expected Dependency, got {other:?}"),
    }
    f.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn binary_pending_state_is_stored_as_binary() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let mut lease = f
        .create_and_read(&Lease::new(shard(0), ExtendedSequenceNumber::TRIM_HORIZON))
        .await?;
    assert!(f.store.take_lease(&mut lease, "worker-a").await?);
    lease.pending_checkpoint = Some(seq("5")?);
    lease.pending_checkpoint_state = Some(Bytes::from(vec![0_u8, 159, 146, 150]));
    assert!(f.store.update_lease_checkpoint(&mut lease).await?);
    let raw = f.get_raw(&shard(0)).await?;
    assert_eq!(
        raw.get("pendingCheckpointState"),
        Some(&AttributeValue::B(Blob::new(vec![0_u8, 159, 146, 150])))
    );
    f.shutdown().await;
    Ok(())
}

/// Answers the first `remaining` `DescribeTable` calls with status `CREATING` (the
/// emulator creates tables `ACTIVE` at once, so the wait is otherwise never exercised).
#[derive(Debug)]
struct ReportCreating {
    table: String,
    remaining: Arc<AtomicUsize>,
}

impl Intercept for ReportCreating {
    fn name(&self) -> &'static str {
        "ReportCreating"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let is_describe = cfg.load::<Metadata>().is_some_and(|m| m.name() == "DescribeTable");
        let take_one = |n: usize| n.checked_sub(1);
        if is_describe
            && self
                .remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, take_one)
                .is_ok()
        {
            let body = format!(
                r#"{{"Table":{{"TableName":"{}","TableStatus":"CREATING","KeySchema":[{{"AttributeName":"leaseKey","KeyType":"HASH"}}],"AttributeDefinitions":[{{"AttributeName":"leaseKey","AttributeType":"S"}}]}}}}"#,
                self.table
            );
            *context.response_mut() = HttpResponse::new(StatusCode::try_from(200_u16)?, SdkBody::from(body));
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_table_being_created_is_waited_for_within_a_bound() -> anyhow::Result<()> {
    let f = Fixture::with_table().await?;
    let store_seeing_creating = |remaining: usize, timeout: Duration| {
        let remaining = Arc::new(AtomicUsize::new(remaining));
        let client = Client::from_conf(
            f.client
                .config()
                .to_builder()
                .interceptor(ReportCreating {
                    table: f.table.clone(),
                    remaining: Arc::clone(&remaining),
                })
                .build(),
        );
        let store = DynamoLeaseStore::builder(client, f.table.clone())
            .table_creation_timeout(timeout)
            .table_status_poll_interval(Duration::from_millis(10))
            .build();
        (store, remaining)
    };

    // CREATING three times, then ACTIVE: waited for; not created by this call.
    let (store, remaining) = store_seeing_creating(3, Duration::from_secs(60));
    assert!(!store?.create_lease_table_if_not_exists().await?);
    assert_eq!(remaining.load(Ordering::SeqCst), 0, "the wait stopped before ACTIVE");

    // CREATING for ever: a bounded wait, then a retryable error naming the table.
    let (store, _) = store_seeing_creating(usize::MAX, Duration::from_millis(100));
    match store?.create_lease_table_if_not_exists().await {
        Err(error @ LeaseStoreError::Dependency { .. }) => {
            assert!(error.is_retryable());
            let source = std::error::Error::source(&error)
                .and_then(|s| s.downcast_ref::<TableNotActiveError>())
                .context("source is not TableNotActiveError")?;
            assert_eq!(source.table, f.table);
            assert_eq!(source.last_status, "CREATING");
            assert!(source.waited >= Duration::from_millis(100));
        }
        other => panic!("expected Dependency, got {other:?}"),
    }
    f.shutdown().await;
    Ok(())
}
