//! The lease table itself: creating it, checking that an existing table can be a lease
//! table, and waiting until it is `ACTIVE` (the Java KCL's
//! `createLeaseTableIfNotExists` and `waitUntilLeaseTableExists`).
//!
//! A lease table has exactly one key, the hash key `leaseKey` of type S. A table of
//! the same name with any other key schema is a deployment mistake (two applications
//! sharing a name, or a table made by hand) and is reported as
//! [`LeaseStoreError::InvalidTable`] rather than written into.
//!
//! A table this crate creates has the Java KCL 3.x's global secondary index
//! `LeaseOwnerToLeaseKeyIndex` (hash `leaseOwner`, range `leaseKey`, keys only), through
//! which a worker lists its own leases without reading the whole table. An existing
//! table without it gets it added (`UpdateTable`); until DynamoDB has built it, owners'
//! leases are found with a full read instead.
//!
//! Several workers start at once and race to create the table; the one whose
//! `CreateTable` succeeds reports `true`, the others see `ResourceInUseException` and
//! wait for the same table to become `ACTIVE`.

use std::time::Duration;

use aws_sdk_dynamodb::error::BuildError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode as SdkBillingMode, CreateGlobalSecondaryIndexAction, GlobalSecondaryIndex,
    GlobalSecondaryIndexUpdate, KeySchemaElement, KeyType, Projection, ProjectionType, ProvisionedThroughput,
    ScalarAttributeType, TableDescription, TableStatus,
};
use aws_sdk_dynamodb::Client;
use kcl_core::LeaseStoreError;

use crate::error::{kind_of, to_store_error, ErrorKind};
use crate::item::{LEASE_KEY, LEASE_OWNER};

/// The Java KCL 3.x's index of leases by owner.
pub(crate) const OWNER_INDEX: &str = "LeaseOwnerToLeaseKeyIndex";

/// How a lease table created by this crate is billed. Existing tables are left as they
/// are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BillingMode {
    /// On-demand capacity (`PAY_PER_REQUEST`), the Java KCL's default. The default here.
    #[default]
    PayPerRequest,
    /// Provisioned capacity, in capacity units (each at least 1).
    Provisioned {
        /// Read capacity units.
        read_capacity_units: u64,
        /// Write capacity units.
        write_capacity_units: u64,
    },
}

/// The source of the [`LeaseStoreError::Dependency`] returned when the lease table did
/// not become `ACTIVE` within the configured wait.
#[derive(Debug, thiserror::Error)]
#[error("table {table:?} is not ACTIVE after waiting {waited:?} (last status: {last_status})")]
#[non_exhaustive]
pub struct TableNotActiveError {
    /// The table name.
    pub table: String,
    /// The status last reported by `DescribeTable` (`NOT_FOUND` when it was not visible).
    pub last_status: String,
    /// How long this call waited.
    pub waited: Duration,
}

/// Options for creating the table and waiting for it.
#[derive(Clone, Debug)]
pub(crate) struct TableOptions {
    /// Billing of a table this crate creates.
    pub(crate) billing_mode: BillingMode,
    /// Bound on the wait for `ACTIVE`, so that a stuck table fails start-up clearly
    /// instead of hanging it.
    pub(crate) creation_timeout: Duration,
    /// Pause between two `DescribeTable` calls while waiting.
    pub(crate) poll_interval: Duration,
}

impl Default for TableOptions {
    fn default() -> Self {
        Self {
            billing_mode: BillingMode::PayPerRequest,
            creation_timeout: Duration::from_secs(120),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// Creates the lease table unless it exists, then waits until it is `ACTIVE`. Returns
/// `true` only when this call created it.
pub(crate) async fn create_table_if_not_exists(
    client: &Client,
    table: &str,
    options: &TableOptions,
    owner_index: bool,
) -> Result<bool, LeaseStoreError> {
    if let Some(description) = describe(client, table).await? {
        check_key_schema(table, &description)?;
        if !is_usable(table, &description)? {
            wait_until_active(client, table, options).await?;
        }
        if owner_index && !has_owner_index(&description) {
            add_owner_index(client, table, &options.billing_mode).await;
        }
        return Ok(false);
    }

    match create(client, table, &options.billing_mode, owner_index).await {
        Ok(()) => {
            tracing::info!(table, "created the lease table");
            wait_until_active(client, table, options).await?;
            Ok(true)
        }
        Err(err) if kind_of(&err) == ErrorKind::ResourceInUse => {
            tracing::debug!(table, "the lease table was created concurrently; waiting for it");
            if let Some(description) = describe(client, table).await? {
                check_key_schema(table, &description)?;
            }
            wait_until_active(client, table, options).await?;
            Ok(false)
        }
        Err(err) => Err(to_store_error(err, table, format!("CreateTable {table:?}"))),
    }
}

/// `DescribeTable`: `None` when the table does not exist.
async fn describe(client: &Client, table: &str) -> Result<Option<TableDescription>, LeaseStoreError> {
    match client.describe_table().table_name(table).send().await {
        Ok(output) => Ok(output.table),
        Err(err) if kind_of(&err) == ErrorKind::ResourceNotFound => Ok(None),
        Err(err) => Err(to_store_error(err, table, format!("DescribeTable {table:?}"))),
    }
}

async fn create(
    client: &Client,
    table: &str,
    billing_mode: &BillingMode,
    owner_index: bool,
) -> Result<(), aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::create_table::CreateTableError>> {
    // The builders only fail when a required field is missing, and both are set here;
    // the error is still mapped rather than unwrapped.
    let request = || -> Result<_, BuildError> {
        let mut request = client
            .create_table()
            .table_name(table)
            .attribute_definitions(string_attribute(LEASE_KEY)?)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(LEASE_KEY)
                    .key_type(KeyType::Hash)
                    .build()?,
            );
        if owner_index {
            request = request
                .attribute_definitions(string_attribute(LEASE_OWNER)?)
                .global_secondary_indexes({
                    let mut index = GlobalSecondaryIndex::builder()
                        .index_name(OWNER_INDEX)
                        .set_key_schema(Some(owner_index_keys()?))
                        .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build());
                    if let Some(throughput) = throughput(billing_mode)? {
                        index = index.provisioned_throughput(throughput);
                    }
                    index.build()?
                });
        }
        request = match throughput(billing_mode)? {
            None => request.billing_mode(SdkBillingMode::PayPerRequest),
            Some(throughput) => request
                .billing_mode(SdkBillingMode::Provisioned)
                .provisioned_throughput(throughput),
        };
        Ok(request)
    };
    let request = request().map_err(aws_sdk_dynamodb::error::SdkError::construction_failure)?;
    request.send().await.map(|_| ())
}

/// The definition of a string (`S`) key attribute.
fn string_attribute(name: &str) -> Result<AttributeDefinition, BuildError> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
}

