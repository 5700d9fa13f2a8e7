//! Operations on an application's lease table and stream, as the `shardwise-admin`
//! binary runs them (feature `admin`): who holds what, how far behind each shard is,
//! moving a checkpoint, fan-out consumers, deleting an application.
//!
//! Every function works against AWS and `kcl-local serve` alike (the clients say
//! where). Writes to leases are conditional on the lease counter (and owner) as read,
//! so an operation never overwrites a concurrent change: it fails with
//! [`AdminError::Changed`] instead.
//!
//! Multi-stream tables (leases keyed `account-id:stream-name:creation-epoch:shard-id`)
//! work too: rows name each lease's stream, `lag` reads each shard from its own stream,
//! and a shard is named by its lease key or by stream name and shard id.

use std::collections::BTreeMap;

use aws_sdk_kinesis::types::ShardIteratorType;
use kcl_core::{Checkpoint, ExtendedSequenceNumber, Lease, LeaseStore as _, SequenceNumber, StreamIdentifier};
use kcl_dynamo::DynamoLeaseStore;
use serde::Serialize;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// The lease table could not be read or written.
    #[error("lease table")]
    LeaseStore(#[from] kcl_core::LeaseStoreError),
    /// A Kinesis call failed.
    #[error("Kinesis {operation} failed")]
    Kinesis {
        /// The operation.
        operation: &'static str,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A DynamoDB table call failed.
    #[error("DynamoDB {operation} failed")]
    DynamoDb {
        /// The operation.
        operation: &'static str,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// There is no lease for the shard.
    #[error("no lease for shard {0:?}")]
    NoSuchLease(String),
    /// The lease is held by a worker: moving its checkpoint under it needs `force`.
    #[error(
        "shard {shard_id:?} is held by {owner:?}; stop that worker first, or force (the owner then loses the lease)"
    )]
    Owned {
        /// The shard.
        shard_id: String,
        /// Its owner.
        owner: String,
    },
    /// The lease changed between the read and the write; read again and retry.
    #[error("the lease of shard {0:?} changed meanwhile; nothing was written")]
    Changed(String),
    /// The value given cannot be used.
    #[error("{0}")]
    InvalidArgument(String),
}

/// One lease as `leases` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeaseRow {
    /// The lease key: the shard id, or in a multi-stream table
    /// `account-id:stream-name:creation-epoch:shard-id`.
    pub lease_key: String,
    /// The stream identifier of a multi-stream lease (`account-id:stream-name:creation-epoch`).
    pub stream: Option<String>,
    /// The shard.
    pub shard_id: String,
    /// The worker holding it.
    pub owner: Option<String>,
    /// During a graceful handoff, the worker handing it over.
    pub handing_over_from: Option<String>,
    /// The lease counter.
    pub counter: u64,
    /// The checkpoint (a sequence number or `TRIM_HORIZON`, `LATEST`, `SHARD_END`, ...).
    pub checkpoint: String,
    /// The checkpoint's sub-sequence number.
    pub sub_sequence_number: u64,
    /// Parent shards.
    pub parents: Vec<String>,
    /// Child shards, once known.
    pub children: Vec<String>,
    /// `finished` (checkpointed at `SHARD_END`), `handing_over`, `owned` or `unowned`.
    pub state: &'static str,
}

impl From<&Lease> for LeaseRow {
    fn from(lease: &Lease) -> Self {
        let state = if lease.checkpoint.is_shard_end() {
            "finished"
        } else if lease.is_handoff_pending() {
            "handing_over"
        } else if lease.lease_owner.is_some() {
            "owned"
        } else {
            "unowned"
        };
        Self {
            lease_key: lease.lease_key.clone(),
            stream: lease.stream_name.clone(),
            shard_id: lease.shard().to_owned(),
            owner: lease.lease_owner.clone(),
            handing_over_from: lease.checkpoint_owner.clone(),
            counter: lease.lease_counter,
            checkpoint: lease.checkpoint.checkpoint.as_str().to_owned(),
            sub_sequence_number: lease.checkpoint.sub_sequence_number,
            parents: lease.parent_shard_ids.iter().cloned().collect(),
            children: lease.child_shard_ids.iter().cloned().collect(),
            state,
        }
    }
}

