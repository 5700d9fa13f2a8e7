//! The [`Checkpointer`] (the Java KCL's `RecordProcessorCheckpointer`) and the
//! two-phase [`PreparedCheckpointer`].
//!
//! Every checkpoint is validated before it is written: never before the stored
//! checkpoint (never backwards), never past the last record delivered to the processor
//! (nothing unprocessed is marked done). The write is fenced on the lease counter, so a
//! worker that lost the lease cannot checkpoint: it gets [`CheckpointError::LeaseLost`].
//!
//! Handling a failed checkpoint in `process_records`: a write that fails for a
//! retryable reason (throttled, the store failed) is retried by the checkpointer itself
//! for as long as the lease is provably held, so an error reaches the processor only
//! when retrying cannot help. Returning it (`?`) does not deliver the batch again: its
//! records were processed, and the next checkpoint covers them (a lost lease ends the
//! consumer with `lease_lost`). A processor that would rather go on can tell the cases
//! apart:
//!
//! ```no_run
//! # async fn f(input: kcl_core::ProcessRecordsInput) -> Result<(), kcl_core::ProcessorError> {
//! match input.checkpointer.checkpoint().await {
//!     Ok(()) => {}
//!     // Another worker owns the shard now; `lease_lost` follows.
//!     Err(e) if e.is_lease_lost() => {}
//!     // Throttled or the store failed: the next checkpoint covers these records.
//!     Err(e) if e.is_retryable() => {
//!         tracing::warn!(error = %kcl_core::error::ErrorChain(&e), "checkpoint failed; will retry later")
//!     }
//!     Err(e) => return Err(e.into()),
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use crate::error::{CheckpointError, InvalidCheckpointReason, LeaseStoreError};
use crate::lease::coordinator::LeaseCoordinator;
use crate::lease::held::HeldLease;
use crate::lease::renewer::WriteOutcome;
use crate::record::Record;
use crate::retry::RetryPolicy;
use crate::sequence::{ExtendedSequenceNumber, SequenceNumber};

/// Backoff between tries of a checkpoint write that failed for a retryable reason, and
/// how many tries (about 5 s in all at most; the end of the lease's provable ownership
/// ends them sooner).
fn checkpoint_retry() -> RetryPolicy {
    RetryPolicy::new(Duration::from_millis(50), Duration::from_secs(1), Some(8))
}

/// What the consumer has delivered, which bounds what may be checkpointed.
#[derive(Debug)]
struct Progress {
    /// The position of the last record delivered; starts at the lease's checkpoint.
    last_delivered: ExtendedSequenceNumber,
    /// Set once every record of the shard was delivered: `SHARD_END` becomes allowed.
    shard_ended: bool,
    /// The child shards, recorded in the lease with the `SHARD_END` checkpoint.
    children: Vec<String>,
}

struct Inner {
    shard_id: String,
    coordinator: Arc<LeaseCoordinator>,
    held: Arc<HeldLease>,
    /// A std mutex: read and written in short sections, never across an await.
    progress: Mutex<Progress>,
}

/// Records progress of one shard in its lease. Cheap to clone; every clone checkpoints
/// the same shard. Obtained from the inputs of
/// [`RecordProcessor`](crate::RecordProcessor) methods.
#[derive(Clone)]
pub struct Checkpointer {
    inner: Arc<Inner>,
}

impl fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpointer")
            .field("shard_id", &self.inner.shard_id)
            .finish_non_exhaustive()
    }
}

/// Why a write did not happen, before it reached the store.
enum Refusal {
    Invalid(ExtendedSequenceNumber, InvalidCheckpointReason),
}

impl Checkpointer {
    pub(crate) fn new(coordinator: Arc<LeaseCoordinator>, held: Arc<HeldLease>, start: ExtendedSequenceNumber) -> Self {
        Self {
            inner: Arc::new(Inner {
                shard_id: held.shard_id.clone(),
                coordinator,
                held,
                progress: Mutex::new(Progress {
                    last_delivered: start,
                    shard_ended: false,
                    children: Vec::new(),
                }),
            }),
        }
    }

    /// The shard this checkpointer writes to.
    pub fn shard_id(&self) -> &str {
        &self.inner.shard_id
    }

    pub(crate) fn set_last_delivered(&self, position: ExtendedSequenceNumber) {
        self.progress().last_delivered = position;
    }

