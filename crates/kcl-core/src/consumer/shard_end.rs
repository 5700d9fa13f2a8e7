//! The end of a shard: its children's leases are created before the processor hears
//! of it, then `shard_ended` must checkpoint `SHARD_END`.

use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use tracing::{debug, error, info, warn};

use super::{ConsumerContext, ConsumerOutcome, ShardConsumer, ShutdownReason};
use crate::checkpoint::Checkpointer;
use crate::error::ErrorChain;
use crate::error::{BoxError, SchedulerError};
use crate::lease::Lease;
use crate::metrics;
use crate::processor::ShardEndedInput;
use crate::retrieval::ChildShard;
use crate::retry::{retry, RetryPolicy};
use crate::streams::StreamHandle;

impl ShardConsumer {
    /// The publisher read the shard to its end: the children's leases are created
    /// first, then the consumer shuts down for `ShardEnd`.
    pub(super) async fn on_shard_end(&mut self, child_shards: Vec<ChildShard>, checkpointer: &Checkpointer) {
        let children = create_child_leases(&self.ctx, &self.stream, &self.shard_id, child_shards).await;
        info!(children = ?children, "shard read to its end");
        checkpointer.set_shard_ended(children);
        self.signal(ShutdownReason::ShardEnd);
    }

    /// Kinesis does not know this consumer's shard. If the stream still exists the
    /// shard is gone (aged out or resharded long ago) and is treated as ended; if the
    /// stream is gone, one of many streams stops being consumed and a single stream
    /// stops the scheduler. Returns the outcome the consumer then ends with; nothing
    /// when the shard is treated as ended (its shutdown decides the outcome) or when a
    /// lost lease or a shutdown interrupts the question.
    pub(super) async fn on_shard_not_found(
        &mut self,
        operation: &'static str,
        source: &BoxError,
        checkpointer: &Checkpointer,
    ) -> Option<ConsumerOutcome> {
        let exists = tokio::select! {
            biased;
            // Cancel safety: abandoning the question loses nothing; the next owner
            // meets the unknown shard again.
            () = self.held.lost.cancelled() => return None,
            () = self.shutdown.cancelled() => return None,
            exists = stream_exists(&self.ctx, &self.stream) => exists,
        };
        if exists {
            metrics::shard_gone(self.stream(), self.shard_id());
            warn!(
                operation,
                error = %ErrorChain(source.as_ref()),
                "Kinesis no longer knows this shard (aged out past retention, or resharded long ago); treating it \
                 as ended"
            );
            let children = create_child_leases(&self.ctx, &self.stream, &self.shard_id, Vec::new()).await;
            checkpointer.set_shard_ended(children);
            self.signal(ShutdownReason::ShardEnd);
            None
        } else if self.stream.key.is_some() {
            // One of many streams: the scheduler stops consuming it.
            warn!(stream = %self.stream.identifier, "the stream does not exist any more");
            self.signal(ShutdownReason::Requested);
            Some(ConsumerOutcome::StreamGone)
        } else {
            error!(stream = %self.stream.identifier, "the stream does not exist any more");
            self.signal(ShutdownReason::Requested);
            Some(ConsumerOutcome::Failed(SchedulerError::StreamNotFound {
                stream: self.stream.name().to_owned(),
            }))
        }
    }

    /// Calls `shard_ended` and checks that `SHARD_END` was checkpointed, retrying per
    /// the error policy. True when the shard is finished.
    pub(super) async fn finish_shard(&mut self, checkpointer: &Checkpointer) -> bool {
        let policy = self.ctx.error_policy.retry.clone();
        let mut attempt = 1u32;
        loop {
            let input = ShardEndedInput {
                shard_id: self.shard_id().to_owned(),
                checkpointer: checkpointer.clone(),
            };
            let result = AssertUnwindSafe(self.processor.shard_ended(input)).catch_unwind().await;
            let done = checkpointer.last_checkpoint().await.is_shard_end();
            match (result, done) {
                (Ok(Ok(())), true) => return true,
                (_, true) => return true,
                (Ok(Ok(())), false) => {
                    error!("shard_ended returned without checkpointing SHARD_END; the shard is not finished")
                }
                (Ok(Err(e)), false) => error!(error = %ErrorChain(e.as_ref()), "shard_ended failed"),
                (Err(_), false) => error!("shard_ended panicked"),
            }
            if self.held.lost.is_cancelled() || !policy.should_retry(attempt) {
                return false;
            }
            tokio::time::sleep(policy.backoff(attempt)).await;
            attempt += 1;
        }
    }
}

