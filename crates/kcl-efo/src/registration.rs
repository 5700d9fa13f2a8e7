//! Stream consumer registration (the Java KCL's `FanOutConsumerRegistration`): find or
//! register the consumer by name, idempotently, and wait until it is `ACTIVE`.
//! Deregistration is a separate, explicit operation: a worker that stops never
//! deregisters, since the other workers of the application still use the consumer.

use std::time::Duration;

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::describe_stream_consumer::DescribeStreamConsumerError;
use aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError;
use aws_sdk_kinesis::operation::register_stream_consumer::RegisterStreamConsumerError;
use aws_sdk_kinesis::types::ConsumerStatus;
use kcl_core::error::{BoxError, ErrorChain};
use kcl_core::retry::{with_timeout, RetryPolicy};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::config::check_consumer_name;
use crate::error::FanOutError;

/// A registered, `ACTIVE` stream consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamConsumer {
    /// Its name.
    pub consumer_name: String,
    /// Its ARN, which `SubscribeToShard` takes.
    pub consumer_arn: String,
    /// The stream's ARN.
    pub stream_arn: String,
}

/// True when an SDK error says the endpoint does not know the operation (an emulator
/// without enhanced fan-out).
fn unsupported<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    match e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            code.contains("UnknownOperation")
                || code.contains("NotImplemented")
                || code.contains("UnsupportedOperation")
        }
        _ => false,
    }
}

/// True for errors worth another try: throttling and transport failures.
fn transient<E, R>(e: &SdkError<E, R>) -> bool {
    matches!(
        e,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    )
}

/// The ARN of a stream, by name.
///
/// # Errors
/// [`FanOutError::StreamNotFound`], or [`FanOutError::Kinesis`] after retries.
pub async fn stream_arn(
    kinesis: &aws_sdk_kinesis::Client,
    stream_name: &str,
    call_timeout: Duration,
) -> Result<String, FanOutError> {
    let retry = RetryPolicy::default();
    let mut attempt = 1;
    loop {
        let call = kinesis.describe_stream_summary().stream_name(stream_name).send();
        match with_timeout(call_timeout, call).await {
            Ok(out) => {
                return out
                    .stream_description_summary()
                    .map(|d| d.stream_arn().to_owned())
                    .ok_or_else(|| FanOutError::Kinesis {
                        operation: "DescribeStreamSummary",
                        source: "no stream description in the answer".into(),
                    })
            }
            Err(SdkError::ServiceError(s))
                if matches!(s.err(), DescribeStreamSummaryError::ResourceNotFoundException(_)) =>
            {
                return Err(FanOutError::StreamNotFound {
                    stream: stream_name.to_owned(),
                })
            }
            Err(e) if (transient(&e) || is_throttled(&e)) && retry.should_retry(attempt) => {
                tokio::time::sleep(retry.backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                return Err(FanOutError::Kinesis {
                    operation: "DescribeStreamSummary",
                    source: BoxError::from(e),
                })
            }
        }
    }
}

fn is_throttled<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(s) if s.err().code() == Some("LimitExceededException"))
}

/// Finds the stream consumer `consumer_name` of `stream_name`, registers it when it does
/// not exist, and waits until it is `ACTIVE`, for at most `timeout`. Idempotent: workers
/// registering the same name at once all end with the same consumer. A consumer being
/// deleted is waited out and registered again.
///
/// # Errors
/// [`FanOutError::InvalidConsumerName`], [`FanOutError::StreamNotFound`],
/// [`FanOutError::NotSupported`] (the endpoint has no enhanced fan-out),
/// [`FanOutError::RegistrationRefused`] (for example too many consumers),
/// [`FanOutError::ConsumerNotActive`] after `timeout`, [`FanOutError::Kinesis`].
pub async fn register_stream_consumer(
    kinesis: &aws_sdk_kinesis::Client,
    stream_name: &str,
    consumer_name: &str,
    timeout: Duration,
    call_timeout: Duration,
) -> Result<StreamConsumer, FanOutError> {
    check_consumer_name(consumer_name).map_err(|reason| FanOutError::InvalidConsumerName {
        name: consumer_name.to_owned(),
        reason,
    })?;
    let stream_arn = stream_arn(kinesis, stream_name, call_timeout).await?;
    let started = Instant::now();
    let poll = RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(2), None);
    let mut attempt = 1;
    let mut status = "NOT_FOUND".to_owned();
    loop {
        let describe = kinesis
            .describe_stream_consumer()
            .stream_arn(&stream_arn)
            .consumer_name(consumer_name)
            .send();
        match with_timeout(call_timeout, describe).await {
            Ok(out) => match out.consumer_description() {
                Some(d) if *d.consumer_status() == ConsumerStatus::Active => {
                    info!(
                        consumer_name,
                        consumer_arn = d.consumer_arn(),
                        "stream consumer is active"
                    );
                    return Ok(StreamConsumer {
                        consumer_name: consumer_name.to_owned(),
                        consumer_arn: d.consumer_arn().to_owned(),
                        stream_arn,
                    });
                }
                Some(d) => {
                    status = d.consumer_status().as_str().to_owned();
                    debug!(consumer_name, status, "waiting for the stream consumer");
                }
                None => status = "UNKNOWN".to_owned(),
            },
            Err(SdkError::ServiceError(s))
                if matches!(s.err(), DescribeStreamConsumerError::ResourceNotFoundException(_)) =>
            {
                status = "NOT_FOUND".to_owned();
                register(kinesis, &stream_arn, consumer_name, call_timeout).await?;
            }
            Err(e) if unsupported(&e) => {
                return Err(FanOutError::NotSupported {
                    operation: "DescribeStreamConsumer",
                    source: BoxError::from(e),
                })
            }
            Err(e) if transient(&e) || is_throttled(&e) => {
                warn!(consumer_name, error = %ErrorChain(&e), "DescribeStreamConsumer failed; retrying");
            }
            Err(e) => {
                return Err(FanOutError::Kinesis {
                    operation: "DescribeStreamConsumer",
                    source: BoxError::from(e),
                })
            }
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(FanOutError::ConsumerNotActive {
                consumer_name: consumer_name.to_owned(),
                status,
                waited,
            });
        }
        tokio::time::sleep(poll.backoff_ceiling(attempt).min(timeout - waited)).await;
        attempt += 1;
    }
}