/// Every lease, by shard id.
///
/// # Errors
/// [`AdminError::LeaseStore`].
pub async fn leases(store: &DynamoLeaseStore) -> Result<Vec<LeaseRow>, AdminError> {
    let mut leases = store.list_leases().await?;
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    Ok(leases.iter().map(LeaseRow::from).collect())
}

/// Which worker holds which shards (unfinished leases only).
///
/// # Errors
/// [`AdminError::LeaseStore`].
pub async fn workers(store: &DynamoLeaseStore) -> Result<BTreeMap<String, Vec<String>>, AdminError> {
    let mut by_worker: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for lease in store.list_leases().await? {
        if let Some(owner) = &lease.lease_owner {
            if !lease.checkpoint.is_shard_end() {
                by_worker
                    .entry(owner.clone())
                    .or_default()
                    .push(lease.lease_key.clone());
            }
        }
    }
    for shards in by_worker.values_mut() {
        shards.sort();
    }
    Ok(by_worker)
}

/// How far one shard's checkpoint is behind the shard's newest record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShardLag {
    /// The lease key.
    pub lease_key: String,
    /// The shard's stream name.
    pub stream: String,
    /// The shard.
    pub shard_id: String,
    /// Its checkpoint.
    pub checkpoint: String,
    /// Milliseconds between the first record after the checkpoint and the shard's
    /// newest (Kinesis's `MillisBehindLatest`); `None` for a finished shard.
    pub millis_behind_latest: Option<i64>,
}

/// The stream name of a lease: its own in a multi-stream table, else `stream`.
fn stream_of<'a>(lease: &Lease, stream: Option<&'a str>) -> Result<std::borrow::Cow<'a, str>, AdminError> {
    match &lease.stream_name {
        Some(id) => StreamIdentifier::parse_multi_stream(id)
            .map(|id| std::borrow::Cow::Owned(id.stream_name().to_owned()))
            .map_err(|e| AdminError::InvalidArgument(format!("lease {:?}: {e}", lease.lease_key))),
        None => stream.map(std::borrow::Cow::Borrowed).ok_or_else(|| {
            AdminError::InvalidArgument("the stream is required for a single-stream lease table".to_owned())
        }),
    }
}

