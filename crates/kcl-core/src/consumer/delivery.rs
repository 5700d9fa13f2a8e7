//! Delivering a batch to the processor under the error policy: retries, skipping a
//! batch, bisecting it down to the records that fail, and dead-lettering them.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use tracing::{error, warn};

use super::{panic_message, ConsumerOutcome, ShardConsumer};
use crate::checkpoint::Checkpointer;
use crate::config::{OnProcessorFailure, ProcessorErrorPolicy};
use crate::error::{BoxError, ErrorChain, SchedulerError};
use crate::metrics;
use crate::processor::{DeadLetterInput, InitializationInput, ProcessRecordsInput, RecordProcessor};
use crate::record::Record;
use crate::retrieval::RecordsBatch;
use crate::retry::RetryPolicy;
use crate::sequence::ExtendedSequenceNumber;

/// Why a processor call under the error policy gave up.
#[derive(Debug)]
enum CallFailure {
    /// The policy says to stop the scheduler.
    StopScheduler(SchedulerError),
    /// The policy (`SkipBatch`) would skip, but the call cannot be skipped: stop only
    /// this consumer.
    StopConsumer,
    /// The lease was lost while the call kept failing: nothing was processed, nothing
    /// more is called; the consumer picks up the loss.
    LeaseLost,
    /// The retries are exhausted and the policy is `Bisect`: the caller isolates the
    /// failing records.
    Bisect(BoxError),
}

/// What a batch's `process_records` calls share besides their records.
struct Batch<'a> {
    millis_behind_latest: Option<i64>,
    fetched_at: std::time::Instant,
    checkpointer: &'a Checkpointer,
    /// The last record delivered before this batch: the checkpointer's bound while no
    /// record of this batch is known to be processed.
    previous_delivered: ExtendedSequenceNumber,
}

/// Splits records in two halves, returned so that popping yields the first half first.
fn split(mut records: Vec<Record>) -> Vec<Vec<Record>> {
    let second = records.split_off(records.len() / 2);
    vec![second, records]
}

