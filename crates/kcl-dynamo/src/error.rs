//! Mapping AWS SDK errors to [`LeaseStoreError`], on the SDK's typed variants.
//!
//! Each DynamoDB operation has its own error enum; [`Classify`] reduces each to the few
//! outcomes the lease store reacts to differently: a failed condition (a lost race,
//! `Ok(false)` to the caller), throttling (back off), a missing table, a table being
//! created concurrently, and everything else (a dependency failure whose outcome is
//! unknown). Timeouts, dispatch failures and unparseable responses are "everything
//! else". The SDK error is kept as the source of the returned error.

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::get_item::GetItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::query::QueryError;
use aws_sdk_dynamodb::operation::scan::ScanError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use kcl_core::LeaseStoreError;

/// How the lease store reacts to a failed DynamoDB call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// `ConditionalCheckFailedException`: the item is not as the caller saw it.
    ConditionalCheckFailed,
    /// Throughput exceeded, request limit exceeded, throttling: back off.
    Throttled,
    /// `ResourceNotFoundException`: the table does not exist.
    ResourceNotFound,
    /// `ResourceInUseException`: (on `CreateTable`) the table exists or is being created.
    ResourceInUse,
    /// `ValidationException`: the request does not fit the table (on `Query`: the index
    /// does not exist yet).
    Validation,
    /// Anything else: the outcome is unknown.
    Other,
}

/// Error codes that mean "throttled" on operations whose error enum has no typed
/// variant for them (`DescribeTable`, `CreateTable` and unmodelled codes).
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TooManyRequestsException",
];

fn kind_from_code(code: Option<&str>) -> ErrorKind {
    match code {
        Some(code) if THROTTLING_CODES.contains(&code) => ErrorKind::Throttled,
        Some("ValidationException") => ErrorKind::Validation,
        _ => ErrorKind::Other,
    }
}

/// An operation error that can be reduced to an [`ErrorKind`].
pub(crate) trait Classify: ProvideErrorMetadata {
    /// The kind of this service error.
    fn kind(&self) -> ErrorKind;
}

/// `Classify` for the item operations, whose typed errors share these variants; the
/// conditional-write ones also have `ConditionalCheckFailedException`.
macro_rules! classify_item_operation {
    ($($error:ident),+ $(; conditional: $($conditional:ident),+)?) => {
        $(impl Classify for $error {
            fn kind(&self) -> ErrorKind {
                match self {
                    Self::ProvisionedThroughputExceededException(_)
                    | Self::RequestLimitExceeded(_)
                    | Self::ThrottlingException(_) => ErrorKind::Throttled,
                    Self::ResourceNotFoundException(_) => ErrorKind::ResourceNotFound,
                    _ => kind_from_code(self.code()),
                }
            }
        })+
        $($(impl Classify for $conditional {
            fn kind(&self) -> ErrorKind {
                match self {
                    Self::ConditionalCheckFailedException(_) => ErrorKind::ConditionalCheckFailed,
                    Self::ProvisionedThroughputExceededException(_)
                    | Self::RequestLimitExceeded(_)
                    | Self::ThrottlingException(_) => ErrorKind::Throttled,
                    Self::ResourceNotFoundException(_) => ErrorKind::ResourceNotFound,
                    _ => kind_from_code(self.code()),
                }
            }
        })+)?
    };
}

classify_item_operation!(GetItemError, ScanError, QueryError; conditional: PutItemError, UpdateItemError, DeleteItemError);

impl Classify for DescribeTableError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::ResourceNotFoundException(_) => ErrorKind::ResourceNotFound,
            _ => kind_from_code(self.code()),
        }
    }
}

impl Classify for CreateTableError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::ResourceInUseException(_) => ErrorKind::ResourceInUse,
            _ => kind_from_code(self.code()),
        }
    }
}

/// The kind of a failed call: only service errors are classified, every transport-level
/// failure (timeout, dispatch, response parsing) is [`ErrorKind::Other`].
pub(crate) fn kind_of<E: Classify>(err: &SdkError<E>) -> ErrorKind {
    match err {
        SdkError::ServiceError(service) => service.err().kind(),
        _ => ErrorKind::Other,
    }
}

/// Converts a failed call into the store's error: throttling to
/// [`LeaseStoreError::Throttled`], a missing table to [`LeaseStoreError::TableNotFound`],
/// anything else to [`LeaseStoreError::Dependency`] with `what` as the message.
pub(crate) fn to_store_error<E>(err: SdkError<E>, table: &str, what: String) -> LeaseStoreError
where
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    match kind_of(&err) {
        ErrorKind::Throttled => LeaseStoreError::Throttled(Box::new(err)),
        ErrorKind::ResourceNotFound => LeaseStoreError::TableNotFound {
            table: table.to_owned(),
        },
        ErrorKind::ConditionalCheckFailed | ErrorKind::ResourceInUse | ErrorKind::Validation | ErrorKind::Other => {
            LeaseStoreError::Dependency {
                message: what,
                source: Box::new(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_dynamodb::config::http::HttpResponse;
    use aws_sdk_dynamodb::error::ErrorMetadata;
    use aws_sdk_dynamodb::types::error::{
        ConditionalCheckFailedException, ProvisionedThroughputExceededException, ResourceNotFoundException,
    };
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;

    use super::*;

    fn service_error<E>(err: E) -> SdkError<E> {
        SdkError::service_error(
            err,
            HttpResponse::new(StatusCode::try_from(400_u16).expect("valid status"), SdkBody::empty()),
        )
    }

    #[test]
    fn typed_variants_are_classified() {
        let failed = service_error(UpdateItemError::ConditionalCheckFailedException(
            ConditionalCheckFailedException::builder().build(),
        ));
        assert_eq!(kind_of(&failed), ErrorKind::ConditionalCheckFailed);

        let throttled = service_error(GetItemError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder().build(),
        ));
        assert_eq!(kind_of(&throttled), ErrorKind::Throttled);
        assert!(matches!(
            to_store_error(throttled, "t", "get".to_owned()),
            LeaseStoreError::Throttled(_)
        ));

        let missing = service_error(ScanError::ResourceNotFoundException(
            ResourceNotFoundException::builder().build(),
        ));
        assert!(matches!(
            to_store_error(missing, "t", "scan".to_owned()),
            LeaseStoreError::TableNotFound { table } if table == "t"
        ));
    }

    #[test]
    fn unmodelled_throttling_code_is_throttled_and_others_are_dependency() {
        let throttled = service_error(DescribeTableError::generic(
            ErrorMetadata::builder().code("ThrottlingException").build(),
        ));
        assert_eq!(kind_of(&throttled), ErrorKind::Throttled);

        let other = service_error(PutItemError::generic(
            ErrorMetadata::builder().code("ValidationException").build(),
        ));
        match to_store_error(other, "t", "put".to_owned()) {
            LeaseStoreError::Dependency { message, .. } => assert_eq!(message, "put"),
            e => panic!("expected Dependency, got {e:?}"),
        }
    }
}
