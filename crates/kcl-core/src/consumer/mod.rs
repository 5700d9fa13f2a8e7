//! The per-shard consumer (the Java KCL's `ShardConsumer` and `ConsumerStates`).
//!
//! ```text
//!                          shutdown (any reason)
//!   WaitingOnParentShards ─────────────────────────────────────────┐
//!        │ parents done                                            │
//!        ▼                 shutdown (any reason)                   │
//!   Initializing ──────────────────────────────────────────────────┤
//!        │ initialized          Requested                          │
//!        ▼                 ┌───────────────► ShutdownRequested     │
//!   Processing ────────────┤                      │ shutdown_requested
//!     ▲    │ batch         │ LeaseLost/ShardEnd   ▼ returned       │
//!     └────┘               └───────────────► ShuttingDown          │
//!                                                 │ lease_lost /   │
//!                                                 │ shard_ended    ▼
//!                                                 └────────► ShutdownComplete
//! ```
//!
//! Legal transitions, per state (everything else is a bug):
//! - `WaitingOnParentShards`: parents done → `Initializing`; any shutdown →
//!   `ShutdownComplete` (the processor was never initialized, so it is not called).
//! - `Initializing`: initialized → `Processing`; any shutdown signalled before
//!   `initialize` ran → `ShutdownComplete` (likewise, the processor is not called).
//! - `Processing`: batch → `Processing`; `Requested` → `ShutdownRequested`;
//!   `ShardEnd`/`LeaseLost` → `ShuttingDown`.
//! - `ShutdownRequested`: `shutdown_requested` returned (or any higher reason) →
//!   `ShuttingDown`.
//! - `ShuttingDown`: `lease_lost` / `shard_ended` returned → `ShutdownComplete`.
//! - `ShutdownComplete`: final.
//!
//! Shutdown reasons are ordered `Requested < ShardEnd < LeaseLost`: a higher reason
//! overrides a lower one, never the reverse. Signals are acted on between processor
//! calls, never by dropping a processor call half-way.
//!
//! - `delivery`: delivering a batch, and the processor error policy (retries, skips,
//!   bisecting, dead letters).
//! - `shard_end`: learning an ended shard's children, creating their leases, and
//!   `shard_ended`.

mod delivery;
mod shard_end;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::checkpoint::Checkpointer;
use crate::config::{CoordinatorConfig, ProcessorErrorPolicy};
use crate::error::{ErrorChain, SchedulerError};
use crate::lease::coordinator::LeaseCoordinator;
use crate::lease::held::HeldLease;
use crate::lease::renewer::WriteOutcome;
use crate::lease::Lease;
use crate::processor::{DeadLetterSink, InitializationInput, LeaseLostInput, RecordProcessor, ShutdownRequestedInput};
use crate::retrieval::{PublisherEvent, PublisherStart, RecordsPublisher, StartingPosition};
use crate::retry::RetryPolicy;
use crate::sequence::{Checkpoint, ExtendedSequenceNumber};
use crate::shard_sync::sync_shards;
use crate::streams::StreamHandle;

/// How far before its first consumer started a `LATEST` lease is taken to start, for
/// the consumers after it: covers a worker clock up to this much ahead of Kinesis's,
/// and backends that keep arrival times in whole seconds. Later owners may deliver
/// the records of this last second before the start again; none is skipped.
const LATEST_START_MARGIN: Duration = Duration::from_secs(1);
/// The states of a shard consumer, as in the Java KCL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardConsumerState {
    /// Waiting until every parent shard is checkpointed at `SHARD_END` (or gone).
    WaitingOnParentShards,
    /// Calling the processor's `initialize`.
    Initializing,
    /// Delivering batches.
    Processing,
    /// Calling the processor's `shutdown_requested`.
    ShutdownRequested,
    /// Calling `lease_lost` or `shard_ended`.
    ShuttingDown,
    /// Done.
    ShutdownComplete,
}

