//! The consumer side of the demo: [`ClickCounter`], the [`RecordProcessor`] the
//! scheduler runs for each shard, and the [`Tally`] all of them share with `main`.
//!
//! The tally lives in a `tokio::sync::watch` channel: every processor updates it once per
//! batch, and `main` awaits the moment it covers every written record (no polling), and
//! reads it for the progress lines and the summary.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use async_trait::async_trait;
use kcl_core::{
    CheckpointError, Checkpointer, InitializationInput, LeaseLostInput, ProcessRecordsInput, ProcessorError,
    RecordProcessor, ShutdownRequestedInput,
};
use tokio::sync::watch;

use crate::producer::{ClickEvent, ShardCounts};

/// What the processor of one shard has seen so far.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardTally {
    /// Records delivered to the processor, good and bad.
    pub(crate) processed: u64,
    /// Records whose payload is not a click event in JSON. Counted, not fatal: one bad
    /// record must not stop a shard (returning an error would retry the batch forever).
    pub(crate) bad: u64,
    /// How far behind the newest record of the shard the last batch was, when Kinesis
    /// said.
    pub(crate) millis_behind_latest: Option<i64>,
}

/// What every processor of this worker has seen: the value of the watch channel.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    /// Per shard id. A shard appears once its processor is initialized.
    pub(crate) shards: BTreeMap<String, ShardTally>,
    /// When the first record reached a processor, for the time-to-first-record figure.
    pub(crate) first_record_at: Option<Instant>,
    /// When the latest batch reached a processor, for the records/s figure.
    pub(crate) last_record_at: Option<Instant>,
}

impl Tally {
    /// Records processed on all shards.
    pub(crate) fn processed(&self) -> u64 {
        self.shards.values().map(|s| s.processed).sum()
    }

    /// Bad records on all shards.
    pub(crate) fn bad(&self) -> u64 {
        self.shards.values().map(|s| s.bad).sum()
    }

    /// The largest lag reported by any shard, when one was reported.
    pub(crate) fn max_millis_behind_latest(&self) -> Option<i64> {
        self.shards.values().filter_map(|s| s.millis_behind_latest).max()
    }

    /// The shards whose processed count is not what was written to them (a shard absent
    /// from either side counts 0 there).
    pub(crate) fn mismatches<'a>(&'a self, written: &'a ShardCounts) -> Vec<&'a str> {
        let shard_ids: BTreeSet<&str> = written.keys().chain(self.shards.keys()).map(String::as_str).collect();
        shard_ids
            .into_iter()
            .filter(|&shard_id| {
                let processed = self.shards.get(shard_id).map_or(0, |s| s.processed);
                written.get(shard_id).copied().unwrap_or(0) != processed
            })
            .collect()
    }

    /// True when every shard has processed at least as many records as were written to
    /// it.
    pub(crate) fn covers(&self, written: &ShardCounts) -> bool {
        written
            .iter()
            .all(|(shard_id, &count)| self.shards.get(shard_id).map_or(0, |s| s.processed) >= count)
    }
}

/// Parses each record as a [`ClickEvent`], counts it for its shard in the shared
/// [`Tally`], and checkpoints after every batch.
#[derive(Debug)]
pub(crate) struct ClickCounter {
    /// The shard this processor reads; the key of its entry in the tally.
    shard_id: String,
    /// Shared with every other processor and with `main`.
    tally: watch::Sender<Tally>,
}

impl ClickCounter {
    /// A processor for `shard_id` that counts into `tally`.
    pub(crate) fn new(shard_id: &str, tally: watch::Sender<Tally>) -> Self {
        Self {
            shard_id: shard_id.to_owned(),
            tally,
        }
    }
}

#[async_trait]
impl RecordProcessor for ClickCounter {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        tracing::info!(shard_id = %input.shard_id, from = %input.extended_sequence_number, "processor initialized");
        self.tally.send_modify(|tally| {
            tally.shards.entry(self.shard_id.clone()).or_default();
        });
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let arrived = Instant::now();
        // The work of this demo: decode each payload. A real application would act on
        // the event here (and never log the payload itself).
        let bad = input
            .records
            .iter()
            .filter(|record| serde_json::from_slice::<ClickEvent>(&record.data).is_err())
            .count();
        self.tally.send_modify(|tally| {
            tally.first_record_at.get_or_insert(arrived);
            tally.last_record_at = Some(arrived);
            let shard = tally.shards.entry(self.shard_id.clone()).or_default();
            shard.processed += input.records.len() as u64;
            shard.bad += bad as u64;
            shard.millis_behind_latest = input.millis_behind_latest;
        });
        checkpoint(&input.checkpointer).await
    }

    async fn lease_lost(&mut self, input: LeaseLostInput) {
        tracing::info!(shard_id = %input.shard_id, "lease lost; another worker continues this shard");
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        checkpoint(&input.checkpointer).await
    }
}

/// Checkpoints at the last record delivered.
///
/// A lost lease is not this processor's error: the scheduler calls `lease_lost` next, and
/// the new owner resumes after the last checkpoint. A throttled or failed write is logged
/// and left to the next checkpoint, which covers these records too: failing the batch
/// would have it delivered (and counted) again. Any other refusal is a bug, reported.
///
/// # Errors
/// [`CheckpointError::InvalidSequenceNumber`] or [`CheckpointError::InvalidState`].
async fn checkpoint(checkpointer: &Checkpointer) -> Result<(), ProcessorError> {
    match checkpointer.checkpoint().await {
        Ok(()) => Ok(()),
        Err(CheckpointError::LeaseLost { shard_id }) => {
            tracing::info!(%shard_id, "not checkpointing: the lease is lost");
            Ok(())
        }
        Err(error @ (CheckpointError::Throttled { .. } | CheckpointError::Dependency { .. })) => {
            tracing::warn!(error = %kcl_core::error::ErrorChain(&error), "checkpoint failed; the next checkpoint covers these records");
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(processed: &[(&str, u64)]) -> Tally {
        let shards = processed
            .iter()
            .map(|&(shard_id, processed)| {
                let shard = ShardTally {
                    processed,
                    ..ShardTally::default()
                };
                (shard_id.to_owned(), shard)
            })
            .collect();
        Tally {
            shards,
            ..Tally::default()
        }
    }

    #[test]
    fn covers_needs_every_written_record_on_every_shard() {
        let written = ShardCounts::from([("a".to_owned(), 2), ("b".to_owned(), 3)]);
        assert!(!tally(&[("a", 2)]).covers(&written), "shard b has not started");
        assert!(!tally(&[("a", 2), ("b", 2)]).covers(&written));
        assert!(tally(&[("a", 2), ("b", 3)]).covers(&written));
    }

    #[test]
    fn mismatches_catch_missing_and_duplicate_records_and_unexpected_shards() {
        let written = ShardCounts::from([("a".to_owned(), 2), ("b".to_owned(), 3)]);
        assert!(tally(&[("a", 2), ("b", 3)]).mismatches(&written).is_empty());
        assert_eq!(tally(&[("a", 3), ("b", 3)]).mismatches(&written), ["a"]);
        assert_eq!(tally(&[("a", 2)]).mismatches(&written), ["b"]);
        assert_eq!(tally(&[("a", 2), ("b", 3), ("c", 1)]).mismatches(&written), ["c"]);
    }
}
