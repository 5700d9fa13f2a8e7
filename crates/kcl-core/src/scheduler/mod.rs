//! The [`Scheduler`] (the Java KCL's `Scheduler`): runs one worker. It checks the
//! stream and lease table, syncs shards into leases, keeps its leases renewed, takes
//! leases, runs a [`ShardConsumer`](crate::consumer) per held lease, and shuts down
//! gracefully.
//!
//! Tasks: the scheduler loop itself (taking leases, syncing shards, starting and
//! reaping consumers), one renewer task, and one task per shard consumer (plus its
//! publisher). One root `CancellationToken` asks for shutdown; each consumer has a
//! child token; a lost lease cancels only its own consumer.
//!
//! - `run`: one run, its loop ([`Scheduler::run`] calls it) and one method per step.
//! - `workers`: the running shard consumers, and the backoff of failed ones.

mod run;
mod workers;

use std::fmt;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info_span, warn, Instrument};

use crate::config::{
    CoordinatorConfig, InitialPositionInStream, LeaseManagementConfig, OnProcessorFailure, ProcessorErrorPolicy,
    RetrievalConfig,
};
use crate::error::{ConfigError, ErrorChain, SchedulerError};
use crate::lease::LeaseStore;
use crate::processor::{DeadLetterSink, RecordProcessorFactory};
use crate::retrieval::{PollingRetrievalFactory, RetrievalFactory};
use crate::shard_sync::sync_shards;
use crate::stream::{MultiStreamConfig, MultiStreamTracker};
use crate::streams::{describe_stream, StreamHandle, Streams};

/// Asks a running [`Scheduler`] to shut down gracefully: stop taking leases, call
/// `shutdown_requested` on every processor (which may checkpoint), release the leases.
/// [`Scheduler::run`] returns when that is done.
#[derive(Clone, Debug)]
pub struct ShutdownHandle {
    token: CancellationToken,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown. Idempotent.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// True once a shutdown was requested.
    pub fn is_shutdown_requested(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// What a scheduler consumes: one stream, or the streams a tracker lists.
#[derive(Clone, Debug)]
enum StreamSource {
    Single(String),
    Multi(Arc<dyn MultiStreamTracker>),
}

impl fmt::Display for StreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(name) => f.write_str(name),
            Self::Multi(_) => f.write_str("(multi-stream)"),
        }
    }
}

/// Runs one worker of a Kinesis consumer application. Build it with
/// [`Scheduler::builder`] (one stream) or [`Scheduler::multi_stream_builder`] (the
/// streams a [`MultiStreamTracker`] lists, with one lease table).
pub struct Scheduler {
    source: StreamSource,
    multi_stream: MultiStreamConfig,
    worker_id: String,
    kinesis: aws_sdk_kinesis::Client,
    store: Arc<dyn LeaseStore>,
    factory: Arc<dyn RecordProcessorFactory>,
    initial_position: InitialPositionInStream,
    lease: LeaseManagementConfig,
    retrieval: RetrievalConfig,
    /// Starts each shard's publisher: polling (with `retrieval`) unless the builder was
    /// given another factory (enhanced fan-out).
    retrieval_factory: Arc<dyn RetrievalFactory>,
    coordinator: CoordinatorConfig,
    error_policy: ProcessorErrorPolicy,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
    /// The root token: cancelling it starts the graceful shutdown.
    shutdown: CancellationToken,
}

