//! The lease model and the [`LeaseStore`] trait (the Java KCL's `Lease` and
//! `LeaseRefresher`).
//!
//! A lease is one item of the lease table per shard. Its `lease_counter` is the fencing
//! token: every write that changes ownership or progress is conditional on the counter
//! (and owner) the writer last saw, and increments it. Workers judge expiry by watching
//! the counter change on their own monotonic clock, never by comparing wall clocks.
//!
//! `kcl-core` defines the trait; `kcl-dynamo` implements it on DynamoDB.
//! [`InMemoryLeaseStore`] keeps a table in memory with the same conditional semantics,
//! for unit tests of code built on the library and for measuring the framework alone.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::LeaseStoreError;
use crate::sequence::ExtendedSequenceNumber;

/// The hash key range a shard covers, as decimal strings (kept for lineage decisions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashKeyRange {
    /// `startingHashKey`, inclusive.
    pub starting_hash_key: String,
    /// `endingHashKey`, inclusive.
    pub ending_hash_key: String,
}

/// One shard's lease, with the attributes of the Java KCL's lease item.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Lease {
    /// `leaseKey`: the shard id; in a multi-stream application the Java KCL 3.x's
    /// `account-id:stream-name:creation-epoch:shard-id`.
    pub lease_key: String,
    /// `leaseOwner`: the worker id holding the lease, `None` when unowned.
    pub lease_owner: Option<String>,
    /// `leaseCounter`: incremented by every conditional write; the fencing token.
    pub lease_counter: u64,
    /// `checkpoint` + `checkpointSubSequenceNumber`: everything up to here is processed.
    pub checkpoint: ExtendedSequenceNumber,
    /// `pendingCheckpoint` (+ sub-sequence): a prepared, not yet committed, checkpoint.
    pub pending_checkpoint: Option<ExtendedSequenceNumber>,
    /// `pendingCheckpointState`: application state saved with a prepared checkpoint.
    pub pending_checkpoint_state: Option<Bytes>,
    /// `ownerSwitchesSinceCheckpoint`: how often the lease changed hands without progress.
    pub owner_switches_since_checkpoint: u64,
    /// `parentShardId`: the shards this one was split or merged from.
    pub parent_shard_ids: BTreeSet<String>,
    /// `childShardIds`: the shards this one was split or merged into, once known.
    pub child_shard_ids: BTreeSet<String>,
    /// `startingHashKey` / `endingHashKey`.
    pub hash_key_range: Option<HashKeyRange>,
    /// `checkpointOwner`: during a graceful handoff, the worker handing the lease over
    /// (it keeps processing and checkpointing until it completes the handoff, while
    /// `lease_owner` names the receiver); `None` otherwise.
    pub checkpoint_owner: Option<String>,
    /// `throughputKBps`: the kilobytes a second its owner recently read from the shard,
    /// as the Java KCL 3.x records it; written with renewals and checkpoints, `None`
    /// until a worker has measured it.
    pub throughput_kbps: Option<f64>,
    /// `streamName`: in a multi-stream application, the serialized
    /// [`StreamIdentifier`](crate::StreamIdentifier) of the shard's stream
    /// (`account-id:stream-name:creation-epoch`, as the Java KCL 3.x writes it); `None`
    /// in a single-stream application.
    pub stream_name: Option<String>,
    /// `shardId`: in a multi-stream application, the shard id (the lease key's last
    /// part); `None` in a single-stream application, whose lease key is the shard id.
    pub shard_id: Option<String>,
    /// `latestStartTimestamp` (ours; the Java KCL neither reads nor writes it): while
    /// the checkpoint is `LATEST`, the moment the lease's first consumer started. Every
    /// consumer of the lease reads from `AT_TIMESTAMP` of it until the first
    /// checkpoint, so that records written after the lease first started are never
    /// skipped by a new `LATEST` iterator. Dropped by the first checkpoint write past
    /// `LATEST`; see [`latest_start`](Self::latest_start).
    pub latest_start_timestamp: Option<SystemTime>,
}

