//! The lease coordinator (the Java KCL's `LeaseCoordinator`, `LeaseRenewer` and
//! `LeaseTaker`): which leases this worker holds, keeping them alive, taking new ones,
//! fenced checkpoint writes, and releasing them on shutdown.
//!
//! Expiry follows the Java KCL: a lease held by another worker is expired when its
//! counter has not changed for `failover_time` as seen on *this* worker's monotonic
//! clock, so wall-clock skew between machines never matters. A lease this worker holds
//! counts as lost as soon as it could be expired for others: when no renewal sent in
//! the last `failover_time - renewal_interval` succeeded; no checkpoint write runs past
//! that point either.
//!
//! A lease moves between live workers by a graceful handoff, as in the Java KCL 3.x: the
//! receiving worker sets `leaseOwner` to itself and `checkpointOwner` to the current
//! owner, without moving the counter. The current owner learns of it at its next write
//! (a checkpoint, or a renewal within a renewal interval): the write is refused, the
//! read that follows shows the handoff, and the owner adopts the new owners and goes
//! on renewing. Its consumer gets `shutdown_requested` (and may checkpoint: a checkpoint
//! by the checkpoint owner is accepted), and once it has stopped, the owner removes
//! `checkpointOwner`, moving the counter. Only then does the receiver start, so no
//! record is processed by both. A handoff that does not complete within
//! `graceful_lease_handoff_timeout` (or whose old owner stops renewing for the failover
//! time) is ended by the receiver with an assignment that moves the counter: the old
//! owner's next write fails and its consumer gets `lease_lost`.
//!
//! Renewals are scheduled per lease, one renewal interval (less a random part, so that
//! they spread over the interval) after the lease's last successful write: a lease
//! checkpointed more often than that is never renewed separately. A failed renewal is
//! tried again after a quarter interval, with jitter, until ownership can no longer be
//! proven.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{LeaseBalancing, LeaseManagementConfig};
use crate::error::{ErrorChain, LeaseStoreError};
use crate::lease::{Lease, LeaseStore};
use crate::metrics;

/// A lease this worker holds, shared by the renewer, the shard consumer and its
/// checkpointer.
#[derive(Debug)]
pub(crate) struct HeldLease {
    pub(crate) shard_id: String,
    /// The last lease state this worker wrote. A tokio mutex because it is held across
    /// the conditional write, which serializes renewals and checkpoints of one lease
    /// (each write must carry the counter the previous one produced).
    pub(crate) lease: tokio::sync::Mutex<Lease>,
    /// When the last successful write was *sent*. Other workers start their expiry
    /// clock no earlier than that, so this is a safe lower bound of our ownership.
    last_renewal_sent: Mutex<Instant>,
    /// When the next renewal is due: a renewal interval after the last successful
    /// write, less a random part; sooner after a failed renewal.
    next_renewal: Mutex<Instant>,
    /// Cancelled when the lease is lost; the shard consumer watches it.
    pub(crate) lost: CancellationToken,
    /// Cancelled when the shard consumer should shut down gracefully: the lease is being
    /// handed to another worker, or the scheduler shuts down.
    pub(crate) shutdown_requested: CancellationToken,
    /// The bytes read from the shard, for the lease's `throughputKBps`.
    throughput: Mutex<Throughput>,
}

/// The read throughput of one shard, sampled at each lease write: the rate since the
/// previous sample, smoothed (the mean of the new rate and the previous estimate).
#[derive(Debug)]
struct Throughput {
    bytes: u64,
    since: Instant,
    kbps: Option<f64>,
}

impl Throughput {
    /// Samples are at least this far apart: a write soon after another keeps the
    /// estimate (and its bytes count towards the next sample).
    const MIN_SAMPLE: Duration = Duration::from_secs(1);

    fn sample(&mut self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= Self::MIN_SAMPLE {
            #[allow(clippy::cast_precision_loss)] // bytes in a sample fit an f64 exactly enough
            let rate = self.bytes as f64 / 1024.0 / elapsed.as_secs_f64();
            self.kbps = Some(self.kbps.map_or(rate, |previous| (previous + rate) / 2.0));
            self.bytes = 0;
            self.since = now;
        }
        self.kbps
    }
}

impl HeldLease {
    fn new(lease: Lease, sent: Instant, renewal_interval: Duration) -> Self {
        // The first renewal falls anywhere in the last four fifths of the interval, so
        // that leases taken together do not renew together.
        let first = renewal_interval.mul_f64(rand::random_range(0.2..=1.0));
        Self {
            shard_id: lease.lease_key.clone(),
            lease: tokio::sync::Mutex::new(lease),
            last_renewal_sent: Mutex::new(sent),
            next_renewal: Mutex::new(sent + first),
            lost: CancellationToken::new(),
            shutdown_requested: CancellationToken::new(),
            throughput: Mutex::new(Throughput {
                bytes: 0,
                since: sent,
                kbps: None,
            }),
        }
    }

    /// Counts `bytes` of record data read from the shard.
    pub(crate) fn record_bytes(&self, bytes: u64) {
        lock(&self.throughput).bytes += bytes;
    }

    /// The shard's recent read throughput in KB/s, for the next write of the lease.
    fn sample_throughput(&self, now: Instant) -> Option<f64> {
        lock(&self.throughput).sample(now)
    }

    /// Records a successful write sent at `sent` (a renewal or a checkpoint, which
    /// moves the counter as a renewal does) and schedules the next renewal.
    fn record_renewal(&self, sent: Instant, renewal_interval: Duration) {
        let mut last = lock(&self.last_renewal_sent);
        if sent > *last {
            *last = sent;
            let early = renewal_interval.mul_f64(rand::random_range(0.0..0.1));
            *lock(&self.next_renewal) = sent + renewal_interval - early;
        }
    }

    /// Schedules another attempt after a failed renewal: a quarter interval, with
    /// jitter, so that renewals throttled together do not retry together.
    fn retry_renewal(&self, now: Instant, renewal_interval: Duration) {
        *lock(&self.next_renewal) = now + (renewal_interval / 4).mul_f64(rand::random_range(0.5..1.5));
    }

    fn next_renewal(&self) -> Instant {
        *lock(&self.next_renewal)
    }

    fn last_renewal_sent(&self) -> Instant {
        *lock(&self.last_renewal_sent)
    }
}

/// A std mutex guard that survives a panicking holder (the data is plain state that
/// stays consistent: every critical section is a few assignments).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The outcome of a fenced write to a held lease.
#[derive(Debug)]
pub(crate) enum WriteOutcome {
    Written,
    LeaseLost,
    Failed(LeaseStoreError),
}

/// Owns the set of held leases and performs every write to them.
#[derive(Debug)]
pub(crate) struct LeaseCoordinator {
    /// Every call is bounded by the store itself: the scheduler hands a
    /// `TimedLeaseStore` (`lease_store_call_timeout`). Checkpoint writes get a tighter
    /// bound here, the proof of ownership left.
    store: Arc<dyn LeaseStore>,
    worker_id: String,
    config: LeaseManagementConfig,
    /// A std mutex: only short map operations happen under it, never an await.
    held: Mutex<HashMap<String, Arc<HeldLease>>>,
    /// Set when the scheduler shuts down: the live workers and their loads, to which
    /// released leases are assigned (least loaded first) instead of being left unowned,
    /// so that they find them through the owner index at their next pass.
    successors: Mutex<Vec<(String, usize)>>,
}

