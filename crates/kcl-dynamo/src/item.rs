//! Conversion between a [`Lease`] and a DynamoDB item in the Java KCL's lease schema.
//!
//! The functions here are pure (no I/O) so that the schema — attribute names, types,
//! defaults, and what counts as corrupt — can be read and tested in one place:
//!
//! | attribute | type | notes |
//! |---|---|---|
//! | `leaseKey` | S | hash key: the shard id; multi-stream: `account-id:stream-name:creation-epoch:shard-id` |
//! | `leaseOwner` | S | absent when unowned |
//! | `leaseCounter` | N | the fencing token |
//! | `checkpoint` | S | a sequence number or `TRIM_HORIZON`/`LATEST`/`AT_TIMESTAMP`/`SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | 0 when absent |
//! | `pendingCheckpoint`, `pendingCheckpointSubSequenceNumber` | S, N | optional |
//! | `pendingCheckpointState` | B | optional |
//! | `ownerSwitchesSinceCheckpoint` | N | 0 when absent |
//! | `parentShardId`, `childShardIds` | SS | absent when empty (a DynamoDB set cannot be empty) |
//! | `startingHashKey`, `endingHashKey` | S | optional |
//! | `checkpointOwner` | S | optional (graceful handoff) |
//! | `throughputKBps` | N | optional, a decimal (written with renewals and checkpoints) |
//! | `streamName`, `shardId` | S, S | multi-stream only: the stream identifier (`account-id:stream-name:creation-epoch`) and the shard id |
//! | `latestStartTimestamp` | N | ours, optional: while `checkpoint` is `LATEST`, when the lease first started (milliseconds since the Unix epoch); the Java KCL ignores it |
//!
//! An item is a lease when it has `leaseKey` as a string and a `checkpoint` attribute;
//! anything else sharing the table is not ours and is skipped. A lease item whose
//! attribute cannot be read is [`LeaseStoreError::CorruptLease`], naming the attribute.
//! Attributes this crate does not know (the Java KCL 3.x writes a few more, such as
//! `isMarkedForLeaseSteal`) are ignored and left as they are.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use kcl_core::lease::HashKeyRange;
use kcl_core::{Checkpoint, ExtendedSequenceNumber, Lease, LeaseStoreError};

/// A DynamoDB item as the SDK represents it.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// `leaseKey` (S): the hash key, the shard id.
pub(crate) const LEASE_KEY: &str = "leaseKey";
/// `leaseOwner` (S): the worker holding the lease; absent when unowned.
pub(crate) const LEASE_OWNER: &str = "leaseOwner";
/// `leaseCounter` (N): the fencing token.
pub(crate) const LEASE_COUNTER: &str = "leaseCounter";
/// `checkpoint` (S).
pub(crate) const CHECKPOINT: &str = "checkpoint";
/// `checkpointSubSequenceNumber` (N).
pub(crate) const CHECKPOINT_SUB_SEQUENCE_NUMBER: &str = "checkpointSubSequenceNumber";
/// `pendingCheckpoint` (S).
pub(crate) const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
/// `pendingCheckpointSubSequenceNumber` (N).
pub(crate) const PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER: &str = "pendingCheckpointSubSequenceNumber";
/// `pendingCheckpointState` (B).
pub(crate) const PENDING_CHECKPOINT_STATE: &str = "pendingCheckpointState";
/// `ownerSwitchesSinceCheckpoint` (N).
pub(crate) const OWNER_SWITCHES_SINCE_CHECKPOINT: &str = "ownerSwitchesSinceCheckpoint";
/// `parentShardId` (SS).
pub(crate) const PARENT_SHARD_ID: &str = "parentShardId";
/// `childShardIds` (SS).
pub(crate) const CHILD_SHARD_IDS: &str = "childShardIds";
/// `startingHashKey` (S).
pub(crate) const STARTING_HASH_KEY: &str = "startingHashKey";
/// `endingHashKey` (S).
pub(crate) const ENDING_HASH_KEY: &str = "endingHashKey";
/// `checkpointOwner` (S).
pub(crate) const CHECKPOINT_OWNER: &str = "checkpointOwner";
/// `throughputKBps` (N, a decimal).
pub(crate) const THROUGHPUT_KBPS: &str = "throughputKBps";
/// `streamName` (S): the stream identifier of a multi-stream lease.
pub(crate) const STREAM_NAME: &str = "streamName";
/// `latestStartTimestamp` (N): milliseconds since the Unix epoch (ours).
pub(crate) const LATEST_START_TIMESTAMP: &str = "latestStartTimestamp";
/// `shardId` (S): the shard id of a multi-stream lease.
pub(crate) const SHARD_ID: &str = "shardId";

