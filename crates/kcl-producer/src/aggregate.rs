//! The exact size of a KPL aggregated record being packed, record by record, so that
//! an aggregate is closed before it would break `aggregation_max_size` or the record
//! limit. The encoding is `kcl_core::aggregation::encode_aggregated`'s: the magic, a
//! protobuf `AggregatedRecord` (a partition key table and an explicit hash key table,
//! each key once, then the records, each naming its keys by index), and an MD5 digest.

use std::collections::HashMap;

/// The 4-byte magic and the 16-byte MD5 digest around the protobuf message.
const FRAMING: usize = 4 + 16;

/// The bytes of a protobuf varint holding `n`.
fn varint_len(n: u64) -> usize {
    // 7 bits a byte; 0 still takes one.
    (64 - (n | 1).leading_zeros() as usize).div_ceil(7)
}

/// The bytes of a length-delimited field (tag, length, payload) of `len` bytes; every
/// field here has a tag below 16, so one byte.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// The tables and running size of one aggregate.
#[derive(Debug, Default)]
pub(crate) struct AggregateSize {
    partition_keys: HashMap<String, u64>,
    explicit_hash_keys: HashMap<String, u64>,
    /// The protobuf message's bytes so far.
    message: usize,
    /// The partition key of the outer Kinesis record (the first record's), which
    /// counts towards the record limit.
    outer_key: usize,
}

impl AggregateSize {
    /// The Kinesis record size (data and partition key) of the aggregate with a record
    /// of these keys and data added.
    pub(crate) fn with(&self, partition_key: &str, explicit_hash_key: Option<&str>, data: usize) -> usize {
        self.message + self.added(partition_key, explicit_hash_key, data) + FRAMING + self.outer_key_or(partition_key)
    }

    /// Adds a record (as [`AggregateSize::with`] counted it).
    pub(crate) fn add(&mut self, partition_key: &str, explicit_hash_key: Option<&str>, data: usize) {
        self.outer_key = self.outer_key_or(partition_key);
        self.message += self.added(partition_key, explicit_hash_key, data);
        let next = self.partition_keys.len() as u64;
        self.partition_keys.entry(partition_key.to_owned()).or_insert(next);
        if let Some(ehk) = explicit_hash_key {
            let next = self.explicit_hash_keys.len() as u64;
            self.explicit_hash_keys.entry(ehk.to_owned()).or_insert(next);
        }
    }

    fn outer_key_or(&self, partition_key: &str) -> usize {
        if self.message == 0 {
            partition_key.len()
        } else {
            self.outer_key
        }
    }

    /// The message bytes a record adds: its keys' table entries when new, and the
    /// record itself.
    fn added(&self, partition_key: &str, explicit_hash_key: Option<&str>, data: usize) -> usize {
        let mut bytes = 0;
        let pk_index = match self.partition_keys.get(partition_key) {
            Some(index) => *index,
            None => {
                bytes += field_len(partition_key.len());
                self.partition_keys.len() as u64
            }
        };
        let mut record = 1 + varint_len(pk_index) + field_len(data);
        if let Some(ehk) = explicit_hash_key {
            let ehk_index = match self.explicit_hash_keys.get(ehk) {
                Some(index) => *index,
                None => {
                    bytes += field_len(ehk.len());
                    self.explicit_hash_keys.len() as u64
                }
            };
            record += 1 + varint_len(ehk_index);
        }
        bytes + field_len(record)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use kcl_core::aggregation::encode_aggregated;

    use super::*;

    #[test]
    fn varints_are_sized_as_protobuf_encodes_them() {
        for (n, len) in [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (u64::MAX, 10)] {
            assert_eq!(varint_len(n), len, "{n}");
        }
    }

    #[test]
    fn the_size_is_the_encoded_size_with_both_key_tables() {
        // Repeated and distinct partition keys, explicit hash keys on some records, and
        // data and table sizes across varint boundaries (127/128 records, 16 KiB data).
        let mut records: Vec<(String, Option<String>, Bytes)> = Vec::new();
        let mut size = AggregateSize::default();
        for i in 0..300_usize {
            let pk = format!("key-{}", i % 150);
            let ehk = (i % 3 != 0).then(|| (u128::MAX - i as u128).to_string());
            let data = Bytes::from(vec![b'x'; if i == 7 { 16 << 10 } else { i % 200 }]);
            let expected = size.with(&pk, ehk.as_deref(), data.len());
            size.add(&pk, ehk.as_deref(), data.len());
            records.push((pk, ehk, data));
            let encoded = encode_aggregated(&records).len() + records[0].0.len();
            assert_eq!(expected, encoded, "after {} records", records.len());
        }
    }
}
