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

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::checkpoint::Checkpointer;
use crate::config::{CoordinatorConfig, OnProcessorFailure, ProcessorErrorPolicy};
use crate::coordinator::{HeldLease, LeaseCoordinator, WriteOutcome};
use crate::error::{BoxError, ErrorChain, SchedulerError};
use crate::lease::Lease;
use crate::metrics;
use crate::processor::{
    DeadLetterInput, DeadLetterSink, InitializationInput, LeaseLostInput, ProcessRecordsInput, RecordProcessor,
    ShardEndedInput, ShutdownRequestedInput,
};
use crate::record::Record;
use crate::retrieval::{ChildShard, PublisherEvent, PublisherStart, RecordsBatch, RecordsPublisher, StartingPosition};
use crate::retry::{retry, RetryPolicy};
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
                    // Never skipped: an uninitialized processor must not get records.
                    let policy = self.ctx.error_policy.clone();
                    let result = self
                        .call_with_policy("initialize", false, &policy, |p| {
                            let input = input.clone();
                            async move { p.initialize(input).await }.boxed()
                        })
                        .await;
                    match result {
                        Ok(()) => {
                            info!(checkpoint = %start, "shard consumer initialized");
                            events = Some(self.stream.retrieval.start(PublisherStart {
                                kinesis: self.ctx.kinesis.clone(),
                                stream_name: self.stream.name().to_owned(),
                                stream_arn: self.stream.arn.clone(),
                                shard_id: self.shard_id().to_owned(),
                                position: position.clone().unwrap_or_else(|| {
                                    StartingPosition::new(start.clone(), self.stream.initial_timestamp())
                                }),
                                cancel: publisher_cancel.child_token(),
                            }));
                            self.transition(self.state.on_success());
                        }
                        Err(CallFailure::StopScheduler(e)) => return ConsumerOutcome::Failed(e),
                        // A call that cannot be skipped is never bisected either.
                        Err(CallFailure::StopConsumer | CallFailure::LeaseLost | CallFailure::Bisect(_)) => {
                            return ConsumerOutcome::InitializeFailed
                        }
                    }
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
                            let children =
                                create_child_leases(&self.ctx, &self.stream, &self.shard_id, child_shards).await;
                            info!(children = ?children, "shard read to its end");
                            checkpointer.set_shard_ended(children);
                            self.signal(ShutdownReason::ShardEnd);
                        }
                        Some(PublisherEvent::Failed { operation, source }) => {
                            error!(operation, error = %ErrorChain(source.as_ref()), "shard cannot be read; stopping its consumer");
                            outcome = Some(ConsumerOutcome::RetrievalFailed);
                            self.signal(ShutdownReason::Requested);
                        }
                        Some(PublisherEvent::ShardNotFound { operation, source }) => {
                            let exists = tokio::select! {
                                biased;
                                // Cancel safety: abandoning the question loses nothing; the
                                // next owner meets the unknown shard again.
                                () = self.held.lost.cancelled() => continue,
                                () = self.shutdown.cancelled() => continue,
                                exists = stream_exists(&self.ctx, &self.stream) => exists,
                            };
                            if exists {
                                metrics::shard_gone(self.stream(), self.shard_id());
                                warn!(
                                    operation,
                                    error = %ErrorChain(source.as_ref()),
                                    "Kinesis no longer knows this shard (aged out past retention, or resharded long \
                                     ago); treating it as ended"
                                );
                                let children =
                                    create_child_leases(&self.ctx, &self.stream, &self.shard_id, Vec::new()).await;
                                checkpointer.set_shard_ended(children);
                                self.signal(ShutdownReason::ShardEnd);
                            } else if self.stream.key.is_some() {
                                // One of many streams: the scheduler stops consuming it.
                                warn!(stream = %self.stream.identifier, "the stream does not exist any more");
                                outcome = Some(ConsumerOutcome::StreamGone);
                                self.signal(ShutdownReason::Requested);
                            } else {
                                error!(stream = %self.stream.identifier, "the stream does not exist any more");
                                outcome = Some(ConsumerOutcome::Failed(SchedulerError::StreamNotFound {
                                    stream: self.stream.name().to_owned(),
                                }));
                                self.signal(ShutdownReason::Requested);
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

    /// Delivers one batch: drops what was already delivered, records the new last
    /// position, and calls the processor under the error policy.
    async fn deliver(
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

    /// Calls `shard_ended` and checks that `SHARD_END` was checkpointed, retrying per
    /// the error policy. True when the shard is finished.
    async fn finish_shard(&mut self, checkpointer: &Checkpointer) -> bool {
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