/// The owner index's key schema: `leaseOwner` hash, `leaseKey` range.
fn owner_index_keys() -> Result<Vec<KeySchemaElement>, BuildError> {
    Ok(vec![
        KeySchemaElement::builder()
            .attribute_name(LEASE_OWNER)
            .key_type(KeyType::Hash)
            .build()?,
        KeySchemaElement::builder()
            .attribute_name(LEASE_KEY)
            .key_type(KeyType::Range)
            .build()?,
    ])
}

/// The provisioned throughput of a provisioned table (and of its index).
fn throughput(billing_mode: &BillingMode) -> Result<Option<ProvisionedThroughput>, BuildError> {
    match billing_mode {
        BillingMode::PayPerRequest => Ok(None),
        BillingMode::Provisioned {
            read_capacity_units,
            write_capacity_units,
        } => Ok(Some(
            ProvisionedThroughput::builder()
                .read_capacity_units(capacity(*read_capacity_units))
                .write_capacity_units(capacity(*write_capacity_units))
                .build()?,
        )),
    }
}

/// Whether the table has the owner index (in any state).
pub(crate) fn has_owner_index(description: &TableDescription) -> bool {
    description
        .global_secondary_indexes()
        .iter()
        .any(|index| index.index_name() == Some(OWNER_INDEX))
}

/// Adds the owner index to an existing table (a table made by the Java KCL 2.x, or by an
/// earlier version of this crate). Failing is not fatal: owners' leases are then found
/// by full reads, as before; the failure is logged.
async fn add_owner_index(client: &Client, table: &str, billing_mode: &BillingMode) {
    let action = || -> Result<_, BuildError> {
        let mut create = CreateGlobalSecondaryIndexAction::builder()
            .index_name(OWNER_INDEX)
            .set_key_schema(Some(owner_index_keys()?))
            .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build());
        if let Some(throughput) = throughput(billing_mode)? {
            create = create.provisioned_throughput(throughput);
        }
        // Every attribute of the index's key schema is defined, the table's key too.
        let definitions = vec![string_attribute(LEASE_OWNER)?, string_attribute(LEASE_KEY)?];
        Ok((create.build()?, definitions))
    };
    let (create, definitions) = match action() {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(table, error = %e, "cannot build the request adding the owner index");
            return;
        }
    };
    let result = client
        .update_table()
        .table_name(table)
        .set_attribute_definitions(Some(definitions))
        .global_secondary_index_updates(GlobalSecondaryIndexUpdate::builder().create(create).build())
        .send()
        .await;
    match result {
        Ok(_) => tracing::info!(table, index = OWNER_INDEX, "adding the owner index to the lease table"),
        Err(err) => tracing::warn!(
            table,
            index = OWNER_INDEX,
            error = %aws_sdk_dynamodb::error::DisplayErrorContext(&err),
            "could not add the owner index; workers list their leases with full reads"
        ),
    }
}

/// Capacity units as the SDK wants them; the builder has checked the range already.
fn capacity(units: u64) -> i64 {
    i64::try_from(units).unwrap_or(i64::MAX)
}

/// Whether the table can take lease reads and writes now. `false` while it is being
/// created; an error for a table that will not become usable by waiting.
fn is_usable(table: &str, description: &TableDescription) -> Result<bool, LeaseStoreError> {
    match description.table_status() {
        // No status at all only comes from emulators; the table exists, so use it.
        None | Some(TableStatus::Active | TableStatus::Updating) => Ok(true),
        Some(TableStatus::Creating) => Ok(false),
        Some(other) => Err(LeaseStoreError::InvalidTable {
            table: table.to_owned(),
            reason: format!("the table's status is {}; it cannot hold leases", other.as_str()),
        }),
    }
}