/// Why a shard consumer shuts down. Ordered: a higher reason overrides a lower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// The worker is shutting down gracefully.
    Requested,
    /// The shard was read to its end.
    ShardEnd,
    /// The lease was lost.
    LeaseLost,
}

impl ShardConsumerState {
    /// The state after the current step completed normally.
    pub fn on_success(self) -> Self {
        match self {
            Self::WaitingOnParentShards => Self::Initializing,
            Self::Initializing | Self::Processing => Self::Processing,
            Self::ShutdownRequested => Self::ShuttingDown,
            Self::ShuttingDown | Self::ShutdownComplete => Self::ShutdownComplete,
        }
    }

    /// The state after a shutdown for `reason` was signalled.
    pub fn on_shutdown(self, reason: ShutdownReason) -> Self {
        match (self, reason) {
            // Not initialized yet: the processor is never called.
            (Self::WaitingOnParentShards | Self::Initializing, _) => Self::ShutdownComplete,
            (Self::Processing, ShutdownReason::Requested) => Self::ShutdownRequested,
            (Self::ShutdownRequested, ShutdownReason::Requested) => Self::ShutdownRequested,
            (Self::Processing | Self::ShutdownRequested, _) => Self::ShuttingDown,
            (Self::ShuttingDown, _) => Self::ShuttingDown,
            (Self::ShutdownComplete, _) => Self::ShutdownComplete,
        }
    }
}

/// How a shard consumer ended.
#[derive(Debug)]
pub(crate) enum ConsumerOutcome {
    /// Shut down for this reason. `ShardEnd` means `SHARD_END` is checkpointed.
    Completed(ShutdownReason),
    /// Ended before initializing (shutdown while waiting on parents).
    NotStarted,
    /// The shard end was reached but the processor did not checkpoint `SHARD_END`; the
    /// lease should be released so that the shard is retried.
    ShardEndNotCheckpointed,
    /// The shard could not be read; the shard backs off and is retried.
    RetrievalFailed,
    /// `initialize` kept failing and the policy allows stopping only this consumer
    /// (`SkipBatch` skips batches, never an initialization); the shard backs off.
    InitializeFailed,
    /// The processor kept failing and the policy says to stop the scheduler.
    Failed(SchedulerError),
    /// The consumer itself panicked (a bug in this library); the shard backs off.
    Crashed,
    /// The stream (one of a multi-stream application's) was deleted: the scheduler
    /// stops consuming it.
    StreamGone,
}

/// Everything a shard consumer needs, shared by all consumers of a scheduler.
#[derive(Debug)]
pub(crate) struct ConsumerContext {
    pub(crate) kinesis: aws_sdk_kinesis::Client,
    pub(crate) coordinator: Arc<LeaseCoordinator>,
    /// Bound of the Kinesis calls the consumer makes itself.
    pub(crate) kinesis_call_timeout: std::time::Duration,
    /// Backoff of those calls.
    pub(crate) kinesis_retry: RetryPolicy,
    pub(crate) coordinator_config: CoordinatorConfig,
    pub(crate) error_policy: ProcessorErrorPolicy,
    /// Where the `Bisect` policy hands the records that keep failing.
    pub(crate) dead_letters: Option<Arc<dyn DeadLetterSink>>,
}

pub(crate) struct ShardConsumer {
    ctx: Arc<ConsumerContext>,
    /// The shard's stream: how to read it, where new shards start.
    stream: Arc<StreamHandle>,
    /// The shard id (the lease key in single-stream mode).
    shard_id: String,
    held: Arc<HeldLease>,
    processor: Box<dyn RecordProcessor>,
    /// Cancelled for a graceful shutdown of this consumer.
    shutdown: CancellationToken,
    state: ShardConsumerState,
    reason: Option<ShutdownReason>,
}

