//! The lease model: one item of the lease table per shard ([`Lease`]), the leader lock
//! ([`LeaderLock`]) and a full read of the table ([`LeaseListing`]).

use std::collections::BTreeSet;
use std::time::SystemTime;

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