/// The lag of every unfinished lease's shard, read from its checkpoint: one
/// `GetShardIterator` and one `GetRecords` (of one record) per shard. `stream` is
/// required for a single-stream table; in a multi-stream table each shard is read from
/// its own stream, and `stream`, when given, keeps that stream's shards only.
///
/// # Errors
/// [`AdminError::LeaseStore`], [`AdminError::Kinesis`], [`AdminError::InvalidArgument`]
/// without the stream of a single-stream table.
pub async fn lag(
    store: &DynamoLeaseStore,
    kinesis: &aws_sdk_kinesis::Client,
    stream: Option<&str>,
) -> Result<Vec<ShardLag>, AdminError> {
    let mut leases = store.list_leases().await?;
    leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
    let mut out = Vec::new();
    for lease in leases {
        let stream_name = stream_of(&lease, stream)?.into_owned();
        if stream.is_some_and(|s| s != stream_name) {
            continue;
        }
        let checkpoint = lease.checkpoint.checkpoint.as_str().to_owned();
        let request = kinesis
            .get_shard_iterator()
            .stream_name(&stream_name)
            .shard_id(lease.shard());
        let row = |millis_behind_latest| ShardLag {
            lease_key: lease.lease_key.clone(),
            stream: stream_name.clone(),
            shard_id: lease.shard().to_owned(),
            checkpoint: checkpoint.clone(),
            millis_behind_latest,
        };
        let request = match &lease.checkpoint.checkpoint {
            Checkpoint::ShardEnd => {
                out.push(row(None));
                continue;
            }
            Checkpoint::Sequence(s) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(s.as_str()),
            Checkpoint::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            _ => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let iterator = request.send().await.map_err(kinesis_error("GetShardIterator"))?;
        let Some(iterator) = iterator.shard_iterator else {
            continue;
        };
        let page = kinesis
            .get_records()
            .shard_iterator(iterator)
            .limit(1)
            .send()
            .await
            .map_err(kinesis_error("GetRecords"))?;
        out.push(row(page.millis_behind_latest));
    }
    Ok(out)
}

/// The lease key of `shard` (a lease key, or a shard id; in a multi-stream table with
/// `stream` naming the stream when several streams have that shard id).
///
/// # Errors
/// [`AdminError::NoSuchLease`]; [`AdminError::InvalidArgument`] when the shard id is
/// in several streams and `stream` does not say which.
pub async fn find_lease_key(store: &DynamoLeaseStore, stream: Option<&str>, shard: &str) -> Result<String, AdminError> {
    if stream.is_none() && store.get_lease(shard).await?.is_some() {
        return Ok(shard.to_owned());
    }
    let matches: Vec<String> = store
        .list_leases()
        .await?
        .into_iter()
        .filter(|l| l.shard() == shard || l.lease_key == shard)
        .filter(|l| stream.is_none() || stream_of(l, stream).is_ok_and(|s| Some(s.as_ref()) == stream))
        .map(|l| l.lease_key)
        .collect();
    match matches.as_slice() {
        [key] => Ok(key.clone()),
        [] => Err(AdminError::NoSuchLease(shard.to_owned())),
        keys => Err(AdminError::InvalidArgument(format!(
            "shard {shard:?} is in several streams ({}); name the stream",
            keys.join(", ")
        ))),
    }
}

/// Where `checkpoint set|reset` moves a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NewCheckpoint {
    /// After this sequence number.
    Sequence(String),
    /// The oldest record retained.
    TrimHorizon,
    /// After the newest record.
    Latest,
}

/// Moves a shard's checkpoint: refused while a worker holds the lease unless `force`.
/// Forced, the lease is first taken in the name [`ADMIN_OWNER`] (which fences the
/// owner: its next write is refused and its read-back shows another owner, so it loses
/// the lease), then the checkpoint is written, then the lease is released, so that the
/// next owner starts from the new checkpoint at once. Each write is conditional on the
/// counter and owner read. Returns the lease as written.
///
/// # Errors
/// [`AdminError::NoSuchLease`], [`AdminError::Owned`], [`AdminError::Changed`],
/// [`AdminError::InvalidArgument`] for a sequence number that does not parse.
pub async fn set_checkpoint(
    store: &DynamoLeaseStore,
    shard_id: &str,
    to: NewCheckpoint,
    force: bool,
) -> Result<LeaseRow, AdminError> {
    let checkpoint = match to {
        NewCheckpoint::Sequence(s) => ExtendedSequenceNumber::new(
            SequenceNumber::parse(&s).map_err(|e| AdminError::InvalidArgument(format!("{s:?}: {e}")))?,
            0,
        ),
        NewCheckpoint::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON,
        NewCheckpoint::Latest => ExtendedSequenceNumber::LATEST,
    };
    // Forced, the owner's renewals may move the counter between the read and the take:
    // read again, a few times.
    let attempts = if force { FORCED_ATTEMPTS } else { 1 };
    for _ in 0..attempts {
        let mut lease = store
            .get_lease(shard_id)
            .await?
            .ok_or_else(|| AdminError::NoSuchLease(shard_id.to_owned()))?;
        if let (Some(owner), false) = (&lease.lease_owner, force) {
            return Err(AdminError::Owned {
                shard_id: shard_id.to_owned(),
                owner: owner.clone(),
            });
        }
        // Fence the owner: a checkpoint write alone would leave the lease in its name,
        // and the owner would adopt the stored lease and write its own checkpoint over
        // this one.
        let fenced = lease.lease_owner.is_some();
        if fenced && !store.take_lease(&mut lease, ADMIN_OWNER).await? {
            continue;
        }
        lease.checkpoint = checkpoint.clone();
        lease.pending_checkpoint = None;
        lease.pending_checkpoint_state = None;
        // A lease set to LATEST starts anew: where an earlier consumer started is void.
        lease.latest_start_timestamp = None;
        if !store.update_lease_checkpoint(&mut lease).await? {
            return Err(AdminError::Changed(shard_id.to_owned()));
        }
        // Released: any worker takes it at once, from the new checkpoint.
        if fenced && !store.evict_lease(&mut lease).await? {
            return Err(AdminError::Changed(shard_id.to_owned()));
        }
        return Ok(LeaseRow::from(&lease));
    }
    Err(AdminError::Changed(shard_id.to_owned()))
}

