//! [`DynamoLeaseStore`]: the [`LeaseStore`] operations as DynamoDB calls (the Java KCL's
//! `DynamoDBLeaseRefresher`).
//!
//! Every write that changes ownership or progress is an `UpdateItem` whose
//! `ConditionExpression` checks the counter and/or owner the caller last saw, and which
//! sets the counter to one more. A failed condition means another worker (or an
//! earlier write of ours) got there first and is reported as `Ok(false)`. Values always
//! travel as `ExpressionAttributeValues` and names as `ExpressionAttributeNames`; no item
//! data is ever spliced into an expression string. Updates ask for `ReturnValues =
//! ALL_NEW` so that the caller's lease becomes exactly what is stored, except renewals:
//! they only move the counter, their condition pins the rest of the item, and the
//! caller applies the new counter itself.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use aws_sdk_dynamodb::Client;
use kcl_core::{ConfigError, LeaderLock, Lease, LeaseListing, LeaseStore, LeaseStoreError};

use crate::error::{kind_of, to_store_error, ErrorKind};
use crate::item::{self, n, s, Item};
use crate::table::{self, BillingMode, TableOptions};

/// A [`LeaseStore`] on a DynamoDB table with the Java KCL's lease item schema.
///
/// Cheap to clone (the SDK client is reference-counted) and safe to share between tasks.
///
/// | operation | DynamoDB call | condition | writes |
/// |---|---|---|---|
/// | `create_lease_if_not_exists` | `PutItem` | no item with the key | the whole lease |
/// | `renew_lease` | `UpdateItem` | counter and owner | counter + 1 |
/// | `take_lease` | `UpdateItem` | counter and owner | owner, checkpoint owner removed, counter + 1, owner switches + 1 if the owner changes |
/// | `evict_lease` | `UpdateItem` | owner, item exists | checkpoint owner removed during a handoff (completing it), else owner removed; counter + 1 |
/// | `initiate_graceful_lease_handoff` | `UpdateItem` | owner (no checkpoint owner), item exists | owner = the new owner, checkpoint owner = the old one; counter unchanged |
/// | `assign_lease` | `UpdateItem` | owner, item exists | owner, checkpoint owner removed, counter + 1, owner switches + 1 if the owner changes |
/// | `update_lease_checkpoint` | `UpdateItem` | counter and owner | checkpoint, pending checkpoint (set or removed), owner switches = 0, children (when known), counter + 1 |
/// | `delete_lease` | `DeleteItem` | none | — |
/// | `list_leases` / `list_readable_leases` / `get_lease` | `Scan` (all pages) / `Scan`, corrupt items set aside / `GetItem` | — | — |
///
/// "Owner" in a condition is `leaseOwner` and `checkpointOwner` as the caller's lease has
/// them, each "absent" when `None`. The SDK client's retry and timeout configuration applies to every call; the
/// scheduler also bounds every call it makes (`LeaseManagementConfig::
/// lease_store_call_timeout` and `lease_table_scan_timeout`), and table creation is
/// bounded by the table creation timeout.
///
/// # Errors
/// Throttling ([`LeaseStoreError::Throttled`]) and a missing table
/// ([`LeaseStoreError::TableNotFound`]) are recognised on the SDK's typed error
/// variants; everything else, timeouts and connection failures included, is
/// [`LeaseStoreError::Dependency`] with the SDK error as its source.
///
/// # Cancel safety
/// Dropping a write's future after the request was sent leaves its outcome unknown, as
/// with a `Dependency` error: the caller's lease is not updated, and the next renewal
/// or read shows what happened.
#[derive(Clone)]
pub struct DynamoLeaseStore {
    client: Client,
    table_name: String,
    /// Whether `get_lease` and `list_leases` use strongly consistent reads. A worker
    /// judging expiry or choosing leases to take must see the latest counters, so this
    /// is on unless the user opts out to halve the read cost.
    consistent_reads: bool,
    /// `Limit` of each `Scan` page in `list_leases`; `None` lets DynamoDB fill 1 MB pages.
    scan_page_size: Option<i32>,
    table: TableOptions,
    /// The table holding the leader lock (`None`: no leader election).
    leader_table: Option<String>,
    /// Set once the leader lock's table exists.
    leader_ready: Arc<AtomicBool>,
}

/// The key of the leader lock's item in its table.
const LEADER_LOCK_KEY: &str = "leader";

/// The leader lock's table for a lease table: `<lease table>-LeaderLock`, when that is
/// still a valid table name.
fn leader_table_name(lease_table: &str) -> Option<String> {
    let name = format!("{lease_table}-LeaderLock");
    (name.len() <= 255).then_some(name)
}