impl ShardConsumer {
    /// Calls `initialize` under the error policy. Never skipped (an uninitialized
    /// processor must not get records), nor bisected. `Err` holds how the consumer
    /// ends.
    pub(super) async fn initialize_processor(&mut self, input: InitializationInput) -> Result<(), ConsumerOutcome> {
        let policy = self.ctx.error_policy.clone();
        let result = self
            .call_with_policy("initialize", false, &policy, |p| {
                let input = input.clone();
                async move { p.initialize(input).await }.boxed()
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(CallFailure::StopScheduler(e)) => Err(ConsumerOutcome::Failed(e)),
            Err(CallFailure::StopConsumer | CallFailure::LeaseLost | CallFailure::Bisect(_)) => {
                Err(ConsumerOutcome::InitializeFailed)
            }
        }
    }

    /// Delivers one batch: drops what was already delivered, records the new last
    /// position, and calls the processor under the error policy.
    pub(super) async fn deliver(
        &mut self,
        mut batch: RecordsBatch,
        checkpointer: &Checkpointer,
        last_delivered: &mut ExtendedSequenceNumber,
    ) -> Result<(), SchedulerError> {
        // `batch` keeps its share of the prefetch budget until this returns.
        let records = &mut batch.records;
        let (millis_behind_latest, fetched_at) = (batch.millis_behind_latest, batch.fetched_at);
        records.retain(|r| {
            r.extended_sequence_number()
                .partial_cmp(last_delivered)
                .is_none_or(|o| o.is_gt())
        });
        if let Some(m) = millis_behind_latest {
            metrics::millis_behind_latest(self.stream(), self.shard_id(), m);
        }
        // Touches the shard's series at every read, so that an exporter with an idle
        // timeout keeps them while this worker holds the shard and drops them after.
        metrics::records_processed(self.stream(), self.shard_id(), 0);
        if records.is_empty() && !self.ctx.coordinator_config.call_process_records_even_for_empty_list {
            return Ok(());
        }
        let previous_delivered = last_delivered.clone();
        if let Some(last) = records.last() {
            *last_delivered = last.extended_sequence_number();
            checkpointer.set_last_delivered(last_delivered.clone());
        }
        let count = records.len();
        self.held
            .record_bytes(records.iter().map(|r| r.data.len() as u64).sum());
        let batch = Batch {
            millis_behind_latest,
            fetched_at,
            checkpointer,
            previous_delivered,
        };
        let policy = self.ctx.error_policy.clone();
        match self.process(records, &batch, &policy).await {
            Ok(()) => {
                metrics::records_processed(self.stream(), self.shard_id(), count);
                Ok(())
            }
            Err(CallFailure::StopScheduler(e)) => Err(e),
            // Not reached: a batch is skippable, so the policy skips it instead.
            Err(CallFailure::StopConsumer) => Ok(()),
            // Not processed, and not counted: the loop picks up the lease loss.
            Err(CallFailure::LeaseLost) => Ok(()),
            Err(CallFailure::Bisect(error)) => self.bisect(std::mem::take(records), &batch, error).await,
        }
    }

    /// Calls `process_records` with `records` under `policy`.
    async fn process(
        &mut self,
        records: &[Record],
        batch: &Batch<'_>,
        policy: &ProcessorErrorPolicy,
    ) -> Result<(), CallFailure> {
        self.call_with_policy("process_records", true, policy, |p| {
            let input = ProcessRecordsInput {
                records: records.to_vec(),
                millis_behind_latest: batch.millis_behind_latest,
                cache_entry_time: batch.fetched_at,
                checkpointer: batch.checkpointer.clone(),
            };
            async move { p.process_records(input).await }.boxed()
        })
        .await
    }

    /// The `Bisect` policy, after `records` kept failing as a whole: halves are
    /// processed in order, once each; a half that fails is split again; a single record
    /// gets the full retry policy and, if it still fails, goes to the dead-letter sink.
    async fn bisect(&mut self, records: Vec<Record>, batch: &Batch<'_>, error: BoxError) -> Result<(), SchedulerError> {
        if records.len() == 1 {
            // A lone record already had the full retries.
            return self.dead_letter(records, error).await;
        }
        warn!(records = records.len(), error = %ErrorChain(error.as_ref()), "processor kept failing on a batch; isolating the failing records");
        let once = ProcessorErrorPolicy {
            retry: RetryPolicy::new(Duration::ZERO, Duration::ZERO, Some(1)),
            on_exhausted: OnProcessorFailure::Bisect,
        };
        let full = self.ctx.error_policy.clone();
        // Inside a part, `checkpoint()` means "up to the end of this part": the bound of
        // the checkpointer follows the parts, and falls back to the last record that was
        // processed or dead-lettered whenever a part fails, so that no path (a sink that
        // keeps failing, a crash, a lost lease) can store a checkpoint past a record that
        // was neither.
        let Some(batch_end) = records.last().map(Record::extended_sequence_number) else {
            return Ok(());
        };
        let mut done = batch.previous_delivered.clone();
        // Parts still to process, the next on top.
        let mut parts = split(records);
        while let Some(part) = parts.pop() {
            let Some(part_end) = part.last().map(Record::extended_sequence_number) else {
                continue;
            };
            if !self.ctx.coordinator.still_owned(&self.held) {
                // The next owner re-reads from the stored checkpoint.
                return Ok(());
            }
            let lone = part.len() == 1;
            batch.checkpointer.set_last_delivered(part_end.clone());
            let result = self.process(&part, batch, if lone { &full } else { &once }).await;
            if result.is_err() {
                batch.checkpointer.set_last_delivered(done.clone());
            }
            match result {
                Ok(()) => metrics::records_processed(self.stream(), self.shard_id(), part.len()),
                Err(CallFailure::Bisect(error)) if lone => self.dead_letter(part, error).await?,
                Err(CallFailure::Bisect(_)) => {
                    parts.extend(split(part));
                    continue;
                }
                Err(CallFailure::StopScheduler(e)) => return Err(e),
                // The lease is lost: nothing more is processed; the loop picks it up.
                Err(CallFailure::StopConsumer | CallFailure::LeaseLost) => return Ok(()),
            }
            done = part_end;
        }
        batch.checkpointer.set_last_delivered(batch_end);
        Ok(())
    }

    /// Hands records the processor cannot process to the dead-letter sink, retrying per
    /// the policy; a sink that keeps failing stops the scheduler.
    async fn dead_letter(&mut self, records: Vec<Record>, error: BoxError) -> Result<(), SchedulerError> {
        let Some(sink) = self.ctx.dead_letters.clone() else {
            return Err(SchedulerError::ProcessorFailed {
                shard_id: self.shard_id().to_owned(),
                source: error,
            });
        };
        let error = ErrorChain(error.as_ref()).to_string();
        let policy = self.ctx.error_policy.retry.clone();
        let mut attempt = 1u32;
        loop {
            let input = DeadLetterInput {
                shard_id: self.shard_id().to_owned(),
                stream: self.stream.identifier.clone(),
                records: records.clone(),
                error: error.clone(),
            };
            let failure: BoxError = match AssertUnwindSafe(sink.dead_letter(input)).catch_unwind().await {
                Ok(Ok(())) => {
                    error!(records = records.len(), error = %error, "records the processor kept failing on were handed to the dead-letter sink");
                    metrics::dead_lettered(self.stream(), self.shard_id(), records.len());
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(panic) => BoxError::from(format!("dead-letter sink panicked: {}", panic_message(&panic))),
            };
            if !policy.should_retry(attempt) {
                error!(error = %ErrorChain(failure.as_ref()), "the dead-letter sink kept failing; stopping the scheduler so that no record is dropped");
                return Err(SchedulerError::ProcessorFailed {
                    shard_id: self.shard_id().to_owned(),
                    source: failure,
                });
            }
            warn!(attempt, error = %ErrorChain(failure.as_ref()), "the dead-letter sink failed; retrying");
            tokio::time::sleep(policy.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Calls the processor, retrying errors and panics per the policy. `Ok` also when
    /// the policy skipped the call; only a `skippable` call (a batch) is ever skipped:
    /// for any other, `SkipBatch` stops this consumer instead.
    async fn call_with_policy<F>(
        &mut self,
        what: &'static str,
        skippable: bool,
        policy: &ProcessorErrorPolicy,
        mut call: F,
    ) -> Result<(), CallFailure>
    where
        F: for<'a> FnMut(&'a mut Box<dyn RecordProcessor>) -> futures::future::BoxFuture<'a, Result<(), BoxError>>,
    {
        let mut attempt = 1u32;
        loop {
            let error: BoxError = match AssertUnwindSafe(call(&mut self.processor)).catch_unwind().await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(panic) => BoxError::from(format!("processor panicked in {what}: {}", panic_message(&panic))),
            };
            metrics::processor_failure(self.stream(), self.shard_id());
            // A batch whose records were processed but whose checkpoint failed is not
            // delivered again: the checkpointer already retried what retrying could fix,
            // and the next checkpoint covers these records.
            if skippable && !self.held.lost.is_cancelled() {
                match checkpoint_error(error.as_ref()) {
                    Some(e) if e.is_retryable() => {
                        warn!(what, error = %ErrorChain(error.as_ref()), "the processor returned a failed checkpoint; its records are not delivered again (the next checkpoint covers them)");
                        return Ok(());
                    }
                    _ => {}
                }
            }
            if self.held.lost.is_cancelled() {
                // Its checkpoints fail now anyway; stop retrying and let the lease go. A
                // call that cannot be skipped (`initialize`) ends the consumer instead, so
                // that a processor that failed to initialize is never handed anything.
                warn!(what, error = %ErrorChain(error.as_ref()), "processor failed after the lease was lost");
                return Err(Self::lost_failure(skippable));
            }
            if policy.retry.should_retry(attempt) {
                let wait = policy.retry.backoff(attempt);
                warn!(what, attempt, error = %ErrorChain(error.as_ref()), ?wait, "processor failed; retrying the same input");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.held.lost.cancelled() => return Err(Self::lost_failure(skippable)),
                }
                attempt += 1;
                continue;
            }
            return match policy.on_exhausted {
                OnProcessorFailure::Bisect if skippable => Err(CallFailure::Bisect(error)),
                OnProcessorFailure::SkipBatch if skippable => {
                    error!(what, attempts = attempt, error = %ErrorChain(error.as_ref()), "processor kept failing; skipping the input per policy");
                    metrics::batch_skipped(self.stream(), self.shard_id());
                    Ok(())
                }
                OnProcessorFailure::SkipBatch | OnProcessorFailure::Bisect => {
                    error!(what, attempts = attempt, error = %ErrorChain(error.as_ref()), "processor kept failing; stopping this shard's consumer (only batches are ever skipped or bisected)");
                    Err(CallFailure::StopConsumer)
                }
                _ => {
                    error!(what, attempts = attempt, error = %ErrorChain(error.as_ref()), "processor kept failing; stopping the scheduler per policy");
                    Err(CallFailure::StopScheduler(SchedulerError::ProcessorFailed {
                        shard_id: self.shard_id().to_owned(),
                        source: error,
                    }))
                }
            };
        }
    }

    /// How a failing call ends once the lease is lost: a batch was not processed (never
    /// reported as done); a call that cannot be skipped (`initialize`) ends the consumer.
    fn lost_failure(skippable: bool) -> CallFailure {
        if skippable {
            CallFailure::LeaseLost
        } else {
            CallFailure::StopConsumer
        }
    }
}

/// The [`CheckpointError`](crate::CheckpointError) in `error`'s source chain, if the
/// processor returned one (directly or wrapped).
fn checkpoint_error<'a>(
    error: &'a (dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'a crate::CheckpointError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    // Bounded: a cyclic chain (a bug elsewhere) must not hang the consumer.
    for _ in 0..32 {
        let e = current?;
        if let Some(c) = e.downcast_ref::<crate::CheckpointError>() {
            return Some(c);
        }
        current = e.source();
    }
    None
}
