//! The lease renewer (the Java KCL's `LeaseRenewer`): the set of leases this worker
//! holds, keeping each alive, the watchdog that marks a lease lost the moment this
//! worker can no longer prove it holds it, and every fenced write to a held lease
//! (renewals and checkpoints).
//!
//! Renewals are scheduled per lease, one renewal interval (less a random part, so that
//! they spread over the interval) after the lease's last successful write: a lease
//! checkpointed more often than that is never renewed separately. Renewals are
//! independent (earliest deadline first, a bounded number in flight): one slow call
//! holds back no other. Each is bounded by half the proof of ownership left, and a
//! failed one is tried again after a quarter interval with jitter (within a quarter of
//! the proof left), so that a hung call costs a retry, not the lease, until ownership
//! can no longer be proven.
//!
//! A lease this worker holds counts as lost as soon as it could be expired for others:
//! when no renewal sent in the last `failover_time - renewal_interval` succeeded; no
//! checkpoint write runs past that point either.
//!
//! A refused write is verified by a read ([`Verdict`]): a lease still ours had a write
//! of ours land unseen (the SDK retried it, or its answer was lost); a lease whose
//! `checkpointOwner` is this worker is being handed over, and is renewed and
//! checkpointed on until the handoff completes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::held::{lock, HeldLease};
use super::model::Lease;
use super::store::LeaseStore;
use super::timed::bounded;
use crate::config::LeaseManagementConfig;
use crate::error::{ErrorChain, LeaseStoreError};
use crate::metrics;

/// At most this many renewals are in flight at once, so that a worker holding
/// thousands of leases does not send them in one burst.
const MAX_CONCURRENT_RENEWALS: usize = 32;

/// The outcome of a fenced write to a held lease.
#[derive(Debug)]
pub(crate) enum WriteOutcome {
    Written,
    LeaseLost,
    Failed(LeaseStoreError),
}