impl LeaseCoordinator {
    pub(crate) fn new(store: Arc<dyn LeaseStore>, worker_id: String, config: LeaseManagementConfig) -> Self {
        Self {
            store,
            worker_id,
            config,
            held: Mutex::new(HashMap::new()),
            successors: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn worker_id(&self) -> &str {
        &self.worker_id
    }

    pub(crate) fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    pub(crate) fn held_leases(&self) -> Vec<Arc<HeldLease>> {
        lock(&self.held).values().cloned().collect()
    }

    /// The keys of the leases held.
    pub(crate) fn held_keys(&self) -> HashSet<String> {
        lock(&self.held).keys().cloned().collect()
    }

    pub(crate) fn held_count(&self) -> usize {
        lock(&self.held).len()
    }

    pub(crate) fn is_held(&self, shard_id: &str) -> bool {
        lock(&self.held).contains_key(shard_id)
    }

    fn publish_gauge(&self, held: &HashMap<String, Arc<HeldLease>>) {
        metrics::leases_held(held.len());
    }

    /// Marks a lease lost: removes it and cancels its consumer.
    pub(crate) fn mark_lost(&self, shard_id: &str, why: &str) {
        let removed = {
            let mut held = lock(&self.held);
            let removed = held.remove(shard_id);
            self.publish_gauge(&held);
            removed
        };
        if let Some(h) = removed {
            warn!(shard_id, reason = why, "lease lost");
            metrics::lease_lost();
            h.lost.cancel();
        }
    }

    /// Renews the held leases whose renewal is due by `by`, at most
    /// [`MAX_CONCURRENT_RENEWALS`] at a time; declares lost those whose renewal was
    /// refused, and those not renewed in time to be sure no one else may take them.
    pub(crate) async fn renew_due(&self, by: Instant) {
        let due: Vec<Arc<HeldLease>> = self
            .held_leases()
            .into_iter()
            .filter(|h| h.next_renewal() <= by)
            .collect();
        for chunk in due.chunks(MAX_CONCURRENT_RENEWALS) {
            futures::future::join_all(chunk.iter().map(|h| self.renew_one(h))).await;
        }
    }

    /// When the next held lease's renewal is due, if any lease is held.
    pub(crate) fn next_renewal_due(&self) -> Option<Instant> {
        lock(&self.held).values().map(|h| h.next_renewal()).min()
    }

    /// The next moment a held lease stops being provably held, if nothing renews it.
    pub(crate) fn next_unprovable(&self) -> Option<Instant> {
        let safe = self.config.failover_time.saturating_sub(self.config.renewal_interval);
        lock(&self.held)
            .values()
            .filter(|h| !h.lost.is_cancelled())
            .map(|h| h.last_renewal_sent() + safe)
            .min()
    }

    /// Marks lost every held lease that can no longer be proven held.
    pub(crate) fn expire_unprovable(&self, now: Instant) {
        for held in self.held_leases() {
            if !held.lost.is_cancelled() && self.past_safe_ownership(held.last_renewal_sent(), now) {
                self.mark_lost(&held.shard_id, "not renewed within the failover time");
            }
        }
    }

    /// The renewal interval.
    pub(crate) fn renewal_interval(&self) -> Duration {
        self.config.renewal_interval
    }

    /// Notes that the lease `held` is being handed to another worker: its consumer is
    /// asked to shut down gracefully.
    fn handoff_requested(&self, held: &HeldLease, stored: &Lease) {
        if !held.shutdown_requested.is_cancelled() {
            info!(shard_id = %held.shard_id, to = ?stored.lease_owner, "lease is being handed to another worker; shutting its consumer down gracefully");
            metrics::lease_handoff("out", "requested");
            held.shutdown_requested.cancel();
        }
    }

    async fn renew_one(&self, held: &Arc<HeldLease>) {
        if held.lost.is_cancelled() {
            return;
        }
        // A refused renewal is verified: when the stored lease is still ours, an earlier
        // write of ours that reported failure (or that the SDK retried) had landed and
        // moved the counter; the stored state is adopted and the renewal sent again.
        let mut outcome = Err(LeaseStoreError::Dependency {
            message: format!("lease {:?} changed twice during one renewal", held.shard_id),
            source: "concurrent writer with this worker id".into(),
        });
        for _ in 0..2 {
            let mut guard = held.lease.lock().await;
            let mut next = guard.clone();
            let sent = Instant::now();
            next.throughput_kbps = held.sample_throughput(sent).or(next.throughput_kbps);
            outcome = match self.store.renew_lease(&mut next).await {
                Ok(true) => {
                    *guard = next;
                    held.record_renewal(sent, self.config.renewal_interval);
                    Ok(true)
                }
                Ok(false) => match self.verify_refusal(&held.shard_id).await {
                    Verdict::StillOurs(stored) => {
                        debug!(shard_id = %held.shard_id, counter = stored.lease_counter, "renewal refused but the lease is still ours; adopting the stored lease");
                        *guard = *stored;
                        continue;
                    }
                    Verdict::HandingOff(stored) => {
                        self.handoff_requested(held, &stored);
                        *guard = *stored;
                        continue;
                    }
                    Verdict::Lost => Ok(false),
                    Verdict::Unknown(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            break;
        }
        match outcome {
            Ok(true) => debug!(shard_id = %held.shard_id, "lease renewed"),
            Ok(false) => self.mark_lost(&held.shard_id, "renewal refused: another worker holds the lease"),
            Err(e) => {
                metrics::lease_renewal_failed();
                warn!(shard_id = %held.shard_id, error = %ErrorChain(&e), "lease renewal failed");
                let now = Instant::now();
                if self.past_safe_ownership(held.last_renewal_sent(), now) {
                    self.mark_lost(&held.shard_id, "not renewed within the failover time");
                } else {
                    held.retry_renewal(now, self.config.renewal_interval);
                }
            }
        }
    }

    /// After a conditional write to a held lease was refused: reads the lease (strongly
    /// consistent, as stores read) to tell a lost lease from one whose counter an
    /// earlier write of ours moved.
    async fn verify_refusal(&self, shard_id: &str) -> Verdict {
        match self.store.get_lease(shard_id).await {
            Ok(Some(stored)) if stored.checkpoint_owner.as_deref() == Some(self.worker_id.as_str()) => {
                Verdict::HandingOff(Box::new(stored))
            }
            Ok(Some(stored)) if stored.is_owned_by(&self.worker_id) && !stored.is_handoff_pending() => {
                Verdict::StillOurs(Box::new(stored))
            }
            Ok(_) => Verdict::Lost,
            Err(e) => Verdict::Unknown(e),
        }
    }

    /// How much longer this worker can prove it owns `held`; `None` when it no longer can.
    fn provable_ownership_left(&self, held: &HeldLease) -> Option<Duration> {
        let safe = self.config.failover_time.saturating_sub(self.config.renewal_interval);
        let left = (held.last_renewal_sent() + safe).saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// True when, at `now`, the lease may be expired for other workers before the next
    /// renewal could land: the last successful renewal was sent more than
    /// `failover_time - renewal_interval` ago.
    pub(crate) fn past_safe_ownership(&self, last_sent: Instant, now: Instant) -> bool {
        let safe = self.config.failover_time.saturating_sub(self.config.renewal_interval);
        now.saturating_duration_since(last_sent) >= safe
    }

    /// True while this worker can prove it still owns `held`: not marked lost, and
    /// renewed recently enough that no other worker may have taken it. When the proof
    /// has run out the lease is marked lost here, so that a stalled renewer cannot let a
    /// consumer go on processing a shard another worker may already own.
    pub(crate) fn still_owned(&self, held: &HeldLease) -> bool {
        if held.lost.is_cancelled() {
            return false;
        }
        if self.past_safe_ownership(held.last_renewal_sent(), Instant::now()) {
            self.mark_lost(&held.shard_id, "not renewed within the failover time");
            return false;
        }
        true
    }

    /// Tries to take `lease` (as read from the table) for this worker. A take that was
    /// refused or failed is verified by reading the lease: when it is ours with the
    /// counter moved past what we saw, our take had landed (the SDK retried it, or its
    /// answer was lost) and it is a success.
    pub(crate) async fn take(&self, lease: Lease) -> Result<bool, LeaseStoreError> {
        self.acquire(lease, Acquire::Take).await
    }

    /// Ends a handoff to this worker that did not complete in time: assigns the lease
    /// to this worker, moving the counter so that the old owner's next write fails.
    /// Verified as [`LeaseCoordinator::take`] is.
    pub(crate) async fn assign_to_self(&self, lease: Lease) -> Result<bool, LeaseStoreError> {
        self.acquire(lease, Acquire::Assign).await
    }

    async fn acquire(&self, lease: Lease, how: Acquire) -> Result<bool, LeaseStoreError> {
        let sent = Instant::now();
        let seen_counter = lease.lease_counter;
        let mut taken = lease;
        let key = taken.lease_key.clone();
        let result = match how {
            Acquire::Take => self.store.take_lease(&mut taken, &self.worker_id).await,
            Acquire::Assign => self.store.assign_lease(&mut taken, &self.worker_id).await,
        };
        let taken = match result {
            Ok(true) => taken,
            Ok(false) | Err(_) => match self.store.get_lease(&key).await {
                Ok(Some(stored))
                    if stored.is_owned_by(&self.worker_id)
                        && !stored.is_handoff_pending()
                        && stored.lease_counter > seen_counter =>
                {
                    info!(shard_id = %key, "take reported failure but had landed");
                    stored
                }
                _ => return result.map(|_| false),
            },
        };
        info!(shard_id = %taken.lease_key, counter = taken.lease_counter, ?how, "lease taken");
        let mut held = lock(&self.held);
        held.insert(key, Arc::new(HeldLease::new(taken, sent, self.config.renewal_interval)));
        self.publish_gauge(&held);
        Ok(true)
    }

    /// Asks the owner of `lease` (as read from the table) to hand it to this worker:
    /// true when the handoff was recorded. The lease is not held until the old owner
    /// completes it.
    pub(crate) async fn initiate_handoff(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let from = lease.lease_owner.clone();
        let started = self
            .store
            .initiate_graceful_lease_handoff(lease, &self.worker_id)
            .await?;
        if started {
            info!(shard_id = %lease.lease_key, from = ?from, "asked for a graceful handoff of the lease");
            metrics::lease_handoff("in", "requested");
        }
        Ok(started)
    }

    /// Writes a change to a held lease's checkpoint fields, fenced on its counter.
    /// `change` edits a copy of the current lease; returning `Err` from it aborts.
    ///
    /// A refused write is verified: when the stored lease is still ours, an earlier
    /// write of ours that reported failure had landed; the stored state is adopted,
    /// `change` is applied (and so validated) again on it, and the write is sent once
    /// more. A verification that fails is a retryable failure, not a lost lease.
    pub(crate) async fn update_checkpoint<E>(
        &self,
        held: &HeldLease,
        change: impl Fn(&mut Lease) -> Result<(), E>,
    ) -> Result<WriteOutcome, E> {
        if held.lost.is_cancelled() {
            return Ok(WriteOutcome::LeaseLost);
        }
        let mut guard = held.lease.lock().await;
        for _ in 0..2 {
            if held.lost.is_cancelled() {
                return Ok(WriteOutcome::LeaseLost);
            }
            let mut next = guard.clone();
            change(&mut next)?;
            let expected_counter = next.lease_counter;
            let sent = Instant::now();
            next.throughput_kbps = held.sample_throughput(sent).or(next.throughput_kbps);
            // A write never outlives the proof of ownership: past that point another
            // worker may own the lease, and this worker must already have stopped.
            let Some(provable) = self.provable_ownership_left(held) else {
                drop(guard);
                self.mark_lost(&held.shard_id, "not renewed within the failover time");
                return Ok(WriteOutcome::LeaseLost);
            };
            let timeout = self.config.lease_store_call_timeout.min(provable);
            let write = tokio::time::timeout(timeout, self.store.update_lease_checkpoint(&mut next)).await;
            let write = write.unwrap_or_else(|_| {
                Err(LeaseStoreError::Dependency {
                    message: format!("checkpoint write timed out after {timeout:?}"),
                    source: "lease store call timed out".into(),
                })
            });
            let outcome = match write {
                Ok(true) => WriteOutcome::Written,
                Ok(false) => match self.verify_refusal(&held.shard_id).await {
                    // The SDK may have retried a write that had already landed; then
                    // the item holds exactly what we wrote, one counter step later.
                    Verdict::StillOurs(stored)
                        if stored.lease_counter == expected_counter + 1
                            && stored.checkpoint == next.checkpoint
                            && stored.pending_checkpoint == next.pending_checkpoint
                            // Compared by presence: the store keeps milliseconds.
                            && stored.latest_start().is_some() == next.latest_start().is_some() =>
                    {
                        next = *stored;
                        WriteOutcome::Written
                    }
                    Verdict::StillOurs(stored) => {
                        debug!(
                            shard_id = %held.shard_id,
                            counter = stored.lease_counter,
                            "checkpoint refused but the lease is still ours; adopting the stored lease and writing again"
                        );
                        *guard = *stored;
                        continue;
                    }
                    Verdict::HandingOff(stored) => {
                        // The checkpoint owner still checkpoints during a handoff.
                        self.handoff_requested(held, &stored);
                        *guard = *stored;
                        continue;
                    }
                    Verdict::Lost => WriteOutcome::LeaseLost,
                    Verdict::Unknown(e) => WriteOutcome::Failed(e),
                },
                Err(e) => WriteOutcome::Failed(e),
            };
            match outcome {
                WriteOutcome::Written => {
                    *guard = next;
                    held.record_renewal(sent, self.config.renewal_interval);
                }
                WriteOutcome::LeaseLost => {
                    drop(guard);
                    self.mark_lost(&held.shard_id, "checkpoint refused: another worker holds the lease");
                }
                WriteOutcome::Failed(_) => {}
            }
            return Ok(outcome);
        }
        // Both attempts adopted a newer stored lease of ours: the lease keeps changing
        // under us, which only another process with our worker id could do.
        Ok(WriteOutcome::Failed(LeaseStoreError::Dependency {
            message: format!("lease {:?} changed twice during one checkpoint", held.shard_id),
            source: "concurrent writer with this worker id".into(),
        }))
    }

    /// Releases a held lease (graceful handoff): clears the owner so that any worker
    /// can take it at once. Only the lease period `held` stands for is released: when
    /// the lease was lost and taken again since, the newer period is left alone. The
    /// lease is no longer held afterwards, whatever happens.
    pub(crate) async fn release(&self, held: &Arc<HeldLease>) {
        let removed = {
            let mut map = lock(&self.held);
            let current = map.get(&held.shard_id).is_some_and(|h| Arc::ptr_eq(h, held));
            let removed = if current { map.remove(&held.shard_id) } else { None };
            self.publish_gauge(&map);
            removed
        };
        let Some(h) = removed else {
            debug!(shard_id = %held.shard_id, "not releasing a lease period that already ended");
            return;
        };
        h.lost.cancel();
        let shard_id = h.shard_id.as_str();
        let mut lease = h.lease.lock().await.clone();
        if !lease.is_handoff_pending() && !lease.checkpoint.is_shard_end() {
            if let Some(successor) = self.next_successor() {
                match self.store.assign_lease(&mut lease, &successor).await {
                    Ok(true) => {
                        info!(shard_id, to = %successor, "lease handed to a live worker");
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        debug!(shard_id, error = %ErrorChain(&e), "handing the lease to a live worker failed; releasing it")
                    }
                }
            }
        }
        let started = Instant::now();
        let mut result = self.store.evict_lease(&mut lease).await;
        // The second try fits in what is left of one call timeout, so that a release
        // stays bounded by it (a hung table is not waited for twice).
        let deadline = started + self.config.lease_store_call_timeout;
        if !matches!(result, Ok(true)) && Instant::now() < deadline {
            // Refused: a handoff may have begun since our last write (then this release
            // completes it), or an earlier write of ours landed unseen. Failed: the
            // outcome is unknown (a timeout). Either way the lease is read, and
            // released once more while it is still ours, so that it does not wait for
            // the failover time.
            let verdict = tokio::time::timeout_at(deadline, self.verify_refusal(shard_id))
                .await
                .unwrap_or_else(|_| {
                    Verdict::Unknown(LeaseStoreError::Dependency {
                        message: "no time left to verify the release".to_owned(),
                        source: "release bound".into(),
                    })
                });
            match verdict {
                Verdict::HandingOff(stored) | Verdict::StillOurs(stored) => {
                    lease = *stored;
                    if let Ok(again) = tokio::time::timeout_at(deadline, self.store.evict_lease(&mut lease)).await {
                        result = again;
                    }
                }
                Verdict::Lost if result.is_err() => {
                    debug!(
                        shard_id,
                        "a release that reported failure had landed, or another worker took the lease"
                    );
                    result = Ok(false);
                }
                Verdict::Lost | Verdict::Unknown(_) => {}
            }
        }
        match result {
            Ok(true) if lease.lease_owner.is_some() => {
                info!(shard_id, to = ?lease.lease_owner, "lease handed over");
                metrics::lease_handoff("out", "completed");
            }
            Ok(true) => info!(shard_id, "lease released"),
            Ok(false) => info!(shard_id, "lease not released: another worker holds it already"),
            Err(e) => {
                warn!(shard_id, error = %ErrorChain(&e), "lease release failed; it expires after the failover time")
            }
        }
    }

    /// The lease period currently held for `shard_id`, if any.
    #[cfg(test)]
    pub(crate) fn held_lease(&self, shard_id: &str) -> Option<Arc<HeldLease>> {
        lock(&self.held).get(shard_id).cloned()
    }

    /// From now on, released leases are assigned to these live workers (worker id and
    /// load), least loaded first, instead of being left unowned.
    pub(crate) fn hand_released_leases_to(&self, workers: Vec<(String, usize)>) {
        *lock(&self.successors) = workers;
    }

    /// Begins a graceful handoff of every held lease (not finished, not already being
    /// handed over) to the successors, least loaded first, as a worker shutting down
    /// does before it stops its consumers: the receivers notice at their next
    /// lease-taking pass and watch the leases while this worker goes on processing and
    /// renewing them; its release then completes each handoff, and the receiver starts
    /// within one poll. Returns how many handoffs began; a lease whose handoff could not
    /// begin is assigned or released at its release as before.
    pub(crate) async fn announce_handoffs(&self) -> usize {
        let held = self.held_leases();
        let begun = futures::future::join_all(held.iter().map(|h| async move {
            if h.lost.is_cancelled() {
                return false;
            }
            let mut guard = h.lease.lock().await;
            if guard.is_handoff_pending() || guard.checkpoint.is_shard_end() {
                return false;
            }
            let Some(to) = self.next_successor() else {
                return false;
            };
            let mut next = guard.clone();
            match self.store.initiate_graceful_lease_handoff(&mut next, &to).await {
                Ok(true) => {
                    info!(shard_id = %h.shard_id, to = %to, "handing the lease over; processing it until the handoff completes");
                    *guard = next;
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    debug!(shard_id = %h.shard_id, error = %ErrorChain(&e), "beginning a handoff failed; the lease is handed over at its release");
                    false
                }
            }
        }))
        .await;
        begun.into_iter().filter(|b| *b).count()
    }

    /// The least loaded successor, counted one lease more.
    fn next_successor(&self) -> Option<String> {
        let mut successors = lock(&self.successors);
        let next = successors.iter_mut().min_by_key(|(w, n)| (*n, w.clone()))?;
        next.1 += 1;
        Some(next.0.clone())
    }

    /// Releases every held lease, concurrently: bounded by one
    /// `lease_store_call_timeout` (plus the wait for a checkpoint write in flight, itself
    /// bounded by it), whatever the number of leases.
    pub(crate) async fn release_all(&self) {
        let held = self.held_leases();
        futures::future::join_all(held.iter().map(|h| self.release(h))).await;
    }
}

/// At most this many renewals are in flight at once, so that a worker holding
/// thousands of leases does not send them in one burst.
const MAX_CONCURRENT_RENEWALS: usize = 32;

/// How a lease is acquired.
#[derive(Debug, Clone, Copy)]
enum Acquire {
    /// Conditional on the counter: an unowned or expired lease, or one assigned to us.
    Take,
    /// Conditional on the owners only: ends a handoff to us that did not complete.
    Assign,
}

/// What a read shows after a conditional write to a held lease was refused.
#[derive(Debug)]
enum Verdict {
    /// The stored lease still names this worker as owner, with no handoff under way.
    StillOurs(Box<Lease>),
    /// The lease is being handed from this worker (its checkpoint owner) to another:
    /// this worker may still renew and checkpoint it until it completes the handoff.
    HandingOff(Box<Lease>),
    /// Another worker owns it, or it is gone.
    Lost,
    /// The read failed: the outcome is unknown, retry later.
    Unknown(LeaseStoreError),
}

/// What the taker remembers of a lease between passes, to judge expiry.
#[derive(Debug, Clone)]
struct Observation {
    counter: u64,
    owner: Option<String>,
    /// Since when, on this worker's clock, the counter counts as unchanged.
    since: Instant,
}

/// What one lease-taking pass should do.
#[derive(Debug, Default)]
pub(crate) struct TakePlan {
    /// Unowned and expired leases, and leases the table already gives this worker that
    /// it does not hold (assigned to it, or held by an earlier process with its id):
    /// taken with a write conditional on the counter.
    pub(crate) take: Vec<Lease>,
    /// Leases of live workers to ask for by a graceful handoff, to balance the load.
    pub(crate) steal: Vec<Lease>,
    /// Leases being handed to this worker that it does not yet watch.
    pub(crate) incoming: Vec<Lease>,
    /// Unowned and expired leases beyond this worker's share, with the live worker each
    /// is assigned to (the leader's job; empty for other workers).
    pub(crate) assign: Vec<(Lease, String)>,
    /// Leases of the most loaded live workers to hand to the least loaded ones (the
    /// leader's job, as the Java KCL 3.x's lease assignment: a graceful handoff).
    pub(crate) rebalance: Vec<(Lease, String)>,
    /// True when this pass takes or asks for leases for this worker: it reads the
    /// whole table again at the next pass, until it has its share.
    pub(crate) short: bool,
    /// True when no other live worker is known while several leases are free: other
    /// workers may be starting too, so takes stop at the first one another worker won,
    /// and the next pass, knowing the others, aims at the fair share.
    pub(crate) cautious: bool,
}

#[cfg(test)]
impl TakePlan {
    /// The leases to take and to ask for, in that order.
    fn all(self) -> Vec<Lease> {
        self.take.into_iter().chain(self.steal).collect()
    }
}

/// Decides which leases to take (the Java KCL's `DynamoDBLeaseTaker` arithmetic), as a
/// pure function of the table and this worker's observations, so it is unit-testable
/// with explicit instants.
#[derive(Debug, Default)]
pub(crate) struct LeaseTaker {
    observed: HashMap<String, Observation>,
    /// Whether this worker hands unowned and expired leases beyond its share to the
    /// other live workers (it is the leader).
    pub(crate) hand_out: bool,
    /// Whether this worker's last pass took or asked for leases.
    pub(crate) short: bool,
    /// Whether another worker (the leader) balances the fleet: then this one asks for
    /// leases only while it holds none.
    pub(crate) defer_balancing: bool,
    /// How many leases the last read of the table listed.
    pub(crate) table_size: usize,
    /// Leases this worker assigned to another worker, with the counter its write left:
    /// until that counter moves, the lease proves nothing about its owner being alive.
    assigned: HashMap<String, u64>,
    /// Leases this worker asked to be handed to another worker, with the receiver.
    handed: HashMap<String, String>,
}

/// Up to how many leases a table is small: every worker reads it whole at each pass
/// (one page, the cost of an owner-index query), judges expiry as precisely as the
/// leader, and balances itself; larger tables are balanced by the leader.
pub(crate) const SMALL_TABLE: usize = 100;

impl LeaseTaker {
    /// Records the table as read at `now`. A lease first seen unowned is available at
    /// once; one first seen owned by another worker gets a full failover time. A
    /// counter seen changed counts as unchanged since half a renewal interval before
    /// this read: the write that changed it was sent before `now`, and its writer stops
    /// using the lease a whole renewal interval before the failover time has passed
    /// since it sent its last successful write, so judging expiry from that moment
    /// leaves the writer half a renewal interval to notice (workers of one application
    /// share `failover_time` and `renewal_interval`), and a crashed worker's leases are
    /// taken about one failover time after its last write rather than after this read.
    fn observe(&mut self, leases: &[Lease], now: Instant, failover: Duration, renewal: Duration) {
        let present: HashSet<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        self.observed.retain(|k, _| present.contains(k.as_str()));
        let changed_since = now.checked_sub(renewal / 2).unwrap_or(now);
        for lease in leases {
            match self.observed.get_mut(&lease.lease_key) {
                Some(o) if o.counter == lease.lease_counter => {}
                Some(o) => {
                    *o = Observation {
                        counter: lease.lease_counter,
                        owner: lease.lease_owner.clone(),
                        since: changed_since,
                    }
                }
                None => {
                    let since = if lease.lease_owner.is_none() {
                        now.checked_sub(failover).unwrap_or(now)
                    } else {
                        now
                    };
                    self.observed.insert(
                        lease.lease_key.clone(),
                        Observation {
                            counter: lease.lease_counter,
                            owner: lease.lease_owner.clone(),
                            since,
                        },
                    );
                }
            }
        }
    }

    /// Records a read of the table outside a lease-taking pass (at shutdown).
    pub(crate) fn observe_table(&mut self, leases: &[Lease], now: Instant, config: &LeaseManagementConfig) {
        self.observe(leases, now, config.failover_time, config.renewal_interval);
    }

    /// The next moment after `after` at which a lease this worker does not hold expires,
    /// if nothing renews it first (by this worker's observations): a taking pass then
    /// finds a crashed worker's leases without waiting for the next regular pass.
    pub(crate) fn next_expiry(&self, held: &HashSet<String>, after: Instant, failover: Duration) -> Option<Instant> {
        self.observed
            .iter()
            .filter(|(key, o)| o.owner.is_some() && !held.contains(*key))
            .map(|(_, o)| o.since + failover)
            .filter(|at| *at > after)
            .min()
    }

    /// Notes that this worker assigned `lease` (as its write left it) to another worker.
    pub(crate) fn note_assigned(&mut self, lease: &Lease) {
        self.assigned.insert(lease.lease_key.clone(), lease.lease_counter);
    }

    /// Notes that this worker asked for `lease` to be handed to `to`: once the old
    /// owner completes the handoff, the lease counts as assigned to `to`, unproven
    /// until `to` writes it.
    pub(crate) fn note_handed(&mut self, lease: &Lease, to: &str) {
        self.handed.insert(lease.lease_key.clone(), to.to_owned());
    }

    /// True when `lease` shows its owner is alive: not expired, and its counter moved
    /// since this worker last assigned it.
    fn proves_owner_alive(&self, lease: &Lease, now: Instant, failover: Duration) -> bool {
        !self.is_expired(lease, now, failover) && self.assigned.get(&lease.lease_key) != Some(&lease.lease_counter)
    }

    /// The other workers that held unexpired leases at the last read, with how many.
    pub(crate) fn live_workers(&self, me: &str, now: Instant, failover: Duration) -> Vec<(String, usize)> {
        let mut load: HashMap<&str, usize> = HashMap::new();
        for o in self.observed.values() {
            if let Some(owner) = o.owner.as_deref() {
                if owner != me && now.saturating_duration_since(o.since) < failover {
                    *load.entry(owner).or_default() += 1;
                }
            }
        }
        load.into_iter().map(|(w, n)| (w.to_owned(), n)).collect()
    }

    /// When the counter of `lease_key` was last seen to change (or first seen).
    pub(crate) fn unchanged_since(&self, lease_key: &str, counter: u64) -> Option<Instant> {
        self.observed
            .get(lease_key)
            .filter(|o| o.counter == counter)
            .map(|o| o.since)
    }

    fn is_expired(&self, lease: &Lease, now: Instant, failover: Duration) -> bool {
        if lease.lease_owner.is_none() {
            return true;
        }
        self.observed
            .get(&lease.lease_key)
            .is_some_and(|o| o.owner == lease.lease_owner && now.saturating_duration_since(o.since) >= failover)
    }

    /// What this worker should do now (the Java KCL's algorithm): count the active
    /// workers (owners of unexpired leases, this one included), aim for a fair share
    /// `ceil(leases / workers)` capped by `max_leases_for_worker`, take expired or
    /// unowned leases first, and only when there are none ask the most loaded worker
    /// for a handoff, at most `max_leases_to_steal_at_one_time` per pass. A worker one
    /// lease short of the target does not steal from one that is exactly at it, so
    /// workers converge without trading leases back and forth. Finished (`SHARD_END`)
    /// leases are neither counted nor taken. `held` are the leases this worker holds or
    /// is receiving by a handoff.
    pub(crate) fn leases_to_take(
        &mut self,
        leases: &[Lease],
        worker_id: &str,
        held: &HashSet<String>,
        now: Instant,
        config: &LeaseManagementConfig,
    ) -> TakePlan {
        self.observe(leases, now, config.failover_time, config.renewal_interval);
        let live: Vec<&Lease> = leases.iter().filter(|l| !l.checkpoint.is_shard_end()).collect();
        let failover = config.failover_time;
        // A handoff this worker asked for that the old owner completed moved the
        // counter, but proves nothing about the new owner: it is unproven until the new
        // owner writes the lease itself.
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let assigned = &mut self.assigned;
        self.handed.retain(|key, to| match by_key.get(key.as_str()) {
            Some(l) if l.is_owned_by(to) && l.is_handoff_pending() => true,
            Some(l) if l.is_owned_by(to) => {
                assigned.insert(key.clone(), l.lease_counter);
                false
            }
            _ => false,
        });
        self.assigned
            .retain(|key, counter| self.observed.get(key).is_some_and(|o| o.counter == *counter));
        // Only large tables are balanced by the leader: in a small one every worker
        // reads the whole table each pass and balances itself.
        let leader_balances = live.len() > SMALL_TABLE;
        // Workers that showed they are alive; a worker known only through leases this
        // one assigned to it (and that it never touched) is not counted, so a dead
        // worker is not given the same leases again and again.
        // A worker with a lease that expired is taken for dead: its other leases expire
        // within moments, and handing it more would only delay them.
        let suspect: HashSet<&str> = live
            .iter()
            .filter(|l| l.lease_owner.as_deref() != Some(worker_id) && self.is_expired(l, now, failover))
            .filter_map(|l| l.lease_owner.as_deref())
            .collect();
        // The worker that writes a lease is the one it proves alive: during a handoff,
        // the old owner (its checkpoint owner) renews it.
        let alive: HashSet<&str> = live
            .iter()
            .filter(|l| self.proves_owner_alive(l, now, failover))
            .filter_map(|l| l.actual_owner())
            .filter(|o| !suspect.contains(o))
            .collect();
        let mut plan = TakePlan::default();
        let mut expired = Vec::new();
        let mut load: HashMap<&str, usize> = HashMap::new();
        load.insert(worker_id, 0);
        // The same, weighed by throughput (used when balancing by throughput).
        let weigh = Weigher::new(&live);
        let mut weighed: HashMap<&str, f64> = HashMap::new();
        weighed.insert(worker_id, 0.0);
        for lease in &live {
            let counted_for = if held.contains(&lease.lease_key) {
                Some(worker_id)
            } else if self.is_expired(lease, now, failover) {
                expired.push((*lease).clone());
                None
            } else if lease.is_owned_by(worker_id) {
                // Given to this worker (by a handoff, an assignment, or an earlier
                // process with its id): it counts as ours.
                if lease.is_handoff_pending() {
                    plan.incoming.push((*lease).clone());
                } else {
                    plan.take.push((*lease).clone());
                }
                Some(worker_id)
            } else {
                lease.lease_owner.as_deref().filter(|o| alive.contains(o))
            };
            if let Some(owner) = counted_for {
                *load.entry(owner).or_default() += 1;
                *weighed.entry(owner).or_default() += weigh.weight(lease);
            }
        }
        let workers = load.len();
        plan.cautious = workers == 1 && expired.len() > 1;
        if config.lease_balancing == LeaseBalancing::Throughput {
            let mine = load.get(worker_id).copied().unwrap_or(0);
            let context = Weighed {
                live: &live,
                alive: &alive,
                me: worker_id,
                weigh: &weigh,
                room: config.max_leases_for_worker.saturating_sub(mine),
            };
            let defer = self.defer_balancing && leader_balances && mine > 0;
            context.plan(
                &mut plan,
                weighed,
                expired,
                self.hand_out,
                leader_balances,
                defer,
                config,
            );
            plan.short = !plan.take.is_empty() || !plan.steal.is_empty();
            return plan;
        }
        let target = live.len().div_ceil(workers).min(config.max_leases_for_worker);
        let mine = load.get(worker_id).copied().unwrap_or(0);
        let needed = target.saturating_sub(mine);
        use rand::seq::SliceRandom;
        if !expired.is_empty() {
            // Shuffled so that workers starting together spread over the table
            // instead of racing for the same keys.
            expired.shuffle(&mut rand::rng());
            let rest = expired.split_off(needed.min(expired.len()));
            plan.short = !expired.is_empty();
            plan.take.extend(expired);
            if self.hand_out {
                plan.assign = hand_out(rest, &load, worker_id);
            }
            return plan;
        }
        if self.hand_out && leader_balances {
            plan.rebalance = rebalance(&live, &load, &alive, worker_id);
            return plan;
        }
        // With a leader balancing the fleet, a worker asks for leases itself only while
        // it has none (the leader does not know of it yet).
        if needed == 0 || (self.defer_balancing && leader_balances && mine > 0) {
            return plan;
        }
        let Some((victim, victim_load)) = load
            .iter()
            .filter(|(w, _)| **w != worker_id)
            .max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w)))
            .map(|(w, n)| (w.to_string(), *n))
        else {
            return plan;
        };
        let threshold = if needed > 1 { target } else { target + 1 };
        if victim_load < threshold {
            return plan;
        }
        // One lease from a worker exactly at the target when this one needs more than
        // one (as the Java KCL does): otherwise a worker could stay two short forever.
        let over = (victim_load - target).max(usize::from(needed > 1));
        let steal = needed.min(over).min(config.max_leases_to_steal_at_one_time);
        // A lease already being handed over cannot be asked for again.
        let mut theirs: Vec<Lease> = live
            .iter()
            .filter(|l| l.is_owned_by(&victim) && !l.is_handoff_pending())
            .map(|l| (*l).clone())
            .collect();
        theirs.shuffle(&mut rand::rng());
        theirs.truncate(steal);
        if !theirs.is_empty() {
            info!(victim = %victim, count = theirs.len(), target, "asking for leases to balance load");
        }
        plan.short = !theirs.is_empty();
        plan.steal = theirs;
        plan
    }
}

/// How much more than the mean throughput a worker may carry before leases are moved
/// from it (balancing by throughput): measurements move, and a move costs a handoff.
const THROUGHPUT_TOLERANCE: f64 = 0.1;

/// The weight of a lease when balancing by throughput: its `throughputKBps`, at least a
/// twentieth of the mean of the leases that have one (an idle shard still costs a
/// consumer); a lease without one weighs the mean. With no throughput known at all,
/// every lease weighs 1 and balancing counts leases.
#[derive(Debug)]
struct Weigher {
    mean: f64,
}

impl Weigher {
    fn new(live: &[&Lease]) -> Self {
        let known: Vec<f64> = live
            .iter()
            .filter_map(|l| l.throughput_kbps)
            .filter(|t| *t > 0.0)
            .collect();
        #[allow(clippy::cast_precision_loss)] // a count of leases
        let mean = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        Self { mean }
    }

    fn weight(&self, lease: &Lease) -> f64 {
        lease
            .throughput_kbps
            .filter(|t| *t > 0.0)
            .map_or(self.mean, |t| t.max(self.mean / 20.0))
    }
}

/// One pass's view of the fleet when balancing by throughput.
struct Weighed<'a> {
    live: &'a [&'a Lease],
    alive: &'a HashSet<&'a str>,
    me: &'a str,
    weigh: &'a Weigher,
    /// How many more leases this worker may hold (`max_leases_for_worker`).
    room: usize,
}

impl<'a> Weighed<'a> {
    /// Fills `plan` as [`LeaseTaker::leases_to_take`] does, with loads weighed by
    /// throughput: unowned and expired leases are taken until this worker carries the
    /// mean (the leader hands the rest to the least loaded); with none, a lease moves by
    /// a graceful handoff from a worker carrying more than the mean plus
    /// [`THROUGHPUT_TOLERANCE`] to the least loaded (this worker, or for the leader of
    /// a large table any worker) when that lowers the higher of the two loads.
    #[allow(clippy::too_many_arguments)]
    fn plan(
        &self,
        plan: &mut TakePlan,
        mut load: HashMap<&'a str, f64>,
        mut expired: Vec<Lease>,
        hand_out: bool,
        leader_balances: bool,
        defer: bool,
        config: &LeaseManagementConfig,
    ) {
        use rand::seq::SliceRandom;
        let total: f64 = self.live.iter().map(|l| self.weigh.weight(l)).sum();
        #[allow(clippy::cast_precision_loss)] // a count of workers
        let mean = total / load.len() as f64;
        let ceiling = mean * (1.0 + THROUGHPUT_TOLERANCE);
        let mut mine = load.get(self.me).copied().unwrap_or(0.0);
        if !expired.is_empty() {
            expired.shuffle(&mut rand::rng());
            let mut rest = Vec::new();
            for lease in expired {
                if mine < mean && plan.take.len() < self.room {
                    mine += self.weigh.weight(&lease);
                    plan.take.push(lease);
                } else {
                    rest.push(lease);
                }
            }
            if hand_out {
                load.insert(self.me, mine);
                plan.assign = self.hand_out(rest, &load);
            }
            return;
        }
        if hand_out && leader_balances {
            plan.rebalance = self.moves(&mut load, None, (self.live.len() / 20).max(1), ceiling);
        } else if mine < mean && !defer && self.room > 0 {
            let moves = self.moves(
                &mut load,
                Some(self.me),
                config.max_leases_to_steal_at_one_time.min(self.room),
                ceiling,
            );
            plan.steal = moves.into_iter().map(|(lease, _)| lease).collect();
        }
    }

