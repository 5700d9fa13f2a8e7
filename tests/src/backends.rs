//! Each test's world: a fresh stream and lease table on a backend, either the
//! embedded one (`kcl-local`: ferrokinesis + dynoxide) or the npm conformance
//! backends (kinesis-mock + dynalite, see [`conformance`]).

use anyhow::Context as _;
use kcl_dynamo::DynamoLeaseStore;
use kcl_local::LocalBackend;

use crate::conformance;

/// A random suffix so that tests running in parallel never share a stream or table.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Which Kinesis + DynamoDB a test talks to.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value per test; boxing would only add noise"
)]
pub enum Backend {
    /// The embedded ferrokinesis + dynoxide (`kcl-local`): fast, the default.
    Embedded(LocalBackend),
    /// kinesis-mock + dynalite from npm: slower, and the most faithful (`ChildShards`).
    Conformance(conformance::ConformanceBackend),
}

impl Backend {
    /// The Kinesis endpoint URL.
    pub fn kinesis_endpoint(&self) -> String {
        match self {
            Self::Embedded(b) => b.kinesis_endpoint(),
            Self::Conformance(b) => b.kinesis_endpoint(),
        }
    }

    /// The DynamoDB endpoint URL.
    pub fn dynamodb_endpoint(&self) -> String {
        match self {
            Self::Embedded(b) => b.dynamodb_endpoint(),
            Self::Conformance(b) => b.dynamodb_endpoint(),
        }
    }

    /// SDK config for Kinesis.
    pub fn kinesis_sdk_config(&self) -> aws_types::SdkConfig {
        match self {
            Self::Embedded(b) => b.kinesis_sdk_config(),
            Self::Conformance(b) => b.kinesis_sdk_config(),
        }
    }

    /// SDK config for DynamoDB.
    pub fn dynamodb_sdk_config(&self) -> aws_types::SdkConfig {
        match self {
            Self::Embedded(b) => b.dynamodb_sdk_config(),
            Self::Conformance(b) => b.dynamodb_sdk_config(),
        }
    }
}

/// One test's world: a backend, a stream, and a lease table name.
#[derive(Debug)]
pub struct TestEnv {
    /// The Kinesis + DynamoDB.
    pub backend: Backend,
    /// Kinesis client for the producer and the scheduler.
    pub kinesis: aws_sdk_kinesis::Client,
    /// DynamoDB client.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// The stream, created with the requested shard count.
    pub stream: String,
    /// The lease table (the application name).
    pub table: String,
}

impl TestEnv {
    /// Starts the embedded backend and creates a stream of `shards` shards.
    pub async fn start(shards: i32) -> anyhow::Result<Self> {
        init_tracing();
        let backend = LocalBackend::start().await.context("starting the embedded backend")?;
        Self::with_backend(Backend::Embedded(backend), shards).await
    }

    /// Starts the conformance backend (kinesis-mock + dynalite; `npm ci --prefix
    /// tests/conformance` first) and creates a stream of `shards` shards.
    pub async fn start_conformance(shards: i32) -> anyhow::Result<Self> {
        init_tracing();
        let backend = conformance::ConformanceBackend::start()
            .await
            .context("starting the conformance backend")?;
        Self::with_backend(Backend::Conformance(backend), shards).await
    }

    async fn with_backend(backend: Backend, shards: i32) -> anyhow::Result<Self> {
        let kinesis = aws_sdk_kinesis::Client::new(&backend.kinesis_sdk_config());
        let dynamodb = aws_sdk_dynamodb::Client::new(&backend.dynamodb_sdk_config());
        let stream = unique("stream");
        kcl_local::create_stream(&kinesis, &stream, shards)
            .await
            .context("creating the stream")?;
        Ok(Self {
            backend,
            kinesis,
            dynamodb,
            stream,
            table: unique("app"),
        })
    }

    /// A DynamoDB lease store on this test's table.
    pub fn lease_store(&self) -> DynamoLeaseStore {
        DynamoLeaseStore::new(self.dynamodb.clone(), self.table.clone())
    }
}