/// A string attribute value.
pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// A number attribute value.
pub(crate) fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// A decimal number attribute value (`throughputKBps`), rounded to three decimals;
/// `None` for a value DynamoDB cannot store (not finite).
pub(crate) fn decimal(value: f64) -> Option<AttributeValue> {
    value
        .is_finite()
        .then(|| AttributeValue::N(format!("{:.3}", value.max(0.0))))
}

/// A string-set attribute value; `None` for an empty set, which DynamoDB cannot store.
pub(crate) fn ss(values: &BTreeSet<String>) -> Option<AttributeValue> {
    (!values.is_empty()).then(|| AttributeValue::Ss(values.iter().cloned().collect()))
}

/// A binary attribute value.
pub(crate) fn b(value: &Bytes) -> AttributeValue {
    AttributeValue::B(Blob::new(value.to_vec()))
}

/// The primary key of the lease item for `lease_key`.
pub(crate) fn key(lease_key: &str) -> Item {
    HashMap::from([(LEASE_KEY.to_owned(), s(lease_key))])
}

/// The full item for `lease`, as `PutItem` writes it when a lease is created. Optional
/// attributes that are unset are left out, as the Java KCL does.
pub(crate) fn lease_to_item(lease: &Lease) -> Item {
    let mut item = key(&lease.lease_key);
    let mut put = |name: &str, value: AttributeValue| {
        item.insert(name.to_owned(), value);
    };
    if let Some(owner) = &lease.lease_owner {
        put(LEASE_OWNER, s(owner));
    }
    put(LEASE_COUNTER, n(lease.lease_counter));
    put(CHECKPOINT, s(lease.checkpoint.checkpoint.as_str()));
    put(CHECKPOINT_SUB_SEQUENCE_NUMBER, n(lease.checkpoint.sub_sequence_number));
    if let Some(pending) = &lease.pending_checkpoint {
        put(PENDING_CHECKPOINT, s(pending.checkpoint.as_str()));
        put(PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER, n(pending.sub_sequence_number));
    }
    if let Some(state) = &lease.pending_checkpoint_state {
        put(PENDING_CHECKPOINT_STATE, b(state));
    }
    put(
        OWNER_SWITCHES_SINCE_CHECKPOINT,
        n(lease.owner_switches_since_checkpoint),
    );
    if let Some(parents) = ss(&lease.parent_shard_ids) {
        put(PARENT_SHARD_ID, parents);
    }
    if let Some(children) = ss(&lease.child_shard_ids) {
        put(CHILD_SHARD_IDS, children);
    }
    if let Some(range) = &lease.hash_key_range {
        put(STARTING_HASH_KEY, s(&range.starting_hash_key));
        put(ENDING_HASH_KEY, s(&range.ending_hash_key));
    }
    if let Some(checkpoint_owner) = &lease.checkpoint_owner {
        put(CHECKPOINT_OWNER, s(checkpoint_owner));
    }
    if let Some(throughput) = lease.throughput_kbps.and_then(decimal) {
        put(THROUGHPUT_KBPS, throughput);
    }
    if let Some(stream) = &lease.stream_name {
        put(STREAM_NAME, s(stream));
    }
    if let Some(shard_id) = &lease.shard_id {
        put(SHARD_ID, s(shard_id));
    }
    if let Some(start) = lease.latest_start() {
        put(LATEST_START_TIMESTAMP, epoch_millis(start));
    }
    item
}

