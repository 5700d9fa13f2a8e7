//! [`ConfigsBuilder`]: the clients and lease store of one application reading one
//! stream (or, in multi-stream mode, the streams a tracker lists), as the Java KCL's
//! `ConfigsBuilder` gathers them.

use std::sync::Arc;

use kcl_core::{MultiStreamTracker, Scheduler, SchedulerBuilder};
use kcl_dynamo::DynamoLeaseStore;

/// The pieces every scheduler of an application needs: its stream, its name (the lease
/// table's name), a Kinesis and a DynamoDB client, and optionally a worker id.
/// [`ConfigsBuilder::scheduler_builder`] gives a [`SchedulerBuilder`] with them set; add
/// a processor factory (and any config) and build.
#[derive(Clone, Debug)]
pub struct ConfigsBuilder {
    /// Empty in multi-stream mode.
    stream_name: String,
    tracker: Option<Arc<dyn MultiStreamTracker>>,
    application_name: String,
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    worker_identifier: Option<String>,
}

impl ConfigsBuilder {
    /// Clients for both services from one AWS configuration (region, credentials, and
    /// endpoints, including `AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB`).
    pub fn new(
        stream_name: impl Into<String>,
        application_name: impl Into<String>,
        sdk_config: &aws_config::SdkConfig,
    ) -> Self {
        Self::with_clients(
            stream_name,
            application_name,
            aws_sdk_kinesis::Client::new(sdk_config),
            aws_sdk_dynamodb::Client::new(sdk_config),
        )
    }

    /// With clients built by the caller (their own endpoints, retries, interceptors).
    pub fn with_clients(
        stream_name: impl Into<String>,
        application_name: impl Into<String>,
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
    ) -> Self {
        Self {
            stream_name: stream_name.into(),
            tracker: None,
            application_name: application_name.into(),
            kinesis,
            dynamodb,
            worker_identifier: None,
        }
    }

    /// Multi-stream mode: the streams `tracker` lists (a `Vec<StreamConfig>` is a
    /// fixed list), one lease table for all, clients from one AWS configuration.
    pub fn for_streams(
        tracker: impl MultiStreamTracker,
        application_name: impl Into<String>,
        sdk_config: &aws_config::SdkConfig,
    ) -> Self {
        Self::for_streams_with_clients(
            tracker,
            application_name,
            aws_sdk_kinesis::Client::new(sdk_config),
            aws_sdk_dynamodb::Client::new(sdk_config),
        )
    }

    /// [`for_streams`](Self::for_streams) with clients built by the caller.
    pub fn for_streams_with_clients(
        tracker: impl MultiStreamTracker,
        application_name: impl Into<String>,
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
    ) -> Self {
        let mut configs = Self::with_clients(String::new(), application_name, kinesis, dynamodb);
        configs.tracker = Some(Arc::new(tracker));
        configs
    }

    /// This worker's id in the lease table (default: unique per process).
    #[must_use]
    pub fn worker_identifier(mut self, worker_identifier: impl Into<String>) -> Self {
        self.worker_identifier = Some(worker_identifier.into());
        self
    }

    /// The Kinesis client (for a producer, or fan-out registration).
    pub fn kinesis_client(&self) -> &aws_sdk_kinesis::Client {
        &self.kinesis
    }

    /// A scheduler builder with the stream (or tracker), the Kinesis client, the DynamoDB lease store
    /// (table named after the application) and the worker id set.
    pub fn scheduler_builder(&self) -> SchedulerBuilder {
        let builder = match &self.tracker {
            Some(tracker) => Scheduler::multi_stream_builder(tracker.clone()),
            None => Scheduler::builder(self.stream_name.clone()),
        };
        let builder = builder
            .kinesis_client(self.kinesis.clone())
            .lease_store(DynamoLeaseStore::new(
                self.dynamodb.clone(),
                self.application_name.clone(),
            ));
        match &self.worker_identifier {
            Some(id) => builder.worker_id(id.clone()),
            None => builder,
        }
    }
}
