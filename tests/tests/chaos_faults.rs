//! The chaos runner's SDK faults go through the real SDK and the real emulators: the
//! client sees the service's own error shapes, and the request has landed.

use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_types::retry::RetryConfig;
use kcl_tests::sdk_faults::{RandomFaults, SdkFault, Service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_reach_the_client_as_service_errors_after_the_request_landed() -> anyhow::Result<()> {
    let backend = kcl_local::LocalBackend::start().await?;
    let seen: Arc<Mutex<Vec<(Service, String, SdkFault)>>> = Arc::default();
    let observer = {
        let seen = seen.clone();
        Arc::new(move |service: Service, operation: &str, fault: SdkFault| {
            seen.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((service, operation.to_owned(), fault));
        })
    };

    // Kinesis, every response a fault, no SDK retries to hide them.
    let kinesis_config = backend
        .kinesis_sdk_config()
        .into_builder()
        .retry_config(RetryConfig::disabled())
        .build();
    let faulty = RandomFaults::new(Service::Kinesis, 1.0, 5, observer.clone()).kinesis_client(&kinesis_config);
    let error = faulty
        .create_stream()
        .stream_name("landed")
        .shard_count(1)
        .send()
        .await
        .expect_err("every response is a fault");
    let service_error = error.into_service_error();
    assert!(
        service_error.is_limit_exceeded_exception() || service_error.meta().code() == Some("InternalFailure"),
        "{service_error:?}"
    );
    // The stream was created all the same.
    let described = backend
        .kinesis_client()
        .describe_stream_summary()
        .stream_name("landed")
        .send()
        .await?;
    assert!(described.stream_description_summary().is_some());

    // DynamoDB: a write that fails on the way back is in the table.
    let dynamodb_config = backend
        .dynamodb_sdk_config()
        .into_builder()
        .retry_config(RetryConfig::disabled())
        .build();
    let plain = backend.dynamodb_client();
    plain
        .create_table()
        .table_name("landed")
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("k")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("k")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()?,
        )
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await?;
    let faulty = RandomFaults::new(Service::DynamoDb, 1.0, 9, observer).dynamodb_client(&dynamodb_config);
    let error = faulty
        .put_item()
        .table_name("landed")
        .item("k", AttributeValue::S("v".into()))
        .send()
        .await
        .expect_err("every response is a fault");
    let service_error = error.into_service_error();
    assert!(
        service_error.is_provisioned_throughput_exceeded_exception() || service_error.is_internal_server_error(),
        "{service_error:?}"
    );
    let item = plain
        .get_item()
        .table_name("landed")
        .key("k", AttributeValue::S("v".into()))
        .send()
        .await?;
    assert!(item.item().is_some(), "the write landed");

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].0, seen[0].1.as_str()), (Service::Kinesis, "CreateStream"));
    assert_eq!((seen[1].0, seen[1].1.as_str()), (Service::DynamoDb, "PutItem"));
    backend.shutdown().await;
    Ok(())
}
