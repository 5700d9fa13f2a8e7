//! Which shard a record goes to: the MD5 hash of its partition key (or its explicit
//! hash key) against the open shards' hash key ranges, as Kinesis routes it.

use md5::{Digest as _, Md5};

/// The 128-bit hash key Kinesis routes a partition key by.
pub(crate) fn hash_of_partition_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// The open shards' hash key ranges, sorted by start.
#[derive(Debug, Default)]
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
    fn partition_keys_hash_as_kinesis_does() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661.
        assert_eq!(
            hash_of_partition_key("a"),
            0x0cc1_75b9_c0f1_b6a8_31c3_99e2_6977_2661_u128
        );
    }
}
