//! Checks on what was written and delivered: the sequence numbers per shard
//! ([`by_shard`]) and the per-key order of a keyed producer's records
//! ([`assert_keyed_order`]).

use std::collections::BTreeMap;

use anyhow::Context as _;
use kcl_core::SequenceNumber;

use crate::producers::Written;
use crate::recorder::Delivery;

/// Sequence numbers written per shard, in write order.
pub fn by_shard(written: &[Written]) -> BTreeMap<String, Vec<SequenceNumber>> {
    let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
    for w in written {
        map.entry(w.shard_id.clone())
            .or_default()
            .push(w.sequence_number.clone());
    }
    map
}

/// Checks that, per partition key, the records of a
/// [`spawn_keyed_producer`](crate::spawn_keyed_producer) first arrive in the order they
/// were written (across parent and child shards too), and returns per key how many
/// records arrived.
///
/// # Panics
/// When a key's record arrives before an earlier one of the same key.
pub fn assert_keyed_order(deliveries: &[Delivery]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut next: BTreeMap<String, u64> = BTreeMap::new();
    for d in deliveries {
        let text = String::from_utf8_lossy(&d.data);
        let (key, n) = text.split_once(':').context("keyed payload")?;
        let n: u64 = n.parse()?;
        let expected = next.entry(key.to_owned()).or_insert(0);
        if n == *expected {
            *expected += 1;
        } else {
            assert!(n < *expected, "key {key}: record {n} arrived before record {expected}");
        }
    }
    Ok(next)
}
