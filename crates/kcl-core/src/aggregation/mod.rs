//! KPL de-aggregation (the Java KCL's `AggregatorUtil`): unpacks the user records that
//! the Kinesis Producer Library packs into one Kinesis record, and packs them for tests
//! and producers.
//!
//! An aggregated record's data is `MAGIC || protobuf(AggregatedRecord) || MD5(protobuf)`,
//! as described in the KPL's `aggregation-format.md`. Each user record comes out as a
//! [`Record`] with the outer record's sequence number and arrival timestamp, its index as
//! `sub_sequence_number`, its own partition key (and explicit hash key, if any) and
//! `aggregated = true`. Its data is a slice of the outer record's buffer, not a copy.
//!
//! Where the Java KCL silently delivers a broken aggregated record as if it were a plain
//! one, this module returns a [`DeaggregationError`]: once the MD5 matches, the record is
//! certainly aggregated, and delivering its raw bytes would hand the processor wrong data.
//! Data that merely starts with the magic bytes but whose digest does not match is a
//! plain record (a producer may write any bytes) and passes through unchanged, as in Java.
//!
//! The Java KCL also drops user records whose hash key falls outside the shard's range
//! after a re-shard; this module does not.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

use crate::record::Record;
use crate::sequence::SequenceNumber;

/// The four bytes that open every KPL aggregated record (`AGGREGATED_RECORD_MAGIC` in the
/// Java KCL).
pub const AGGREGATED_RECORD_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that closes an aggregated record.
const DIGEST_LEN: usize = 16;

/// The KPL's protobuf messages (`messages.proto`), written by hand so that no build script
/// or `protoc` is needed.
///
/// The schema is proto2. Its `required` fields are declared `optional` here so that a
/// missing one is seen (prost would otherwise decode it as 0 or empty, and a missing
/// `partition_key_index` would silently become the first key of the table); the wire
/// format of a present field is the same either way.
mod proto {
    use bytes::Bytes;

    /// `message AggregatedRecord`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct AggregatedRecord {
        /// Partition keys, de-duplicated; user records point into it by index.
        #[prost(string, repeated, tag = "1")]
        pub(super) partition_key_table: Vec<String>,
        /// Explicit hash keys, de-duplicated; user records point into it by index.
        #[prost(string, repeated, tag = "2")]
        pub(super) explicit_hash_key_table: Vec<String>,
        /// The user records, in the order the producer added them.
        #[prost(message, repeated, tag = "3")]
        pub(super) records: Vec<UserRecord>,
    }

    /// `message Tag`. Decoded (so that a malformed tag is reported) but not used.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct Tag {
        /// `required string key = 1`.
        #[prost(string, optional, tag = "1")]
        pub(super) key: Option<String>,
        /// `optional string value = 2`.
        #[prost(string, optional, tag = "2")]
        pub(super) value: Option<String>,
    }

    /// `message Record` (named `UserRecord` here to keep it apart from [`crate::record::Record`]).
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct UserRecord {
        /// `required uint64 partition_key_index = 1`.
        #[prost(uint64, optional, tag = "1")]
        pub(super) partition_key_index: Option<u64>,
        /// `optional uint64 explicit_hash_key_index = 2`.
        #[prost(uint64, optional, tag = "2")]
        pub(super) explicit_hash_key_index: Option<u64>,
        /// `required bytes data = 3`. `Bytes`, so that decoding from a `Bytes` buffer
        /// slices it instead of copying.
        #[prost(bytes = "bytes", optional, tag = "3")]
        pub(super) data: Option<Bytes>,
        /// `repeated Tag tags = 4`.
        #[prost(message, repeated, tag = "4")]
        pub(super) tags: Vec<Tag>,
    }
}

/// Which key table of an aggregated record an index points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTable {
    /// `partition_key_table`.
    PartitionKey,
    /// `explicit_hash_key_table`.
    ExplicitHashKey,
}

impl fmt::Display for KeyTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PartitionKey => "partition_key_table",
            Self::ExplicitHashKey => "explicit_hash_key_table",
        })
    }
}

