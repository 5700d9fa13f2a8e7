//! A [`LeaseStore`](kcl_core::LeaseStore) on Amazon DynamoDB: the Java KCL's
//! `DynamoDBLeaseRefresher`, item for item.
//!
//! The lease table has one item per shard, keyed by `leaseKey` (the shard id), with the
//! attributes of the Java KCL's lease item, so a team migrating from the Java KCL keeps
//! its checkpoints and both libraries can read the same table. Every write that changes
//! ownership or progress is a conditional write on the `leaseCounter` (and owner) the
//! caller last saw; that counter is the fencing token that keeps a worker which lost a
//! lease from checkpointing. The table has the Java KCL 3.x's owner index
//! (`LeaseOwnerToLeaseKeyIndex`) and takes part in its graceful handoff
//! (`checkpointOwner`); a second small table, `<lease table>-LeaderLock`, holds the
//! leader lock (`DynamoLeaseStoreBuilder::leader_election`).
//!
//! Modules:
//! - `store`: [`DynamoLeaseStore`] and its builder — the `LeaseStore` operations, the
//!   conditional writes, and the mapping of AWS SDK errors to
//!   [`LeaseStoreError`](kcl_core::LeaseStoreError).
//! - `item`: pure conversion between a [`Lease`](kcl_core::Lease) and a DynamoDB item
//!   (attribute names, sentinels, what counts as a lease item, what is corrupt).
//! - `error`: reducing the AWS SDK's per-operation error enums (on their typed
//!   variants) to the store's reactions: lost race, throttled, missing table, failure.
//! - `table`: creating the lease table (on-demand by default) with its owner index,
//!   adding the index to an existing table, checking that an existing table has the
//!   lease table's key schema, and waiting until it is `ACTIVE`.
//!
//! ```no_run
//! # async fn example(client: aws_sdk_dynamodb::Client) -> Result<(), kcl_core::LeaseStoreError> {
//! use kcl_core::LeaseStore;
//! use kcl_dynamo::DynamoLeaseStore;
//!
//! let store = DynamoLeaseStore::new(client, "my-application");
//! store.create_lease_table_if_not_exists().await?;
//! for lease in store.list_leases().await? {
//!     println!("{} owned by {:?}", lease.lease_key, lease.lease_owner);
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]

mod error;
mod item;
mod store;
mod table;

pub use store::{DynamoLeaseStore, DynamoLeaseStoreBuilder};
pub use table::{BillingMode, TableNotActiveError};