    pub(crate) fn set_shard_ended(&self, children: Vec<String>) {
        let mut p = self.progress();
        p.shard_ended = true;
        p.children = children;
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.inner.progress.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The largest position that may be checkpointed now.
    fn largest_permitted(&self) -> ExtendedSequenceNumber {
        self.bound().largest()
    }

    /// What bounds a checkpoint now.
    fn bound(&self) -> Bound {
        let p = self.progress();
        Bound {
            last_delivered: p.last_delivered.clone(),
            shard_ended: p.shard_ended,
        }
    }

    /// The checkpoint currently stored in the lease, as this worker last wrote it.
    pub async fn last_checkpoint(&self) -> ExtendedSequenceNumber {
        self.inner.held.lease.lock().await.checkpoint.clone()
    }

    /// Checkpoints at the last record delivered to the processor, or `SHARD_END` when
    /// called from [`shard_ended`](crate::RecordProcessor::shard_ended).
    ///
    /// # Errors
    /// [`CheckpointError::LeaseLost`]: stop, do not retry. `Throttled` / `Dependency`:
    /// the store failed; retrying is safe.
    pub async fn checkpoint(&self) -> Result<(), CheckpointError> {
        let target = self.at_least_stored(self.largest_permitted()).await;
        self.write(target, None).await
    }

    /// `target`, or the stored checkpoint where that is further: while a batch is being
    /// bisected the bound can be below a checkpoint the processor stored during an
    /// earlier attempt, and "checkpoint what was delivered" then rewrites the stored one
    /// instead of failing as `Backwards`.
    async fn at_least_stored(&self, target: ExtendedSequenceNumber) -> ExtendedSequenceNumber {
        let stored = self.last_checkpoint().await;
        if target.partial_cmp(&stored).is_some_and(|o| o.is_lt()) && !stored.is_shard_end() {
            stored
        } else {
            target
        }
    }

    /// Checkpoints at a delivered record.
    ///
    /// # Errors
    /// As [`checkpoint_at`](Self::checkpoint_at).
    pub async fn checkpoint_record(&self, record: &Record) -> Result<(), CheckpointError> {
        self.write(record.extended_sequence_number(), None).await
    }

    /// Checkpoints at `(sequence_number, sub_sequence_number)`: everything up to and
    /// including that record is processed.
    ///
    /// # Errors
    /// [`CheckpointError::InvalidSequenceNumber`] when the position is before the stored
    /// checkpoint or after the last delivered record; otherwise as
    /// [`checkpoint`](Self::checkpoint).
    pub async fn checkpoint_at(
        &self,
        sequence_number: &SequenceNumber,
        sub_sequence_number: u64,
    ) -> Result<(), CheckpointError> {
        self.write(
            ExtendedSequenceNumber::new(sequence_number.clone(), sub_sequence_number),
            None,
        )
        .await
    }

    /// First phase of a two-phase checkpoint at the last delivered record: records it
    /// as the lease's *pending* checkpoint, with optional application state, and returns
    /// a [`PreparedCheckpointer`] that commits it. A worker taking over the lease sees
    /// the pending checkpoint in [`InitializationInput`](crate::InitializationInput).
    ///
    /// # Errors
    /// As [`checkpoint`](Self::checkpoint).
    pub async fn prepare_checkpoint(
        &self,
        application_state: Option<Bytes>,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        let target = self.at_least_stored(self.largest_permitted()).await;
        self.prepare(target, application_state).await
    }

    /// First phase of a two-phase checkpoint at a given position.
    ///
    /// # Errors
    /// As [`checkpoint_at`](Self::checkpoint_at).
    pub async fn prepare_checkpoint_at(
        &self,
        sequence_number: &SequenceNumber,
        sub_sequence_number: u64,
        application_state: Option<Bytes>,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        let target = ExtendedSequenceNumber::new(sequence_number.clone(), sub_sequence_number);
        self.prepare(target, application_state).await
    }

    async fn prepare(
        &self,
        target: ExtendedSequenceNumber,
        state: Option<Bytes>,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        self.write(target.clone(), Some(state)).await?;
        Ok(PreparedCheckpointer {
            checkpointer: self.clone(),
            pending: target,
        })
    }

    /// Validates and writes. `pending` = `Some(state)` writes a pending checkpoint
    /// (leaving the committed one alone); `None` commits `target` and clears any
    /// pending checkpoint.
    async fn write(
        &self,
        target: ExtendedSequenceNumber,
        pending: Option<Option<Bytes>>,
    ) -> Result<(), CheckpointError> {
        let bound = self.bound();
        let children = self.progress().children.clone();
        let shard_id = &self.inner.shard_id;
        // A write that failed for a retryable reason is tried again here, with backoff,
        // for as long as the lease is provably ours (each write is bounded by what is
        // left of that proof; past it the write reports the lease lost). The processor
        // then sees an error only when retrying cannot help.
        let policy = checkpoint_retry();
        let held = &self.inner.held;
        let mut attempt = 1u32;
        let outcome = loop {
            let outcome = self.write_once(&target, &pending, &bound, &children).await;
            match &outcome {
                Ok(WriteOutcome::Failed(e))
                    if e.is_retryable() && policy.should_retry(attempt) && self.inner.coordinator.still_owned(held) =>
                {
                    tracing::warn!(shard_id = %shard_id, attempt, error = %crate::error::ErrorChain(e), "checkpoint write failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(policy.backoff(attempt)) => {}
                        () = held.lost.cancelled() => {}
                    }
                    attempt = attempt.saturating_add(1);
                }
                // Ownership could not be proven any more: say so, not the last failure.
                Ok(WriteOutcome::Failed(_)) if held.lost.is_cancelled() => break Ok(WriteOutcome::LeaseLost),
                _ => break outcome,
            }
        };
        match outcome {
            Err(Refusal::Invalid(requested, reason)) => Err(CheckpointError::InvalidSequenceNumber {
                shard_id: shard_id.clone(),
                requested: requested.to_string(),
                reason,
            }),
            Ok(WriteOutcome::Written) => {
                tracing::debug!(shard_id = %shard_id, checkpoint = %target, pending = pending.is_some(), "checkpoint written");
                Ok(())
            }
            Ok(WriteOutcome::LeaseLost) => Err(CheckpointError::LeaseLost {
                shard_id: shard_id.clone(),
            }),
            Ok(WriteOutcome::Failed(source @ LeaseStoreError::Throttled(_))) => Err(CheckpointError::Throttled {
                shard_id: shard_id.clone(),
                source,
            }),
            Ok(WriteOutcome::Failed(source)) if source.is_retryable() => Err(CheckpointError::Dependency {
                shard_id: shard_id.clone(),
                source,
            }),
            Ok(WriteOutcome::Failed(source)) => Err(CheckpointError::LeaseTableUnusable {
                shard_id: shard_id.clone(),
                source,
            }),
        }
    }

    /// One validated write, as the coordinator reports it.
    async fn write_once(
        &self,
        target: &ExtendedSequenceNumber,
        pending: &Option<Option<Bytes>>,
        bound: &Bound,
        children: &[String],
    ) -> Result<WriteOutcome, Refusal> {
        self.inner
            .coordinator
            .update_checkpoint(&self.inner.held, |lease| {
                validate(target, &lease.checkpoint, bound)
                    .map_err(|reason| Refusal::Invalid(target.clone(), reason))?;
                match pending {
                    Some(state) => {
                        lease.pending_checkpoint = Some(target.clone());
                        lease.pending_checkpoint_state = state.clone();
                    }
                    None => {
                        lease.checkpoint = target.clone();
                        lease.pending_checkpoint = None;
                        lease.pending_checkpoint_state = None;
                        if target.is_shard_end() {
                            lease.child_shard_ids.extend(children.iter().cloned());
                        }
                    }
                }
                Ok(())
            })
            .await
    }
}

/// What bounds a checkpoint: the last record delivered, and whether the shard ended.
#[derive(Debug, Clone)]
pub(crate) struct Bound {
    /// No sequence number past this one may be checkpointed, shard end or not: a bogus
    /// checkpoint past the last record would make the next owner drop real records.
    pub(crate) last_delivered: ExtendedSequenceNumber,
    /// `SHARD_END` is allowed only once every record of the shard was delivered.
    pub(crate) shard_ended: bool,
}

impl Bound {
    /// `SHARD_END` once the shard was read to its end, else the last record delivered.
    fn largest(&self) -> ExtendedSequenceNumber {
        if self.shard_ended {
            ExtendedSequenceNumber::SHARD_END
        } else {
            self.last_delivered.clone()
        }
    }
}

/// The rule of every checkpoint: not before what is stored, not past what was
/// delivered (also after the shard end), and `SHARD_END` only once the shard has ended.
pub(crate) fn validate(
    requested: &ExtendedSequenceNumber,
    stored: &ExtendedSequenceNumber,
    bound: &Bound,
) -> Result<(), InvalidCheckpointReason> {
    if requested.is_shard_end() {
        return if bound.shard_ended {
            Ok(())
        } else {
            Err(InvalidCheckpointReason::ShardNotEnded)
        };
    }
    if stored.is_shard_end() {
        return Err(InvalidCheckpointReason::Backwards);
    }
    // Initial-position sentinels are below every sequence number; an initial sentinel
    // requested over another one (nothing delivered yet) is a harmless rewrite.
    if requested.partial_cmp(stored).is_some_and(|o| o.is_lt()) {
        return Err(InvalidCheckpointReason::Backwards);
    }
    if requested.partial_cmp(&bound.last_delivered).is_some_and(|o| o.is_gt()) {
        return Err(InvalidCheckpointReason::BeyondLastDelivered);
    }
    Ok(())
}

/// The second phase of a two-phase checkpoint (the Java KCL's
/// `PreparedCheckpointer`).
#[derive(Debug)]
pub struct PreparedCheckpointer {
    checkpointer: Checkpointer,
    pending: ExtendedSequenceNumber,
}

impl PreparedCheckpointer {
    /// The prepared position.
    pub fn pending_checkpoint(&self) -> &ExtendedSequenceNumber {
        &self.pending
    }