impl fmt::Debug for DynamoLeaseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The SDK client is left out: its configuration holds the credentials provider.
        f.debug_struct("DynamoLeaseStore")
            .field("table_name", &self.table_name)
            .field("consistent_reads", &self.consistent_reads)
            .field("scan_page_size", &self.scan_page_size)
            .field("billing_mode", &self.table.billing_mode)
            .field("table_creation_timeout", &self.table.creation_timeout)
            .finish_non_exhaustive()
    }
}

impl DynamoLeaseStore {
    /// A store on the table `table_name` with the default options: on-demand billing
    /// for a table it creates, a 2-minute bound on waiting for the table to become
    /// `ACTIVE`, and strongly consistent reads.
    ///
    /// The table name is not checked here (DynamoDB rejects an invalid one on first
    /// use); [`DynamoLeaseStore::builder`] checks it up front.
    pub fn new(client: Client, table_name: impl Into<String>) -> Self {
        let table_name = table_name.into();
        Self {
            client,
            leader_table: leader_table_name(&table_name),
            table_name,
            consistent_reads: true,
            scan_page_size: None,
            table: TableOptions::default(),
            leader_ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A builder for a store with non-default options.
    pub fn builder(client: Client, table_name: impl Into<String>) -> DynamoLeaseStoreBuilder {
        DynamoLeaseStoreBuilder {
            client,
            table_name: table_name.into(),
            billing_mode: BillingMode::default(),
            table_creation_timeout: TableOptions::default().creation_timeout,
            table_status_poll_interval: TableOptions::default().poll_interval,
            consistent_reads: true,
            scan_page_size: None,
            leader_election: true,
        }
    }

    /// The lease table's name.
    pub fn table_name(&self) -> &str {
        &self.table_name
    }

    /// Reads one lease; `consistent` asks for a strongly consistent read (always used
    /// when deciding whether a failed write was in fact ours).
    async fn read(&self, lease_key: &str, consistent: bool) -> Result<Option<Lease>, LeaseStoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .set_key(Some(item::key(lease_key)))
            .consistent_read(consistent)
            .send()
            .await
            .map_err(|e| self.error(e, "GetItem", lease_key))?;
        match output.item {
            Some(found) => {
                let lease = item::item_to_lease(&found)?;
                if lease.is_none() {
                    tracing::debug!(lease_key, "item is not a lease; reading it as absent");
                }
                Ok(lease)
            }
            None => Ok(None),
        }
    }

    /// Scans the whole table (all pages): the leases, and an error per item that looks
    /// like a lease but cannot be read. Items of other kinds are skipped.
    async fn scan_all(&self) -> Result<LeaseListing, LeaseStoreError> {
        let mut leases = Vec::new();
        let mut corrupt = Vec::new();
        let mut start_key: Option<Item> = None;
        loop {
            let output = self
                .client
                .scan()
                .table_name(&self.table_name)
                .consistent_read(self.consistent_reads)
                .set_limit(self.scan_page_size)
                .set_exclusive_start_key(start_key.take())
                .send()
                .await
                .map_err(|e| to_store_error(e, &self.table_name, format!("Scan of table {:?}", self.table_name)))?;
            for found in output.items.unwrap_or_default() {
                match item::item_to_lease(&found) {
                    Ok(Some(lease)) => leases.push(lease),
                    Ok(None) => {}
                    Err(e) => corrupt.push(e),
                }
            }
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start_key = Some(key),
                _ => return Ok(LeaseListing::new(leases, corrupt)),
            }
        }
    }

    /// Runs a conditional `UpdateItem` on one lease.
    async fn update(
        &self,
        operation: &'static str,
        lease_key: &str,
        update: Update,
        returns: ReturnValue,
    ) -> Result<Updated, LeaseStoreError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table_name)
            .set_key(Some(item::key(lease_key)))
            .update_expression(update.expression())
            .set_condition_expression(update.condition())
            .set_expression_attribute_names(Some(update.names))
            .set_expression_attribute_values(Some(update.values))
            .return_values(returns)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Updated::Written(
                output
                    .attributes
                    .and_then(|written| read_back(operation, lease_key, &written)),
            )),
            Err(err) if kind_of(&err) == ErrorKind::ConditionalCheckFailed => Ok(Updated::ConditionFailed),
            Err(err) => Err(self.error(err, operation, lease_key)),
        }
    }

    fn error<E>(&self, err: aws_sdk_dynamodb::error::SdkError<E>, operation: &str, lease_key: &str) -> LeaseStoreError
    where
        E: crate::error::Classify + std::error::Error + Send + Sync + 'static,
    {
        to_store_error(
            err,
            &self.table_name,
            format!("{operation} of lease {lease_key:?} in table {:?}", self.table_name),
        )
    }
}

/// The leader lock as its item stores it; `None` for an item that is not one.
fn read_lock(found: &Item) -> Option<LeaderLock> {
    let owner = match found.get(item::LEASE_OWNER) {
        Some(AttributeValue::S(owner)) => owner.clone(),
        _ => return None,
    };
    let version = match found.get(item::LEASE_COUNTER) {
        Some(AttributeValue::N(version)) => version.parse().ok()?,
        _ => return None,
    };
    Some(LeaderLock::new(owner, version))
}

