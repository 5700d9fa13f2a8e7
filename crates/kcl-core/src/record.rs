//! The record a processor receives (the Java KCL's `KinesisClientRecord`).

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::sequence::{ExtendedSequenceNumber, SequenceNumber};

/// One user record. For a record that came out of a KPL aggregated record, the
/// sequence number is the aggregated record's and `sub_sequence_number` its index.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The payload. Never logged by this library.
    pub data: Bytes,
    /// The partition key (for aggregated records, the user record's own key). Shared,
    /// not copied, between the user records of one KPL aggregate that use the same key:
    /// an aggregate may hold many records and one key, and a copy per record would
    /// multiply its memory (`Arc<str>` derefs to `&str`; `to_string()` gives a `String`).
    pub partition_key: Arc<str>,
    /// The explicit hash key, when the producer set one (shared like the partition key).
    pub explicit_hash_key: Option<Arc<str>>,
    /// The Kinesis sequence number.
    pub sequence_number: SequenceNumber,
    /// The index inside an aggregated record; 0 for plain records.
    pub sub_sequence_number: u64,
    /// `ApproximateArrivalTimestamp`, when Kinesis reported one.
    pub approximate_arrival_timestamp: Option<SystemTime>,
    /// True when this record was unpacked from a KPL aggregated record.
    pub aggregated: bool,
    /// True when this record carries the KPL aggregation magic but could not be
    /// de-aggregated (truncated, a bad checksum, an unreadable body): it is delivered
    /// as it is, whole, instead of being dropped, and counted in
    /// `kcl_records_malformed_aggregate_total`. `data` is then the raw aggregated record;
    /// a processor that cannot use it can log the sequence number and move on, or stop.
    pub malformed_aggregate: bool,
}

impl Record {
    /// A plain (not aggregated) record.
    pub fn new(data: Bytes, partition_key: impl Into<Arc<str>>, sequence_number: SequenceNumber) -> Self {
        Self {
            data,
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            sequence_number,
            sub_sequence_number: 0,
            approximate_arrival_timestamp: None,
            aggregated: false,
            malformed_aggregate: false,
        }
    }

    /// What the record counts for in the prefetch budget: its data and its keys (a
    /// key is counted in every record that uses it, though the records of an aggregate
    /// share it: the bound stays conservative).
    pub(crate) fn accounted_bytes(&self) -> usize {
        self.data.len() + self.partition_key.len() + self.explicit_hash_key.as_deref().map_or(0, str::len)
    }

    /// The record's position, for checkpoints and ordering.
    pub fn extended_sequence_number(&self) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::new(self.sequence_number.clone(), self.sub_sequence_number)
    }
}

impl fmt::Debug for Record {
    /// Payloads are never printed: they may hold personal data.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("sequence_number", &self.sequence_number)
            .field("sub_sequence_number", &self.sub_sequence_number)
            .field("partition_key_len", &self.partition_key.len())
            .field("data_len", &self.data.len())
            .field("aggregated", &self.aggregated)
            .field("malformed_aggregate", &self.malformed_aggregate)
            .finish()
    }
}