/// A record that is certainly KPL-aggregated (magic and MD5 match) but cannot be unpacked.
///
/// The producer wrote a broken record; retrying will not help. The caller decides whether
/// to stop the shard or skip the record; delivering its raw bytes would be wrong data.
/// No variant holds any of the payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeaggregationError {
    /// The protobuf between the magic and the digest does not decode as an
    /// `AggregatedRecord`, or a user record lacks a required field.
    #[error("aggregated record {sequence_number} is malformed: {reason}")]
    Malformed {
        /// The Kinesis record's sequence number.
        sequence_number: SequenceNumber,
        /// The decoder's message (field names and wire errors, never data).
        reason: String,
    },
    /// An entry of a key table breaks Kinesis's limits (a partition key of 1 to 256
    /// characters, an explicit hash key that is a decimal number from 0 to 2^128 - 1):
    /// Kinesis would have refused it in a plain record, and a hostile one (a huge key
    /// shared by many user records) would cost memory out of all proportion.
    #[error("aggregated record {sequence_number}: entry {index} of {table} is invalid: {reason}")]
    InvalidKey {
        /// The Kinesis record's sequence number.
        sequence_number: SequenceNumber,
        /// The table holding the key.
        table: KeyTable,
        /// The entry's position in the table.
        index: usize,
        /// What is wrong with it (its length, never its text).
        reason: String,
    },
    /// A user record points past the end of a key table.
    #[error(
        "aggregated record {sequence_number}, user record {sub_sequence_number}: \
         index {index} is out of range of {table} (length {table_len})"
    )]
    IndexOutOfRange {
        /// The Kinesis record's sequence number.
        sequence_number: SequenceNumber,
        /// The user record's position inside the aggregated record.
        sub_sequence_number: u64,
        /// The table the index points into.
        table: KeyTable,
        /// The index the user record holds.
        index: u64,
        /// The number of entries in the table.
        table_len: usize,
    },
}

/// Splits `data` into the protobuf and the digest when it opens with the magic and is
/// long enough to hold the digest; `None` for anything else.
fn split_aggregated(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let rest = data.strip_prefix(&AGGREGATED_RECORD_MAGIC[..])?;
    let protobuf_len = rest.len().checked_sub(DIGEST_LEN)?;
    Some(rest.split_at(protobuf_len))
}

/// Whether `data` may be a KPL aggregate (opens with the magic and can hold the digest):
/// records for which this is false are plain, and [`deaggregate`] returns them as they are.
pub(crate) fn may_be_aggregated(data: &[u8]) -> bool {
    split_aggregated(data).is_some()
}

/// Unpacks one Kinesis record into its user records (the Java KCL's
/// `AggregatorUtil.deaggregate`, for one record).
///
/// - Data that does not start with [`AGGREGATED_RECORD_MAGIC`], or is too short to hold
///   the magic and the 16-byte digest, is a plain record: returned unchanged, alone.
/// - Data that starts with the magic but whose MD5 does not match is also a plain record
///   (a producer may write those bytes), returned unchanged; this is logged at `debug`.
/// - Otherwise each user record becomes a [`Record`] with the outer sequence number and
///   arrival timestamp, `sub_sequence_number` = its index (0, 1, ...), its own partition
///   key and explicit hash key (shared with the other user records that use them, not
///   copied), its data (sharing the outer buffer) and `aggregated = true`. An aggregated
///   record holding no user records yields an empty `Vec`. (Unlike the Java KCL, which
///   needs at least one protobuf byte, the 20 bytes `MAGIC || MD5("")` count as such an
///   empty aggregated record.)
///
/// Nothing assumes Kinesis's old 1 MiB record limit: records of up to 10 MiB (and more)
/// are unpacked the same way. [`user_records`] yields the same records one at a time,
/// for callers that must not hold them all at once.
///
/// Hash-key filtering after a re-shard, which the Java KCL also does here, is not done.
///
/// # Errors
/// [`DeaggregationError::Malformed`] when the magic and MD5 match but the protobuf does
/// not decode or a user record lacks a required field;
/// [`DeaggregationError::IndexOutOfRange`] when a user record's key index is past the end
/// of its table; [`DeaggregationError::InvalidKey`] when a key breaks Kinesis's limits.
/// Either way the record as a whole is rejected.
pub fn deaggregate(record: Record) -> Result<Vec<Record>, DeaggregationError> {
    Ok(user_records(record)?.collect())
}