impl Lease {
    /// A new, unowned lease for a shard, starting at `checkpoint`.
    pub fn new(lease_key: impl Into<String>, checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            lease_key: lease_key.into(),
            lease_owner: None,
            lease_counter: 0,
            checkpoint,
            pending_checkpoint: None,
            pending_checkpoint_state: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
            checkpoint_owner: None,
            throughput_kbps: None,
            stream_name: None,
            shard_id: None,
            latest_start_timestamp: None,
        }
    }

    /// Where a lease still at `LATEST` starts: [`latest_start_timestamp`], and `None`
    /// once the checkpoint is past `LATEST` (or no consumer has started yet).
    ///
    /// [`latest_start_timestamp`]: Self::latest_start_timestamp
    pub fn latest_start(&self) -> Option<SystemTime> {
        self.latest_start_timestamp
            .filter(|_| self.checkpoint.checkpoint == crate::sequence::Checkpoint::Latest)
    }

    /// The shard this lease is for: the `shardId` attribute in a multi-stream
    /// application, else the lease key.
    pub fn shard(&self) -> &str {
        self.shard_id.as_deref().unwrap_or(&self.lease_key)
    }

    /// The lease key of another shard of the same stream (a parent or child named by
    /// this lease, whose `parentShardId` and `childShardIds` hold shard ids, as the Java
    /// KCL writes them in both modes).
    pub fn related_lease_key(&self, shard_id: &str) -> String {
        match &self.stream_name {
            Some(stream) => format!("{stream}:{shard_id}"),
            None => shard_id.to_owned(),
        }
    }

    /// Sets the parent shard ids.
    pub fn with_parents(mut self, parents: impl IntoIterator<Item = String>) -> Self {
        self.parent_shard_ids = parents.into_iter().collect();
        self
    }

    /// Sets the hash key range.
    pub fn with_hash_key_range(mut self, range: HashKeyRange) -> Self {
        self.hash_key_range = Some(range);
        self
    }

    /// True when `worker_id` is the recorded owner.
    pub fn is_owned_by(&self, worker_id: &str) -> bool {
        self.lease_owner.as_deref() == Some(worker_id)
    }

    /// True while a graceful handoff is under way (the Java KCL 3.x's
    /// `shutdownRequested`): `checkpointOwner` names the worker that still processes the
    /// shard and checkpoints it, `leaseOwner` the worker it is handed to.
    pub fn is_handoff_pending(&self) -> bool {
        self.checkpoint_owner.is_some()
    }

    /// The worker that processes the shard now (the Java KCL 3.x's `actualOwner`): the
    /// checkpoint owner during a handoff, else the lease owner.
    pub fn actual_owner(&self) -> Option<&str> {
        self.checkpoint_owner.as_deref().or(self.lease_owner.as_deref())
    }
}

/// The leader lock: which worker reads the whole lease table and hands out unowned and
/// expired leases. Expiry works as for leases: a lock whose version has not changed for
/// the failover time, on the reader's clock, may be taken over.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaderLock {
    /// The worker holding the lock.
    pub owner: String,
    /// Incremented by every write; the fencing token.
    pub version: u64,
}

impl LeaderLock {
    /// A lock held by `owner` at `version`.
    pub fn new(owner: impl Into<String>, version: u64) -> Self {
        Self {
            owner: owner.into(),
            version,
        }
    }
}

/// The result of [`LeaseStore::list_readable_leases`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct LeaseListing {
    /// The leases that could be read.
    pub leases: Vec<Lease>,
    /// One [`LeaseStoreError::CorruptLease`] per item that looks like a lease but could
    /// not be read; those leases are left alone (not taken, not recreated).
    pub corrupt: Vec<LeaseStoreError>,
}

impl LeaseListing {
    /// A listing of `leases` with `corrupt` items skipped.
    pub fn new(leases: Vec<Lease>, corrupt: Vec<LeaseStoreError>) -> Self {
        Self { leases, corrupt }
    }

    /// The keys of the leases whose `leaseOwner` is `owner` (what
    /// [`LeaseStore::list_lease_keys_for_owner`] answers, from a full read).
    pub fn keys_owned_by(self, owner: &str) -> Vec<String> {
        self.leases
            .into_iter()
            .filter(|l| l.is_owned_by(owner))
            .map(|l| l.lease_key)
            .collect()
    }
}

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

    /// Gives a graceful handoff under way to another receiver: conditional on the lease
    /// existing with the `leaseOwner` (the receiver so far) and `checkpointOwner` the
    /// caller saw; sets `leaseOwner` to `new_owner` and leaves `checkpointOwner` and the
    /// counter, so that the old owner goes on processing and completes the handoff to
    /// `new_owner`. A receiver that shuts down before a handoff to it completed passes
    /// it on this way, so that the shard does not wait for the failover time.
    ///
    /// The default returns `Ok(false)` (nothing written): the handoff then completes to
    /// the receiver that left, and the lease moves on after the failover time.
    ///
    /// # Errors
    /// Transient errors.
    async fn retarget_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        let _ = (lease, new_owner);
        Ok(false)
    }

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

    /// Deletes a lease; conditional on nothing (used for finished shards' cleanup).
    ///
    /// # Errors
    /// Transient errors.
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError>;
}