/// After a `ResourceNotFoundException` for this consumer's shard: whether the stream
/// itself still exists (then the shard is gone: it aged out past retention, or the stream
/// was resharded while nobody read it). Keeps asking with backoff while the answer is
/// unknown; the caller stops asking when the lease is lost or a shutdown is requested.
async fn stream_exists(ctx: &ConsumerContext, stream: &StreamHandle) -> bool {
    use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
    use aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError;
    let mut attempt = 0u32;
    loop {
        match stream.describe(&ctx.kinesis, ctx.kinesis_call_timeout).await {
            // A stream created again under the same name is another stream.
            Ok(summary) => return stream.is_same_incarnation(&summary),
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), DescribeStreamSummaryError::ResourceNotFoundException(_)) =>
            {
                return false
            }
            Err(e) => {
                warn!(error = %DisplayErrorContext(&e), "cannot tell whether the stream still exists; retrying");
                attempt = attempt.saturating_add(1);
                tokio::time::sleep(ctx.kinesis_retry.backoff(attempt)).await;
            }
        }
    }
}

/// Learns the children of this ended shard, from `GetRecords`'s `ChildShards` or,
/// where the backend did not send them, from `ListShards` parent links, and creates
/// their leases (at `TRIM_HORIZON`, with their parents) before the processor is told
/// of the shard end, so that no child is left without a lease. Returns the child shard
/// ids; when neither source knows them yet the periodic shard sync creates them later.
async fn create_child_leases(
    ctx: &ConsumerContext,
    stream: &StreamHandle,
    shard_id: &str,
    child_shards: Vec<ChildShard>,
) -> Vec<String> {
    let source = if child_shards.is_empty() {
        "ListShards"
    } else {
        "ChildShards"
    };
    debug!(source, "learning the child shards");
    let children: Vec<Lease> = if child_shards.is_empty() {
        match stream.detector.list_shards().await {
            Ok(shards) => shards
                .into_iter()
                .filter(|s| s.parents.iter().any(|p| p == shard_id))
                .map(|s| {
                    let mut l =
                        Lease::new(s.shard_id, crate::ExtendedSequenceNumber::TRIM_HORIZON).with_parents(s.parents);
                    l.hash_key_range = s.hash_key_range;
                    l
                })
                .collect(),
            Err(e) => {
                warn!(error = %ErrorChain(&e), "cannot list shards to find the children; the shard sync will create them");
                Vec::new()
            }
        }
    } else {
        child_shards
            .iter()
            .map(|c| {
                let mut l = Lease::new(c.shard_id.clone(), crate::ExtendedSequenceNumber::TRIM_HORIZON)
                    .with_parents(c.parent_shard_ids.iter().cloned());
                l.hash_key_range = c.hash_key_range.clone();
                l
            })
            .collect()
    };
    let children: Vec<Lease> = children.into_iter().map(|l| stream.qualify(l)).collect();
    let store = ctx.coordinator.store();
    for child in &children {
        let created = retry(&RetryPolicy::default(), crate::LeaseStoreError::is_retryable, || {
            store.create_lease_if_not_exists(child)
        })
        .await;
        match created {
            Ok(true) => info!(child = %child.lease_key, "created child lease"),
            Ok(false) => {}
            Err(e) => {
                warn!(child = %child.lease_key, error = %ErrorChain(&e), "cannot create child lease; the shard sync will")
            }
        }
    }
    children.into_iter().map(|l| l.shard().to_owned()).collect()
}