impl fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheduler")
            .field("source", &self.source)
            .field("multi_stream", &self.multi_stream)
            .field("worker_id", &self.worker_id)
            .field("store", &self.store)
            .field("initial_position", &self.initial_position)
            .field("lease", &self.lease)
            .field("retrieval", &self.retrieval)
            .field("retrieval_factory", &self.retrieval_factory)
            .field("coordinator", &self.coordinator)
            .field("error_policy", &self.error_policy)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Scheduler`]; [`build`](Self::build) validates everything.
#[must_use]
pub struct SchedulerBuilder {
    source: StreamSource,
    multi_stream: MultiStreamConfig,
    worker_id: Option<String>,
    kinesis: Option<aws_sdk_kinesis::Client>,
    store: Option<Arc<dyn LeaseStore>>,
    factory: Option<Arc<dyn RecordProcessorFactory>>,
    initial_position: InitialPositionInStream,
    lease: LeaseManagementConfig,
    retrieval: RetrievalConfig,
    retrieval_factory: Option<Arc<dyn RetrievalFactory>>,
    coordinator: CoordinatorConfig,
    error_policy: ProcessorErrorPolicy,
    dead_letters: Option<Arc<dyn DeadLetterSink>>,
}

impl fmt::Debug for SchedulerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchedulerBuilder")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SchedulerBuilder {
    /// The Kinesis client (required).
    pub fn kinesis_client(mut self, client: aws_sdk_kinesis::Client) -> Self {
        self.kinesis = Some(client);
        self
    }

    /// The lease store, e.g. `kcl_dynamo::DynamoLeaseStore` (required).
    pub fn lease_store(mut self, store: impl LeaseStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// The lease store, already shared.
    pub fn shared_lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The processor factory (required). A closure `|shard_id: &str| MyProcessor::new()` works.
    pub fn processor_factory(mut self, factory: impl RecordProcessorFactory) -> Self {
        self.factory = Some(Arc::new(factory));
        self
    }

    /// This worker's id, unique among the application's workers. Default: a random id
    /// with the process id in it.
    pub fn worker_id(mut self, worker_id: impl Into<String>) -> Self {
        self.worker_id = Some(worker_id.into());
        self
    }

    /// Where shards without a checkpoint start. Default [`InitialPositionInStream::Latest`].
    /// In multi-stream mode each [`StreamConfig`](crate::StreamConfig) has its own.
    pub fn initial_position(mut self, position: InitialPositionInStream) -> Self {
        self.initial_position = position;
        self
    }

    /// Lease settings.
    pub fn lease_config(mut self, config: LeaseManagementConfig) -> Self {
        self.lease = config;
        self
    }

    /// Polling retrieval settings. Their `kinesis_call_timeout` and `retry` also bound
    /// and pace the Kinesis calls the scheduler makes itself (`ListShards`,
    /// `DescribeStreamSummary`), whatever the retrieval.
    pub fn retrieval_config(mut self, config: RetrievalConfig) -> Self {
        self.retrieval = config;
        self
    }

    /// How shards are read: by default polling `GetRecords` with the
    /// [`retrieval_config`](Self::retrieval_config); enhanced fan-out with the factory of
    /// the crate `kcl-efo` (or its `RetrievalMode`, which selects either from one
    /// config value). The processor code is the same for both.
    pub fn retrieval_factory(mut self, factory: impl RetrievalFactory) -> Self {
        self.retrieval_factory = Some(Arc::new(factory));
        self
    }

    /// Multi-stream settings: how often the tracker is asked, what happens to the
    /// leases of streams no longer consumed. Ignored in single-stream mode.
    pub fn multi_stream_config(mut self, config: MultiStreamConfig) -> Self {
        self.multi_stream = config;
        self
    }

    /// Scheduler timing settings.
    pub fn coordinator_config(mut self, config: CoordinatorConfig) -> Self {
        self.coordinator = config;
        self
    }

    /// What to do when a processor fails.
    pub fn processor_error_policy(mut self, policy: ProcessorErrorPolicy) -> Self {
        self.error_policy = policy;
        self
    }

    /// Where records go that the processor keeps failing on, under
    /// [`OnProcessorFailure::Bisect`] (required with that policy).
    pub fn dead_letter_sink(mut self, sink: impl DeadLetterSink) -> Self {
        self.dead_letters = Some(Arc::new(sink));
        self
    }

    /// Validates the configuration and builds the scheduler.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first field that cannot work.
    pub fn build(self) -> Result<Scheduler, ConfigError> {
        match &self.source {
            StreamSource::Single(name) if name.is_empty() => {
                return Err(ConfigError::new("stream_name", "must not be empty"))
            }
            StreamSource::Single(_) => {}
            StreamSource::Multi(_) => self.multi_stream.validate()?,
        }
        let kinesis = self
            .kinesis
            .ok_or_else(|| ConfigError::new("kinesis_client", "is required"))?;
        let store = self
            .store
            .ok_or_else(|| ConfigError::new("lease_store", "is required"))?;
        let factory = self
            .factory
            .ok_or_else(|| ConfigError::new("processor_factory", "is required"))?;
        self.lease.validate()?;
        self.retrieval.validate()?;
        self.coordinator.validate()?;
        self.error_policy.retry.validate("processor_error_policy.retry")?;
        if self.error_policy.on_exhausted == OnProcessorFailure::Bisect && self.dead_letters.is_none() {
            return Err(ConfigError::new(
                "processor_error_policy.on_exhausted",
                "Bisect needs a dead-letter sink (SchedulerBuilder::dead_letter_sink)",
            ));
        }
        let worker_id = match self.worker_id {
            Some(id) if id.trim().is_empty() => return Err(ConfigError::new("worker_id", "must not be blank")),
            Some(id) => id,
            None => format!("worker-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        };
        let retrieval_factory = self
            .retrieval_factory
            .unwrap_or_else(|| Arc::new(PollingRetrievalFactory::new(self.retrieval.clone())));
        Ok(Scheduler {
            retrieval_factory,
            source: self.source,
            multi_stream: self.multi_stream,
            worker_id,
            kinesis,
            store,
            factory,
            initial_position: self.initial_position,
            lease: self.lease,
            retrieval: self.retrieval,
            coordinator: self.coordinator,
            error_policy: self.error_policy,
            dead_letters: self.dead_letters,
            shutdown: CancellationToken::new(),
        })
    }
}

impl Scheduler {
    /// Starts building a scheduler for a stream (by name). Its leases are keyed by
    /// shard id.
    pub fn builder(stream_name: impl Into<String>) -> SchedulerBuilder {
        Self::builder_for(StreamSource::Single(stream_name.into()))
    }

    /// Starts building a scheduler for the streams `tracker` lists (the Java KCL 3.x's
    /// multi-stream mode): one lease table for all, leases keyed
    /// `account-id:stream-name:creation-epoch:shard-id`, all streams' leases balanced
    /// across the workers as one pool. A `Vec<StreamConfig>` is a fixed list.
    pub fn multi_stream_builder(tracker: impl MultiStreamTracker) -> SchedulerBuilder {
        Self::builder_for(StreamSource::Multi(Arc::new(tracker)))
    }

    fn builder_for(source: StreamSource) -> SchedulerBuilder {
        SchedulerBuilder {
            source,
            multi_stream: MultiStreamConfig::default(),
            worker_id: None,
            kinesis: None,
            store: None,
            factory: None,
            initial_position: InitialPositionInStream::default(),
            lease: LeaseManagementConfig::default(),
            retrieval: RetrievalConfig::default(),
            retrieval_factory: None,
            coordinator: CoordinatorConfig::default(),
            error_policy: ProcessorErrorPolicy::default(),
            dead_letters: None,
        }
    }

    /// This worker's id, as written in `leaseOwner`.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            token: self.shutdown.clone(),
        }
    }

    /// Runs the worker until a shutdown is requested through a [`ShutdownHandle`], or a
    /// fatal error. Returns after the graceful shutdown completed: processors were
    /// asked to checkpoint and the leases were released.
    ///
    /// # Errors
    /// [`SchedulerError::StreamNotFound`], [`SchedulerError::LeaseStore`] (for example
    /// a lease table with the wrong key schema or a corrupt lease at start-up),
    /// [`SchedulerError::ProcessorFailed`] per the processor error policy.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future abandons the consumers without releasing
    /// their leases (they expire after the failover time). Use a [`ShutdownHandle`].
    pub async fn run(self) -> Result<(), SchedulerError> {
        let span = info_span!("scheduler", worker_id = %self.worker_id, stream = %self.source);
        self.run_inner().instrument(span).await
    }

    /// Syncs the shards of `only` these streams (all when `None`) into leases. Returns
    /// the error that should stop a single-stream scheduler (its stream is gone); in
    /// multi-stream mode a stream that is gone stops being consumed instead.
    async fn sync(
        &self,
        streams: &mut Streams,
        store: &dyn LeaseStore,
        only: Option<&[Arc<StreamHandle>]>,
    ) -> Result<Option<SchedulerError>, SchedulerError> {
        let targets = only.map_or_else(|| streams.all(), <[_]>::to_vec);
        if targets.is_empty() {
            return Ok(None);
        }
        for (stream, result) in sync_shards(&targets, store).await? {
            match result {
                Ok(_) => {}
                Err(e @ SchedulerError::StreamNotFound { .. }) => match &stream.key {
                    Some(key) => {
                        streams.mark_gone(key);
                    }
                    None => return Ok(Some(e)),
                },
                Err(e) => warn!(stream = %stream.identifier, error = %ErrorChain(&e), "shard sync failed"),
            }
        }
        Ok(None)
    }

    async fn check_stream(&self, stream_name: &str) -> Result<(), SchedulerError> {
        describe_stream(&self.kinesis, stream_name, self.retrieval.kinesis_call_timeout)
            .await
            .map(|_| ())
    }
}