    /// Up to `cap` moves, each of one lease (not already being handed over) from the
    /// most loaded live worker, when it carries more than `ceiling`, to `to` (or the
    /// least loaded): the lease that best evens the two out among those that lower
    /// the higher of their loads.
    fn moves(
        &self,
        load: &mut HashMap<&'a str, f64>,
        to: Option<&'a str>,
        cap: usize,
        ceiling: f64,
    ) -> Vec<(Lease, String)> {
        let mut movable: HashMap<&str, Vec<&Lease>> = HashMap::new();
        for lease in self.live {
            if let Some(owner) = lease.lease_owner.as_deref() {
                if !lease.is_handoff_pending() && (owner == self.me || self.alive.contains(owner)) {
                    movable.entry(owner).or_default().push(lease);
                }
            }
        }
        let mut moves = Vec::new();
        while moves.len() < cap {
            let most = load
                .iter()
                .filter(|(w, _)| Some(**w) != to)
                .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(w, n)| (*w, *n));
            let fewest = match to {
                Some(me) => Some((me, load.get(me).copied().unwrap_or(0.0))),
                None => load
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(b.1).then_with(|| a.0.cmp(b.0)))
                    .map(|(w, n)| (*w, *n)),
            };
            let (Some((giver, high)), Some((taker, low))) = (most, fewest) else {
                break;
            };
            if giver == taker || high <= ceiling {
                break;
            }
            let gap = high - low;
            let Some(candidates) = movable.get_mut(giver) else {
                break;
            };
            let best = candidates
                .iter()
                .enumerate()
                .map(|(i, l)| (i, self.weigh.weight(l)))
                .filter(|(_, w)| *w < gap)
                .min_by(|a, b| (a.1 - gap / 2.0).abs().total_cmp(&(b.1 - gap / 2.0).abs()));
            let Some((index, weight)) = best else {
                break;
            };
            let lease = candidates.swap_remove(index);
            load.insert(giver, high - weight);
            load.insert(taker, low + weight);
            moves.push((lease.clone(), taker.to_owned()));
        }
        if !moves.is_empty() {
            info!(
                moves = moves.len(),
                mean = ceiling / (1.0 + THROUGHPUT_TOLERANCE),
                "moving leases to balance throughput"
            );
        }
        moves
    }

    /// Assigns `leases` one by one to the least loaded live worker other than this one.
    fn hand_out(&self, leases: Vec<Lease>, load: &HashMap<&str, f64>) -> Vec<(Lease, String)> {
        let mut others: Vec<(&str, f64)> = load
            .iter()
            .filter(|(w, _)| **w != self.me)
            .map(|(w, n)| (*w, *n))
            .collect();
        others.sort_by(|a, b| a.0.cmp(b.0));
        let mut out = Vec::new();
        for lease in leases {
            let Some(least) = others.iter_mut().min_by(|a, b| a.1.total_cmp(&b.1)) else {
                break;
            };
            least.1 += self.weigh.weight(&lease);
            out.push((lease, least.0.to_owned()));
        }
        out
    }
}