/// A time as a number of milliseconds since the Unix epoch (0 before it).
pub(crate) fn epoch_millis(t: std::time::SystemTime) -> AttributeValue {
    let millis = t
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    n(millis)
}

/// Reads a lease from an item.
///
/// Returns `Ok(None)` (and logs at debug level) for an item that is not a lease: one
/// without `leaseKey` as a string or without a `checkpoint` attribute.
///
/// # Errors
/// [`LeaseStoreError::CorruptLease`] naming the lease key and the first attribute that
/// has the wrong type or an unreadable value, or a missing `leaseCounter`.
pub(crate) fn item_to_lease(item: &Item) -> Result<Option<Lease>, LeaseStoreError> {
    let Some(AttributeValue::S(lease_key)) = item.get(LEASE_KEY) else {
        tracing::debug!("skipping an item without a string leaseKey: not a lease");
        return Ok(None);
    };
    let Some(checkpoint) = item.get(CHECKPOINT) else {
        tracing::debug!(lease_key = %lease_key, "skipping an item without a checkpoint: not a lease");
        return Ok(None);
    };
    let reader = Reader { lease_key, item };

    let checkpoint = reader.checkpoint_value(CHECKPOINT, checkpoint)?;
    let counter = reader
        .u64(LEASE_COUNTER)?
        .ok_or_else(|| reader.corrupt(LEASE_COUNTER, "missing"))?;
    let sub_sequence_number = reader.u64(CHECKPOINT_SUB_SEQUENCE_NUMBER)?.unwrap_or(0);

    let mut lease = Lease::new(
        lease_key.clone(),
        ExtendedSequenceNumber {
            checkpoint,
            sub_sequence_number,
        },
    );
    lease.lease_owner = reader.string(LEASE_OWNER)?.map(str::to_owned);
    lease.lease_counter = counter;
    lease.pending_checkpoint = match reader.optional(PENDING_CHECKPOINT) {
        Some(value) => Some(ExtendedSequenceNumber {
            checkpoint: reader.checkpoint_value(PENDING_CHECKPOINT, value)?,
            sub_sequence_number: reader.u64(PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER)?.unwrap_or(0),
        }),
        None => None,
    };
    lease.pending_checkpoint_state = reader.blob(PENDING_CHECKPOINT_STATE)?;
    lease.owner_switches_since_checkpoint = reader.u64(OWNER_SWITCHES_SINCE_CHECKPOINT)?.unwrap_or(0);
    lease.parent_shard_ids = reader.string_set(PARENT_SHARD_ID)?;
    lease.child_shard_ids = reader.string_set(CHILD_SHARD_IDS)?;
    lease.hash_key_range = reader.hash_key_range()?;
    lease.checkpoint_owner = reader.string(CHECKPOINT_OWNER)?.map(str::to_owned);
    // Advisory: an unreadable value is dropped (the next renewal rewrites it) rather
    // than making the lease unreadable.
    lease.throughput_kbps = reader.f64(THROUGHPUT_KBPS).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "ignoring an unreadable throughputKBps");
        None
    });
    lease.stream_name = reader.string(STREAM_NAME)?.map(str::to_owned);
    lease.shard_id = reader.string(SHARD_ID)?.map(str::to_owned);
    lease.latest_start_timestamp = match reader.u64(LATEST_START_TIMESTAMP)? {
        Some(ms) => Some(
            std::time::SystemTime::UNIX_EPOCH
                .checked_add(std::time::Duration::from_millis(ms))
                .ok_or_else(|| reader.corrupt(LATEST_START_TIMESTAMP, "beyond the clock's range"))?,
        ),
        None => None,
    };
    Ok(Some(lease))
}