/// [`deaggregate`], one user record at a time: the record is checked whole first (so an
/// error comes before any user record, never half-way), then each user record is decoded
/// only when the iterator is advanced. Memory while iterating is the outer record's
/// buffer, its key tables (at most one entry per user record) and the user records the
/// caller keeps, whatever the number of user records.
///
/// # Errors
/// As [`deaggregate`].
pub fn user_records(record: Record) -> Result<UserRecords, DeaggregationError> {
    let Some((protobuf, digest)) = split_aggregated(&record.data) else {
        return Ok(UserRecords(Inner::Plain(Some(record))));
    };
    if Md5::digest(protobuf).as_slice() != digest {
        tracing::debug!(
            sequence_number = %record.sequence_number,
            data_len = record.data.len(),
            "record starts with the KPL magic but its MD5 does not match; \
             delivering it as a plain record"
        );
        return Ok(UserRecords(Inner::Plain(Some(record))));
    }
    let start = AGGREGATED_RECORD_MAGIC.len();
    let body = record.data.slice(start..start + protobuf.len());
    let aggregate = Aggregate::check(record, body)?;
    Ok(UserRecords(Inner::Aggregated(aggregate)))
}

/// The user records of one Kinesis record, from [`user_records`]: decoded one at a time.
#[derive(Debug)]
pub struct UserRecords(Inner);

#[derive(Debug)]
enum Inner {
    /// A plain record, yielded once.
    Plain(Option<Record>),
    /// A checked aggregate.
    Aggregated(Aggregate),
}

impl Iterator for UserRecords {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        match &mut self.0 {
            Inner::Plain(record) => record.take(),
            Inner::Aggregated(aggregate) => aggregate.next_record(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            Inner::Plain(record) => usize::from(record.is_some()),
            Inner::Aggregated(aggregate) => aggregate.remaining,
        };
        (n, Some(n))
    }
}

/// The longest partition key Kinesis accepts, in Unicode characters.
const MAX_PARTITION_KEY_CHARS: usize = 256;

/// 2^128 - 1, the largest explicit hash key, in decimal.
const MAX_EXPLICIT_HASH_KEY: &str = "340282366920938463463374607431768211455";

/// Why a key breaks Kinesis's limits, if it does.
fn key_problem(table: KeyTable, key: &str) -> Option<String> {
    match table {
        KeyTable::PartitionKey => {
            let chars = key.chars().count();
            (!(1..=MAX_PARTITION_KEY_CHARS).contains(&chars)).then(|| {
                format!("a partition key has {chars} characters (Kinesis allows 1 to {MAX_PARTITION_KEY_CHARS})")
            })
        }
        KeyTable::ExplicitHashKey => {
            let decimal =
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()) && (key == "0" || !key.starts_with('0'));
            let in_range = key.len() < MAX_EXPLICIT_HASH_KEY.len()
                || (key.len() == MAX_EXPLICIT_HASH_KEY.len() && key <= MAX_EXPLICIT_HASH_KEY);
            (!(decimal && in_range)).then(|| {
                format!(
                    "an explicit hash key of {} bytes is not a decimal number from 0 to 2^128 - 1",
                    key.len()
                )
            })
        }
    }
}

/// One field of the `AggregatedRecord` message, as the walk over its body finds it.
enum Field {
    /// `partition_key_table` (1) or `explicit_hash_key_table` (2): an entry.
    Key(KeyTable, Bytes),
    /// `records` (3): one encoded user record.
    Record(Bytes),
}

/// Reads the next field of `body` at `*pos` and moves past it; `None` at the end. Unknown
/// fields are skipped, as prost does.
fn next_field(body: &Bytes, pos: &mut usize) -> Result<Option<Field>, String> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    loop {
        let Some(mut buf) = body.get(*pos..).filter(|b| !b.is_empty()) else {
            return Ok(None);
        };
        let (tag, wire_type) = decode_key(&mut buf).map_err(|e| e.to_string())?;
        if !matches!(tag, 1..=3) {
            skip_field(wire_type, tag, &mut buf, DecodeContext::default()).map_err(|e| e.to_string())?;
            *pos = body.len() - buf.len();
            continue;
        }
        if wire_type != WireType::LengthDelimited {
            return Err(format!(
                "field {tag} of AggregatedRecord has wire type {wire_type:?}, expected LengthDelimited"
            ));
        }
        let len = usize::try_from(decode_varint(&mut buf).map_err(|e| e.to_string())?)
            .ok()
            .filter(|len| *len <= buf.len())
            .ok_or_else(|| format!("field {tag} of AggregatedRecord is longer than the record"))?;
        let start = body.len() - buf.len();
        *pos = start + len;
        let value = body.slice(start..start + len);
        return Ok(Some(match tag {
            1 => Field::Key(KeyTable::PartitionKey, value),
            2 => Field::Key(KeyTable::ExplicitHashKey, value),
            _ => Field::Record(value),
        }));
    }
}

