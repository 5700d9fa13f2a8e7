//! Which shard a record goes to: the MD5 hash of its partition key (or its explicit
//! hash key) against the open shards' hash key ranges, as Kinesis routes it.

use md5::{Digest as _, Md5};

/// The 128-bit hash key Kinesis routes a partition key by.
pub(crate) fn hash_of_partition_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// The open shards' hash key ranges, sorted by start.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ShardMap {
    ranges: Vec<(u128, u128, String)>,
}

impl ShardMap {
    /// A map of `(starting hash key, ending hash key, shard id)` of open shards; ranges
    /// that cannot be read are left out (their records are not predicted).
    pub(crate) fn new(shards: impl IntoIterator<Item = (String, String, String)>) -> Self {
        let mut ranges: Vec<(u128, u128, String)> = shards
            .into_iter()
            .filter_map(|(start, end, id)| Some((start.parse().ok()?, end.parse().ok()?, id)))
            .collect();
        ranges.sort();
        Self { ranges }
    }

    /// The map of the open shards among `shards` as `ListShards` gave them. Closed
    /// shards (those with an ending sequence number) are left out here, not only by
    /// the request's `ShardFilter`: a backend that ignores the filter lists a resharded
    /// stream's closed parents too, whose ranges overlap their children's.
    pub(crate) fn from_listed(shards: &[aws_sdk_kinesis::types::Shard]) -> Self {
        Self::new(shards.iter().filter_map(|shard| {
            let closed = shard
                .sequence_number_range()
                .is_some_and(|r| r.ending_sequence_number().is_some());
            let range = shard.hash_key_range().filter(|_| !closed)?;
            Some((
                range.starting_hash_key().to_owned(),
                range.ending_hash_key().to_owned(),
                shard.shard_id().to_owned(),
            ))
        }))
    }

    /// The shard whose range holds `hash`.
    pub(crate) fn shard_for(&self, hash: u128) -> Option<&str> {
        let i = self.ranges.partition_point(|(start, _, _)| *start <= hash);
        let (_, end, id) = self.ranges.get(i.checked_sub(1)?)?;
        (hash <= *end).then_some(id.as_str())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_maps_to_the_shard_whose_range_holds_it() {
        let half = u128::MAX / 2;
        let map = ShardMap::new([
            ((half + 1).to_string(), u128::MAX.to_string(), "b".to_owned()),
            ("0".to_owned(), half.to_string(), "a".to_owned()),
        ]);
        assert_eq!(map.shard_for(0), Some("a"));
        assert_eq!(map.shard_for(half), Some("a"));
        assert_eq!(map.shard_for(half + 1), Some("b"));
        assert_eq!(map.shard_for(u128::MAX), Some("b"));
        let gap = ShardMap::new([("10".to_owned(), "20".to_owned(), "x".to_owned())]);
        assert_eq!(gap.shard_for(5), None);
        assert_eq!(gap.shard_for(21), None);
    }

    #[test]
    fn a_map_listed_after_a_merge_holds_the_child_not_the_closed_parents() {
        // A backend that ignores ShardFilter (the embedded one) lists closed shards too.
        use aws_sdk_kinesis::types::{HashKeyRange, SequenceNumberRange, Shard};
        let shard = |id: &str, start: u128, end: u128, closed: bool| {
            Shard::builder()
                .shard_id(id)
                .hash_key_range(
                    HashKeyRange::builder()
                        .starting_hash_key(start.to_string())
                        .ending_hash_key(end.to_string())
                        .build()
                        .expect("a range"),
                )
                .sequence_number_range(
                    SequenceNumberRange::builder()
                        .starting_sequence_number("1")
                        .set_ending_sequence_number(closed.then(|| "2".to_owned()))
                        .build()
                        .expect("a range"),
                )
                .build()
                .expect("a shard")
        };
        let half = u128::MAX / 2;
        let map = ShardMap::from_listed(&[
            shard("p0", 0, half, true),
            shard("p1", half + 1, u128::MAX, true),
            shard("child", 0, u128::MAX, false),
        ]);
        assert_eq!(map.shard_for(0), Some("child"));
        assert_eq!(map.shard_for(u128::MAX), Some("child"));
    }

    #[test]
    fn partition_keys_hash_as_kinesis_does() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661.
        assert_eq!(
            hash_of_partition_key("a"),
            0x0cc1_75b9_c0f1_b6a8_31c3_99e2_6977_2661_u128
        );
    }
}