/// Assigns `leases` one by one to the least loaded live worker other than `me` (ties
/// to the first name); none when there is no other live worker.
fn hand_out(leases: Vec<Lease>, load: &HashMap<&str, usize>, me: &str) -> Vec<(Lease, String)> {
    let mut others: std::collections::BTreeMap<(usize, String), ()> = load
        .iter()
        .filter(|(w, _)| **w != me)
        .map(|(w, n)| ((*n, (*w).to_owned()), ()))
        .collect();
    let mut out = Vec::new();
    for lease in leases {
        let Some(((n, worker), ())) = others.pop_first() else {
            break;
        };
        out.push((lease, worker.clone()));
        others.insert((n + 1, worker), ());
    }
    out
}

/// The leader's balancing moves: while the most loaded live worker holds more than
/// the fair share rounded up and the least loaded fewer than rounded down, one of the
/// former's leases (not already being handed over) goes to the latter; at most one
/// move per 20 leases of the table per pass.
fn rebalance(live: &[&Lease], load: &HashMap<&str, usize>, alive: &HashSet<&str>, me: &str) -> Vec<(Lease, String)> {
    let workers = load.len();
    if workers < 2 {
        return Vec::new();
    }
    let (floor, ceil) = (live.len() / workers, live.len().div_ceil(workers));
    let mut movable: HashMap<&str, Vec<&Lease>> = HashMap::new();
    for lease in live {
        if let Some(owner) = lease.lease_owner.as_deref() {
            if !lease.is_handoff_pending() && (owner == me || alive.contains(owner)) {
                movable.entry(owner).or_default().push(lease);
            }
        }
    }
    let mut by_load: std::collections::BTreeSet<(usize, &str)> = load.iter().map(|(w, n)| (*n, *w)).collect();
    let mut moves = Vec::new();
    let cap = (live.len() / 20).max(1);
    while moves.len() < cap {
        let (Some(&(most, giver)), Some(&(fewest, taker))) = (by_load.last(), by_load.first()) else {
            break;
        };
        if most <= ceil || fewest >= floor || giver == taker {
            break;
        }
        let Some(lease) = movable.get_mut(giver).and_then(Vec::pop) else {
            break;
        };
        by_load.remove(&(most, giver));
        by_load.remove(&(fewest, taker));
        by_load.insert((most - 1, giver));
        by_load.insert((fewest + 1, taker));
        moves.push((lease.clone(), taker.to_owned()));
    }
    if !moves.is_empty() {
        info!(
            moves = moves.len(),
            floor, ceil, "handing leases from the most to the least loaded workers"
        );
    }
    moves
}

