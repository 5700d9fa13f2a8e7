//! The running shard consumers of a scheduler: starting one per held lease, reaping
//! them, and backing off a shard whose consumer failed.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info_span, warn, Instrument};

use crate::consumer::{ConsumerContext, ConsumerOutcome, ShardConsumer, ShutdownReason};
use crate::error::{ErrorChain, SchedulerError};
use crate::lease::coordinator::LeaseCoordinator;
use crate::lease::held::HeldLease;
use crate::metrics;
use crate::processor::RecordProcessorFactory;
use crate::retry::RetryPolicy;
use crate::streams::{StreamHandle, Streams};

/// A shard whose consumer failed, waiting to be started again.
#[derive(Debug)]
struct ShardBackoff {
    /// Consecutive failures.
    failures: u32,
    /// When the next consumer may start.
    retry_at: Instant,
}

/// The running shard consumers of a scheduler.
pub(super) struct Workers {
    ctx: Arc<ConsumerContext>,
    factory: Arc<dyn RecordProcessorFactory>,
    /// Lease key -> the consumer's shutdown token and its stream.
    pub(super) running: HashMap<String, (CancellationToken, Arc<StreamHandle>)>,
    /// Each task returns the lease period it consumed, so that only that period is
    /// released.
    pub(super) tasks: JoinSet<(Arc<HeldLease>, ConsumerOutcome)>,
    /// Shards whose consumer failed: not started again before their time. The lease
    /// is kept meanwhile, so the failure does not travel around the fleet.
    backoff: HashMap<String, ShardBackoff>,
    backoff_policy: RetryPolicy,
    /// Set when a shard ended: the shard list is synced at once (in the scheduler loop,
    /// where a shutdown can interrupt it), for children the consumer could not create.
    pub(super) sync_requested: bool,
    /// Streams (their `streamName`) a consumer found deleted.
    pub(super) gone_streams: Vec<String>,
}

impl Workers {
    pub(super) fn new(
        ctx: Arc<ConsumerContext>,
        factory: Arc<dyn RecordProcessorFactory>,
        backoff_policy: RetryPolicy,
    ) -> Self {
        Self {
            ctx,
            factory,
            running: HashMap::new(),
            tasks: JoinSet::new(),
            backoff: HashMap::new(),
            backoff_policy,
            sync_requested: false,
            gone_streams: Vec::new(),
        }
    }