/// Bounds every call to a lease store (the Rust SDK sets no operation timeout of its
/// own): single-item calls by `call`, full reads by `scan`. A call that runs out is a
/// [`LeaseStoreError::Dependency`] with an unknown outcome, like a network failure.
/// Table creation is not bounded here: it waits for the table with its own bound.
#[derive(Debug)]
pub(crate) struct TimedLeaseStore {
    inner: std::sync::Arc<dyn LeaseStore>,
    call: std::time::Duration,
    scan: std::time::Duration,
}

impl TimedLeaseStore {
    pub(crate) fn new(
        inner: std::sync::Arc<dyn LeaseStore>,
        call: std::time::Duration,
        scan: std::time::Duration,
    ) -> Self {
        Self { inner, call, scan }
    }
}

async fn bounded<T>(
    operation: &'static str,
    limit: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, LeaseStoreError>>,
) -> Result<T, LeaseStoreError> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(LeaseStoreError::Dependency {
            message: format!("{operation} timed out after {limit:?}; its outcome is unknown"),
            source: "lease store call timed out".into(),
        })
    })
}

#[async_trait]
impl LeaseStore for TimedLeaseStore {
    async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
        self.inner.create_lease_table_if_not_exists().await
    }
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
        bounded("list_leases", self.scan, self.inner.list_leases()).await
    }
    async fn list_readable_leases(&self) -> Result<LeaseListing, LeaseStoreError> {
        bounded("list_leases", self.scan, self.inner.list_readable_leases()).await
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseStoreError> {
        bounded("get_lease", self.call, self.inner.get_lease(lease_key)).await
    }
    async fn list_lease_keys_for_owner(&self, owner: &str) -> Result<Vec<String>, LeaseStoreError> {
        bounded(
            "list_lease_keys_for_owner",
            self.scan,
            self.inner.list_lease_keys_for_owner(owner),
        )
        .await
    }
    async fn read_leader_lock(&self) -> Result<Option<LeaderLock>, LeaseStoreError> {
        bounded("read_leader_lock", self.call, self.inner.read_leader_lock()).await
    }
    async fn write_leader_lock(
        &self,
        expected: Option<&LeaderLock>,
        owner: &str,
    ) -> Result<Option<LeaderLock>, LeaseStoreError> {
        bounded(
            "write_leader_lock",
            self.call,
            self.inner.write_leader_lock(expected, owner),
        )
        .await
    }
    fn supports_leader_election(&self) -> bool {
        self.inner.supports_leader_election()
    }
    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        bounded("create_lease", self.call, self.inner.create_lease_if_not_exists(lease)).await
    }
    async fn renew_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        bounded("renew_lease", self.call, self.inner.renew_lease(lease)).await
    }
    async fn take_lease(&self, lease: &mut Lease, owner: &str) -> Result<bool, LeaseStoreError> {
        bounded("take_lease", self.call, self.inner.take_lease(lease, owner)).await
    }
    async fn evict_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        bounded("evict_lease", self.call, self.inner.evict_lease(lease)).await
    }
    async fn initiate_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        bounded(
            "initiate_graceful_lease_handoff",
            self.call,
            self.inner.initiate_graceful_lease_handoff(lease, new_owner),
        )
        .await
    }
    async fn retarget_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        bounded(
            "retarget_graceful_lease_handoff",
            self.call,
            self.inner.retarget_graceful_lease_handoff(lease, new_owner),
        )
        .await
    }
    async fn assign_lease(&self, lease: &mut Lease, new_owner: &str) -> Result<bool, LeaseStoreError> {
        bounded("assign_lease", self.call, self.inner.assign_lease(lease, new_owner)).await
    }
    async fn update_lease_checkpoint(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        bounded(
            "update_lease_checkpoint",
            self.call,
            self.inner.update_lease_checkpoint(lease),
        )
        .await
    }
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        bounded("delete_lease", self.call, self.inner.delete_lease(lease)).await
    }
}

/// Makes `owner` the owner (a take or an assignment): ends any handoff and counts an
/// owner switch when the owner changes.
fn set_owner(lease: &mut Lease, owner: &str) {
    if lease.actual_owner() != Some(owner) {
        lease.owner_switches_since_checkpoint += 1;
    }
    lease.lease_owner = Some(owner.to_owned());
    lease.checkpoint_owner = None;
}

/// A lease table in memory, with the trait's conditional semantics (every write is
/// conditional on the counter and owner the caller last saw, and increments the
/// counter). One process only: for unit tests of code built on the library and for
/// measuring the framework without DynamoDB. Production needs a shared table
/// (`kcl-dynamo`).
#[derive(Debug, Default)]
pub struct InMemoryLeaseStore {
    leases: Mutex<HashMap<String, Lease>>,
}