impl ShardConsumer {
    pub(crate) fn new(
        ctx: Arc<ConsumerContext>,
        stream: Arc<StreamHandle>,
        shard_id: String,
        held: Arc<HeldLease>,
        processor: Box<dyn RecordProcessor>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            ctx,
            stream,
            shard_id,
            held,
            processor,
            shutdown,
            state: ShardConsumerState::WaitingOnParentShards,
            reason: None,
        }
    }

    fn shard_id(&self) -> &str {
        &self.shard_id
    }

    /// The stream's name, for metrics.
    fn stream(&self) -> &str {
        self.stream.name()
    }

    fn signal(&mut self, reason: ShutdownReason) {
        if self.reason.is_none_or(|r| reason > r) {
            debug!(?reason, state = ?self.state, "shutdown signalled");
            self.reason = Some(reason);
            self.state = self.state.on_shutdown(reason);
        }
    }

    /// Picks up shutdown signals raised since the last step.
    fn poll_signals(&mut self) {
        if self.held.lost.is_cancelled() {
            self.signal(ShutdownReason::LeaseLost);
        } else if self.shutdown.is_cancelled() {
            self.signal(ShutdownReason::Requested);
        }
    }

    fn transition(&mut self, next: ShardConsumerState) {
        debug!(from = ?self.state, to = ?next, "state transition");
        self.state = next;
    }

    pub(crate) async fn run(mut self) -> ConsumerOutcome {
        let lease = self.held.lease.lock().await.clone();
        let start = lease.checkpoint.clone();
        let checkpointer = Checkpointer::new(self.ctx.coordinator.clone(), self.held.clone(), start.clone());
        // Stops the publisher whatever way this consumer ends.
        let publisher_cancel = CancellationToken::new();
        let _stop_publisher = publisher_cancel.clone().drop_guard();
        let mut events: Option<RecordsPublisher> = None;
        let mut last_delivered = start.clone();
        // Where the publisher starts, settled once the parents are done.
        let mut position: Option<StartingPosition> = None;
        let mut outcome = None;
        loop {
            self.poll_signals();
            match self.state {
                ShardConsumerState::WaitingOnParentShards => {
                    if start.is_shard_end() {
                        // Nothing to read; the scheduler should not have started us.
                        return ConsumerOutcome::Completed(ShutdownReason::ShardEnd);
                    }
                    let parents: Vec<String> = lease
                        .parent_shard_ids
                        .iter()
                        .map(|p| lease.related_lease_key(p))
                        .collect();
                    // A lease still at TRIM_HORIZON or AT_TIMESTAMP reads its
                    // ancestors' records first; one at LATEST reads none of them.
                    let reads_ancestors = matches!(start.checkpoint, Checkpoint::TrimHorizon | Checkpoint::AtTimestamp);
                    if self.wait_for_parents(lease.shard(), &parents, reads_ancestors).await {
                        if let Some(p) = self.starting_position(&lease, &start).await {
                            position = Some(p);
                            self.transition(self.state.on_success());
                        }
                    }
                }
                ShardConsumerState::Initializing => {
                    let input = InitializationInput {
                        shard_id: self.shard_id().to_owned(),
                        stream: self.stream.identifier.clone(),
                        extended_sequence_number: start.clone(),
                        pending_checkpoint: lease.pending_checkpoint.clone(),
                        pending_checkpoint_state: lease.pending_checkpoint_state.clone(),
                    };
                    if let Err(outcome) = self.initialize_processor(input).await {
                        return outcome;
                    }
                    info!(checkpoint = %start, "shard consumer initialized");
                    events = Some(self.stream.retrieval.start(PublisherStart {
                        kinesis: self.ctx.kinesis.clone(),
                        stream_name: self.stream.name().to_owned(),
                        stream_arn: self.stream.arn.clone(),
                        shard_id: self.shard_id().to_owned(),
                        position:
                            position.clone().unwrap_or_else(|| {
                                StartingPosition::new(start.clone(), self.stream.initial_timestamp())
                            }),
                        cancel: publisher_cancel.child_token(),
                    }));
                    self.transition(self.state.on_success());
                }
                ShardConsumerState::Processing => {
                    let Some(rx) = events.as_mut() else {
                        return ConsumerOutcome::RetrievalFailed;
                    };
                    let event = tokio::select! {
                        biased;
                        // Cancel safety: the signal branches lose nothing, and
                        // `next` is cancel safe (an unreceived batch stays queued).
                        () = self.held.lost.cancelled() => continue,
                        () = self.shutdown.cancelled() => continue,
                        event = rx.next() => event,
                    };
                    // Deliver only while ownership is provable; otherwise the batch is
                    // dropped (the next owner re-reads it after the last checkpoint) and
                    // the loop picks up the lease loss.
                    if !self.ctx.coordinator.still_owned(&self.held) {
                        continue;
                    }
                    match event {
                        Some(PublisherEvent::Batch(batch)) => {
                            if let Err(e) = self.deliver(batch, &checkpointer, &mut last_delivered).await {
                                return ConsumerOutcome::Failed(e);
                            }
                        }
                        Some(PublisherEvent::ShardEnd { child_shards }) => {
                            self.on_shard_end(child_shards, &checkpointer).await;
                        }
                        Some(PublisherEvent::Failed { operation, source }) => {
                            error!(operation, error = %ErrorChain(source.as_ref()), "shard cannot be read; stopping its consumer");
                            outcome = Some(ConsumerOutcome::RetrievalFailed);
                            self.signal(ShutdownReason::Requested);
                        }
                        Some(PublisherEvent::ShardNotFound { operation, source }) => {
                            if let Some(ended) = self.on_shard_not_found(operation, &source, &checkpointer).await {
                                outcome = Some(ended);
                            }
                        }
                        None => {
                            outcome = Some(ConsumerOutcome::RetrievalFailed);
                            self.signal(ShutdownReason::Requested);
                        }
                    }
                }
                ShardConsumerState::ShutdownRequested => {
                    let input = ShutdownRequestedInput {
                        shard_id: self.shard_id().to_owned(),
                        checkpointer: checkpointer.clone(),
                    };
                    match AssertUnwindSafe(self.processor.shutdown_requested(input))
                        .catch_unwind()
                        .await
                    {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %ErrorChain(e.as_ref()), "shutdown_requested returned an error"),
                        Err(_) => warn!("shutdown_requested panicked"),
                    }
                    self.transition(self.state.on_success());
                }
                ShardConsumerState::ShuttingDown => {
                    let reason = self.reason.unwrap_or(ShutdownReason::Requested);
                    match reason {
                        ShutdownReason::LeaseLost => {
                            let input = LeaseLostInput {
                                shard_id: self.shard_id().to_owned(),
                            };
                            if AssertUnwindSafe(self.processor.lease_lost(input))
                                .catch_unwind()
                                .await
                                .is_err()
                            {
                                warn!("lease_lost panicked");
                            }
                        }
                        ShutdownReason::ShardEnd => {
                            if !self.finish_shard(&checkpointer).await {
                                outcome = Some(ConsumerOutcome::ShardEndNotCheckpointed);
                            }
                        }
                        ShutdownReason::Requested => {}
                    }
                    self.transition(self.state.on_success());
                }
                ShardConsumerState::ShutdownComplete => {
                    info!(reason = ?self.reason, "shard consumer shut down");
                    return match (outcome, self.reason) {
                        (Some(o), _) => o,
                        (None, Some(r)) if events.is_some() => ConsumerOutcome::Completed(r),
                        (None, _) => ConsumerOutcome::NotStarted,
                    };
                }
            }
        }
    }

    /// Waits until every parent lease is gone or at `SHARD_END`. Returns false when a
    /// shutdown signal came first.
    ///
    /// A parent without a lease is not taken for finished at once when this lease
    /// reads its ancestors (`reads_ancestors`): the parent's lease may never have been
    /// created (its creation at the grandparent's end failed, then this shard was made
    /// by a merge). Unless the stream's last listing shows the parent gone (it aged
    /// out), one shard sync of this stream runs first, which creates the parent's
    /// lease unless the parent is finished (a started lease descends from it) or gone
    /// from the stream; the parent is then waited on like any other.
    async fn wait_for_parents(&mut self, shard: &str, parents: &[String], reads_ancestors: bool) -> bool {
        let mut synced = !reads_ancestors;
        loop {
            let mut pending = Vec::new();
            let mut missing = Vec::new();
            for parent in parents {
                match self.ctx.coordinator.store().get_lease(parent).await {
                    Ok(Some(l)) if !l.checkpoint.is_shard_end() => pending.push(parent.clone()),
                    Ok(None) if !synced => missing.push(parent.clone()),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(parent, error = %ErrorChain(&e), "cannot read a parent lease; waiting");
                        pending.push(parent.clone());
                    }
                }
            }
            // A parent the last listing of the stream no longer has (aged out past the
            // retention: the common case) needs no sync; one still listed, or a listing
            // too old to have this shard, does.
            if !missing.is_empty() {
                let listed = self.stream.detector.last_listing();
                let needs_sync = match &listed {
                    Some(ids) if ids.contains(shard) => missing
                        .iter()
                        .any(|key| ids.contains(key.rsplit(':').next().unwrap_or(key))),
                    _ => true,
                };
                if !needs_sync {
                    debug!(?missing, "parent shards without a lease are gone from the stream");
                    missing.clear();
                    synced = true;
                }
            }
            if !missing.is_empty() {
                let store = self.ctx.coordinator.store().as_ref();
                let result = tokio::select! {
                    biased;
                    () = self.held.lost.cancelled() => return false,
                    () = self.shutdown.cancelled() => return false,
                    r = sync_shards(std::slice::from_ref(&self.stream), store) => r,
                };
                match result.map(|mut per_stream| per_stream.pop().map(|(_, r)| r)) {
                    Ok(Some(Ok(created))) => {
                        if created > 0 {
                            info!(?missing, created, "created the leases of parent shards that had none");
                        }
                        synced = true;
                        // Reads the parents again at once: the new leases are waited on.
                        continue;
                    }
                    Ok(Some(Err(e))) | Err(e) => {
                        warn!(?missing, error = %ErrorChain(&e), "cannot sync shards for parents without a lease; waiting");
                        pending.extend(missing);
                    }
                    Ok(None) => {
                        synced = true;
                        continue;
                    }
                }
            }
            if pending.is_empty() {
                return true;
            }
            debug!(?pending, "waiting on parent shards");
            tokio::select! {
                () = self.held.lost.cancelled() => return false,
                () = self.shutdown.cancelled() => return false,
                () = tokio::time::sleep(self.ctx.coordinator_config.parent_shard_poll_interval) => {}
            }
        }
    }

    /// Where the publisher starts: the lease's checkpoint, except for a lease still at
    /// `LATEST`. Its first consumer stores the moment it started in the lease
    /// (`latestStartTimestamp`) before it asks for a `LATEST` iterator; every later
    /// consumer until the first checkpoint (after a handoff, a failover or a restart)
    /// reads from `AT_TIMESTAMP` of that moment instead of a new `LATEST` that would
    /// skip what was written in between. Returns `None` when the lease was lost or a
    /// shutdown was requested first. A failed write is retried, and nothing is read
    /// until it succeeds; after about a minute of failures the consumer reads from
    /// `LATEST` without a stored start (an error log says what that risks).
    async fn starting_position(&mut self, lease: &Lease, start: &ExtendedSequenceNumber) -> Option<StartingPosition> {
        let at = |t: SystemTime| StartingPosition::new(ExtendedSequenceNumber::AT_TIMESTAMP, Some(t));
        if start.checkpoint != Checkpoint::Latest {
            return Some(StartingPosition::new(start.clone(), self.stream.initial_timestamp()));
        }
        if let Some(t) = lease.latest_start() {
            info!(started_at = ?t, "a LATEST lease resumes where it first started (AT_TIMESTAMP)");
            return Some(at(t));
        }
        // Taken before the iterator is asked for, and set back by a margin for a worker
        // clock ahead of Kinesis's (and for backends that keep arrival times in whole
        // seconds): AT_TIMESTAMP of it covers what the LATEST iterator will read.
        let now = SystemTime::now()
            .checked_sub(LATEST_START_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        // About a minute of retries.
        let policy = RetryPolicy::default();
        let set_here = std::sync::atomic::AtomicBool::new(false);
        for attempt in 1u32.. {
            let write = self
                .ctx
                .coordinator
                .update_checkpoint(&self.held, |l| {
                    let unset = l.checkpoint.checkpoint == Checkpoint::Latest && l.latest_start().is_none();
                    if unset {
                        l.latest_start_timestamp = Some(now);
                    }
                    set_here.store(unset, std::sync::atomic::Ordering::Relaxed);
                    Ok::<(), std::convert::Infallible>(())
                })
                .await;
            match write {
                Ok(WriteOutcome::Written) => {
                    let stored = self.held.lease.lock().await;
                    return match stored.latest_start() {
                        // Another process of ours started the lease meanwhile.
                        Some(t) if !set_here.load(std::sync::atomic::Ordering::Relaxed) => Some(at(t)),
                        _ => {
                            info!("a LATEST lease starts here; until its first checkpoint, its consumers read from this moment");
                            Some(StartingPosition::new(start.clone(), None))
                        }
                    };
                }
                Ok(WriteOutcome::LeaseLost) => return None,
                Ok(WriteOutcome::Failed(e)) if policy.should_retry(attempt) => {
                    warn!(attempt, error = %ErrorChain(&e), "cannot store where this LATEST lease starts; retrying before reading");
                }
                Ok(WriteOutcome::Failed(e)) => {
                    // Reading matters more than the stronger start: the shard is not
                    // pinned by a write the table keeps refusing.
                    error!(
                        attempt,
                        error = %ErrorChain(&e),
                        "cannot store where this LATEST lease starts; reading from LATEST without it: should the lease \
                         change hands before its first checkpoint, records written in between may be skipped"
                    );
                    return Some(StartingPosition::new(start.clone(), None));
                }
                Err(never) => match never {},
            }
            tokio::select! {
                () = self.held.lost.cancelled() => return None,
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep(policy.backoff(attempt)) => {}
            }
        }
        None
    }
}