/// Deletes finished leases once nothing can need them (the Java KCL's
/// `LeaseCleanupManager`): a lease at `SHARD_END` whose children have all started, and
/// that has stayed so, with its counter unchanged, for `completed_lease_cleanup_delay`
/// on this worker's clock. A finished lease still owned by a worker (one that died
/// between its `SHARD_END` checkpoint and its release) waits at least the failover time
/// too, as an expired lease would.
///
/// A child has started when its lease checkpointed past its initial position, or when
/// its lease is gone because it was finished and cleaned up itself: then a lease of the
/// next generation names it as a parent and has started or finished. A child whose lease
/// does not exist yet (and that no started lease descends from) keeps the parent, so a
/// child created later still waits for it. Children no longer wait on a deleted parent,
/// and the shard sync does not recreate a lease for a shard whose descendant has one, so
/// a deleted parent is never read again.
#[derive(Debug, Default)]
pub(crate) struct LeaseCleanup {
    /// Per eligible lease: its counter, and since when it was seen eligible with it.
    eligible_since: HashMap<String, (u64, Instant)>,
    /// Per lease of a stream no longer consumed: its counter, and since when it was
    /// seen with it.
    former_since: HashMap<String, (u64, Instant)>,
}

impl LeaseCleanup {
    pub(crate) fn leases_to_delete(
        &mut self,
        leases: &[Lease],
        now: Instant,
        delay: Duration,
        failover: Duration,
    ) -> Vec<Lease> {
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let progressed = |l: &Lease| l.checkpoint.is_shard_end() || !l.checkpoint.checkpoint.is_initial_position();
        // The parents (as lease keys: parents and children are named by shard id, in
        // the lease's stream) named by leases that started or finished.
        let parents_of_progressed: HashSet<String> = leases
            .iter()
            .filter(|l| progressed(l))
            .flat_map(|l| l.parent_shard_ids.iter().map(|p| l.related_lease_key(p)))
            .collect();
        let started = |c: &str| match by_key.get(c) {
            Some(l) => !l.checkpoint.checkpoint.is_initial_position(),
            // Cleaned up after it finished: a started lease of the next generation
            // names it as its parent.
            None => parents_of_progressed.contains(c),
        };
        let mut out = Vec::new();
        let mut eligible = HashSet::new();
        for lease in leases {
            if !lease.checkpoint.is_shard_end() {
                continue;
            }
            let mut children: Vec<String> = lease
                .child_shard_ids
                .iter()
                .map(|c| lease.related_lease_key(c))
                .collect();
            if children.is_empty() {
                children = leases
                    .iter()
                    .filter(|l| l.stream_name == lease.stream_name && l.parent_shard_ids.contains(lease.shard()))
                    .map(|l| l.lease_key.clone())
                    .collect();
            }
            if children.is_empty() || !children.iter().all(|c| started(c)) {
                continue;
            }
            eligible.insert(lease.lease_key.clone());
            let since = unchanged_since(&mut self.eligible_since, lease, now);
            let wait = if lease.lease_owner.is_some() {
                delay.max(failover)
            } else {
                delay
            };
            if now.saturating_duration_since(since) >= wait {
                out.push(lease.clone());
            }
        }
        self.eligible_since.retain(|k, _| eligible.contains(k));
        out
    }

    /// The leases of streams no longer consumed (`consumed` says false) that nobody
    /// has written for `delay`: a lease still renewed by a worker whose tracker lists
    /// its stream starts the wait again at each write.
    pub(crate) fn former_stream_leases_to_delete(
        &mut self,
        leases: &[Lease],
        consumed: impl Fn(&Lease) -> bool,
        now: Instant,
        delay: Duration,
    ) -> Vec<Lease> {
        let mut out = Vec::new();
        let mut former = HashSet::new();
        for lease in leases.iter().filter(|l| !consumed(l)) {
            former.insert(lease.lease_key.clone());
            if now.saturating_duration_since(unchanged_since(&mut self.former_since, lease, now)) >= delay {
                out.push(lease.clone());
            }
        }
        self.former_since.retain(|k, _| former.contains(k));
        out
    }
}