/// Polls `DescribeTable` until the table is usable, for at most the configured time.
async fn wait_until_active(client: &Client, table: &str, options: &TableOptions) -> Result<(), LeaseStoreError> {
    let started = tokio::time::Instant::now();
    loop {
        let last_status = match describe(client, table).await? {
            Some(description) => {
                if is_usable(table, &description)? {
                    return Ok(());
                }
                description
                    .table_status()
                    .map_or_else(|| "UNKNOWN".to_owned(), |s| s.as_str().to_owned())
            }
            // Right after CreateTable a table may not be visible yet.
            None => "NOT_FOUND".to_owned(),
        };
        let waited = started.elapsed();
        if waited >= options.creation_timeout {
            return Err(LeaseStoreError::Dependency {
                message: format!("waiting for lease table {table:?} to become ACTIVE"),
                source: Box::new(TableNotActiveError {
                    table: table.to_owned(),
                    last_status,
                    waited,
                }),
            });
        }
        tokio::time::sleep(options.poll_interval.min(options.creation_timeout - waited)).await;
    }
}

/// Checks that `description` has the lease table's key schema: exactly one key, the
/// hash key `leaseKey` of type S.
pub(crate) fn check_key_schema(table: &str, description: &TableDescription) -> Result<(), LeaseStoreError> {
    let keys = description.key_schema();
    let attribute_type = |name: &str| {
        description
            .attribute_definitions()
            .iter()
            .find(|d| d.attribute_name() == name)
            .map(|d| d.attribute_type().as_str().to_owned())
    };
    let is_lease_key = |k: &KeySchemaElement| {
        k.attribute_name() == LEASE_KEY
            && *k.key_type() == KeyType::Hash
            && attribute_type(LEASE_KEY).as_deref() == Some("S")
    };
    if let [only] = keys {
        if is_lease_key(only) {
            return Ok(());
        }
    }
    let found: Vec<String> = keys
        .iter()
        .map(|k| {
            format!(
                "{} {} ({})",
                k.attribute_name(),
                k.key_type().as_str(),
                attribute_type(k.attribute_name()).as_deref().unwrap_or("type unknown")
            )
        })
        .collect();
    Err(LeaseStoreError::InvalidTable {
        table: table.to_owned(),
        reason: format!(
            "its key schema is [{}]; a lease table has exactly one key, [{LEASE_KEY} HASH (S)]",
            found.join(", ")
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, key_type: KeyType) -> KeySchemaElement {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(key_type)
            .build()
            .expect("complete")
    }

    fn definition(name: &str, attribute_type: ScalarAttributeType) -> AttributeDefinition {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(attribute_type)
            .build()
            .expect("complete")
    }

    fn reason(result: Result<(), LeaseStoreError>) -> String {
        match result {
            Err(LeaseStoreError::InvalidTable { table, reason }) => {
                assert_eq!(table, "t");
                reason
            }
            other => panic!("expected InvalidTable, got {other:?}"),
        }
    }

    #[test]
    fn accepts_the_lease_table_schema() {
        let description = TableDescription::builder()
            .key_schema(key(LEASE_KEY, KeyType::Hash))
            .attribute_definitions(definition(LEASE_KEY, ScalarAttributeType::S))
            .build();
        check_key_schema("t", &description).expect("valid");
    }

    #[test]
    fn rejects_another_hash_key_a_range_key_or_a_numeric_key() {
        let other_name = TableDescription::builder()
            .key_schema(key("id", KeyType::Hash))
            .attribute_definitions(definition("id", ScalarAttributeType::S))
            .build();
        assert!(reason(check_key_schema("t", &other_name)).contains("[id HASH (S)]"));

        let with_range = TableDescription::builder()
            .key_schema(key(LEASE_KEY, KeyType::Hash))
            .key_schema(key("sk", KeyType::Range))
            .attribute_definitions(definition(LEASE_KEY, ScalarAttributeType::S))
            .attribute_definitions(definition("sk", ScalarAttributeType::N))
            .build();
        assert!(reason(check_key_schema("t", &with_range)).contains("[leaseKey HASH (S), sk RANGE (N)]"));

        let numeric = TableDescription::builder()
            .key_schema(key(LEASE_KEY, KeyType::Hash))
            .attribute_definitions(definition(LEASE_KEY, ScalarAttributeType::N))
            .build();
        assert!(reason(check_key_schema("t", &numeric)).contains("[leaseKey HASH (N)]"));
    }

    #[test]
    fn deleting_table_is_not_usable() {
        let deleting = TableDescription::builder().table_status(TableStatus::Deleting).build();
        assert!(reason(is_usable("t", &deleting).map(|_| ())).contains("DELETING"));
        let creating = TableDescription::builder().table_status(TableStatus::Creating).build();
        assert!(!is_usable("t", &creating).expect("transitional"));
    }
}