/// `RegisterStreamConsumer`; a consumer registered meanwhile by another worker
/// (`ResourceInUseException`) is fine.
async fn register(
    kinesis: &aws_sdk_kinesis::Client,
    stream_arn: &str,
    consumer_name: &str,
    call_timeout: Duration,
) -> Result<(), FanOutError> {
    let call = kinesis
        .register_stream_consumer()
        .stream_arn(stream_arn)
        .consumer_name(consumer_name)
        .send();
    match with_timeout(call_timeout, call).await {
        Ok(_) => {
            info!(consumer_name, "registered the stream consumer");
            Ok(())
        }
        Err(SdkError::ServiceError(s)) if matches!(s.err(), RegisterStreamConsumerError::ResourceInUseException(_)) => {
            debug!(
                consumer_name,
                "the stream consumer is being registered by another worker"
            );
            Ok(())
        }
        Err(e) if unsupported(&e) => Err(FanOutError::NotSupported {
            operation: "RegisterStreamConsumer",
            source: BoxError::from(e),
        }),
        Err(e) if transient(&e) || is_throttled(&e) => {
            warn!(consumer_name, error = %ErrorChain(&e), "RegisterStreamConsumer failed; retrying");
            Ok(())
        }
        // (`LimitExceededException` is retried above: Kinesis uses it both for the rate
        // limit and for too many consumers; the latter ends as `ConsumerNotActive`.)
        Err(SdkError::ServiceError(s))
            if matches!(s.err(), RegisterStreamConsumerError::InvalidArgumentException(_)) =>
        {
            Err(FanOutError::RegistrationRefused {
                consumer_name: consumer_name.to_owned(),
                source: BoxError::from(SdkError::ServiceError(s)),
            })
        }
        Err(e) => Err(FanOutError::Kinesis {
            operation: "RegisterStreamConsumer",
            source: BoxError::from(e),
        }),
    }
}

/// Deregisters the stream consumer `consumer_name` of `stream_name` (an operator's
/// decision: every worker of the application stops receiving records through it). A
/// consumer that does not exist is not an error. Returns whether one was deregistered.
///
/// # Errors
/// [`FanOutError::StreamNotFound`], [`FanOutError::Kinesis`].
pub async fn deregister_stream_consumer(
    kinesis: &aws_sdk_kinesis::Client,
    stream_name: &str,
    consumer_name: &str,
    call_timeout: Duration,
) -> Result<bool, FanOutError> {
    let stream_arn = stream_arn(kinesis, stream_name, call_timeout).await?;
    let call = kinesis
        .deregister_stream_consumer()
        .stream_arn(stream_arn)
        .consumer_name(consumer_name)
        .send();
    match with_timeout(call_timeout, call).await {
        Ok(_) => {
            info!(consumer_name, "deregistered the stream consumer");
            Ok(true)
        }
        Err(SdkError::ServiceError(s)) if s.err().is_resource_not_found_exception() => Ok(false),
        Err(e) => Err(FanOutError::Kinesis {
            operation: "DeregisterStreamConsumer",
            source: BoxError::from(e),
        }),
    }
}