    /// Starts a consumer for every held lease that has none and is not backing off.
    /// Finished leases, and those of a stream no longer consumed, are released instead:
    /// there is nothing to read. So are those being handed over, backing off or not:
    /// the receiver reads them.
    /// Consumers of streams no longer consumed are asked to shut down gracefully, and
    /// their held leases without a consumer released.
    pub(super) async fn start_new(
        &mut self,
        coordinator: &LeaseCoordinator,
        root: &CancellationToken,
        streams: &Streams,
    ) {
        if root.is_cancelled() {
            return;
        }
        for (token, stream) in self.running.values() {
            if streams.by_key(stream.key.as_deref()).is_none() && !token.is_cancelled() {
                token.cancel();
            }
        }
        let now = Instant::now();
        self.backoff.retain(|shard_id, _| coordinator.is_held(shard_id));
        for held in coordinator.held_leases() {
            if self.running.contains_key(&held.shard_id) || held.lost.is_cancelled() {
                continue;
            }
            // Backing off: no consumer yet, unless a handoff was asked for meanwhile:
            // it completes at once below (there is no consumer to stop).
            let backing_off = self.backoff.get(&held.shard_id).is_some_and(|b| b.retry_at > now);
            if backing_off && !held.shutdown_requested.is_cancelled() {
                continue;
            }
            let (finished, stream, shard) = {
                let lease = held.lease.lock().await;
                (
                    lease.checkpoint.is_shard_end(),
                    streams.of(&lease).cloned(),
                    lease.shard().to_owned(),
                )
            };
            let Some(stream) = stream.filter(|_| !finished && !held.shutdown_requested.is_cancelled()) else {
                // Finished, being handed over before a consumer ran (releasing
                // completes the handoff), or of a stream no longer consumed.
                self.backoff.remove(&held.shard_id);
                coordinator.release(&held).await;
                continue;
            };
            let lease_key = held.shard_id.clone();
            let factory = self.factory.clone();
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                factory.create_processor_for_stream(&stream.identifier, &shard)
            }));
            let processor = match made {
                Ok(p) => p,
                Err(panic) => {
                    let message = crate::consumer::panic_message(&panic);
                    error!(stream = stream.name(), shard_id = %shard, panic = %message, "processor factory panicked");
                    self.back_off(stream.name(), &shard, &lease_key, now);
                    continue;
                }
            };
            // Cancelled by a handoff of the lease, or by the scheduler's shutdown.
            let token = held.shutdown_requested.clone();
            let span = info_span!("shard_consumer", stream = %stream.name(), shard_id = %shard);
            let handle = stream.clone();
            let consumer = ShardConsumer::new(self.ctx.clone(), stream, shard, held.clone(), processor, token.clone());
            let period = held.clone();
            self.tasks.spawn(
                async move {
                    // Processor panics are caught inside; this catches our own bugs, so
                    // that the lease period is not lost with the task.
                    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(consumer.run()))
                        .await
                        .unwrap_or(ConsumerOutcome::Crashed);
                    (period, outcome)
                }
                .instrument(span),
            );
            self.running.insert(lease_key, (token, handle));
        }
    }

    /// Counts a failure of the consumer of `lease_key` (`shard_id` of `stream`) and
    /// schedules its next start.
    fn back_off(&mut self, stream: &str, shard_id: &str, lease_key: &str, now: Instant) {
        let cap = self.backoff_policy.max_backoff;
        let entry = self.backoff.entry(lease_key.to_owned()).or_insert(ShardBackoff {
            failures: 0,
            retry_at: now,
        });
        // A consumer that ran well past the longest wait since its last failure starts
        // the count afresh.
        if now.saturating_duration_since(entry.retry_at) > cap.saturating_mul(2) {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        let wait = self.backoff_policy.backoff_ceiling(entry.failures);
        entry.retry_at = now + wait;
        metrics::shard_backoff(stream, shard_id);
        warn!(stream, shard_id, failures = entry.failures, retry_in = ?wait, "shard consumer failed; keeping the lease and starting it again after the backoff");
    }

    /// Resolves when a handoff is asked for a held lease whose consumer is backing off
    /// (the step after it releases the lease at once: there is no consumer to stop);
    /// never while there is none.
    pub(super) fn handoff_while_backing_off(&self, coordinator: &LeaseCoordinator) -> impl Future<Output = ()> {
        let now = Instant::now();
        let tokens: Vec<CancellationToken> = coordinator
            .held_leases()
            .into_iter()
            .filter(|h| !self.running.contains_key(&h.shard_id))
            .filter(|h| self.backoff.get(&h.shard_id).is_some_and(|b| b.retry_at > now))
            .map(|h| h.shutdown_requested.clone())
            .collect();
        async move {
            if tokens.is_empty() {
                return std::future::pending().await;
            }
            futures::future::select_all(tokens.iter().map(|t| Box::pin(t.cancelled()))).await;
        }
    }

    /// When the next backing-off shard may start.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.backoff
            .iter()
            .filter(|(shard_id, _)| !self.running.contains_key(*shard_id))
            .map(|(_, b)| b.retry_at)
            .min()
    }

    /// Handles a finished consumer. Returns the error that should stop the scheduler.
    pub(super) async fn reap(
        &mut self,
        joined: Result<(Arc<HeldLease>, ConsumerOutcome), tokio::task::JoinError>,
        coordinator: &LeaseCoordinator,
    ) -> Option<SchedulerError> {
        let (held, outcome) = match joined {
            Ok(v) => v,
            Err(e) => {
                // Only an abort gets here (panics are caught in the task).
                warn!(error = %ErrorChain(&e), "a shard consumer task was aborted");
                return None;
            }
        };
        let shard_id = held.shard_id.clone();
        let stream = self.running.remove(&shard_id).map(|(_, stream)| stream);
        match outcome {
            ConsumerOutcome::Completed(ShutdownReason::ShardEnd) => {
                self.backoff.remove(&shard_id);
                coordinator.release(&held).await;
                self.sync_requested = true;
            }
            ConsumerOutcome::Completed(ShutdownReason::LeaseLost) => {
                self.backoff.remove(&shard_id);
            }
            ConsumerOutcome::Completed(_) | ConsumerOutcome::NotStarted => {
                coordinator.release(&held).await;
            }
            ConsumerOutcome::ShardEndNotCheckpointed
            | ConsumerOutcome::RetrievalFailed
            | ConsumerOutcome::InitializeFailed
            | ConsumerOutcome::Crashed => {
                if coordinator.still_owned(&held) {
                    let shard = held.lease.lock().await.shard().to_owned();
                    let name = stream.as_ref().map_or("", |s| s.name());
                    self.back_off(name, &shard, &shard_id, Instant::now());
                }
            }
            ConsumerOutcome::StreamGone => {
                coordinator.release(&held).await;
                self.gone_streams.extend(stream.and_then(|s| s.key.clone()));
            }
            ConsumerOutcome::Failed(e) => {
                coordinator.release(&held).await;
                return Some(e);
            }
        }
        None
    }
}
