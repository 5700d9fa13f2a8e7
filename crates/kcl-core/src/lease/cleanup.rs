//! Cleanup of leases nothing needs any more (the Java KCL's `LeaseCleanupManager`):
//! finished shards' leases once their children have started, and in multi-stream mode
//! the leases of streams no longer consumed, each after its delay on this worker's
//! clock with the counter unchanged.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::model::Lease;
use super::store::LeaseStore;
use crate::config::LeaseManagementConfig;
use crate::error::ErrorChain;

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
    /// Deletes the finished leases of `leases` (one read of the table) that
    /// [`LeaseCleanup::leases_to_delete`] names. A failed delete is logged; a later
    /// pass tries again.
    pub(crate) async fn delete_finished(
        &mut self,
        store: &dyn LeaseStore,
        leases: &[Lease],
        now: Instant,
        config: &LeaseManagementConfig,
    ) {
        let delay = config.completed_lease_cleanup_delay;
        for finished in self.leases_to_delete(leases, now, delay, config.failover_time) {
            match store.delete_lease_if_unchanged(&finished).await {
                Ok(true) => {
                    info!(shard_id = %finished.lease_key, owner = ?finished.lease_owner, "deleted the lease of a finished shard")
                }
                Ok(false) => {
                    debug!(shard_id = %finished.lease_key, "a finished lease changed since it was read; kept for now")
                }
                Err(e) => {
                    warn!(shard_id = %finished.lease_key, error = %ErrorChain(&e), "deleting a finished lease failed")
                }
            }
        }
    }

    /// Deletes the leases of `leases` of streams no longer `consumed` that
    /// [`LeaseCleanup::former_stream_leases_to_delete`] names.
    pub(crate) async fn delete_former_stream_leases(
        &mut self,
        store: &dyn LeaseStore,
        leases: &[Lease],
        consumed: impl Fn(&Lease) -> bool,
        now: Instant,
        delay: Duration,
    ) {
        for lease in self.former_stream_leases_to_delete(leases, consumed, now, delay) {
            // Conditional on the lease as judged: a worker whose tracker still lists
            // the stream may have taken or renewed it since the read.
            match store.delete_lease_if_unchanged(&lease).await {
                Ok(true) => {
                    info!(shard_id = %lease.lease_key, stream = ?lease.stream_name, "deleted a lease of a stream no longer consumed")
                }
                Ok(false) => {
                    info!(shard_id = %lease.lease_key, stream = ?lease.stream_name, "a lease of a former stream was written since it was judged stale; kept")
                }
                Err(e) => {
                    warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "deleting a lease of a former stream failed")
                }
            }
        }
    }

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