impl InMemoryLeaseStore {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to the stored lease if its owners (and, with `check_counter`,
    /// its counter) are the caller's; `bump` increments the counter. Then gives the
    /// caller the stored lease.
    fn write_if(&self, lease: &mut Lease, check_counter: bool, bump: bool, change: impl FnOnce(&mut Lease)) -> bool {
        let mut map = self.leases();
        match map.get_mut(&lease.lease_key) {
            Some(stored)
                if (!check_counter || stored.lease_counter == lease.lease_counter)
                    && stored.lease_owner == lease.lease_owner
                    && stored.checkpoint_owner == lease.checkpoint_owner =>
            {
                change(stored);
                if bump {
                    stored.lease_counter += 1;
                }
                *lease = stored.clone();
                true
            }
            _ => false,
        }
    }

    /// A write conditional on counter and owners that increments the counter.
    fn write(&self, lease: &mut Lease, change: impl FnOnce(&mut Lease)) -> bool {
        self.write_if(lease, true, true, change)
    }
}

#[async_trait]
impl LeaseStore for InMemoryLeaseStore {
    async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
        Ok(false)
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
        Ok(self.leases().values().cloned().collect())
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseStoreError> {
        Ok(self.leases().get(lease_key).cloned())
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        let mut map = self.leases();
        if map.contains_key(&lease.lease_key) {
            return Ok(false);
        }
        map.insert(lease.lease_key.clone(), lease.clone());
        Ok(true)
    }

    async fn renew_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        Ok(self.write(lease, |_| {}))
    }

    async fn take_lease(&self, lease: &mut Lease, owner: &str) -> Result<bool, LeaseStoreError> {
        Ok(self.write(lease, |l| set_owner(l, owner)))
    }

    async fn evict_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        Ok(self.write_if(lease, false, true, |l| {
            if l.checkpoint_owner.take().is_none() {
                l.lease_owner = None;
            }
        }))
    }

    async fn initiate_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        if lease.lease_owner.is_none() || lease.checkpoint_owner.is_some() {
            return Ok(false);
        }
        Ok(self.write_if(lease, false, false, |l| {
            l.checkpoint_owner = l.lease_owner.replace(new_owner.to_owned());
        }))
    }

    async fn retarget_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        if lease.checkpoint_owner.is_none() {
            return Ok(false);
        }
        Ok(self.write_if(lease, false, false, |l| l.lease_owner = Some(new_owner.to_owned())))
    }

    async fn assign_lease(&self, lease: &mut Lease, new_owner: &str) -> Result<bool, LeaseStoreError> {
        Ok(self.write_if(lease, false, true, |l| set_owner(l, new_owner)))
    }

    async fn update_lease_checkpoint(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let wanted = lease.clone();
        let latest_start = wanted.latest_start();
        Ok(self.write(lease, move |l| {
            l.checkpoint = wanted.checkpoint;
            l.pending_checkpoint = wanted.pending_checkpoint;
            l.pending_checkpoint_state = wanted.pending_checkpoint_state;
            l.owner_switches_since_checkpoint = 0;
            l.latest_start_timestamp = latest_start;
            l.child_shard_ids = wanted.child_shard_ids;
        }))
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        self.leases().remove(&lease.lease_key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_in_memory_store_gives_a_handoff_on_only_from_the_receiver_seen() {
        let store = InMemoryLeaseStore::default();
        let mut lease = Lease::new("shard", ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(store.create_lease_if_not_exists(&lease).await.expect("create"));
        assert!(store.take_lease(&mut lease, "a").await.expect("take"));
        assert!(!store
            .retarget_graceful_lease_handoff(&mut lease.clone(), "c")
            .await
            .expect("none under way"));
        assert!(store
            .initiate_graceful_lease_handoff(&mut lease, "b")
            .await
            .expect("handoff"));
        let mut stale = lease.clone();
        stale.lease_owner = Some("x".into());
        assert!(!store
            .retarget_graceful_lease_handoff(&mut stale, "c")
            .await
            .expect("refused"));
        let counter = lease.lease_counter;
        assert!(store
            .retarget_graceful_lease_handoff(&mut lease, "c")
            .await
            .expect("retarget"));
        assert_eq!(
            (
                lease.lease_owner.as_deref(),
                lease.checkpoint_owner.as_deref(),
                lease.lease_counter
            ),
            (Some("c"), Some("a"), counter)
        );
    }
}