/// The text of a panic payload (a `&str` or a `String`), for logs.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::ShardConsumerState::*;
    use super::ShutdownReason::*;

    #[test]
    fn happy_path() {
        assert_eq!(WaitingOnParentShards.on_success(), Initializing);
        assert_eq!(Initializing.on_success(), Processing);
        assert_eq!(Processing.on_success(), Processing);
    }

    #[test]
    fn uninitialized_consumers_complete_without_calling_the_processor() {
        for r in [Requested, ShardEnd, LeaseLost] {
            assert_eq!(WaitingOnParentShards.on_shutdown(r), ShutdownComplete);
            assert_eq!(Initializing.on_shutdown(r), ShutdownComplete);
        }
    }

    #[test]
    fn requested_goes_through_shutdown_requested() {
        assert_eq!(Processing.on_shutdown(Requested), ShutdownRequested);
        assert_eq!(ShutdownRequested.on_success(), ShuttingDown);
        assert_eq!(ShuttingDown.on_success(), ShutdownComplete);
    }

    #[test]
    fn higher_reasons_go_straight_to_shutting_down() {
        for s in [Processing, ShutdownRequested] {
            assert_eq!(s.on_shutdown(LeaseLost), ShuttingDown);
            assert_eq!(s.on_shutdown(ShardEnd), ShuttingDown);
        }
        assert_eq!(ShutdownRequested.on_shutdown(Requested), ShutdownRequested);
        assert_eq!(ShutdownComplete.on_shutdown(LeaseLost), ShutdownComplete);
    }

    #[test]
    fn reasons_are_ordered() {
        assert!(Requested < ShardEnd && ShardEnd < LeaseLost);
    }
}