/// The outcome of a conditional update.
enum Updated {
    /// Written; the stored lease as `ALL_NEW` returned it, when it could be read.
    Written(Option<Box<Lease>>),
    /// The condition failed: the item is not as the caller saw it.
    ConditionFailed,
}

/// The lease as an update's `ALL_NEW` attributes show it. The write succeeded, so an
/// attribute that cannot be read must not turn it into an error: the caller falls back
/// to the values it wrote, and the next read reports the corruption.
fn read_back(operation: &str, lease_key: &str, written: &Item) -> Option<Box<Lease>> {
    match item::item_to_lease(written) {
        Ok(lease) => lease.map(Box::new),
        Err(error) => {
            tracing::warn!(lease_key, error = %kcl_core::error::ErrorChain(&error), "{operation}: cannot read the written lease back");
            None
        }
    }
}

/// Updates `lease` after a successful write: to the stored lease when DynamoDB returned
/// it, else by applying `wrote` (the same changes, computed locally).
fn apply(lease: &mut Lease, written: Option<Box<Lease>>, wrote: impl FnOnce(&mut Lease)) {
    match written {
        Some(stored) => *lease = *stored,
        None => wrote(lease),
    }
}

/// The counter after one more write.
fn next_counter(lease: &Lease) -> Result<u64, LeaseStoreError> {
    lease
        .lease_counter
        .checked_add(1)
        .ok_or_else(|| LeaseStoreError::CorruptLease {
            lease_key: lease.lease_key.clone(),
            attribute: item::LEASE_COUNTER.to_owned(),
            reason: "the counter is at its maximum and cannot be incremented".to_owned(),
        })
}

/// An `UpdateExpression` with its condition, names and values, built from attribute
/// names and typed values (never from item data spliced into the text).
#[derive(Default)]
struct Update {
    set: Vec<String>,
    remove: Vec<String>,
    conditions: Vec<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    /// The `#name` placeholder of an attribute (attribute names here are alphanumeric).
    fn name(&mut self, attribute: &str) -> String {
        let placeholder = format!("#{attribute}");
        self.names.insert(placeholder.clone(), attribute.to_owned());
        placeholder
    }

    /// A `:value` placeholder.
    fn value(&mut self, label: &str, value: AttributeValue) -> String {
        let placeholder = format!(":{label}");
        self.values.insert(placeholder.clone(), value);
        placeholder
    }

    /// `SET attribute = value`.
    fn set(&mut self, attribute: &str, value: AttributeValue) {
        let name = self.name(attribute);
        let value = self.value(attribute, value);
        self.set.push(format!("{name} = {value}"));
    }

    /// `SET attribute = if_not_exists(attribute, 0) + 1`.
    fn increment(&mut self, attribute: &str) {
        let name = self.name(attribute);
        let zero = self.value("zero", n(0));
        let one = self.value("one", n(1));
        self.set.push(format!("{name} = if_not_exists({name}, {zero}) + {one}"));
    }

    /// `REMOVE attribute`.
    fn remove(&mut self, attribute: &str) {
        let name = self.name(attribute);
        self.remove.push(name);
    }

    /// Condition: the stored counter is `counter`.
    fn expect_counter(&mut self, counter: u64) {
        let name = self.name(item::LEASE_COUNTER);
        let value = self.value("expectedCounter", n(counter));
        self.conditions.push(format!("{name} = {value}"));
    }

    /// Condition: the stored `attribute` is `value` (absent for `None`).
    fn expect_string(&mut self, attribute: &str, label: &str, value: Option<&str>) {
        let name = self.name(attribute);
        let condition = match value {
            Some(v) => {
                let value = self.value(label, s(v));
                format!("{name} = {value}")
            }
            None => format!("attribute_not_exists({name})"),
        };
        self.conditions.push(condition);
    }

    /// Condition: the stored owners are the caller's: `leaseOwner` and
    /// `checkpointOwner` (each absent for `None`).
    fn expect_owner(&mut self, lease: &Lease) {
        self.expect_string(item::LEASE_OWNER, "expectedOwner", lease.lease_owner.as_deref());
        self.expect_string(
            item::CHECKPOINT_OWNER,
            "expectedCheckpointOwner",
            lease.checkpoint_owner.as_deref(),
        );
    }

    /// Condition: the item exists.
    fn expect_exists(&mut self) {
        let name = self.name(item::LEASE_KEY);
        self.conditions.push(format!("attribute_exists({name})"));
    }

    /// `SET leaseCounter = leaseCounter + 1`, for writes not conditional on the counter.
    fn increment_counter(&mut self) {
        let counter = self.name(item::LEASE_COUNTER);
        let one = self.value("one", n(1));
        self.set.push(format!("{counter} = {counter} + {one}"));
    }