    /// Commits the prepared checkpoint (and clears the pending one).
    ///
    /// # Errors
    /// As [`Checkpointer::checkpoint_at`]; a later checkpoint made meanwhile makes this
    /// one `Backwards`.
    pub async fn checkpoint(self) -> Result<(), CheckpointError> {
        self.checkpointer.write(self.pending, None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: &str) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::new(SequenceNumber::parse(n).expect("valid"), 0)
    }

    fn upto(n: &ExtendedSequenceNumber) -> Bound {
        Bound {
            last_delivered: n.clone(),
            shard_ended: false,
        }
    }

    fn ended(n: &ExtendedSequenceNumber) -> Bound {
        Bound {
            last_delivered: n.clone(),
            shard_ended: true,
        }
    }

    #[test]
    fn never_backwards_never_past_delivered() {
        use InvalidCheckpointReason::*;
        let th = ExtendedSequenceNumber::TRIM_HORIZON;
        assert_eq!(validate(&at("5"), &th, &upto(&at("10"))), Ok(()));
        assert_eq!(validate(&at("10"), &at("5"), &upto(&at("10"))), Ok(()));
        assert_eq!(
            validate(&at("5"), &at("5"), &upto(&at("10"))),
            Ok(()),
            "same again is allowed"
        );
        assert_eq!(validate(&at("4"), &at("5"), &upto(&at("10"))), Err(Backwards));
        assert_eq!(
            validate(&at("11"), &at("5"), &upto(&at("10"))),
            Err(BeyondLastDelivered)
        );
        assert_eq!(
            validate(&at("1"), &th, &upto(&th)),
            Err(BeyondLastDelivered),
            "nothing delivered yet"
        );
    }

    #[test]
    fn shard_end_only_after_the_shard_ended() {
        use InvalidCheckpointReason::*;
        let end = ExtendedSequenceNumber::SHARD_END;
        assert_eq!(validate(&end, &at("5"), &upto(&at("10"))), Err(ShardNotEnded));
        assert_eq!(validate(&end, &at("5"), &ended(&at("10"))), Ok(()));
        assert_eq!(
            validate(&at("9"), &at("5"), &ended(&at("10"))),
            Ok(()),
            "records before the end are fine"
        );
        assert_eq!(validate(&at("9"), &end, &ended(&at("10"))), Err(Backwards));
    }

    /// Issue 21 item 11: after the shard end, a sequence number past the last record is
    /// refused (the old rule compared it with `SHARD_END` and let every number pass).
    #[test]
    fn after_the_shard_end_nothing_past_the_last_record_passes() {
        assert_eq!(
            validate(&at("11"), &at("5"), &ended(&at("10"))),
            Err(InvalidCheckpointReason::BeyondLastDelivered)
        );
        assert_eq!(
            validate(&at("99999999999999999999"), &at("5"), &ended(&at("10"))),
            Err(InvalidCheckpointReason::BeyondLastDelivered)
        );
    }
}