/// What a read shows after a conditional write to a held lease was refused.
#[derive(Debug)]
pub(super) enum Verdict {
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

/// Owns the set of held leases and performs every write that keeps them: renewals
/// and fenced checkpoint writes.
#[derive(Debug)]
pub(crate) struct LeaseRenewer {
    /// Every call is bounded by the store itself: the scheduler hands a
    /// `TimedLeaseStore` (`lease_store_call_timeout`). Checkpoint writes get a tighter
    /// bound here, the proof of ownership left.
    store: Arc<dyn LeaseStore>,
    worker_id: String,
    config: LeaseManagementConfig,
    /// A std mutex: only short map operations happen under it, never an await.
    held: Mutex<HashMap<String, Arc<HeldLease>>>,
}

impl LeaseRenewer {
    pub(crate) fn new(store: Arc<dyn LeaseStore>, worker_id: String, config: LeaseManagementConfig) -> Self {
        Self {
            store,
            worker_id,
            config,
            held: Mutex::new(HashMap::new()),
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

    /// The lease period currently held for `shard_id`, if any.
    #[cfg(test)]
    pub(crate) fn held_lease(&self, shard_id: &str) -> Option<Arc<HeldLease>> {
        lock(&self.held).get(shard_id).cloned()
    }

    /// Starts holding `lease`, just acquired by a write sent at `sent`.
    pub(super) fn add(&self, lease: Lease, sent: Instant) {
        let mut held = lock(&self.held);
        held.insert(
            lease.lease_key.clone(),
            Arc::new(HeldLease::new(lease, sent, self.config.renewal_interval)),
        );
        self.publish_gauge(&held);
    }

    /// Stops holding the lease period `held`, if it is still the current one (when
    /// the lease was lost and acquired again since, the newer period is left alone).
    pub(super) fn remove_period(&self, held: &Arc<HeldLease>) -> Option<Arc<HeldLease>> {
        let mut map = lock(&self.held);
        let current = map.get(&held.shard_id).is_some_and(|h| Arc::ptr_eq(h, held));
        let removed = if current { map.remove(&held.shard_id) } else { None };
        self.publish_gauge(&map);
        removed
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
    #[cfg(test)]
    pub(crate) async fn renew_due(&self, by: Instant) {
        let due: Vec<Arc<HeldLease>> = self
            .held_leases()
            .into_iter()
            .filter(|h| h.next_renewal() <= by)
            .collect();
        let mut due = due;
        due.sort_by_key(|h| h.next_renewal());
        futures::stream::iter(due)
            .for_each_concurrent(MAX_CONCURRENT_RENEWALS, |h| async move { self.renew_one(&h).await })
            .await;
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
            outcome = match self.send_renewal(held, &mut next).await {
                Ok(true) => {
                    *guard = next;
                    held.record_renewal(sent, self.config.renewal_interval);
                    Ok(true)
                }
                Ok(false) => match self
                    .verify_refusal_within(&held.shard_id, self.provable_ownership_left(held))
                    .await
                {
                    Verdict::StillOurs(stored) => {
                        debug!(shard_id = %held.shard_id, counter = stored.lease_counter, "renewal refused but the lease is still ours; adopting the stored lease");
                        *guard = *stored;
                        continue;
                    }
                    Verdict::HandingOff(stored) => {
                        held.handoff_requested(&stored);
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
                let every = self.config.renewal_interval;
                match self.provable_ownership_left(held) {
                    None => self.mark_lost(&held.shard_id, "not renewed within the failover time"),
                    // Throttled: the table is answering, only slowly; the jittered
                    // quarter interval spreads the retries (within half the proof left).
                    Some(left) if matches!(e, LeaseStoreError::Throttled(_)) => {
                        held.retry_renewal(Instant::now(), every, left / 2);
                    }
                    // Tried again within a quarter of the proof left (but not sooner than
                    // a fiftieth of an interval), so that another attempt fits before
                    // it runs out after a hung call.
                    Some(left) => held.retry_renewal(Instant::now(), every, (left / 4).max(every / 50)),
                }
            }
        }
    }

    /// After a conditional write to a held lease was refused: reads the lease (strongly
    /// consistent, as stores read) to tell a lost lease from one whose counter an
    /// earlier write of ours moved.
    pub(super) async fn verify_refusal(&self, shard_id: &str) -> Verdict {
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

    /// [`Self::verify_refusal`], bounded by `left` (the proof of ownership left; none:
    /// unknown at once), so that a hung read does not outlast the lease.
    async fn verify_refusal_within(&self, shard_id: &str, left: Option<Duration>) -> Verdict {
        let read = async { Ok(self.verify_refusal(shard_id).await) };
        match bounded(
            "reading the lease after a refused write",
            left.unwrap_or_default(),
            read,
        )
        .await
        {
            Ok(verdict) => verdict,
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
            let Some(write) = self.send_checkpoint(held, &mut next).await else {
                drop(guard);
                self.mark_lost(&held.shard_id, "not renewed within the failover time");
                return Ok(WriteOutcome::LeaseLost);
            };
            let outcome = match write {
                Ok(true) => WriteOutcome::Written,
                Ok(false) => match self
                    .verify_refusal_within(&held.shard_id, self.provable_ownership_left(held))
                    .await
                {
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
                        held.handoff_requested(&stored);
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

    /// Sends one renewal of `next`, bounded by the call timeout and by the proof of
    /// ownership left less a quarter renewal interval, kept for another attempt (or
    /// half what is left, when that is more): a renewal that hangs fails in time for
    /// another to land while the lease is still provably held, a slow but healthy
    /// table has most of the time left, and the attempts after a hang keep halving
    /// what is left instead of giving up after one.
    async fn send_renewal(&self, held: &HeldLease, next: &mut Lease) -> Result<bool, LeaseStoreError> {
        // Nothing is sent once ownership can no longer be proven: a late write would
        // move the counter of a lease others may be taking.
        let Some(left) = self.provable_ownership_left(held) else {
            return Err(LeaseStoreError::Dependency {
                message: "no proof of ownership left to renew within".into(),
                source: "not renewed within the failover time".into(),
            });
        };
        let budget = (left / 2).max(left.saturating_sub(self.config.renewal_interval / 4));
        let timeout = self.config.lease_store_call_timeout.min(budget);
        bounded("renewal", timeout, self.store.renew_lease(next)).await
    }

    /// Sends one checkpoint write of `next`, bounded by the call timeout and by the
    /// proof of ownership left: a write never outlives it (past that point another
    /// worker may own the lease, and this worker must already have stopped). `None`
    /// when no ownership is provable any more.
    async fn send_checkpoint(&self, held: &HeldLease, next: &mut Lease) -> Option<Result<bool, LeaseStoreError>> {
        let provable = self.provable_ownership_left(held)?;
        let timeout = self.config.lease_store_call_timeout.min(provable);
        Some(bounded("checkpoint write", timeout, self.store.update_lease_checkpoint(next)).await)
    }

    /// Runs until `stop`: renews each held lease when its renewal is due ([`Self::renewals`]),
    /// and beside it runs a watchdog that marks a lease lost the moment it can no
    /// longer be proven held, even while a renewal of it hangs.
    pub(crate) async fn run(&self, stop: CancellationToken) {
        let every = self.config.renewal_interval;
        let watchdog = async {
            loop {
                let now = Instant::now();
                let wake = self
                    .next_unprovable()
                    .map_or(now + every / 5, |at| at.min(now + every / 5));
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(wake) => {}
                }
                self.expire_unprovable(Instant::now());
            }
        };
        tokio::join!(self.renewals(&stop), watchdog);
    }

    /// Renews each held lease when its renewal is due, earliest deadline first, with up
    /// to [`MAX_CONCURRENT_RENEWALS`] in flight. Renewals are independent: one that
    /// hangs until its timeout holds back no other (a new one starts whenever one
    /// ends), and its own lease is tried again in time ([`Self::renew_one`]). Wakes at
    /// least every fifth of a renewal interval, so that a lease taken meanwhile is
    /// renewed on time.
    async fn renewals(&self, stop: &CancellationToken) {
        let every = self.config.renewal_interval;
        let renew = |held: Arc<HeldLease>| async move {
            self.renew_one(&held).await;
            held
        };
        let mut in_flight = FuturesUnordered::new();
        let mut renewing: HashSet<String> = HashSet::new();
        loop {
            let now = Instant::now();
            // Leases due within the next few milliseconds go now too.
            let soon = now + every / 50;
            let mut due: Vec<(Instant, Arc<HeldLease>)> = self
                .held_leases()
                .into_iter()
                .filter(|h| !renewing.contains(&h.shard_id))
                .map(|h| (h.next_renewal(), h))
                .collect();
            due.sort_by_key(|(at, _)| *at);
            let later = due.iter().map(|(at, _)| *at).find(|at| *at > soon);
            // Due now, earliest first: started as slots free up, without another scan.
            let mut ready: VecDeque<Arc<HeldLease>> = due
                .into_iter()
                .take_while(|(at, _)| *at <= soon)
                .map(|(_, h)| h)
                .collect();
            while in_flight.len() < MAX_CONCURRENT_RENEWALS {
                let Some(held) = ready.pop_front() else { break };
                renewing.insert(held.shard_id.clone());
                in_flight.push(renew(held));
            }
            let wake = later.map_or(now + every / 5, |at| at.min(now + every / 5));
            let sleep = tokio::time::sleep_until(wake);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                        // A failed renewal is due again soon.
                        let again = done.next_renewal();
                        if again < sleep.deadline() {
                            sleep.as_mut().reset(again);
                        }
                        if let Some(held) = ready.pop_front() {
                            renewing.insert(held.shard_id.clone());
                            in_flight.push(renew(held));
                        }
                        renewing.remove(&done.shard_id);
                    }
                    // Only once every lease due has started: the next scan finds the rest.
                    () = &mut sleep, if ready.is_empty() => break,
                }
            }
        }
    }
}
