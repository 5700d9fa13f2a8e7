//! [`InMemoryLeaseStore`]: a lease table in memory with the trait's conditional
//! semantics.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;

use super::model::Lease;
use super::store::LeaseStore;
use crate::error::LeaseStoreError;

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

    async fn delete_lease_if_unchanged(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        let mut map = self.leases();
        let unchanged = map.get(&lease.lease_key).is_some_and(|stored| {
            stored.lease_counter == lease.lease_counter
                && stored.lease_owner == lease.lease_owner
                && stored.checkpoint_owner == lease.checkpoint_owner
        });
        if unchanged {
            map.remove(&lease.lease_key);
        }
        Ok(unchanged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sequence::ExtendedSequenceNumber;

    /// A Java KCL 3.x old owner completes a handoff with `assignLease` to the receiver
    /// it read, conditional on that owner and not on the counter its renewals moved.
    #[tokio::test]
    async fn the_in_memory_store_completes_a_handoff_as_the_java_old_owner_does() {
        let store = InMemoryLeaseStore::default();
        let mut lease = Lease::new("shard", ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(store.create_lease_if_not_exists(&lease).await.expect("create"));
        assert!(store.take_lease(&mut lease, "a").await.expect("take"));
        assert!(store
            .initiate_graceful_lease_handoff(&mut lease, "b")
            .await
            .expect("handoff"));
        let read_by_old_owner = lease.clone();
        assert!(store.renew_lease(&mut lease).await.expect("renewed"));
        let mut stale = read_by_old_owner.clone();
        stale.lease_owner = Some("x".into());
        assert!(!store.assign_lease(&mut stale, "x").await.expect("refused"));
        let mut old_owner = read_by_old_owner;
        assert!(store.assign_lease(&mut old_owner, "b").await.expect("assigned"));
        assert_eq!(
            (
                old_owner.lease_owner.as_deref(),
                old_owner.checkpoint_owner.as_deref(),
                old_owner.lease_counter
            ),
            (Some("b"), None, lease.lease_counter + 1)
        );
    }
}
