//! [`TimedLeaseStore`]: the store wrapper that bounds every lease-table call.

use async_trait::async_trait;

use super::model::{LeaderLock, Lease, LeaseListing};
use super::store::LeaseStore;
use crate::error::LeaseStoreError;

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

/// `call`, failed with an unknown outcome when it takes longer than `limit`.
pub(super) async fn bounded<T>(
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

    async fn delete_lease_if_unchanged(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        bounded(
            "delete_lease_if_unchanged",
            self.call,
            self.inner.delete_lease_if_unchanged(lease),
        )
        .await
    }
}