/// A checked aggregate, yielding its user records in order.
#[derive(Debug)]
struct Aggregate {
    /// The Kinesis record (its data is the whole aggregate).
    outer: Record,
    /// The protobuf, a slice of `outer.data`.
    body: Bytes,
    /// Where the walk over `body` stands.
    pos: usize,
    /// The key tables, one shared buffer per key.
    partition_keys: Vec<Arc<str>>,
    explicit_hash_keys: Vec<Arc<str>>,
    /// The next user record's index.
    next_sub_sequence_number: u64,
    /// User records not yielded yet.
    remaining: usize,
}

/// A user record's checked fields.
struct Checked {
    partition_key_index: usize,
    explicit_hash_key_index: Option<usize>,
    data: Bytes,
}

impl Aggregate {
    /// Reads the key tables and checks every user record, keeping none of them.
    fn check(outer: Record, body: Bytes) -> Result<Self, DeaggregationError> {
        let sequence_number = outer.sequence_number.clone();
        let malformed = |reason: String| DeaggregationError::Malformed {
            sequence_number: sequence_number.clone(),
            reason,
        };
        let mut partition_keys = Vec::new();
        let mut explicit_hash_keys = Vec::new();
        let mut records = 0usize;
        let mut pos = 0;
        while let Some(field) = next_field(&body, &mut pos).map_err(malformed)? {
            match field {
                Field::Key(table, value) => {
                    let key = std::str::from_utf8(&value)
                        .map_err(|_| malformed(format!("an entry of {table} is not valid UTF-8")))?;
                    let keys = match table {
                        KeyTable::PartitionKey => &mut partition_keys,
                        KeyTable::ExplicitHashKey => &mut explicit_hash_keys,
                    };
                    if let Some(reason) = key_problem(table, key) {
                        return Err(DeaggregationError::InvalidKey {
                            sequence_number,
                            table,
                            index: keys.len(),
                            reason,
                        });
                    }
                    keys.push(Arc::<str>::from(key));
                }
                Field::Record(_) => records += 1,
            }
        }
        // The KPL puts a key in a table only for a user record that uses it: a table
        // longer than the records is not the KPL's, and would only cost memory (one key
        // with no record is let through: an empty aggregate may carry its table).
        for (table, len) in [
            (KeyTable::PartitionKey, partition_keys.len()),
            (KeyTable::ExplicitHashKey, explicit_hash_keys.len()),
        ] {
            if len > records.max(1) {
                return Err(malformed(format!(
                    "{table} has {len} entries for {records} user records"
                )));
            }
        }
        let aggregate = Self {
            outer,
            body,
            pos: 0,
            partition_keys,
            explicit_hash_keys,
            next_sub_sequence_number: 0,
            remaining: records,
        };
        let mut pos = 0;
        let mut sub_sequence_number = 0u64;
        while let Some(field) = next_field(&aggregate.body, &mut pos).map_err(malformed)? {
            if let Field::Record(value) = field {
                aggregate.check_user_record(sub_sequence_number, value)?;
                sub_sequence_number += 1;
            }
        }
        Ok(aggregate)
    }

    /// Decodes and checks one user record.
    fn check_user_record(&self, sub_sequence_number: u64, value: Bytes) -> Result<Checked, DeaggregationError> {
        let sequence_number = &self.outer.sequence_number;
        let malformed = |reason: String| DeaggregationError::Malformed {
            sequence_number: sequence_number.clone(),
            reason,
        };
        let user = proto::UserRecord::decode(value).map_err(|e| malformed(e.to_string()))?;
        let lookup = |table: KeyTable, table_len: usize, index: u64| {
            usize::try_from(index)
                .ok()
                .filter(|i| *i < table_len)
                .ok_or_else(|| DeaggregationError::IndexOutOfRange {
                    sequence_number: sequence_number.clone(),
                    sub_sequence_number,
                    table,
                    index,
                    table_len,
                })
        };
        let pk_index = user
            .partition_key_index
            .ok_or_else(|| malformed(format!("user record {sub_sequence_number} has no partition_key_index")))?;
        let data = user
            .data
            .ok_or_else(|| malformed(format!("user record {sub_sequence_number} has no data")))?;
        if user.tags.iter().any(|tag| tag.key.is_none()) {
            return Err(malformed(format!(
                "user record {sub_sequence_number} has a tag without a key"
            )));
        }
        Ok(Checked {
            partition_key_index: lookup(KeyTable::PartitionKey, self.partition_keys.len(), pk_index)?,
            explicit_hash_key_index: user
                .explicit_hash_key_index
                .map(|i| lookup(KeyTable::ExplicitHashKey, self.explicit_hash_keys.len(), i))
                .transpose()?,
            data,
        })
    }