/// Reads typed attributes of one lease item, naming the lease and attribute on failure.
struct Reader<'a> {
    lease_key: &'a str,
    item: &'a Item,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, attribute: &str, reason: impl Into<String>) -> LeaseStoreError {
        LeaseStoreError::CorruptLease {
            lease_key: self.lease_key.to_owned(),
            attribute: attribute.to_owned(),
            reason: reason.into(),
        }
    }

    fn wrong_type(&self, attribute: &str, expected: &str, found: &AttributeValue) -> LeaseStoreError {
        self.corrupt(
            attribute,
            format!("expected type {expected}, found {}", type_name(found)),
        )
    }

    /// The attribute, treating an explicit DynamoDB `NULL` like an absent attribute.
    fn optional(&self, attribute: &str) -> Option<&'a AttributeValue> {
        match self.item.get(attribute) {
            None | Some(AttributeValue::Null(true)) => None,
            Some(value) => Some(value),
        }
    }

    fn string(&self, attribute: &str) -> Result<Option<&'a str>, LeaseStoreError> {
        match self.optional(attribute) {
            None => Ok(None),
            Some(AttributeValue::S(value)) => Ok(Some(value)),
            Some(other) => Err(self.wrong_type(attribute, "S", other)),
        }
    }

    fn u64(&self, attribute: &str) -> Result<Option<u64>, LeaseStoreError> {
        match self.optional(attribute) {
            None => Ok(None),
            Some(AttributeValue::N(value)) => value
                .parse::<u64>()
                .map(Some)
                .map_err(|_| self.corrupt(attribute, format!("{value:?} is not a non-negative integer"))),
            Some(other) => Err(self.wrong_type(attribute, "N", other)),
        }
    }

    fn f64(&self, attribute: &str) -> Result<Option<f64>, LeaseStoreError> {
        match self.optional(attribute) {
            None => Ok(None),
            Some(AttributeValue::N(value)) => value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .map(Some)
                .ok_or_else(|| self.corrupt(attribute, format!("{value:?} is not a number"))),
            Some(other) => Err(self.wrong_type(attribute, "N", other)),
        }
    }

    fn blob(&self, attribute: &str) -> Result<Option<Bytes>, LeaseStoreError> {
        match self.optional(attribute) {
            None => Ok(None),
            Some(AttributeValue::B(value)) => Ok(Some(Bytes::copy_from_slice(value.as_ref()))),
            Some(other) => Err(self.wrong_type(attribute, "B", other)),
        }
    }

    fn string_set(&self, attribute: &str) -> Result<BTreeSet<String>, LeaseStoreError> {
        match self.optional(attribute) {
            None => Ok(BTreeSet::new()),
            Some(AttributeValue::Ss(values)) => Ok(values.iter().cloned().collect()),
            Some(other) => Err(self.wrong_type(attribute, "SS", other)),
        }
    }

    fn checkpoint_value(&self, attribute: &str, value: &AttributeValue) -> Result<Checkpoint, LeaseStoreError> {
        match value {
            AttributeValue::S(text) => Checkpoint::parse(text).map_err(|e| self.corrupt(attribute, e.to_string())),
            other => Err(self.wrong_type(attribute, "S", other)),
        }
    }

    /// Both hash keys, or neither. Like the Java KCL, a lease with only one of the two is
    /// read without a range (it is lineage information, not needed to process the shard).
    fn hash_key_range(&self) -> Result<Option<HashKeyRange>, LeaseStoreError> {
        let starting = self.string(STARTING_HASH_KEY)?;
        let ending = self.string(ENDING_HASH_KEY)?;
        for (attribute, value) in [(STARTING_HASH_KEY, starting), (ENDING_HASH_KEY, ending)] {
            if let Some(value) = value {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(self.corrupt(attribute, format!("{value:?} is not a decimal hash key")));
                }
            }
        }
        match (starting, ending) {
            (Some(starting), Some(ending)) => Ok(Some(HashKeyRange {
                starting_hash_key: starting.to_owned(),
                ending_hash_key: ending.to_owned(),
            })),
            (None, None) => Ok(None),
            _ => {
                tracing::debug!(
                    lease_key = %self.lease_key,
                    "lease has only one of startingHashKey/endingHashKey; ignoring the range"
                );
                Ok(None)
            }
        }
    }
}

/// The DynamoDB type descriptor of a value, for error messages (never the value itself).
fn type_name(value: &AttributeValue) -> &'static str {
    match value {
        AttributeValue::B(_) => "B",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Bs(_) => "BS",
        AttributeValue::L(_) => "L",
        AttributeValue::M(_) => "M",
        AttributeValue::N(_) => "N",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Null(_) => "NULL",
        AttributeValue::S(_) => "S",
        AttributeValue::Ss(_) => "SS",
        _ => "an unknown type",
    }
}

