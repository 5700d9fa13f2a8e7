//! Fault injection on the lease-table side: [`FaultyLeaseStore`], a
//! [`kcl_core::LeaseStore`] wrapper (the Java KCL's `ExceptionThrowingLeaseRefresher`)
//! for partitions, failed renewals, failed reads, and writes that land but are reported
//! as failed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use async_trait::async_trait;
use kcl_core::{Lease, LeaseStore, LeaseStoreError};
use tokio::sync::Notify;

/// A [`kcl_core::LeaseStore`] wrapper that injects failures.
///
/// - While `partitioned`, every call hangs for `hang` and then fails as a network error
///   would (use an hour to mean "forever"); [`wait_hung`](Self::wait_hung) awaits such
///   a call.
/// - Otherwise every `fail_every_nth_write`-th lease write that keeps a lease alive (a
///   renewal or a checkpoint, which renews too) fails without reaching the store
///   (deterministic, so a short test always sees failures).
/// - `land_then_fail_*`: while positive, a checkpoint / take / renewal is passed to the
///   inner store (on a copy of the caller's lease, so it lands) and then reported as a
///   [`LeaseStoreError::Dependency`] (`"injected: checkpoint landed but reported
///   failure"`, `take` / `renewal` for the others), with the caller's lease left as it
///   was: the "outcome unknown" case of a timed-out write. (The error is reported even
///   when the inner store's condition failed and nothing was written; an error of the
///   inner store is returned as is.)
/// - `fail_get_lease`: while positive, `get_lease` fails without reaching the store.
/// - `fail_takes`: while positive, `take_lease` fails without reaching the store.
/// - `fail_creates`: while set, `create_lease_if_not_exists` fails without reaching
///   the store (a lease whose creation keeps failing).
/// - `fail_evictions`: while positive, `evict_lease` (a release) fails without reaching
///   the store, as a release that timed out.
///
/// Each `land_then_fail_*` and `fail_get_lease` counter is decremented per injected
/// failure. All counters are shared by clones.
#[derive(Debug, Clone)]
pub struct FaultyLeaseStore {
    inner: Arc<dyn LeaseStore>,
    /// Cut off from the lease table.
    pub partitioned: Arc<AtomicBool>,
    /// How long a call hangs before failing while partitioned.
    pub hang: Duration,
    /// Every n-th renewal or checkpoint fails outside a partition (0: none).
    pub fail_every_nth_write: usize,
    /// Renewals and checkpoints counted for `fail_every_nth_write`.
    writes: Arc<AtomicUsize>,
    /// Calls failed so far (every injected failure).
    pub failures: Arc<AtomicUsize>,
    /// While positive: `update_lease_checkpoint` writes, then fails (decrements).
    pub land_then_fail_checkpoints: Arc<AtomicUsize>,
    /// While positive: `take_lease` writes, then fails (decrements).
    pub land_then_fail_takes: Arc<AtomicUsize>,
    /// While positive: `renew_lease` writes, then fails (decrements).
    pub land_then_fail_renewals: Arc<AtomicUsize>,
    /// While positive: `get_lease` fails without reading (decrements).
    pub fail_get_lease: Arc<AtomicUsize>,
    /// While positive: `evict_lease` fails without writing (decrements).
    pub fail_evictions: Arc<AtomicUsize>,
    /// While positive: `take_lease` fails without writing (decrements).
    pub fail_takes: Arc<AtomicUsize>,
    /// While set: `create_lease_if_not_exists` fails without writing.
    pub fail_creates: Arc<AtomicBool>,
    /// `take_lease` calls so far (including failed ones).
    pub takes: Arc<AtomicUsize>,
    /// `create_lease_if_not_exists` calls so far (including failed ones).
    pub creates: Arc<AtomicUsize>,
    /// `update_lease_checkpoint` calls so far (including failed ones).
    pub checkpoints: Arc<AtomicUsize>,
    /// Calls that started hanging in a partition so far (cumulative: a call counts from
    /// the moment it starts hanging, and still counts after it failed).
    pub hung_calls: Arc<AtomicUsize>,
    /// Of those, full reads of the table (`list_leases`, `list_readable_leases`).
    pub hung_scans: Arc<AtomicUsize>,
    /// Notified when a counter the `wait_*` methods watch moves.
    hung: Arc<Notify>,
}