    /// The next user record (all of them were checked in [`check`](Self::check)).
    fn next_record(&mut self) -> Option<Record> {
        loop {
            let field = next_field(&self.body, &mut self.pos).ok()??;
            let Field::Record(value) = field else { continue };
            let sub_sequence_number = self.next_sub_sequence_number;
            self.next_sub_sequence_number += 1;
            self.remaining = self.remaining.saturating_sub(1);
            // Checked already; an error here cannot happen, and would end the records.
            let checked = self.check_user_record(sub_sequence_number, value).ok()?;
            return Some(Record {
                data: checked.data,
                partition_key: self.partition_keys[checked.partition_key_index].clone(),
                explicit_hash_key: checked
                    .explicit_hash_key_index
                    .map(|i| self.explicit_hash_keys[i].clone()),
                sequence_number: self.outer.sequence_number.clone(),
                sub_sequence_number,
                approximate_arrival_timestamp: self.outer.approximate_arrival_timestamp,
                aggregated: true,
                malformed_aggregate: false,
            });
        }
    }
}

/// Unpacks every record of a batch with [`deaggregate`], keeping their order (the Java
/// KCL's `AggregatorUtil.deaggregate(List)`).
///
/// # Errors
/// The first [`DeaggregationError`] of the batch; records already unpacked are dropped
/// with it, so the caller sees the whole batch or nothing.
pub fn deaggregate_all(records: impl IntoIterator<Item = Record>) -> Result<Vec<Record>, DeaggregationError> {
    let records = records.into_iter();
    let mut out = Vec::with_capacity(records.size_hint().0);
    for record in records {
        out.extend(deaggregate(record)?);
    }
    Ok(out)
}

/// Packs user records into the data of one KPL aggregated record: the inverse of
/// [`deaggregate`]. A helper for tests and for producers that aggregate without the KPL.
///
/// Each element is `(partition key, explicit hash key, data)`. Partition keys and
/// explicit hash keys are de-duplicated into their tables, as the KPL does. An empty
/// slice gives `MAGIC || MD5("")`, which [`deaggregate`] reads as zero user records.
///
/// Kinesis's limits are not checked: the result must still fit in one record (the
/// stream's maximum record size, 1 MiB by default and up to 10 MiB), and Kinesis routes
/// it by the partition key the caller puts on the outer record. [`deaggregate`] refuses
/// keys beyond Kinesis's limits.
pub fn encode_aggregated(user_records: &[(String, Option<String>, Bytes)]) -> Bytes {
    fn index_of<'a>(key: &'a str, index: &mut HashMap<&'a str, u64>, table: &mut Vec<String>) -> u64 {
        *index.entry(key).or_insert_with(|| {
            table.push(key.to_owned());
            // A table never has more entries than a slice has elements, so this fits.
            (table.len() - 1) as u64
        })
    }

    let mut pk_index = HashMap::new();
    let mut ehk_index = HashMap::new();
    let mut message = proto::AggregatedRecord::default();
    for (partition_key, explicit_hash_key, data) in user_records {
        let partition_key_index = index_of(partition_key, &mut pk_index, &mut message.partition_key_table);
        let explicit_hash_key_index = explicit_hash_key
            .as_deref()
            .map(|ehk| index_of(ehk, &mut ehk_index, &mut message.explicit_hash_key_table));
        message.records.push(proto::UserRecord {
            partition_key_index: Some(partition_key_index),
            explicit_hash_key_index,
            data: Some(data.clone()),
            tags: Vec::new(),
        });
    }

    let protobuf = message.encode_to_vec();
    let digest = Md5::digest(&protobuf);
    let mut out = Vec::with_capacity(AGGREGATED_RECORD_MAGIC.len() + protobuf.len() + DIGEST_LEN);
    out.extend_from_slice(&AGGREGATED_RECORD_MAGIC);
    out.extend_from_slice(&protobuf);
    out.extend_from_slice(&digest);
    Bytes::from(out)
}

#[cfg(test)]
mod tests;