#[cfg(test)]
mod tests {
    use kcl_core::SequenceNumber;

    use super::*;

    fn seq(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid sequence number")
    }

    fn full_lease() -> Lease {
        let mut lease = Lease::new(
            "shardId-000000000003",
            ExtendedSequenceNumber::new(seq("49590338271490256608559692538361571095921575989136588898"), 7),
        )
        .with_parents(["shardId-000000000000".to_owned(), "shardId-000000000001".to_owned()])
        .with_hash_key_range(HashKeyRange {
            starting_hash_key: "0".to_owned(),
            ending_hash_key: "340282366920938463463374607431768211455".to_owned(),
        });
        lease.lease_owner = Some("worker-a".to_owned());
        lease.lease_counter = 42;
        lease.pending_checkpoint = Some(ExtendedSequenceNumber::new(seq("4959"), 2));
        lease.pending_checkpoint_state = Some(Bytes::from_static(b"\x00state\xff"));
        lease.owner_switches_since_checkpoint = 3;
        lease.child_shard_ids = ["shardId-000000000007".to_owned()].into_iter().collect();
        lease.checkpoint_owner = Some("worker-b".to_owned());
        lease.throughput_kbps = Some(12.25);
        lease
    }

    fn corrupt_attribute(item: &Item) -> (String, String) {
        match item_to_lease(item) {
            Err(LeaseStoreError::CorruptLease {
                lease_key, attribute, ..
            }) => (lease_key, attribute),
            other => panic!("expected CorruptLease, got {other:?}"),
        }
    }

    #[test]
    fn full_lease_round_trips() {
        let lease = full_lease();
        let item = lease_to_item(&lease);
        assert_eq!(item.get(PARENT_SHARD_ID).map(type_name), Some("SS"));
        assert_eq!(item.get(PENDING_CHECKPOINT_STATE).map(type_name), Some("B"));
        assert_eq!(item_to_lease(&item).expect("readable"), Some(lease));
    }

