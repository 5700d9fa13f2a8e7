//! The lease coordinator (the Java KCL's `LeaseCoordinator`): what the scheduler and
//! the shard consumers see of lease management. It acquires leases (a take, or the
//! assignment that ends a handoff to this worker that ran out of time), asks other
//! workers for handoffs, and releases leases, handing each to a live worker when the
//! scheduler shuts down (those writes are its own); the held set, renewals and
//! checkpoint writes are its [`LeaseRenewer`]'s.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::held::{lock, HeldLease};
use super::model::Lease;
use super::renewer::{LeaseRenewer, Verdict, WriteOutcome};
use super::store::LeaseStore;
use crate::config::LeaseManagementConfig;
use crate::error::{ErrorChain, LeaseStoreError};
use crate::metrics;

/// How a lease is acquired.
#[derive(Debug, Clone, Copy)]
enum Acquire {
    /// Conditional on the counter: an unowned or expired lease, or one assigned to us.
    Take,
    /// Conditional on the owners only: ends a handoff to us that did not complete.
    Assign,
}

/// Acquires, hands over and releases leases; holds them through its renewer.
#[derive(Debug)]
pub(crate) struct LeaseCoordinator {
    renewer: LeaseRenewer,
    /// Bounds a release (one `lease_store_call_timeout`).
    config: LeaseManagementConfig,
    /// Set when the scheduler shuts down: the live workers and their loads, to which
    /// released leases are assigned (least loaded first) instead of being left unowned,
    /// so that they find them through the owner index at their next pass.
    successors: Mutex<Vec<(String, usize)>>,
    /// Acquisitions under way: with the held leases, they may not pass
    /// `max_leases_for_worker`.
    acquiring: Mutex<usize>,
}

/// A place among the leases this worker may hold, taken for one acquisition.
struct Slot<'a>(&'a Mutex<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *lock(self.0) -= 1;
    }
}

impl LeaseCoordinator {
    pub(crate) fn new(store: Arc<dyn LeaseStore>, worker_id: String, config: LeaseManagementConfig) -> Self {
        Self {
            renewer: LeaseRenewer::new(store, worker_id, config.clone()),
            config,
            successors: Mutex::new(Vec::new()),
            acquiring: Mutex::new(0),
        }
    }

    /// The renewer, which holds the leases.
    pub(crate) fn renewer(&self) -> &LeaseRenewer {
        &self.renewer
    }

    pub(crate) fn worker_id(&self) -> &str {
        self.renewer.worker_id()
    }

    pub(crate) fn store(&self) -> &Arc<dyn LeaseStore> {
        self.renewer.store()
    }

    pub(crate) fn held_leases(&self) -> Vec<Arc<HeldLease>> {
        self.renewer.held_leases()
    }

    /// The keys of the leases held.
    pub(crate) fn held_keys(&self) -> HashSet<String> {
        self.renewer.held_keys()
    }

    pub(crate) fn held_count(&self) -> usize {
        self.renewer.held_count()
    }

    pub(crate) fn is_held(&self, shard_id: &str) -> bool {
        self.renewer.is_held(shard_id)
    }

    /// See [`LeaseRenewer::still_owned`].
    pub(crate) fn still_owned(&self, held: &HeldLease) -> bool {
        self.renewer.still_owned(held)
    }

    /// See [`LeaseRenewer::update_checkpoint`].
    pub(crate) async fn update_checkpoint<E>(
        &self,
        held: &HeldLease,
        change: impl Fn(&mut Lease) -> Result<(), E>,
    ) -> Result<WriteOutcome, E> {
        self.renewer.update_checkpoint(held, change).await
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

    /// A slot for one more lease, unless the held leases and the acquisitions under way
    /// reach `max_leases_for_worker`.
    fn reserve(&self) -> Option<Slot<'_>> {
        let mut acquiring = lock(&self.acquiring);
        if self.held_count() + *acquiring >= self.config.max_leases_for_worker {
            return None;
        }
        *acquiring += 1;
        Some(Slot(&self.acquiring))
    }

    /// A worker at `max_leases_for_worker` refuses a lease: one given to it (assigned,
    /// or handed over to it) is released, so that a worker with room takes it at once;
    /// any other is left as it is (a handoff to this worker that ran out of time is
    /// then ended by its old owner, or expires).
    async fn refuse(&self, mut lease: Lease) -> Result<bool, LeaseStoreError> {
        let key = lease.lease_key.clone();
        let cap = self.config.max_leases_for_worker;
        if lease.is_owned_by(self.worker_id()) && !lease.is_handoff_pending() {
            if self.store().evict_lease(&mut lease).await? {
                info!(shard_id = %key, max_leases_for_worker = cap, "a lease given to this worker was released: it holds its maximum");
            }
        } else {
            debug!(shard_id = %key, max_leases_for_worker = cap, "not acquiring a lease: this worker holds its maximum");
        }
        Ok(false)
    }