/// Decrements `counter` if it is positive; true when it did.
fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl FaultyLeaseStore {
    /// Wraps a store.
    pub fn new(inner: impl LeaseStore, hang: Duration, fail_every_nth_write: usize) -> Self {
        Self {
            inner: Arc::new(inner),
            partitioned: Arc::default(),
            hang,
            fail_every_nth_write,
            writes: Arc::default(),
            failures: Arc::default(),
            land_then_fail_checkpoints: Arc::default(),
            land_then_fail_takes: Arc::default(),
            land_then_fail_renewals: Arc::default(),
            fail_get_lease: Arc::default(),
            fail_evictions: Arc::default(),
            fail_takes: Arc::default(),
            fail_creates: Arc::default(),
            takes: Arc::default(),
            creates: Arc::default(),
            checkpoints: Arc::default(),
            hung_calls: Arc::default(),
            hung_scans: Arc::default(),
            hung: Arc::default(),
        }
    }

    /// Waits until at least `n` calls started hanging in a partition (see
    /// [`hung_calls`](Self::hung_calls)); fails after `timeout`.
    pub async fn wait_hung(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_counter(&self.hung_calls, "hanging lease-table calls", n, timeout)
            .await
    }

    /// Waits until at least `n` full reads of the table started hanging (see
    /// [`hung_scans`](Self::hung_scans)); fails after `timeout`.
    pub async fn wait_hung_scans(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_counter(&self.hung_scans, "hanging lease-table scans", n, timeout)
            .await
    }

    /// Waits until at least `n` `take_lease` calls were made; fails after `timeout`.
    pub async fn wait_takes(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_counter(&self.takes, "lease takes", n, timeout).await
    }

    /// Waits until at least `n` `create_lease_if_not_exists` calls were made; fails
    /// after `timeout`.
    pub async fn wait_creates(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_counter(&self.creates, "lease creations", n, timeout).await
    }

    async fn wait_counter(&self, counter: &AtomicUsize, what: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.hung.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if counter.load(Ordering::SeqCst) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {n} {what}: {} so far",
                    counter.load(Ordering::SeqCst)
                );
            }
        }
    }

    async fn gate_scan(&self) -> Result<(), LeaseStoreError> {
        if self.partitioned.load(Ordering::SeqCst) {
            self.hung_scans.fetch_add(1, Ordering::SeqCst);
        }
        self.gate().await
    }

    /// Counts a renewal or checkpoint; true when it is one to fail.
    fn nth_write_fails(&self) -> bool {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        self.fail_every_nth_write > 0 && n.is_multiple_of(self.fail_every_nth_write)
    }

    fn injected(&self, message: &str, source: &str) -> LeaseStoreError {
        self.failures.fetch_add(1, Ordering::SeqCst);
        LeaseStoreError::Dependency {
            message: message.into(),
            source: source.into(),
        }
    }

    async fn gate(&self) -> Result<(), LeaseStoreError> {
        if self.partitioned.load(Ordering::SeqCst) {
            self.hung_calls.fetch_add(1, Ordering::SeqCst);
            self.hung.notify_waiters();
            tokio::time::sleep(self.hang).await;
            return Err(self.injected("injected: lease table unreachable", "partitioned"));
        }
        Ok(())
    }

    /// The error of a write that was passed on (`what`: `checkpoint`, `take` or
    /// `renewal`) and then reported as failed.
    fn landed_but_failed(&self, what: &str) -> LeaseStoreError {
        self.injected(&format!("injected: {what} landed but reported failure"), "injected")
    }
}