    fn expression(&self) -> String {
        let mut clauses = Vec::new();
        if !self.set.is_empty() {
            clauses.push(format!("SET {}", self.set.join(", ")));
        }
        if !self.remove.is_empty() {
            clauses.push(format!("REMOVE {}", self.remove.join(", ")));
        }
        clauses.join(" ")
    }

    fn condition(&self) -> Option<String> {
        (!self.conditions.is_empty()).then(|| self.conditions.join(" AND "))
    }
}

#[async_trait]
impl LeaseStore for DynamoLeaseStore {
    async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
        // The wait for ACTIVE has its own bound; this one also covers a single
        // `DescribeTable` or `CreateTable` call that never answers.
        let bound = self.table.creation_timeout + self.table.poll_interval;
        let create = |name: String, owner_index: bool| async move {
            tokio::time::timeout(
                bound,
                table::create_table_if_not_exists(&self.client, &name, &self.table, owner_index),
            )
            .await
            .unwrap_or_else(|_| {
                Err(LeaseStoreError::Dependency {
                    message: format!("creating table {name:?} did not finish within {bound:?}"),
                    source: "table creation timed out".into(),
                })
            })
        };
        let created = create(self.table_name.clone(), true).await?;
        if let Some(leader_table) = &self.leader_table {
            // Without the lock's table every worker reads the whole lease table, as
            // before leader election: slower at scale, never wrong.
            match create(leader_table.clone(), false).await {
                Ok(_) => self.leader_ready.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(
                    table = %leader_table,
                    error = %kcl_core::error::ErrorChain(&e),
                    "cannot create the leader lock's table; every worker reads the whole lease table"
                ),
            }
        }
        Ok(created)
    }

    async fn list_lease_keys_for_owner(&self, owner: &str) -> Result<Vec<String>, LeaseStoreError> {
        let mut keys = Vec::new();
        let mut start_key: Option<Item> = None;
        loop {
            let output = self
                .client
                .query()
                .table_name(&self.table_name)
                .index_name(table::OWNER_INDEX)
                .key_condition_expression("#owner = :owner")
                .expression_attribute_names("#owner", item::LEASE_OWNER)
                .expression_attribute_values(":owner", s(owner))
                .set_exclusive_start_key(start_key.take())
                .send()
                .await;
            let output = match output {
                Ok(output) => output,
                // The index is still being built (or could not be added): read the
                // whole table instead.
                Err(err) if matches!(kind_of(&err), ErrorKind::Validation | ErrorKind::ResourceNotFound) => {
                    tracing::debug!(
                        table = %self.table_name,
                        error = %aws_sdk_dynamodb::error::DisplayErrorContext(&err),
                        "the owner index cannot be queried; reading the whole table"
                    );
                    return Ok(self.scan_all().await?.keys_owned_by(owner));
                }
                Err(err) => {
                    return Err(to_store_error(
                        err,
                        &self.table_name,
                        format!("Query of index {} of table {:?}", table::OWNER_INDEX, self.table_name),
                    ))
                }
            };
            keys.extend(
                output
                    .items
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|found| match found.get(item::LEASE_KEY) {
                        Some(AttributeValue::S(key)) => Some(key.clone()),
                        _ => None,
                    }),
            );
            match output.last_evaluated_key {
                Some(key) if !key.is_empty() => start_key = Some(key),
                _ => return Ok(keys),
            }
        }
    }

    fn supports_leader_election(&self) -> bool {
        self.leader_table.is_some() && self.leader_ready.load(Ordering::Relaxed)
    }

    async fn read_leader_lock(&self) -> Result<Option<LeaderLock>, LeaseStoreError> {
        let Some(leader_table) = &self.leader_table else {
            return Ok(None);
        };
        let output = self
            .client
            .get_item()
            .table_name(leader_table)
            .set_key(Some(item::key(LEADER_LOCK_KEY)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| {
                to_store_error(
                    e,
                    leader_table,
                    format!("GetItem of the leader lock in {leader_table:?}"),
                )
            })?;
        Ok(output.item.as_ref().and_then(read_lock))
    }

    async fn write_leader_lock(
        &self,
        expected: Option<&LeaderLock>,
        owner: &str,
    ) -> Result<Option<LeaderLock>, LeaseStoreError> {
        let Some(leader_table) = &self.leader_table else {
            return Ok(None);
        };
        let version = expected.map_or(1, |l| l.version.saturating_add(1));
        let mut request = self
            .client
            .put_item()
            .table_name(leader_table)
            .item(item::LEASE_KEY, s(LEADER_LOCK_KEY))
            .item(item::LEASE_OWNER, s(owner))
            .item(item::LEASE_COUNTER, n(version));
        request = match expected {
            None => request
                .condition_expression("attribute_not_exists(#key)")
                .expression_attribute_names("#key", item::LEASE_KEY),
            Some(lock) => request
                .condition_expression("#version = :version")
                .expression_attribute_names("#version", item::LEASE_COUNTER)
                .expression_attribute_values(":version", n(lock.version)),
        };
        match request.send().await {
            Ok(_) => Ok(Some(LeaderLock::new(owner, version))),
            Err(err) if kind_of(&err) == ErrorKind::ConditionalCheckFailed => Ok(None),
            Err(err) => Err(to_store_error(
                err,
                leader_table,
                format!("PutItem of the leader lock in {leader_table:?}"),
            )),
        }
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
        let listing = self.scan_all().await?;
        match listing.corrupt.into_iter().next() {
            Some(corrupt) => Err(corrupt),
            None => Ok(listing.leases),
        }
    }

    async fn list_readable_leases(&self) -> Result<LeaseListing, LeaseStoreError> {
        self.scan_all().await
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseStoreError> {
        self.read(lease_key, self.consistent_reads).await
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .set_item(Some(item::lease_to_item(lease)))
            .condition_expression("attribute_not_exists(#leaseKey)")
            .expression_attribute_names("#leaseKey", item::LEASE_KEY)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) if kind_of(&err) == ErrorKind::ConditionalCheckFailed => {
                tracing::debug!(lease_key = %lease.lease_key, "lease already exists");
                Ok(false)
            }
            Err(err) => Err(self.error(err, "PutItem", &lease.lease_key)),
        }
    }

    async fn renew_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let next = next_counter(lease)?;
        let mut update = Update::default();
        update.set(item::LEASE_COUNTER, n(next));
        if let Some(throughput) = lease.throughput_kbps.and_then(item::decimal) {
            update.set(item::THROUGHPUT_KBPS, throughput);
        }
        update.expect_counter(lease.lease_counter);
        update.expect_owner(lease);
        match self
            .update("UpdateItem (renew)", &lease.lease_key, update, ReturnValue::None)
            .await?
        {
            Updated::Written(written) => {
                apply(lease, written, |l| l.lease_counter = next);
                Ok(true)
            }
            Updated::ConditionFailed => {
                // The SDK retries a write whose response was lost; if the first attempt
                // was applied, the retry fails its condition although the renewal
                // happened. The Java KCL recognises that case the same way.
                match self.read(&lease.lease_key, true).await? {
                    Some(stored)
                        if stored.lease_owner == lease.lease_owner
                            && stored.checkpoint_owner == lease.checkpoint_owner
                            && stored.lease_counter == next =>
                    {
                        tracing::debug!(
                            lease_key = %lease.lease_key,
                            "renewal's condition failed but the stored lease shows it applied"
                        );
                        *lease = stored;
                        Ok(true)
                    }
                    _ => {
                        tracing::debug!(
                            lease_key = %lease.lease_key,
                            owner = ?lease.lease_owner,
                            "renewal failed: the lease changed"
                        );
                        Ok(false)
                    }
                }
            }
        }
    }

    async fn take_lease(&self, lease: &mut Lease, owner: &str) -> Result<bool, LeaseStoreError> {
        let next = next_counter(lease)?;
        let owner_changes = lease.actual_owner() != Some(owner);
        let mut update = Update::default();
        update.set(item::LEASE_OWNER, s(owner));
        update.set(item::LEASE_COUNTER, n(next));
        update.remove(item::CHECKPOINT_OWNER);
        if owner_changes {
            update.increment(item::OWNER_SWITCHES_SINCE_CHECKPOINT);
        }
        update.expect_counter(lease.lease_counter);
        update.expect_owner(lease);
        match self
            .update("UpdateItem (take)", &lease.lease_key, update, ReturnValue::AllNew)
            .await?
        {
            Updated::Written(written) => {
                tracing::debug!(
                    lease_key = %lease.lease_key,
                    from = ?lease.lease_owner,
                    to = owner,
                    "took lease"
                );
                apply(lease, written, |l| {
                    l.lease_owner = Some(owner.to_owned());
                    l.checkpoint_owner = None;
                    l.lease_counter = next;
                    if owner_changes {
                        l.owner_switches_since_checkpoint = l.owner_switches_since_checkpoint.saturating_add(1);
                    }
                });
                Ok(true)
            }
            Updated::ConditionFailed => {
                tracing::debug!(lease_key = %lease.lease_key, to = owner, "take failed: the lease changed");
                Ok(false)
            }
        }
    }

    async fn evict_lease(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let mut update = Update::default();
        // During a handoff, removing `checkpointOwner` completes it; otherwise the owner
        // goes. Conditional on the owners only (as in the Java KCL), so the counter is
        // incremented in place rather than set from the caller's possibly older value.
        let completes_handoff = lease.checkpoint_owner.is_some();
        update.remove(if completes_handoff {
            item::CHECKPOINT_OWNER
        } else {
            item::LEASE_OWNER
        });
        update.increment_counter();
        update.expect_owner(lease);
        update.expect_exists();
        match self
            .update("UpdateItem (evict)", &lease.lease_key, update, ReturnValue::AllNew)
            .await?
        {
            Updated::Written(written) => {
                tracing::debug!(lease_key = %lease.lease_key, owner = ?lease.lease_owner, completes_handoff, "evicted lease");
                apply(lease, written, |l| {
                    if l.checkpoint_owner.take().is_none() {
                        l.lease_owner = None;
                    }
                    l.lease_counter = l.lease_counter.saturating_add(1);
                });
                Ok(true)
            }
            Updated::ConditionFailed => Ok(false),
        }
    }

    async fn initiate_graceful_lease_handoff(
        &self,
        lease: &mut Lease,
        new_owner: &str,
    ) -> Result<bool, LeaseStoreError> {
        let (Some(current), None) = (lease.lease_owner.clone(), &lease.checkpoint_owner) else {
            return Ok(false);
        };
        let mut update = Update::default();
        update.set(item::LEASE_OWNER, s(new_owner));
        update.set(item::CHECKPOINT_OWNER, s(&current));
        update.expect_owner(lease);
        update.expect_exists();
        match self
            .update("UpdateItem (handoff)", &lease.lease_key, update, ReturnValue::AllNew)
            .await?
        {
            Updated::Written(written) => {
                tracing::debug!(lease_key = %lease.lease_key, from = %current, to = new_owner, "initiated graceful handoff");
                apply(lease, written, |l| {
                    l.lease_owner = Some(new_owner.to_owned());
                    l.checkpoint_owner = Some(current);
                });
                Ok(true)
            }
            Updated::ConditionFailed => Ok(false),
        }
    }

    async fn assign_lease(&self, lease: &mut Lease, new_owner: &str) -> Result<bool, LeaseStoreError> {
        let owner_changes = lease.actual_owner() != Some(new_owner);
        let mut update = Update::default();
        update.set(item::LEASE_OWNER, s(new_owner));
        update.remove(item::CHECKPOINT_OWNER);
        update.increment_counter();
        if owner_changes {
            update.increment(item::OWNER_SWITCHES_SINCE_CHECKPOINT);
        }
        update.expect_owner(lease);
        update.expect_exists();
        match self
            .update("UpdateItem (assign)", &lease.lease_key, update, ReturnValue::AllNew)
            .await?
        {
            Updated::Written(written) => {
                tracing::debug!(lease_key = %lease.lease_key, from = ?lease.lease_owner, to = new_owner, "assigned lease");
                apply(lease, written, |l| {
                    l.lease_owner = Some(new_owner.to_owned());
                    l.checkpoint_owner = None;
                    l.lease_counter = l.lease_counter.saturating_add(1);
                    if owner_changes {
                        l.owner_switches_since_checkpoint = l.owner_switches_since_checkpoint.saturating_add(1);
                    }
                });
                Ok(true)
            }
            Updated::ConditionFailed => Ok(false),
        }
    }

    async fn update_lease_checkpoint(&self, lease: &mut Lease) -> Result<bool, LeaseStoreError> {
        let next = next_counter(lease)?;
        let mut update = Update::default();
        update.set(item::CHECKPOINT, s(lease.checkpoint.checkpoint.as_str()));
        update.set(
            item::CHECKPOINT_SUB_SEQUENCE_NUMBER,
            n(lease.checkpoint.sub_sequence_number),
        );
        update.set(item::OWNER_SWITCHES_SINCE_CHECKPOINT, n(0));
        update.set(item::LEASE_COUNTER, n(next));
        // Removed only when the lease has it or is set to `LATEST` without it (an
        // operator's reset): a table whose IAM policy allows only the Java KCL's
        // attributes still takes every other checkpoint.
        match lease.latest_start() {
            Some(start) => update.set(item::LATEST_START_TIMESTAMP, item::epoch_millis(start)),
            None if lease.latest_start_timestamp.is_some()
                || lease.checkpoint.checkpoint == kcl_core::Checkpoint::Latest =>
            {
                update.remove(item::LATEST_START_TIMESTAMP);
            }
            None => {}
        }
        match &lease.pending_checkpoint {
            Some(pending) => {
                update.set(item::PENDING_CHECKPOINT, s(pending.checkpoint.as_str()));
                update.set(
                    item::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER,
                    n(pending.sub_sequence_number),
                );
            }
            None => {
                update.remove(item::PENDING_CHECKPOINT);
                update.remove(item::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER);
            }
        }
        match &lease.pending_checkpoint_state {
            Some(state) => update.set(item::PENDING_CHECKPOINT_STATE, item::b(state)),
            None => update.remove(item::PENDING_CHECKPOINT_STATE),
        }
        if let Some(children) = item::ss(&lease.child_shard_ids) {
            update.set(item::CHILD_SHARD_IDS, children);
        }
        if let Some(throughput) = lease.throughput_kbps.and_then(item::decimal) {
            update.set(item::THROUGHPUT_KBPS, throughput);
        }
        update.expect_counter(lease.lease_counter);
        update.expect_owner(lease);
        match self
            .update("UpdateItem (checkpoint)", &lease.lease_key, update, ReturnValue::AllNew)
            .await?
        {
            Updated::Written(written) => {
                apply(lease, written, |l| {
                    l.lease_counter = next;
                    l.owner_switches_since_checkpoint = 0;
                });
                Ok(true)
            }
            Updated::ConditionFailed => {
                tracing::debug!(
                    lease_key = %lease.lease_key,
                    owner = ?lease.lease_owner,
                    "checkpoint refused: the lease changed"
                );
                Ok(false)
            }
        }
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseStoreError> {
        self.client
            .delete_item()
            .table_name(&self.table_name)
            .set_key(Some(item::key(&lease.lease_key)))
            .send()
            .await
            .map_err(|e| self.error(e, "DeleteItem", &lease.lease_key))?;
        Ok(())
    }

    async fn delete_lease_if_unchanged(&self, lease: &Lease) -> Result<bool, LeaseStoreError> {
        // The same conditions as a write: the counter and owners as read.
        let mut conditions = Update::default();
        conditions.expect_counter(lease.lease_counter);
        conditions.expect_owner(lease);
        let result = self
            .client
            .delete_item()
            .table_name(&self.table_name)
            .set_key(Some(item::key(&lease.lease_key)))
            .set_condition_expression(conditions.condition())
            .set_expression_attribute_names(Some(conditions.names))
            .set_expression_attribute_values(Some(conditions.values))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) if kind_of(&err) == ErrorKind::ConditionalCheckFailed => Ok(false),
            Err(err) => Err(self.error(err, "DeleteItem (if unchanged)", &lease.lease_key)),
        }
    }
}