/// Since when `lease` has been seen with its current counter (`now` for a lease not
/// seen before or written since), recorded in `seen`.
fn unchanged_since(seen: &mut HashMap<String, (u64, Instant)>, lease: &Lease, now: Instant) -> Instant {
    let entry = seen
        .entry(lease.lease_key.clone())
        .or_insert((lease.lease_counter, now));
    if entry.0 != lease.lease_counter {
        *entry = (lease.lease_counter, now);
    }
    entry.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::ExtendedSequenceNumber;

    #[test]
    fn former_stream_leases_are_deleted_only_after_nobody_wrote_them_for_the_delay() {
        let mut cleanup = LeaseCleanup::default();
        let mut gone = lease("1:old:1:shardId-000000000000", None, 5);
        gone.stream_name = Some("1:old:1".into());
        let mut renewed = lease("1:old:1:shardId-000000000001", Some("stale-worker"), 7);
        renewed.stream_name = Some("1:old:1".into());
        let mut kept = lease("1:new:1:shardId-000000000000", Some("w"), 3);
        kept.stream_name = Some("1:new:1".into());
        let consumed = |l: &Lease| l.stream_name.as_deref() == Some("1:new:1");
        let delay = Duration::from_secs(10);
        let t0 = Instant::now();
        let all = [gone.clone(), renewed.clone(), kept.clone()];
        assert!(cleanup
            .former_stream_leases_to_delete(&all, consumed, t0, delay)
            .is_empty());
        // A worker whose tracker still lists the stream renews one lease meanwhile.
        renewed.lease_counter += 1;
        let all = [gone.clone(), renewed.clone(), kept.clone()];
        let t1 = t0 + Duration::from_secs(6);
        assert!(cleanup
            .former_stream_leases_to_delete(&all, consumed, t1, delay)
            .is_empty());
        let t2 = t0 + Duration::from_secs(11);
        assert_eq!(
            keys(cleanup.former_stream_leases_to_delete(&all, consumed, t2, delay)),
            [gone.lease_key.clone()]
        );
        let t3 = t1 + Duration::from_secs(10);
        assert_eq!(
            keys(cleanup.former_stream_leases_to_delete(&all, consumed, t3, delay)),
            [gone.lease_key.clone(), renewed.lease_key.clone()]
        );
    }

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut l = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
        l.lease_owner = owner.map(str::to_owned);
        l.lease_counter = counter;
        l
    }

    fn keys(mut v: Vec<Lease>) -> Vec<String> {
        let mut k: Vec<String> = v.drain(..).map(|l| l.lease_key).collect();
        k.sort();
        k
    }

    fn none() -> HashSet<String> {
        HashSet::new()
    }

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn the_next_expiry_is_the_earliest_stalled_lease_of_another_worker_still_to_come() {
        let cfg = LeaseManagementConfig::default();
        let failover = cfg.failover_time;
        let mut taker = LeaseTaker::default();
        let t0 = Instant::now();
        let table = vec![
            lease("a", Some("other"), 5),
            lease("mine", Some("me"), 1),
            lease("free", None, 0),
        ];
        taker.leases_to_take(&table, "me", &set(&["mine"]), t0, &cfg).all();
        // "a" expires a failover time after it was first seen; held and free leases never.
        assert_eq!(taker.next_expiry(&set(&["mine"]), t0, failover), Some(t0 + failover));
        // "b" seen later, "a" renewed later still: "b" is next.
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t0 + Duration::from_secs(5);
        taker
            .leases_to_take(
                &[table[0].clone(), lease("b", Some("other"), 1)],
                "me",
                &none(),
                t1,
                &cfg,
            )
            .all();
        taker
            .leases_to_take(
                &[lease("a", Some("other"), 6), lease("b", Some("other"), 1)],
                "me",
                &none(),
                t2,
                &cfg,
            )
            .all();
        // "a" changed between the reads at t1 and t2 = t0 + 5 s: it counts as unchanged
        // since t2 - half a renewal interval.
        let a_since = t2 - cfg.renewal_interval / 2;
        assert!(a_since > t1);
        assert_eq!(taker.next_expiry(&none(), t2, failover), Some(t1 + failover));
        // Once that moment has passed, it is not the next one any more (no busy loop on a
        // lease this worker does not take).
        assert_eq!(
            taker.next_expiry(&none(), t1 + failover, failover),
            Some(a_since + failover)
        );
        assert_eq!(taker.next_expiry(&none(), a_since + failover, failover), None);
    }

    #[test]
    fn a_renewal_seen_by_a_read_counts_from_half_a_renewal_interval_before_it() {
        let cfg = LeaseManagementConfig::default(); // failover 10 s, renewal 3.33 s
        let mut taker = LeaseTaker::default();
        let t0 = Instant::now();
        taker.leases_to_take(&[lease("a", Some("other"), 5)], "me", &none(), t0, &cfg);
        assert_eq!(taker.unchanged_since("a", 5), Some(t0), "first seen: from the read");
        let t1 = t0 + Duration::from_secs(8);
        taker.leases_to_take(&[lease("a", Some("other"), 6)], "me", &none(), t1, &cfg);
        assert_eq!(taker.unchanged_since("a", 6), Some(t1 - cfg.renewal_interval / 2));
        assert_eq!(taker.unchanged_since("a", 5), None, "another counter");
        // So the lease expires a failover time after that, not after t1.
        let at = t1 - cfg.renewal_interval / 2 + cfg.failover_time;
        let table = [lease("a", Some("other"), 6)];
        assert!(taker
            .leases_to_take(&table, "me", &none(), at - Duration::from_millis(1), &cfg)
            .all()
            .is_empty());
        assert_eq!(keys(taker.leases_to_take(&table, "me", &none(), at, &cfg).all()), ["a"]);
    }

    #[test]
    fn leases_given_to_this_worker_are_taken_and_handoffs_to_it_are_watched() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let now = Instant::now();
        let mut incoming = lease("in", Some("me"), 4);
        incoming.checkpoint_owner = Some("other".into());
        let table = vec![
            lease("given", Some("me"), 2),
            incoming,
            lease("theirs", Some("other"), 1),
        ];
        let plan = taker.leases_to_take(&table, "me", &none(), now, &cfg);
        assert_eq!(keys(plan.take), ["given"]);
        assert_eq!(keys(plan.incoming), ["in"]);
        assert!(plan.steal.is_empty(), "two of three leases are already coming to me");
    }

    #[test]
    fn balancing_asks_for_a_handoff_and_never_for_a_lease_already_being_handed_over() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let now = Instant::now();
        let mut table = owned("a", "a", 4);
        for l in &mut table[..3] {
            l.lease_owner = Some("x".into());
            l.checkpoint_owner = Some("a".into());
        }
        // a still processes a0..a2 but they are being handed to x; a3 is a's alone.
        let mut table2 = table.clone();
        table2.extend(owned("b", "b", 4));
        let plan = taker.leases_to_take(&table2, "c", &none(), now, &cfg);
        assert!(plan.take.is_empty());
        assert_eq!(plan.steal.len(), 1);
        assert_eq!(
            plan.steal[0].lease_owner.as_deref(),
            Some("b"),
            "b is the most loaded owner"
        );
        // Only a's lease without a handoff could be asked for from a.
        let mut table3 = table;
        table3.extend(owned("x", "x", 1));
        let plan = LeaseTaker::default().leases_to_take(&table3, "c", &none(), now, &cfg);
        assert_eq!(
            keys(plan.steal),
            ["x0"],
            "x is the most loaded (4), but three are in handoff"
        );
    }

    #[test]
    fn the_leader_takes_its_share_of_a_dead_workers_leases_and_hands_the_rest_to_the_least_loaded() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let t0 = Instant::now();
        // me 2, b 2, c 1, dead 4: 9 leases, 3 live workers, target 3.
        let mut table = owned("me", "me", 2);
        table.extend(owned("b", "b", 2));
        table.extend(owned("c", "c", 1));
        table.extend(owned("dead", "dead", 4));
        let held = set(&["me0", "me1"]);
        taker.leases_to_take(&table, "me", &held, t0, &cfg);
        // The counters of me, b and c move; dead's do not.
        for l in &mut table {
            if l.lease_owner.as_deref() != Some("dead") {
                l.lease_counter += 1;
            }
        }
        let plan = taker.leases_to_take(&table, "me", &held, t0 + cfg.failover_time, &cfg);
        assert_eq!(plan.take.len(), 1, "one for me, up to my share of 3");
        let mut given: Vec<&str> = plan.assign.iter().map(|(_, w)| w.as_str()).collect();
        given.sort_unstable();
        assert_eq!(given, ["b", "c", "c"], "c had 1, b 2: c gets two, b one");
        // A worker that is not the leader hands nothing out.
        let mut follower = LeaseTaker::default();
        follower.leases_to_take(&table, "b", &set(&["b0", "b1"]), t0, &cfg);
        let plan = follower.leases_to_take(&table, "b", &set(&["b0", "b1"]), t0 + cfg.failover_time * 2, &cfg);
        assert!(plan.assign.is_empty());
        assert!(plan.short);
    }

    #[test]
    fn a_worker_known_only_through_leases_the_leader_assigned_to_it_is_not_given_more() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let t0 = Instant::now();
        // The leader assigned x to "gone", which never touched it; y is unowned.
        let mut x = lease("x", Some("gone"), 7);
        taker.leases_to_take(
            &[x.clone(), lease("me0", Some("me"), 1)],
            "me",
            &set(&["me0"]),
            t0,
            &cfg,
        );
        x.lease_counter = 8;
        taker.note_assigned(&x);
        let table = vec![x.clone(), lease("me0", Some("me"), 1), lease("y", None, 0)];
        let t1 = t0 + Duration::from_secs(1);
        let plan = taker.leases_to_take(&table, "me", &set(&["me0"]), t1, &cfg);
        assert_eq!(
            keys(plan.take),
            ["y"],
            "gone does not count: the leader's share is everything"
        );
        assert!(plan.assign.is_empty(), "nothing for gone");
        // Once gone writes x itself, it counts again.
        x.lease_counter = 9;
        let table = vec![x, lease("me0", Some("me"), 1), lease("y", Some("me"), 1)];
        let plan = taker.leases_to_take(&table, "me", &set(&["me0", "y"]), t1, &cfg);
        assert!(plan.take.is_empty() && !plan.short, "3 leases, 2 workers: 2 are enough");
    }

    #[test]
    fn the_leader_moves_leases_from_the_most_to_the_least_loaded_by_handoff() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let now = Instant::now();
        // 120 leases: a 60, b 40, me 16, c 4: share 30 each.
        let mut table = owned("a", "a", 60);
        table.extend(owned("b", "b", 40));
        table.extend(owned("me", "me", 16));
        table.extend(owned("c", "c", 4));
        table[0].checkpoint_owner = Some("x".into()); // a0 is already being handed over
        let held: HashSet<String> = (0..16).map(|i| format!("me{i}")).collect();
        let plan = taker.leases_to_take(&table, "me", &held, now, &cfg);
        assert!(plan.take.is_empty() && plan.steal.is_empty());
        assert_eq!(plan.rebalance.len(), 6, "at most one move per 20 leases per pass");
        for (lease, to) in &plan.rebalance {
            assert_eq!(lease.lease_owner.as_deref(), Some("a"), "from the most loaded");
            assert_ne!(lease.lease_key, "a0", "not a lease already being handed over");
            assert!(to == "c" || to == "me", "to the least loaded: {to}");
        }
        // Balanced within one lease: nothing moves.
        let mut table = owned("a", "a", 41);
        table.extend(owned("b", "b", 40));
        table.extend(owned("me", "me", 40));
        let held: HashSet<String> = (0..40).map(|i| format!("me{i}")).collect();
        let plan = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        }
        .leases_to_take(&table, "me", &held, now, &cfg);
        assert!(plan.rebalance.is_empty());
        // A small table is not balanced by the leader: every worker balances itself.
        let mut table = owned("a", "a", 20);
        table.extend(owned("me", "me", 2));
        let held = set(&["me0", "me1"]);
        let plan = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        }
        .leases_to_take(&table, "me", &held, now, &cfg);
        assert!(plan.rebalance.is_empty());
        assert_eq!(plan.steal.len(), 1, "asks for one itself");
    }

    #[test]
    fn a_handoff_the_leader_asked_for_proves_nothing_about_the_receiver_until_it_writes() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let t0 = Instant::now();
        let mut table = owned("me", "me", 100);
        table.extend(owned("a", "a", 3));
        table.push(lease("x0", None, 1));
        let held: HashSet<String> = (0..100).map(|i| format!("me{i}")).collect();
        taker.leases_to_take(&table, "me", &held, t0, &cfg);
        taker.note_handed(&table[100], "dead");
        // a completes the handoff to "dead" (a worker that died meanwhile): the counter
        // moves, but by a's write.
        table[100].lease_owner = Some("dead".into());
        table[100].lease_counter += 2;
        let t1 = t0 + Duration::from_secs(1);
        let plan = taker.leases_to_take(&table, "me", &held, t1, &cfg);
        let live = taker.live_workers("me", t1, cfg.failover_time);
        assert!(live.iter().any(|(w, _)| w == "dead"), "recently written: {live:?}");
        assert!(
            plan.assign.iter().all(|(_, w)| w != "dead"),
            "not given x0: {:?}",
            plan.assign
        );
        // Once it writes the lease itself, it is alive.
        table[100].lease_counter += 1;
        let plan = taker.leases_to_take(&table, "me", &held, t1 + Duration::from_secs(1), &cfg);
        let given: Vec<&str> = plan.assign.iter().map(|(_, w)| w.as_str()).collect();
        assert_eq!(given, ["dead"], "now the least loaded");
    }

    #[test]
    fn a_worker_with_an_expired_lease_is_not_handed_leases() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let t0 = Instant::now();
        // "dying" wrote d1 a moment after d0; "b" keeps writing.
        let mut table = vec![
            lease("me0", Some("me"), 1),
            lease("me1", Some("me"), 1),
            lease("b0", Some("b"), 1),
            lease("b1", Some("b"), 1),
            lease("d0", Some("dying"), 5),
            lease("d1", Some("dying"), 5),
        ];
        let held = set(&["me0", "me1"]);
        taker.leases_to_take(&table, "me", &held, t0, &cfg);
        table[5].lease_counter = 6;
        table[2].lease_counter = 2;
        table[3].lease_counter = 2;
        let t1 = t0 + Duration::from_secs(2);
        taker.leases_to_take(&table, "me", &held, t1, &cfg);
        // d0 has expired, d1 not yet: dying wrote recently and is the least loaded, but
        // is not handed d0.
        table[2].lease_counter = 3;
        table[3].lease_counter = 3;
        let plan = taker.leases_to_take(&table, "me", &held, t0 + cfg.failover_time, &cfg);
        let given: Vec<(&str, &str)> = plan
            .assign
            .iter()
            .map(|(l, w)| (l.lease_key.as_str(), w.as_str()))
            .collect();
        assert!(given.iter().all(|(_, w)| *w != "dying"), "{given:?}");
        assert_eq!(keys(plan.take).len() + given.len(), 1, "d0 goes to me or b");
    }

    fn by_throughput() -> LeaseManagementConfig {
        LeaseManagementConfig {
            lease_balancing: LeaseBalancing::Throughput,
            ..LeaseManagementConfig::default()
        }
    }

    fn with_throughput(mut lease: Lease, kbps: f64) -> Lease {
        lease.throughput_kbps = Some(kbps);
        lease
    }

    #[test]
    fn balancing_by_throughput_counts_a_hot_shard_as_many_quiet_ones() {
        let cfg = by_throughput();
        let now = Instant::now();
        let table = vec![
            with_throughput(lease("hot", Some("a"), 1), 1000.0),
            with_throughput(lease("q1", Some("a"), 1), 100.0),
            with_throughput(lease("q2", Some("me"), 1), 100.0),
            with_throughput(lease("q3", Some("me"), 1), 100.0),
        ];
        // a carries 1,100 KB/s, this worker 200: the mean is 650. Moving the hot shard
        // would not lower the higher load; moving q1 does.
        let plan = LeaseTaker::default().leases_to_take(&table, "me", &set(&["q2", "q3"]), now, &cfg);
        assert_eq!(keys(plan.steal), ["q1"]);
        // Then a carries 1,000 and this worker 300: the only move left (the hot shard)
        // would not help, so nothing moves.
        let mut table = table;
        table[1].lease_owner = Some("me".into());
        let plan = LeaseTaker::default().leases_to_take(&table, "me", &set(&["q1", "q2", "q3"]), now, &cfg);
        assert!(plan.steal.is_empty() && plan.take.is_empty(), "{plan:?}");
        // Counting leases, the same table is balanced the other way: 1 against 3.
        let plan =
            LeaseTaker::default().leases_to_take(&table, "a", &set(&["hot"]), now, &LeaseManagementConfig::default());
        assert_eq!(plan.steal.len(), 1);
    }

    #[test]
    fn balancing_by_throughput_without_measurements_counts_leases() {
        let cfg = by_throughput();
        let now = Instant::now();
        let mut table = owned("a", "a", 4);
        table.extend(owned("b", "b", 2));
        table.extend(owned("me", "me", 2));
        let plan = LeaseTaker::default().leases_to_take(&table, "me", &set(&["me0", "me1"]), now, &cfg);
        assert_eq!(plan.steal.len(), 1, "4/2/2 becomes 3/2/3");
        assert_eq!(plan.steal[0].lease_owner.as_deref(), Some("a"));
        // 3/3/2: nothing to gain.
        let mut table = owned("a", "a", 3);
        table.extend(owned("b", "b", 3));
        table.extend(owned("me", "me", 2));
        let plan = LeaseTaker::default().leases_to_take(&table, "me", &set(&["me0", "me1"]), now, &cfg);
        assert!(plan.steal.is_empty());
    }

    #[test]
    fn balancing_by_throughput_takes_expired_leases_up_to_the_mean_and_the_leader_hands_out_the_rest() {
        let cfg = by_throughput();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let now = Instant::now();
        let mut table = vec![
            with_throughput(lease("b0", Some("b"), 1), 300.0),
            with_throughput(lease("x0", None, 1), 300.0),
            with_throughput(lease("x1", None, 1), 100.0),
            with_throughput(lease("x2", None, 1), 100.0),
            with_throughput(lease("x3", None, 1), 100.0),
        ];
        table.push(with_throughput(lease("x4", None, 1), 100.0));
        // 1,000 KB/s over two workers: this one takes until it carries 500, b gets
        // the rest.
        let plan = taker.leases_to_take(&table, "me", &none(), now, &cfg);
        let taken: f64 = plan.take.iter().filter_map(|l| l.throughput_kbps).sum();
        assert!((500.0..800.0).contains(&taken), "took {taken} KB/s");
        assert!(plan.assign.iter().all(|(_, w)| w == "b"));
        assert_eq!(plan.take.len() + plan.assign.len(), 5);
    }

    #[test]
    fn the_leader_of_a_large_table_moves_throughput_from_the_busiest_workers() {
        let cfg = by_throughput();
        let mut taker = LeaseTaker {
            hand_out: true,
            ..LeaseTaker::default()
        };
        let now = Instant::now();
        // 120 leases of 10 KB/s, 40 each, but a's are 30 KB/s: a carries 1,200 KB/s,
        // b and me 400 each.
        let mut table: Vec<Lease> = owned("a", "a", 40)
            .into_iter()
            .map(|l| with_throughput(l, 30.0))
            .collect();
        table.extend(owned("b", "b", 40).into_iter().map(|l| with_throughput(l, 10.0)));
        table.extend(owned("me", "me", 40).into_iter().map(|l| with_throughput(l, 10.0)));
        let held: HashSet<String> = (0..40).map(|i| format!("me{i}")).collect();
        let plan = taker.leases_to_take(&table, "me", &held, now, &cfg);
        assert_eq!(plan.rebalance.len(), 6, "one move per 20 leases per pass");
        for (lease, to) in &plan.rebalance {
            assert_eq!(lease.lease_owner.as_deref(), Some("a"));
            assert!(to == "b" || to == "me", "{to}");
        }
    }

    #[test]
    fn unowned_leases_are_taken_at_once() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let now = Instant::now();
        let table = vec![lease("a", None, 0), lease("b", None, 3)];
        let plan = taker.leases_to_take(&table, "me", &none(), now, &cfg);
        assert!(plan.cautious, "no other worker known: others may be starting too");
        assert_eq!(keys(plan.all()), ["a", "b"]);
    }

    #[test]
    fn others_leases_expire_only_after_the_counter_stalls_for_the_failover_time() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let t0 = Instant::now();
        let table = vec![lease("a", Some("other"), 5)];
        assert!(taker.leases_to_take(&table, "me", &none(), t0, &cfg).all().is_empty());
        // Counter unchanged, but not for long enough.
        let t1 = t0 + cfg.failover_time - Duration::from_millis(1);
        assert!(taker.leases_to_take(&table, "me", &none(), t1, &cfg).all().is_empty());
        // The owner renewed: the clock restarts from half a renewal interval before the
        // read that saw the new counter.
        let renewed = vec![lease("a", Some("other"), 6)];
        assert!(taker.leases_to_take(&renewed, "me", &none(), t1, &cfg).all().is_empty());
        let restart = t1 - cfg.renewal_interval / 2;
        let t2 = restart + cfg.failover_time - Duration::from_millis(1);
        assert!(taker.leases_to_take(&renewed, "me", &none(), t2, &cfg).all().is_empty());
        let t3 = restart + cfg.failover_time;
        assert_eq!(
            keys(taker.leases_to_take(&renewed, "me", &none(), t3, &cfg).all()),
            ["a"]
        );
    }

    #[test]
    fn finished_shards_and_the_worker_limit_are_respected() {
        let cfg = LeaseManagementConfig {
            max_leases_for_worker: 2,
            ..Default::default()
        };
        let mut taker = LeaseTaker::default();
        let mut done = lease("done", None, 1);
        done.checkpoint = ExtendedSequenceNumber::SHARD_END;
        let table = vec![done, lease("a", None, 0), lease("b", None, 0), lease("c", None, 0)];
        let now = Instant::now();
        let taken = taker.leases_to_take(&table, "me", &none(), now, &cfg).all();
        assert_eq!(taken.len(), 2);
        assert!(taken.iter().all(|l| l.lease_key != "done"));
        assert_eq!(
            taker.leases_to_take(&table, "me", &set(&["a"]), now, &cfg).all().len(),
            1
        );
        assert!(taker
            .leases_to_take(&table, "me", &set(&["a", "b"]), now, &cfg)
            .all()
            .is_empty());
    }

    fn owned(prefix: &str, owner: &str, n: usize) -> Vec<Lease> {
        (0..n).map(|i| lease(&format!("{prefix}{i}"), Some(owner), 1)).collect()
    }

    #[test]
    fn a_new_worker_steals_one_at_a_time_until_the_fair_share() {
        // 8 leases held 4/4 by a and b; c joins: target ceil(8/3) = 3.
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let now = Instant::now();
        let mut table = owned("a", "a", 4);
        table.extend(owned("b", "b", 4));
        let stolen = taker.leases_to_take(&table, "c", &none(), now, &cfg).all();
        assert_eq!(stolen.len(), 1, "max_leases_to_steal_at_one_time is 1");
        assert_eq!(stolen[0].lease_owner.as_deref(), Some("a"), "ties go to the first name");
        // After two steals c holds 2 and a and b hold 3 each: one short of the target,
        // c does not steal from a worker exactly at it.
        let mut table = owned("a", "a", 3);
        table.extend(owned("b", "b", 3));
        table.extend(owned("c", "c", 2));
        let held = set(&["c0", "c1"]);
        assert!(taker.leases_to_take(&table, "c", &held, now, &cfg).all().is_empty());
    }

    #[test]
    fn expired_leases_are_taken_before_stealing() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let t0 = Instant::now();
        // b died holding 4; a holds 4. After the failover time a takes... nothing more
        // than its share: b's leases are expired, so b no longer counts as a worker
        // and a's target is all 8.
        let mut table = owned("a", "a", 4);
        table.extend(owned("b", "b", 4));
        let held = set(&["a0", "a1", "a2", "a3"]);
        assert!(taker.leases_to_take(&table, "a", &held, t0, &cfg).all().is_empty());
        let later = t0 + cfg.failover_time;
        let taken = taker.leases_to_take(&table, "a", &held, later, &cfg).all();
        assert_eq!(keys(taken), ["b0", "b1", "b2", "b3"]);
    }

    #[test]
    fn two_workers_starting_together_split_unowned_leases() {
        let cfg = LeaseManagementConfig::default();
        let mut taker = LeaseTaker::default();
        let now = Instant::now();
        let mut table: Vec<Lease> = (0..6).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        // The other worker already took two: it counts, target is ceil(6/2) = 3.
        table[0].lease_owner = Some("other".into());
        table[1].lease_owner = Some("other".into());
        let plan = taker.leases_to_take(&table, "me", &none(), now, &cfg);
        assert!(!plan.cautious);
        assert_eq!(plan.all().len(), 3);
    }

    #[test]
    fn finished_parents_are_deleted_only_after_their_children_started_and_the_delay() {
        let delay = Duration::from_secs(60);
        let mut cleanup = LeaseCleanup::default();
        let t0 = Instant::now();
        let mut parent = lease("p", None, 9);
        parent.checkpoint = ExtendedSequenceNumber::SHARD_END;
        parent.child_shard_ids = ["c1".to_string(), "c2".to_string()].into();
        let c1 = lease("c1", Some("w"), 3).with_parents(["p".to_string()]);
        let mut c2 = lease("c2", Some("w"), 3).with_parents(["p".to_string()]);
        let started = ExtendedSequenceNumber::new(crate::SequenceNumber::parse("5").expect("valid"), 0);
        let mut c1_started = c1.clone();
        c1_started.checkpoint = started.clone();

        // A child has not started: keep the parent.
        let table = vec![parent.clone(), c1_started.clone(), c2.clone()];
        assert!(cleanup
            .leases_to_delete(&table, t0 + delay * 10, delay, delay)
            .is_empty());
        // Both started: deleted only after the delay.
        c2.checkpoint = started;
        let table = vec![parent.clone(), c1_started.clone(), c2.clone()];
        assert!(cleanup.leases_to_delete(&table, t0, delay, delay).is_empty());
        assert!(cleanup
            .leases_to_delete(&table, t0 + delay - Duration::from_millis(1), delay, delay)
            .is_empty());
        let deleted = cleanup.leases_to_delete(&table, t0 + delay, delay, delay);
        assert_eq!(deleted.iter().map(|l| l.lease_key.as_str()).collect::<Vec<_>>(), ["p"]);
        // A missing child, an owned parent, or an unfinished parent are kept.
        let table = vec![parent.clone(), c1_started.clone()];
        assert!(LeaseCleanup::default()
            .leases_to_delete(&table, t0, Duration::ZERO, Duration::ZERO)
            .is_empty());
        let mut owned = parent.clone();
        owned.lease_owner = Some("w".into());
        let table = vec![owned, c1_started.clone(), c2.clone()];
        assert!(LeaseCleanup::default()
            .leases_to_delete(&table, t0, Duration::ZERO, delay)
            .is_empty());
        let mut unfinished = parent;
        unfinished.checkpoint = ExtendedSequenceNumber::TRIM_HORIZON;
        let table = vec![unfinished, c1_started, c2];
        assert!(LeaseCleanup::default()
            .leases_to_delete(&table, t0, Duration::ZERO, Duration::ZERO)
            .is_empty());
    }

    /// Guards hardening item 8: a finished lease left owned by a worker that died
    /// between its `SHARD_END` checkpoint and its release is deleted once its counter
    /// stood still for the failover time (and the delay); one whose owner is alive
    /// (counter moving) is not.
    #[test]
    fn a_finished_lease_of_a_dead_owner_is_cleaned_after_the_failover_time() {
        let delay = Duration::from_secs(5);
        let failover = Duration::from_secs(10);
        let t0 = Instant::now();
        let started = ExtendedSequenceNumber::new(crate::SequenceNumber::parse("5").expect("valid"), 0);
        let mut parent = lease("p", Some("dead"), 7);
        parent.checkpoint = ExtendedSequenceNumber::SHARD_END;
        parent.child_shard_ids = ["c".to_string()].into();
        let mut child = lease("c", Some("w"), 3).with_parents(["p".to_string()]);
        child.checkpoint = started;
        let mut cleanup = LeaseCleanup::default();
        let table = vec![parent.clone(), child.clone()];
        assert!(cleanup.leases_to_delete(&table, t0, delay, failover).is_empty());
        assert!(
            cleanup.leases_to_delete(&table, t0 + delay, delay, failover).is_empty(),
            "an owned lease waits for the failover time, not only the delay"
        );
        // Its owner wrote meanwhile: the clock starts again.
        let mut renewed = parent.clone();
        renewed.lease_counter = 8;
        let table = vec![renewed, child.clone()];
        assert!(cleanup
            .leases_to_delete(&table, t0 + failover, delay, failover)
            .is_empty());
        assert!(cleanup
            .leases_to_delete(&table, t0 + failover * 2 - Duration::from_millis(1), delay, failover)
            .is_empty());
        let deleted = cleanup.leases_to_delete(&table, t0 + failover * 2, delay, failover);
        assert_eq!(deleted.iter().map(|l| l.lease_key.as_str()).collect::<Vec<_>>(), ["p"]);
    }

    /// Guards hardening item 8: a parent whose child lease was already cleaned up (the
    /// child finished and a grandchild started) is deleted too, while a parent whose
    /// child lease does not exist yet is kept.
    #[test]
    fn a_parent_whose_finished_child_was_cleaned_up_is_deleted() {
        let t0 = Instant::now();
        let started = ExtendedSequenceNumber::new(crate::SequenceNumber::parse("5").expect("valid"), 0);
        let mut grandparent = lease("g", None, 4);
        grandparent.checkpoint = ExtendedSequenceNumber::SHARD_END;
        grandparent.child_shard_ids = ["p".to_string()].into();
        // p itself was finished and deleted; its child c names it as a parent.
        let mut child = lease("c", Some("w"), 3).with_parents(["p".to_string()]);
        let table = vec![grandparent.clone(), child.clone()];
        assert!(
            LeaseCleanup::default()
                .leases_to_delete(&table, t0, Duration::ZERO, Duration::ZERO)
                .is_empty(),
            "c has not started: p may not have been finished"
        );
        child.checkpoint = started;
        let table = vec![grandparent.clone(), child];
        let deleted = LeaseCleanup::default().leases_to_delete(&table, t0, Duration::ZERO, Duration::ZERO);
        assert_eq!(deleted.iter().map(|l| l.lease_key.as_str()).collect::<Vec<_>>(), ["g"]);
        // No lease names p at all: p's lease may simply not exist yet. Keep g.
        let table = vec![grandparent];
        assert!(LeaseCleanup::default()
            .leases_to_delete(&table, t0, Duration::ZERO, Duration::ZERO)
            .is_empty());
    }

    /// The in-memory store, with the trait's conditional semantics.
    type MemStore = crate::lease::InMemoryLeaseStore;

    /// Guards hardening item 11: a consumer whose lease was lost, finishing after this
    /// worker took the shard again, must not release the newer lease period.
    #[tokio::test]
    async fn releasing_an_ended_lease_period_leaves_the_new_one_alone() {
        let store = Arc::new(MemStore::default());
        store
            .create_lease_if_not_exists(&lease("s", None, 0))
            .await
            .expect("created");
        let c = LeaseCoordinator::new(store.clone(), "me".into(), LeaseManagementConfig::default());
        let first = store.get_lease("s").await.expect("read").expect("exists");
        assert!(c.take(first).await.expect("take"));
        let old = c.held_lease("s").expect("held");
        c.mark_lost("s", "test");
        let again = store.get_lease("s").await.expect("read").expect("exists");
        assert!(c.take(again).await.expect("take again"));
        let new = c.held_lease("s").expect("held again");
        assert!(!Arc::ptr_eq(&old, &new));

        c.release(&old).await;
        assert!(c.is_held("s"), "the newer lease period is still held");
        assert!(!new.lost.is_cancelled());
        let stored = store.get_lease("s").await.expect("read").expect("exists");
        assert_eq!(stored.lease_owner.as_deref(), Some("me"), "and still ours in the table");

        c.release(&new).await;
        assert!(!c.is_held("s"));
        let stored = store.get_lease("s").await.expect("read").expect("exists");
        assert_eq!(stored.lease_owner, None);
    }

    /// The handoff protocol from the old owner's side: a handoff recorded by another
    /// worker is noticed at the next renewal, which asks the consumer to shut down and
    /// goes on renewing; the old owner may still checkpoint; its release completes the
    /// handoff.
    #[tokio::test]
    async fn a_handoff_is_noticed_at_the_next_renewal_and_completed_by_the_release() {
        let store = Arc::new(MemStore::default());
        store
            .create_lease_if_not_exists(&lease("s", None, 0))
            .await
            .expect("created");
        let a = LeaseCoordinator::new(store.clone(), "a".into(), LeaseManagementConfig::default());
        assert!(a
            .take(store.get_lease("s").await.expect("read").expect("exists"))
            .await
            .expect("take"));
        let held = a.held_lease("s").expect("held");

        let b = LeaseCoordinator::new(store.clone(), "b".into(), LeaseManagementConfig::default());
        let mut seen = store.get_lease("s").await.expect("read").expect("exists");
        let counter = seen.lease_counter;
        assert!(b.initiate_handoff(&mut seen).await.expect("handoff"));
        assert_eq!(seen.lease_counter, counter, "a handoff does not move the counter");
        assert!(
            !b.initiate_handoff(&mut seen).await.expect("second"),
            "one handoff at a time"
        );

        assert!(!held.shutdown_requested.is_cancelled());
        a.renew_due(Instant::now() + Duration::from_secs(3600)).await;
        assert!(held.shutdown_requested.is_cancelled(), "the consumer is asked to stop");
        assert!(
            !held.lost.is_cancelled(),
            "not lost: a still owns the shard until it hands over"
        );
        let stored = store.get_lease("s").await.expect("read").expect("exists");
        assert_eq!(stored.lease_counter, counter + 1, "a went on renewing");
        assert_eq!(stored.checkpoint_owner.as_deref(), Some("a"));

        let checkpoint = ExtendedSequenceNumber::new(crate::SequenceNumber::parse("42").expect("valid"), 0);
        let outcome = a
            .update_checkpoint(&held, |l| {
                l.checkpoint = checkpoint.clone();
                Ok::<(), ()>(())
            })
            .await
            .expect("no change error");
        assert!(matches!(outcome, WriteOutcome::Written), "{outcome:?}");

        a.release(&held).await;
        let stored = store.get_lease("s").await.expect("read").expect("exists");
        assert_eq!(stored.lease_owner.as_deref(), Some("b"));
        assert_eq!(stored.checkpoint_owner, None, "the handoff is complete");
        assert_eq!(stored.checkpoint, checkpoint);
        assert_eq!(stored.lease_counter, counter + 3);
        // b now takes it as any lease the table gives it.
        assert!(b.take(stored).await.expect("take"));
    }

    #[derive(Debug)]
    struct NoStore;

    #[async_trait::async_trait]
    impl LeaseStore for NoStore {
        async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
            Ok(vec![])
        }
        async fn get_lease(&self, _: &str) -> Result<Option<Lease>, LeaseStoreError> {
            Ok(None)
        }
        async fn create_lease_if_not_exists(&self, _: &Lease) -> Result<bool, LeaseStoreError> {
            Ok(true)
        }
        async fn renew_lease(&self, _: &mut Lease) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn take_lease(&self, _: &mut Lease, _: &str) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn evict_lease(&self, _: &mut Lease) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn update_lease_checkpoint(&self, _: &mut Lease) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn initiate_graceful_lease_handoff(&self, _: &mut Lease, _: &str) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn assign_lease(&self, _: &mut Lease, _: &str) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn delete_lease(&self, _: &Lease) -> Result<(), LeaseStoreError> {
            Ok(())
        }
    }

    #[test]
    fn held_lease_counts_as_lost_before_others_could_take_it() {
        let cfg = LeaseManagementConfig::default(); // failover 10 s, renew every 3.33 s
        let c = LeaseCoordinator::new(Arc::new(NoStore), "me".into(), cfg.clone());
        let t0 = Instant::now();
        let safe = cfg.failover_time - cfg.renewal_interval;
        assert!(!c.past_safe_ownership(t0, t0 + safe - Duration::from_millis(1)));
        assert!(c.past_safe_ownership(t0, t0 + safe));
        // Past the safe window there is still a full renewal interval before any
        // other worker may consider the lease expired.
        assert!(safe + cfg.renewal_interval <= cfg.failover_time);
    }
}