#[async_trait]
impl LeaseStore for FaultyLeaseStore {
    async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        self.inner.create_lease_table_if_not_exists().await
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
        self.gate_scan().await?;
        self.inner.list_leases().await
    }

    async fn list_readable_leases(&self) -> Result<kcl_core::LeaseListing, LeaseStoreError> {
        self.gate_scan().await?;
        self.inner.list_readable_leases().await
    }

    async fn get_lease(&self, key: &str) -> Result<Option<Lease>, LeaseStoreError> {
        self.gate().await?;
        if take_one(&self.fail_get_lease) {
            return Err(self.injected("injected: lease read failed", "injected"));
        }
        self.inner.get_lease(key).await
    }

    async fn list_lease_keys_for_owner(&self, owner: &str) -> Result<Vec<String>, LeaseStoreError> {
        self.gate_scan().await?;
        self.inner.list_lease_keys_for_owner(owner).await
    }

    async fn read_leader_lock(&self) -> Result<Option<kcl_core::LeaderLock>, LeaseStoreError> {
        self.gate().await?;
        self.inner.read_leader_lock().await
    }

    async fn write_leader_lock(
        &self,
        expected: Option<&kcl_core::LeaderLock>,
        owner: &str,
    ) -> Result<Option<kcl_core::LeaderLock>, LeaseStoreError> {
        self.gate().await?;
        self.inner.write_leader_lock(expected, owner).await
    }

    fn supports_leader_election(&self) -> bool {
        self.inner.supports_leader_election()
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        self.creates.fetch_add(1, Ordering::SeqCst);
        self.hung.notify_waiters();
        self.gate().await?;
        if self.fail_creates.load(Ordering::SeqCst) {
            return Err(self.injected("injected: lease creation failed", "injected"));
        }
        self.inner.create_lease_if_not_exists(lease).await
    }

    async fn renew_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        if self.nth_write_fails() {
            return Err(self.injected("injected renewal failure", "injected"));
        }
        if take_one(&self.land_then_fail_renewals) {
            self.inner.renew_lease(&mut lease.clone()).await?;
            return Err(self.landed_but_failed("renewal"));
        }
        self.inner.renew_lease(lease).await
    }

    async fn take_lease(&self, lease: &mut Lease, owner: &str) -> Result<bool, LeaseStoreError> {
        self.takes.fetch_add(1, Ordering::SeqCst);
        self.hung.notify_waiters();
        self.gate().await?;
        if take_one(&self.fail_takes) {
            return Err(self.injected("injected: take failed", "injected"));
        }
        if take_one(&self.land_then_fail_takes) {
            self.inner.take_lease(&mut lease.clone(), owner).await?;
            return Err(self.landed_but_failed("take"));
        }
        self.inner.take_lease(lease, owner).await
    }

    async fn evict_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        if take_one(&self.fail_evictions) {
            return Err(self.injected("injected: release failed", "injected"));
        }
        self.inner.evict_lease(lease).await
    }

    async fn initiate_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        self.inner.initiate_graceful_lease_handoff(lease, new_owner).await
    }

    async fn assign_lease(&self, lease: &mut Lease, new_owner: &str) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        self.inner.assign_lease(lease, new_owner).await
    }

    async fn update_lease_checkpoint(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        self.checkpoints.fetch_add(1, Ordering::SeqCst);
        self.gate().await?;
        if self.nth_write_fails() {
            return Err(self.injected("injected checkpoint failure", "injected"));
        }
        if take_one(&self.land_then_fail_checkpoints) {
            self.inner.update_lease_checkpoint(&mut lease.clone()).await?;
            return Err(self.landed_but_failed("checkpoint"));
        }
        self.inner.update_lease_checkpoint(lease).await
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        self.gate().await?;
        self.inner.delete_lease(lease).await
    }

    async fn delete_lease_if_unchanged(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        self.gate().await?;
        self.inner.delete_lease_if_unchanged(lease).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;
    use kcl_core::{ExtendedSequenceNumber, SequenceNumber};
    use kcl_dynamo::DynamoLeaseStore;

    async fn store() -> anyhow::Result<(kcl_local::LocalBackend, DynamoLeaseStore)> {
        let backend = kcl_local::LocalBackend::start().await?;
        let store = DynamoLeaseStore::new(backend.dynamodb_client(), crate::unique("app"));
        store.create_lease_table_if_not_exists().await?;
        store
            .create_lease_if_not_exists(&Lease::new("shard", ExtendedSequenceNumber::TRIM_HORIZON))
            .await?;
        Ok((backend, store))
    }

    #[tokio::test]
    async fn a_checkpoint_that_lands_then_fails_is_stored_but_not_applied_to_the_caller() -> anyhow::Result<()> {
        let (_backend, store) = store().await?;
        let faulty = FaultyLeaseStore::new(store.clone(), Duration::from_secs(3600), 0);
        let mut lease = faulty.get_lease("shard").await?.context("lease")?;
        assert!(faulty.take_lease(&mut lease, "worker").await?);
        assert_eq!(faulty.takes.load(Ordering::SeqCst), 1);

        let checkpoint = ExtendedSequenceNumber::new(SequenceNumber::parse("12345")?, 0);
        lease.checkpoint = checkpoint.clone();
        let before = lease.clone();
        faulty.land_then_fail_checkpoints.store(1, Ordering::SeqCst);
        let err = faulty
            .update_lease_checkpoint(&mut lease)
            .await
            .err()
            .context("reported failure")?;
        assert!(
            matches!(&err, LeaseStoreError::Dependency { message, .. } if message == "injected: checkpoint landed but reported failure"),
            "{err}"
        );
        assert_eq!(lease, before, "the caller's lease is unchanged");
        assert_eq!(faulty.land_then_fail_checkpoints.load(Ordering::SeqCst), 0);
        assert_eq!(faulty.checkpoints.load(Ordering::SeqCst), 1);

        let stored = store.get_lease("shard").await?.context("stored lease")?;
        assert_eq!(stored.checkpoint, checkpoint, "the write landed");
        assert_eq!(stored.lease_counter, before.lease_counter + 1);
        // The caller's stale counter now loses the conditional write.
        assert!(!faulty.update_lease_checkpoint(&mut lease).await?);
        Ok(())
    }

    #[tokio::test]
    async fn failed_reads_and_hanging_calls() -> anyhow::Result<()> {
        let (_backend, store) = store().await?;
        let faulty = FaultyLeaseStore::new(store, Duration::from_secs(3600), 0);
        faulty.fail_get_lease.store(1, Ordering::SeqCst);
        assert!(faulty.get_lease("shard").await.is_err());
        assert!(faulty.get_lease("shard").await?.is_some());
        assert_eq!(faulty.failures.load(Ordering::SeqCst), 1);

        faulty.partitioned.store(true, Ordering::SeqCst);
        let call = tokio::spawn({
            let faulty = faulty.clone();
            async move { faulty.list_leases().await }
        });
        faulty.wait_hung(1, Duration::from_secs(1)).await?;
        assert!(!call.is_finished());
        call.abort();
        assert!(faulty.wait_hung(2, Duration::from_millis(50)).await.is_err());
        Ok(())
    }
}