/// Builds a [`DynamoLeaseStore`] with non-default options; [`build`](Self::build)
/// checks them.
pub struct DynamoLeaseStoreBuilder {
    client: Client,
    table_name: String,
    billing_mode: BillingMode,
    table_creation_timeout: Duration,
    table_status_poll_interval: Duration,
    consistent_reads: bool,
    scan_page_size: Option<u32>,
    leader_election: bool,
}

impl fmt::Debug for DynamoLeaseStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoLeaseStoreBuilder")
            .field("table_name", &self.table_name)
            .field("billing_mode", &self.billing_mode)
            .field("table_creation_timeout", &self.table_creation_timeout)
            .field("table_status_poll_interval", &self.table_status_poll_interval)
            .field("consistent_reads", &self.consistent_reads)
            .field("scan_page_size", &self.scan_page_size)
            .finish_non_exhaustive()
    }
}

impl DynamoLeaseStoreBuilder {
    /// Billing of the table when this store creates it. Default:
    /// [`BillingMode::PayPerRequest`] (on-demand). An existing table is not changed.
    pub fn billing_mode(mut self, billing_mode: BillingMode) -> Self {
        self.billing_mode = billing_mode;
        self
    }

    /// How long `create_lease_table_if_not_exists` waits for the table to become
    /// `ACTIVE`. Default: 2 minutes.
    pub fn table_creation_timeout(mut self, timeout: Duration) -> Self {
        self.table_creation_timeout = timeout;
        self
    }

