//! The [`LeaseStore`] trait (the Java KCL's `LeaseRefresher`): persistent storage of
//! leases with conditional (fenced) writes.

use std::fmt::Debug;

use async_trait::async_trait;

use super::model::{LeaderLock, Lease, LeaseListing};
use crate::error::LeaseStoreError;

/// Persistent storage of leases with conditional (fenced) writes.
///
/// Every method that changes a lease is conditional: it succeeds only when the stored
/// item still has the counter (and, where stated, the owner) of the `lease` passed in.
/// "The owner" in a condition is the pair `leaseOwner` and `checkpointOwner` as the
/// caller's lease has them (each absent when `None`), so that a write never overlooks
/// a graceful handoff begun since the caller's last read.
/// On success the method updates `lease` in place to what it wrote (counter incremented,
/// owner changed, ...) and returns `Ok(true)`; when the condition fails it returns
/// `Ok(false)` and leaves `lease` untouched. `Err` means the outcome is unknown or the
/// store is unusable; the variants say how to react.
///
/// Implementations must be safe to call concurrently from many tasks.
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug + 'static {
    /// Creates the lease table if it does not exist and waits until it is usable.
    /// Returns `true` when it created the table.
    ///
    /// # Errors
    /// [`LeaseStoreError::InvalidTable`] when a table of that name exists with another
    /// key schema; [`LeaseStoreError::Dependency`] / [`LeaseStoreError::Throttled`] for
    /// transient failures.
    async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError>;

    /// Reads every lease. Items that are not leases of this application (other kinds of
    /// item in a shared table) are skipped; an item that looks like a lease but has a
    /// corrupt attribute is an error naming the lease key.
    ///
    /// # Errors
    /// [`LeaseStoreError::CorruptLease`], [`LeaseStoreError::TableNotFound`], transient errors.
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError>;

    /// Reads every lease that can be read: like [`LeaseStore::list_leases`], but an item
    /// with a corrupt attribute is skipped and reported in [`LeaseListing::corrupt`]
    /// instead of failing the whole read, so that one bad item does not stop a fleet
    /// from taking and creating the other leases. The scheduler uses this; it logs
    /// each skipped item with its key and attribute and counts it.
    ///
    /// The default implementation calls `list_leases` and so skips nothing; stores that
    /// can tell corrupt items apart should override it.
    ///
    /// # Errors
    /// [`LeaseStoreError::TableNotFound`], transient errors.
    async fn list_readable_leases(&self) -> Result<LeaseListing, LeaseStoreError> {
        Ok(LeaseListing {
            leases: self.list_leases().await?,
            corrupt: Vec::new(),
        })
    }

    /// Reads one lease.
    ///
    /// # Errors
    /// As [`LeaseStore::list_leases`].
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseStoreError>;

    /// The keys of the leases whose `leaseOwner` is `owner` (the Java KCL 3.x's
    /// `listLeaseKeysForWorker`). May lag the table by a moment (DynamoDB answers it
    /// from an eventually consistent index): callers read a lease before acting on it.
    /// The default implementation filters a full read.
    ///
    /// # Errors
    /// As [`LeaseStore::list_readable_leases`].
    async fn list_lease_keys_for_owner(&self, owner: &str) -> Result<Vec<String>, LeaseStoreError> {
        Ok(self.list_readable_leases().await?.keys_owned_by(owner))
    }

    /// Reads the leader lock, if this store offers leader election
    /// ([`LeaseStore::supports_leader_election`]); `None` when no worker wrote it yet.
    ///
    /// # Errors
    /// Transient errors.
    async fn read_leader_lock(&self) -> Result<Option<LeaderLock>, LeaseStoreError> {
        Ok(None)
    }

    /// Writes the leader lock for `owner`, with the version after `expected`'s (or 1):
    /// conditional on the stored lock being `expected` (no lock at all for `None`).
    /// Returns the lock written, or `None` when the condition failed.
    ///
    /// # Errors
    /// Transient errors; [`LeaseStoreError::Dependency`] from stores without leader
    /// election.
    async fn write_leader_lock(
        &self,
        expected: Option<&LeaderLock>,
        owner: &str,
    ) -> Result<Option<LeaderLock>, LeaseStoreError> {
        let _ = (expected, owner);
        Err(LeaseStoreError::Dependency {
            message: "this lease store has no leader election".to_owned(),
            source: "unsupported".into(),
        })
    }

    /// Whether [`LeaseStore::read_leader_lock`] and [`LeaseStore::write_leader_lock`]
    /// work. Without leader election every worker reads the whole table at each
    /// lease-taking pass. Default false.
    fn supports_leader_election(&self) -> bool {
        false
    }

    /// Writes `lease` if no lease with its key exists. Returns `false` when one did.
    ///
    /// # Errors
    /// Transient errors, [`LeaseStoreError::TableNotFound`].
    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseStoreError>;

    /// Renews a lease the caller holds: conditional on counter and owner; increments
    /// the counter. Implementations should recover from a spurious failure of a retried
    /// write by re-reading the item (owner still the caller, counter one higher).
    ///
    /// # Errors
    /// Transient errors.
    async fn renew_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError>;

    /// Takes a lease for `owner`: conditional on the counter (and the owner the caller
    /// saw); sets the owner, removes `checkpointOwner` (a handoff whose workers died
    /// ends here), increments the counter, and increments `ownerSwitchesSinceCheckpoint`
    /// when the owner changes.
    ///
    /// # Errors
    /// Transient errors.
    async fn take_lease(&self, lease: &mut Lease, owner: &str) -> Result<bool, LeaseStoreError>;

    /// Releases a lease (the Java KCL's `evictLease`): conditional on the owner the
    /// caller saw; increments the counter. During a handoff (`checkpoint_owner` set) it
    /// removes `checkpointOwner`, which completes the handoff: the lease now belongs to
    /// `lease_owner`. Otherwise it removes the owner, so that any worker can take it at
    /// once.
    ///
    /// # Errors
    /// Transient errors.
    async fn evict_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError>;

    /// Begins a graceful handoff to `new_owner` (the Java KCL 3.x's
    /// `initiateGracefulLeaseHandoff`): conditional on the lease existing with the owner
    /// the caller saw and no handoff under way; sets `leaseOwner` to `new_owner` and
    /// `checkpointOwner` to the current owner, and leaves the counter alone, so that the
    /// current owner's renewals go on. The current owner notices at its next write,
    /// shuts its consumer down (its processor may checkpoint) and completes the handoff
    /// with [`LeaseStore::evict_lease`]; only then does `new_owner` start.
    ///
    /// # Errors
    /// Transient errors.
    async fn initiate_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError>;

    /// Assigns the lease to `new_owner` at once (the Java KCL 3.x's `assignLease`):
    /// conditional on the lease existing with the owner the caller saw; sets the owner,
    /// removes `checkpointOwner`, increments the counter (so the previous owner's next
    /// write fails), and increments `ownerSwitchesSinceCheckpoint` when the worker
    /// processing the shard (the checkpoint owner during a handoff) changes. Used when a handoff did not complete in time.
    ///
    /// # Errors
    /// Transient errors.
    async fn assign_lease(&self, lease: &mut Lease, new_owner: &str) -> Result<bool, LeaseStoreError>;

    /// Writes the checkpoint fields (`checkpoint`, `checkpointSubSequenceNumber`, the
    /// three pending-checkpoint attributes — removed when `None` —,
    /// `latestStartTimestamp` as [`Lease::latest_start`] says — removed when `None` —,
    /// `ownerSwitchesSinceCheckpoint` reset to 0, and `childShardIds` when non-empty):
    /// conditional on counter and owner; increments the counter.
    ///
    /// # Errors
    /// Transient errors.
    async fn update_lease_checkpoint(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError>;

    /// Deletes a lease; conditional on nothing (the admin tool's explicit deletes).
    ///
    /// # Errors
    /// Transient errors.
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError>;

    /// Deletes a lease if it is still as `lease` was read: conditional on its counter
    /// (and owners), so that a lease judged stale from one read and written since (a
    /// worker still consuming its stream took or renewed it) is kept. Returns false
    /// when it changed (or is gone). The cleanup of finished and former streams'
    /// leases deletes this way.
    ///
    /// The default deletes unconditionally and returns true; a store shared by many
    /// workers should override it.
    ///
    /// # Errors
    /// Transient errors.
    async fn delete_lease_if_unchanged(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        self.delete_lease(lease).await.map(|()| true)
    }
}
