//! The lease table seen from outside a worker: polling its owners ([`poll_leases`]),
//! their load ([`load`]), and taking a lease as another worker would ([`steal_lease`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use kcl_dynamo::DynamoLeaseStore;

/// Polls the lease table until `pred` holds on the owners (shard -> owner), sampling
/// every `every`, and calls `observe` with each sample. There is no event to await in
/// another process's writes to DynamoDB, so this is a bounded poll.
pub async fn poll_leases(
    store: &DynamoLeaseStore,
    timeout: Duration,
    every: Duration,
    mut observe: impl FnMut(&BTreeMap<String, Option<String>>),
    pred: impl Fn(&BTreeMap<String, Option<String>>) -> bool,
) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    use kcl_core::LeaseStore as _;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let leases = match store.list_leases().await {
            // The workers have not created the table yet.
            Err(kcl_core::LeaseStoreError::TableNotFound { .. }) => Vec::new(),
            other => other?,
        };
        let owners: BTreeMap<String, Option<String>> =
            leases.into_iter().map(|l| (l.lease_key, l.lease_owner)).collect();
        observe(&owners);
        if pred(&owners) {
            return Ok(owners);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?}; owners: {owners:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Leases per owner, sorted by count (unowned leases are not counted).
pub fn load(owners: &BTreeMap<String, Option<String>>) -> Vec<usize> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for owner in owners.values().flatten() {
        *counts.entry(owner).or_default() += 1;
    }
    let mut v: Vec<usize> = counts.into_values().collect();
    v.sort_unstable();
    v
}

/// Takes `shard_id`'s lease for `owner` as another worker would: reads it and takes it
/// with the counter read, again if the owner's renewal moved the counter in between.
pub async fn steal_lease(store: &DynamoLeaseStore, shard_id: &str, owner: &str) -> anyhow::Result<kcl_core::Lease> {
    use kcl_core::LeaseStore as _;
    for _ in 0..20 {
        let mut lease = store.get_lease(shard_id).await?.context("lease to steal")?;
        if store.take_lease(&mut lease, owner).await? {
            return Ok(lease);
        }
    }
    bail!("could not take {shard_id}: its counter kept moving")
}