    /// The pause between two `DescribeTable` calls while waiting for the table. Default:
    /// 500 ms. Must not be zero.
    pub fn table_status_poll_interval(mut self, interval: Duration) -> Self {
        self.table_status_poll_interval = interval;
        self
    }

    /// Whether `get_lease` and `list_leases` use strongly consistent reads. Default:
    /// `true`. Eventually consistent reads cost half as much but may show a lease
    /// counter that is already stale, delaying expiry decisions and making takes fail.
    pub fn consistent_reads(mut self, consistent: bool) -> Self {
        self.consistent_reads = consistent;
        self
    }

    /// Whether workers elect a leader through a lock item in the table
    /// `<lease table>-LeaderLock` (created with the lease table): the leader reads the
    /// whole lease table at each lease-taking pass, the others mostly list their own
    /// leases through the owner index. Default `true`. Without it every worker reads
    /// the whole table at each pass.
    pub fn leader_election(mut self, enabled: bool) -> Self {
        self.leader_election = enabled;
        self
    }

    /// At most this many items per `Scan` page in `list_leases` (DynamoDB's `Limit`).
    /// Default: unlimited, i.e. pages of up to 1 MB. Must be at least 1.
    pub fn scan_page_size(mut self, items: u32) -> Self {
        self.scan_page_size = Some(items);
        self
    }