/// How many times a forced checkpoint change reads and takes the lease before it gives
/// up (each take loses only to a write between the read and the take).
const FORCED_ATTEMPTS: usize = 5;

/// The owner a forced checkpoint change writes for a moment, to fence the worker that
/// held the lease.
pub const ADMIN_OWNER: &str = "shardwise-admin";

/// The stream's registered enhanced fan-out consumers: (name, ARN, status).
///
/// # Errors
/// [`AdminError::Kinesis`].
pub async fn consumers(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<(String, String, String)>, AdminError> {
    let arn = stream_arn(kinesis, stream).await?;
    let out = kinesis
        .list_stream_consumers()
        .stream_arn(arn)
        .send()
        .await
        .map_err(kinesis_error("ListStreamConsumers"))?;
    Ok(out
        .consumers()
        .iter()
        .map(|c| {
            (
                c.consumer_name().to_owned(),
                c.consumer_arn().to_owned(),
                c.consumer_status().as_str().to_owned(),
            )
        })
        .collect())
}

/// Registers (`register = true`) or deregisters a fan-out consumer by name.
///
/// # Errors
/// [`AdminError::Kinesis`].
pub async fn register_consumer(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    name: &str,
    register: bool,
) -> Result<(), AdminError> {
    let arn = stream_arn(kinesis, stream).await?;
    if register {
        kinesis
            .register_stream_consumer()
            .stream_arn(arn)
            .consumer_name(name)
            .send()
            .await
            .map(|_| ())
            .map_err(kinesis_error("RegisterStreamConsumer"))
    } else {
        kinesis
            .deregister_stream_consumer()
            .stream_arn(arn)
            .consumer_name(name)
            .send()
            .await
            .map(|_| ())
            .map_err(kinesis_error("DeregisterStreamConsumer"))
    }
}

/// Wraps an SDK error of the Kinesis `operation`.
fn kinesis_error<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> AdminError {
    move |e| AdminError::Kinesis {
        operation,
        source: Box::new(e),
    }
}

async fn stream_arn(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> Result<String, AdminError> {
    let out = kinesis
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(kinesis_error("DescribeStreamSummary"))?;
    out.stream_description_summary
        .map(|s| s.stream_arn)
        .ok_or_else(|| AdminError::InvalidArgument(format!("stream {stream:?} has no description")))
}

/// Deletes an application: its lease table and its leader lock table (checkpoints
/// are lost; stop every worker first). Returns the tables deleted.
///
/// # Errors
/// [`AdminError::DynamoDb`].
pub async fn delete_application(
    dynamodb: &aws_sdk_dynamodb::Client,
    application: &str,
) -> Result<Vec<String>, AdminError> {
    use aws_sdk_dynamodb::operation::delete_table::DeleteTableError;
    let mut deleted = Vec::new();
    for table in [application.to_owned(), format!("{application}-LeaderLock")] {
        match dynamodb.delete_table().table_name(&table).send().await {
            Ok(_) => deleted.push(table),
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(DeleteTableError::ResourceNotFoundException(_))
                ) => {}
            Err(e) => {
                return Err(AdminError::DynamoDb {
                    operation: "DeleteTable",
                    source: Box::new(e),
                })
            }
        }
    }
    Ok(deleted)
}