    async fn acquire(&self, lease: Lease, how: Acquire) -> Result<bool, LeaseStoreError> {
        let Some(_slot) = self.reserve() else {
            return self.refuse(lease).await;
        };
        let sent = Instant::now();
        let seen_counter = lease.lease_counter;
        let mut taken = lease;
        let key = taken.lease_key.clone();
        let result = match how {
            Acquire::Take => self.store().take_lease(&mut taken, self.worker_id()).await,
            Acquire::Assign => self.store().assign_lease(&mut taken, self.worker_id()).await,
        };
        let taken = match result {
            Ok(true) => taken,
            Ok(false) | Err(_) => match self.store().get_lease(&key).await {
                Ok(Some(stored))
                    if stored.is_owned_by(self.worker_id())
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
        self.renewer.add(taken, sent);
        Ok(true)
    }

    /// Asks the owner of `lease` (as read from the table) to hand it to this worker:
    /// true when the handoff was recorded. The lease is not held until the old owner
    /// completes it.
    pub(crate) async fn initiate_handoff(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let from = lease.lease_owner.clone();
        let started = self
            .store()
            .initiate_graceful_lease_handoff(lease, self.worker_id())
            .await?;
        if started {
            info!(shard_id = %lease.lease_key, from = ?from, "asked for a graceful handoff of the lease");
            metrics::lease_handoff("in", "requested");
        }
        Ok(started)
    }

    /// Releases a held lease (graceful handoff): clears the owner so that any worker
    /// can take it at once. Only the lease period `held` stands for is released: when
    /// the lease was lost and taken again since, the newer period is left alone. The
    /// lease is no longer held afterwards, whatever happens.
    pub(crate) async fn release(&self, held: &Arc<HeldLease>) {
        let Some(h) = self.renewer.remove_period(held) else {
            debug!(shard_id = %held.shard_id, "not releasing a lease period that already ended");
            return;
        };
        h.lost.cancel();
        let shard_id = h.shard_id.as_str();
        let mut lease = h.lease.lock().await.clone();
        if !lease.is_handoff_pending() && !lease.checkpoint.is_shard_end() {
            if let Some(successor) = self.next_successor() {
                match self.store().assign_lease(&mut lease, &successor).await {
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
        let mut result = self.store().evict_lease(&mut lease).await;
        // The second try fits in what is left of one call timeout, so that a release
        // stays bounded by it (a hung table is not waited for twice).
        let deadline = started + self.config.lease_store_call_timeout;
        if !matches!(result, Ok(true)) && Instant::now() < deadline {
            // Refused: a handoff may have begun since our last write (then this release
            // completes it), or an earlier write of ours landed unseen. Failed: the
            // outcome is unknown (a timeout). Either way the lease is read, and
            // released once more while it is still ours, so that it does not wait for
            // the failover time.
            let verdict = tokio::time::timeout_at(deadline, self.renewer.verify_refusal(shard_id))
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
                    if let Ok(again) = tokio::time::timeout_at(deadline, self.store().evict_lease(&mut lease)).await {
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

    /// From now on, released leases are assigned to these live workers (worker id and
    /// load), least loaded first, instead of being left unowned.
    pub(crate) fn hand_released_leases_to(&self, workers: Vec<(String, usize)>) {
        *lock(&self.successors) = workers;
    }

    /// The least loaded successor below `max_leases_for_worker`, counted one lease more.
    pub(super) fn next_successor(&self) -> Option<String> {
        let mut successors = lock(&self.successors);
        let next = least_loaded(&mut successors, self.config.max_leases_for_worker)?;
        next.1 += 1;
        Some(next.0.clone())
    }

    /// Takes back the lease [`Self::next_successor`] counted for `worker`, when it did
    /// not reach it.
    pub(super) fn uncount_successor(&self, worker: &str) {
        if let Some(entry) = lock(&self.successors).iter_mut().find(|(w, _)| w == worker) {
            entry.1 = entry.1.saturating_sub(1);
        }
    }

    /// Releases every held lease, concurrently: bounded by one
    /// `lease_store_call_timeout` (plus the wait for a checkpoint write in flight, itself
    /// bounded by it), whatever the number of leases.
    pub(crate) async fn release_all(&self) {
        let held = self.held_leases();
        futures::future::join_all(held.iter().map(|h| self.release(h))).await;
    }
}

/// The least loaded of `workers` (worker id and load; ties to the first name) that holds
/// fewer than `cap` leases. Every worker is taken to run with the same
/// `max_leases_for_worker` as this one: its own cap is not in the table.
fn least_loaded(workers: &mut [(String, usize)], cap: usize) -> Option<&mut (String, usize)> {
    workers
        .iter_mut()
        .filter(|(_, n)| *n < cap)
        .min_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)))
}