    /// Issue 21 item 5: where a `LATEST` lease first started, in milliseconds, kept
    /// only while the checkpoint is `LATEST`.
    #[test]
    fn the_latest_start_round_trips_while_the_checkpoint_is_latest() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_700_000_123);
        let mut lease = Lease::new("shardId-000000000000", ExtendedSequenceNumber::LATEST);
        lease.latest_start_timestamp = Some(t);
        let item = lease_to_item(&lease);
        assert_eq!(item.get(LATEST_START_TIMESTAMP), Some(&n(1_764_700_000_123)));
        assert_eq!(item_to_lease(&item).expect("readable"), Some(lease.clone()));
        lease.checkpoint = ExtendedSequenceNumber::TRIM_HORIZON;
        assert_eq!(lease_to_item(&lease).get(LATEST_START_TIMESTAMP), None);
        let mut item = lease_to_item(&Lease::new("s", ExtendedSequenceNumber::LATEST));
        item.insert(LATEST_START_TIMESTAMP.to_owned(), AttributeValue::S("soon".into()));
        assert_eq!(corrupt_attribute(&item).1, LATEST_START_TIMESTAMP);
    }

    #[test]
    fn minimal_lease_round_trips_without_optional_attributes() {
        let lease = Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON);
        let item = lease_to_item(&lease);
        let mut names: Vec<&str> = item.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                CHECKPOINT,
                CHECKPOINT_SUB_SEQUENCE_NUMBER,
                LEASE_COUNTER,
                LEASE_KEY,
                OWNER_SWITCHES_SINCE_CHECKPOINT
            ]
        );
        assert_eq!(item.get(CHECKPOINT), Some(&s("TRIM_HORIZON")));
        assert_eq!(item_to_lease(&item).expect("readable"), Some(lease));
    }

    #[test]
    fn sentinels_round_trip() {
        for sentinel in [
            ExtendedSequenceNumber::TRIM_HORIZON,
            ExtendedSequenceNumber::LATEST,
            ExtendedSequenceNumber::AT_TIMESTAMP,
            ExtendedSequenceNumber::SHARD_END,
        ] {
            let lease = Lease::new("shardId-000000000000", sentinel);
            assert_eq!(item_to_lease(&lease_to_item(&lease)).expect("readable"), Some(lease));
        }
    }

    #[test]
    fn java_kcl_multi_stream_item_parses_and_round_trips() {
        // As the Java KCL 3.x DynamoDBMultiStreamLeaseSerializer writes it: parent and
        // child attributes hold shard ids, not lease keys.
        let item: Item = HashMap::from([
            (
                LEASE_KEY.to_owned(),
                s("123456789012:orders:1700000000:shardId-000000000003"),
            ),
            (STREAM_NAME.to_owned(), s("123456789012:orders:1700000000")),
            (SHARD_ID.to_owned(), s("shardId-000000000003")),
            (LEASE_COUNTER.to_owned(), AttributeValue::N("7".to_owned())),
            (CHECKPOINT.to_owned(), s("TRIM_HORIZON")),
            (
                PARENT_SHARD_ID.to_owned(),
                AttributeValue::Ss(vec!["shardId-000000000000".to_owned()]),
            ),
        ]);
        let lease = item_to_lease(&item).expect("readable").expect("a lease");
        assert_eq!(lease.stream_name.as_deref(), Some("123456789012:orders:1700000000"));
        assert_eq!(lease.shard(), "shardId-000000000003");
        assert_eq!(
            lease.related_lease_key("shardId-000000000000"),
            "123456789012:orders:1700000000:shardId-000000000000"
        );
        let written = lease_to_item(&lease);
        assert_eq!(written.get(STREAM_NAME), item.get(STREAM_NAME));
        assert_eq!(written.get(SHARD_ID), item.get(SHARD_ID));
        assert_eq!(item_to_lease(&written).expect("readable"), Some(lease));
        // A single-stream lease has neither attribute.
        let single = lease_to_item(&Lease::new("shardId-000000000000", ExtendedSequenceNumber::LATEST));
        assert!(!single.contains_key(STREAM_NAME) && !single.contains_key(SHARD_ID));
    }

    #[test]
    fn java_kcl_item_parses() {
        // As the Java KCL 2.x/3.x DynamoDBLeaseSerializer writes it, unknown attributes included.
        let item: Item = HashMap::from([
            (LEASE_KEY.to_owned(), s("shardId-000000000002")),
            (LEASE_OWNER.to_owned(), s("host-1:6a8e")),
            (LEASE_COUNTER.to_owned(), AttributeValue::N("1234".to_owned())),
            (
                CHECKPOINT.to_owned(),
                s("49590338271490256608559692538361571095921575989136588898"),
            ),
            (
                CHECKPOINT_SUB_SEQUENCE_NUMBER.to_owned(),
                AttributeValue::N("0".to_owned()),
            ),
            (
                OWNER_SWITCHES_SINCE_CHECKPOINT.to_owned(),
                AttributeValue::N("1".to_owned()),
            ),
            (
                PARENT_SHARD_ID.to_owned(),
                AttributeValue::Ss(vec!["shardId-000000000000".to_owned()]),
            ),
            (STARTING_HASH_KEY.to_owned(), s("0")),
            (ENDING_HASH_KEY.to_owned(), s("170141183460469231731687303715884105727")),
            ("throughputKBps".to_owned(), AttributeValue::N("12.5".to_owned())),
            ("leaseTableVersion".to_owned(), AttributeValue::Null(true)),
        ]);
        let lease = item_to_lease(&item).expect("readable").expect("a lease");
        assert_eq!(lease.lease_key, "shardId-000000000002");
        assert!(lease.is_owned_by("host-1:6a8e"));
        assert_eq!(lease.lease_counter, 1234);
        assert_eq!(
            lease.checkpoint,
            ExtendedSequenceNumber::new(seq("49590338271490256608559692538361571095921575989136588898"), 0)
        );
        assert_eq!(lease.owner_switches_since_checkpoint, 1);
        assert_eq!(
            lease.parent_shard_ids,
            ["shardId-000000000000".to_owned()].into_iter().collect()
        );
        assert!(lease.child_shard_ids.is_empty());
        assert_eq!(lease.throughput_kbps, Some(12.5));
        assert_eq!(lease.pending_checkpoint, None);
        assert_eq!(
            lease.hash_key_range.map(|r| r.ending_hash_key),
            Some("170141183460469231731687303715884105727".to_owned())
        );
    }

    #[test]
    fn missing_optional_numbers_default_to_zero_and_absent_owner_is_unowned() {
        let item: Item = HashMap::from([
            (LEASE_KEY.to_owned(), s("shardId-000000000009")),
            (LEASE_COUNTER.to_owned(), AttributeValue::N("5".to_owned())),
            (CHECKPOINT.to_owned(), s("SHARD_END")),
        ]);
        let lease = item_to_lease(&item).expect("readable").expect("a lease");
        assert_eq!(lease.checkpoint, ExtendedSequenceNumber::SHARD_END);
        assert_eq!(lease.owner_switches_since_checkpoint, 0);
        assert_eq!(lease.lease_owner, None);

        let mut with_null_owner = item.clone();
        with_null_owner.insert(LEASE_OWNER.to_owned(), AttributeValue::Null(true));
        let lease = item_to_lease(&with_null_owner).expect("readable").expect("a lease");
        assert_eq!(lease.lease_owner, None);
    }

    #[test]
    fn corrupt_attributes_are_named() {
        let base = lease_to_item(&full_lease());
        let cases: [(&str, AttributeValue); 9] = [
            (LEASE_COUNTER, s("seven")),
            (LEASE_COUNTER, AttributeValue::N("-1".to_owned())),
            (LEASE_COUNTER, AttributeValue::N("1.5".to_owned())),
            (CHECKPOINT, s("banana")),
            (CHECKPOINT, AttributeValue::N("12".to_owned())),
            (CHECKPOINT_SUB_SEQUENCE_NUMBER, s("0")),
            (PENDING_CHECKPOINT, s("TRIM HORIZON")),
            (PARENT_SHARD_ID, s("shardId-000000000000")),
            (LEASE_OWNER, AttributeValue::N("1".to_owned())),
        ];
        for (attribute, value) in cases {
            let mut item = base.clone();
            item.insert(attribute.to_owned(), value);
            assert_eq!(
                corrupt_attribute(&item),
                ("shardId-000000000003".to_owned(), attribute.to_owned()),
                "{attribute}"
            );
        }

        let mut no_counter = base.clone();
        no_counter.remove(LEASE_COUNTER);
        assert_eq!(corrupt_attribute(&no_counter).1, LEASE_COUNTER);

        let mut bad_hash_key = base;
        bad_hash_key.insert(ENDING_HASH_KEY.to_owned(), s("ff"));
        assert_eq!(corrupt_attribute(&bad_hash_key).1, ENDING_HASH_KEY);
    }

    #[test]
    fn an_unreadable_throughput_is_dropped_not_fatal() {
        for value in [s("fast"), AttributeValue::N("NaN".to_owned())] {
            let mut item = lease_to_item(&full_lease());
            item.insert(THROUGHPUT_KBPS.to_owned(), value);
            let lease = item_to_lease(&item).expect("readable").expect("a lease");
            assert_eq!(lease.throughput_kbps, None);
        }
        assert_eq!(decimal(f64::INFINITY), None);
        assert_eq!(decimal(1.0 / 3.0), Some(AttributeValue::N("0.333".to_owned())));
    }

    #[test]
    fn corrupt_reason_does_not_echo_binary_payloads() {
        let mut item = lease_to_item(&full_lease());
        item.insert(PENDING_CHECKPOINT_STATE.to_owned(), s("secret application state"));
        let err = item_to_lease(&item).expect_err("corrupt");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn non_lease_items_are_skipped() {
        // A KCL 3.x-style item of another kind: a key but no checkpoint.
        let other_kind: Item = HashMap::from([
            (LEASE_KEY.to_owned(), s("Migration3.0")),
            ("cv".to_owned(), AttributeValue::N("3".to_owned())),
        ]);
        assert_eq!(item_to_lease(&other_kind).expect("skipped"), None);

        let numeric_key: Item = HashMap::from([
            (LEASE_KEY.to_owned(), AttributeValue::N("3".to_owned())),
            (CHECKPOINT.to_owned(), s("LATEST")),
        ]);
        assert_eq!(item_to_lease(&numeric_key).expect("skipped"), None);

        assert_eq!(item_to_lease(&Item::new()).expect("skipped"), None);
    }

    mod fuzz {
        //! Lease items as anything in the table may hold them (property tests): reading
        //! one never panics; it is a lease, "not a lease", or a `CorruptLease` naming
        //! the lease and one of its attributes.

        use std::collections::HashMap;

        use aws_sdk_dynamodb::primitives::Blob;
        use proptest::prelude::*;

        use super::super::*;

        const NAMES: [&str; 18] = [
            LEASE_KEY,
            LEASE_OWNER,
            LEASE_COUNTER,
            CHECKPOINT,
            CHECKPOINT_SUB_SEQUENCE_NUMBER,
            PENDING_CHECKPOINT,
            PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER,
            PENDING_CHECKPOINT_STATE,
            OWNER_SWITCHES_SINCE_CHECKPOINT,
            PARENT_SHARD_ID,
            CHILD_SHARD_IDS,
            STARTING_HASH_KEY,
            ENDING_HASH_KEY,
            CHECKPOINT_OWNER,
            "entityType",
            "throughputKBps",
            STREAM_NAME,
            SHARD_ID,
        ];

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("TRIM_HORIZON".to_owned()),
                Just("SHARD_END".to_owned()),
                Just("LATEST".to_owned()),
                "[0-9]{1,60}",
                "-?[0-9]{1,30}(\\.[0-9]{1,5})?",
                ".{0,40}",
                // Oversized.
                "[0-9a-z]{2000,3000}",
            ]
        }

        fn value() -> impl Strategy<Value = AttributeValue> {
            let leaf = prop_oneof![
                text().prop_map(AttributeValue::S),
                text().prop_map(AttributeValue::N),
                prop::collection::vec(text(), 0..4).prop_map(AttributeValue::Ss),
                prop::collection::vec(text(), 0..4).prop_map(AttributeValue::Ns),
                prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| AttributeValue::B(Blob::new(b))),
                any::<bool>().prop_map(AttributeValue::Bool),
                Just(AttributeValue::Null(true)),
            ];
            leaf.prop_recursive(2, 8, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(AttributeValue::L),
                    prop::collection::hash_map("[a-z]{1,8}", inner, 0..4).prop_map(AttributeValue::M),
                ]
            })
        }

        fn item() -> impl Strategy<Value = Item> {
            prop::collection::vec((prop::sample::select(NAMES.to_vec()), value()), 0..16).prop_map(|pairs| {
                let mut item: Item = pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect::<HashMap<_, _>>();
                // Mostly lease-like: a string key and a checkpoint, so that the reader
                // gets past its "not a lease" checks.
                item.entry(LEASE_KEY.to_owned())
                    .or_insert_with(|| s("shardId-000000000001"));
                item
            })
        }

        proptest! {
            #[test]
            fn reading_any_item_never_panics(item in item()) {
                match item_to_lease(&item) {
                    Ok(Some(lease)) => {
                        // What was read writes back to an item that reads the same.
                        let again = item_to_lease(&lease_to_item(&lease));
                        prop_assert!(matches!(&again, Ok(Some(l)) if *l == lease), "{:?}", again);
                    }
                    Ok(None) => {}
                    Err(LeaseStoreError::CorruptLease { lease_key, attribute, .. }) => {
                        prop_assert_eq!(Some(&AttributeValue::S(lease_key)), item.get(LEASE_KEY));
                        prop_assert!(NAMES.contains(&attribute.as_str()), "names a lease attribute: {}", attribute);
                    }
                    Err(other) => prop_assert!(false, "not a typed corruption: {:?}", other),
                }
            }
        }
    }
}