    /// Checks the options and builds the store.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field when the table name is not a valid DynamoDB
    /// table name (3–255 characters of `a-z A-Z 0-9 _ - .`), a provisioned capacity is
    /// 0 or above `i64::MAX`, the poll interval is zero, or the scan page size is 0 or
    /// above `i32::MAX`.
    pub fn build(self) -> Result<DynamoLeaseStore, ConfigError> {
        let name = &self.table_name;
        let valid_chars = name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
        if !(3..=255).contains(&name.len()) || !valid_chars {
            return Err(ConfigError {
                field: "dynamo.table_name",
                reason: format!(
                    "{name:?} is not a DynamoDB table name: 3 to 255 characters of a-z, A-Z, 0-9, '_', '-', '.'"
                ),
            });
        }
        if let BillingMode::Provisioned {
            read_capacity_units,
            write_capacity_units,
        } = &self.billing_mode
        {
            for units in [read_capacity_units, write_capacity_units] {
                if *units == 0 || i64::try_from(*units).is_err() {
                    return Err(ConfigError {
                        field: "dynamo.billing_mode",
                        reason: format!("provisioned capacity must be from 1 to i64::MAX units, got {units}"),
                    });
                }
            }
        }
        if self.table_status_poll_interval.is_zero() {
            return Err(ConfigError {
                field: "dynamo.table_status_poll_interval",
                reason: "must be greater than zero".to_owned(),
            });
        }
        let scan_page_size = match self.scan_page_size {
            None => None,
            Some(size) => match i32::try_from(size) {
                Ok(size) if size >= 1 => Some(size),
                _ => {
                    return Err(ConfigError {
                        field: "dynamo.scan_page_size",
                        reason: format!("must be from 1 to {}, got {size}", i32::MAX),
                    })
                }
            },
        };
        Ok(DynamoLeaseStore {
            client: self.client,
            leader_table: self
                .leader_election
                .then(|| leader_table_name(&self.table_name))
                .flatten(),
            leader_ready: Arc::new(AtomicBool::new(false)),
            table_name: self.table_name,
            consistent_reads: self.consistent_reads,
            scan_page_size,
            table: TableOptions {
                billing_mode: self.billing_mode,
                creation_timeout: self.table_creation_timeout,
                poll_interval: self.table_status_poll_interval,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .build();
        Client::from_conf(config)
    }

    #[test]
    fn update_expression_uses_placeholders_only() {
        let mut update = Update::default();
        update.set(item::LEASE_OWNER, s("worker' OR 1=1"));
        update.remove(item::PENDING_CHECKPOINT);
        update.increment(item::OWNER_SWITCHES_SINCE_CHECKPOINT);
        update.expect_counter(7);
        update.expect_owner(&Lease::new("shard", kcl_core::ExtendedSequenceNumber::TRIM_HORIZON));
        assert_eq!(
            update.expression(),
            "SET #leaseOwner = :leaseOwner, #ownerSwitchesSinceCheckpoint = \
             if_not_exists(#ownerSwitchesSinceCheckpoint, :zero) + :one REMOVE #pendingCheckpoint"
        );
        assert_eq!(
            update.condition().as_deref(),
            Some(
                "#leaseCounter = :expectedCounter AND attribute_not_exists(#leaseOwner) AND \
                 attribute_not_exists(#checkpointOwner)"
            )
        );
        assert_eq!(update.values.get(":leaseOwner"), Some(&s("worker' OR 1=1")));
        assert_eq!(update.values.get(":expectedCounter"), Some(&n(7)));
    }

    #[test]
    fn builder_checks_options() {
        let field = |builder: DynamoLeaseStoreBuilder| builder.build().map(|_| ()).map_err(|e| e.field);
        assert_eq!(field(DynamoLeaseStore::builder(client(), "ok-table.1")), Ok(()));
        assert_eq!(
            field(DynamoLeaseStore::builder(client(), "ab")),
            Err("dynamo.table_name")
        );
        assert_eq!(
            field(DynamoLeaseStore::builder(client(), "bad name")),
            Err("dynamo.table_name")
        );
        assert_eq!(
            field(
                DynamoLeaseStore::builder(client(), "leases").billing_mode(BillingMode::Provisioned {
                    read_capacity_units: 0,
                    write_capacity_units: 5,
                })
            ),
            Err("dynamo.billing_mode")
        );
        assert_eq!(
            field(DynamoLeaseStore::builder(client(), "leases").table_status_poll_interval(Duration::ZERO)),
            Err("dynamo.table_status_poll_interval")
        );
        assert_eq!(
            field(DynamoLeaseStore::builder(client(), "leases").scan_page_size(0)),
            Err("dynamo.scan_page_size")
        );
    }

    #[test]
    fn debug_names_the_table_but_not_the_client() {
        let store = DynamoLeaseStore::new(client(), "leases");
        let debug = format!("{store:?}");
        assert!(debug.contains("\"leases\""), "{debug}");
        assert!(!debug.contains("client"), "{debug}");
        assert_eq!(store.table_name(), "leases");
    }
}
