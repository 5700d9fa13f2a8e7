//! The [`Scheduler`] (the Java KCL's `Scheduler`): runs one worker. It checks the
//! stream and lease table, syncs shards into leases, keeps its leases renewed, takes
//! leases, runs a [`ShardConsumer`](crate::consumer) per held lease, and shuts down
//! gracefully.
//!
//! Tasks: the scheduler loop itself (taking leases, syncing shards, starting and
//! reaping consumers), one renewer task, and one task per shard consumer (plus its
//! publisher). One root `CancellationToken` asks for shutdown; each consumer has a
//! child token; a lost lease cancels only its own consumer.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::config::{
    CoordinatorConfig, InitialPositionInStream, LeaseManagementConfig, OnProcessorFailure, ProcessorErrorPolicy,
    RetrievalConfig,
};
use crate::consumer::{ConsumerContext, ConsumerOutcome, ShardConsumer, ShutdownReason};
use crate::coordinator::{HeldLease, LeaseCleanup, LeaseCoordinator, LeaseTaker, SMALL_TABLE};
use crate::error::{ConfigError, ErrorChain, LeaseStoreError, SchedulerError};
use crate::leader::LeaderDecider;
use crate::lease::{Lease, LeaseStore, TimedLeaseStore};
use crate::metrics;
use crate::processor::{DeadLetterSink, RecordProcessorFactory};
use crate::retrieval::{PollingRetrievalFactory, RetrievalFactory};
use crate::retry::{retry, RetryPolicy};
use crate::shard_sync::{report_corrupt, sync_shards};
use crate::stream::{FormerStreamsLeasesDeletion, MultiStreamConfig, MultiStreamTracker, StreamIdentifier};
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
    /// Set once the table was found to hold leases of the other mode.
    warned_other_mode: std::sync::atomic::AtomicBool,
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
            warned_other_mode: std::sync::atomic::AtomicBool::new(false),
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

    async fn run_inner(self) -> Result<(), SchedulerError> {
        let started = Instant::now();
        let call_timeout = self.retrieval.kinesis_call_timeout;
        let mut streams = match &self.source {
            StreamSource::Single(name) => {
                self.check_stream(name).await?;
                self.retrieval_factory
                    .initialize(&self.kinesis, name)
                    .await
                    .map_err(|source| SchedulerError::Retrieval { source })?;
                Streams::single(StreamHandle::new(
                    StreamIdentifier::single_stream(name.clone()),
                    None,
                    self.initial_position,
                    self.retrieval_factory.clone(),
                    self.kinesis.clone(),
                    call_timeout,
                ))
            }
            StreamSource::Multi(tracker) => {
                let mut streams = Streams::multi(tracker.clone(), self.multi_stream.stream_tracker_interval);
                let added = streams
                    .poll_tracker(&self.kinesis, &self.retrieval_factory, call_timeout)
                    .await;
                info!(streams = added.len(), "multi-stream mode");
                streams
            }
        };
        // Every lease-table call is bounded from here on.
        let store: Arc<dyn LeaseStore> = Arc::new(TimedLeaseStore::new(
            self.store.clone(),
            self.lease.lease_store_call_timeout,
            self.lease.lease_table_scan_timeout,
        ));
        let created = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
            store.create_lease_table_if_not_exists()
        })
        .await?;
        if created {
            info!("created the lease table");
        }
        if let Some(e) = self.sync(&mut streams, store.as_ref(), None).await? {
            return Err(e);
        }

        let coordinator = Arc::new(LeaseCoordinator::new(
            store.clone(),
            self.worker_id.clone(),
            self.lease.clone(),
        ));
        let renewer_stop = CancellationToken::new();
        let renewer = tokio::spawn(run_renewer(coordinator.clone(), renewer_stop.clone()).in_current_span());
        // Should this future be dropped (not cancel safe: see `run`), the renewer stops
        // with it, so that the leases expire and move instead of being renewed, without
        // consumers, for as long as the process lives.
        let _stop_renewer_when_dropped = renewer_stop.clone().drop_guard();
        let ctx = Arc::new(ConsumerContext {
            kinesis: self.kinesis.clone(),
            coordinator: coordinator.clone(),
            kinesis_call_timeout: self.retrieval.kinesis_call_timeout,
            kinesis_retry: self.retrieval.retry.clone(),
            coordinator_config: self.coordinator.clone(),
            error_policy: self.error_policy.clone(),
            dead_letters: self.dead_letters.clone(),
        });
        let mut workers = Workers {
            ctx,
            factory: self.factory.clone(),
            running: HashMap::new(),
            tasks: JoinSet::new(),
            backoff: HashMap::new(),
            backoff_policy: self.coordinator.shard_failure_backoff.clone(),
            sync_requested: false,
            gone_streams: Vec::new(),
        };
        let mut taker = LeaseTaker::default();
        let mut cleanup = LeaseCleanup::default();
        let mut incoming = IncomingHandoffs::default();
        // The lock lasts three failover times and is written every failover time: a
        // dead leader's leases are taken by the others' expiry passes long before its
        // lock expires, so the lock only bounds how long handing out waits.
        let mut decider = LeaderDecider::new(
            self.worker_id.clone(),
            self.lease.failover_time * 3,
            self.lease.failover_time,
        );
        let mut scans = FullScans::new(self.lease.lease_taking_interval * FOLLOWER_FULL_READ_EVERY);
        let mut take_tick = tokio::time::interval(self.lease.lease_taking_interval);
        take_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut sync_tick = tokio::time::interval_at(
            Instant::now() + self.coordinator.shard_sync_interval,
            self.coordinator.shard_sync_interval,
        );
        sync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut failure: Option<SchedulerError> = None;
        let mut first_take = true;
        // When a lease another worker holds expires if it is not renewed before: a pass
        // then, so that a crashed worker's shards move after the failover time and not
        // up to a taking interval later.
        let mut next_expiry: Option<Instant> = None;

        loop {
            let next_retry = workers.next_retry();
            tokio::select! {
                biased;
                // Cancel safety: every branch is cancel safe (token, JoinSet, intervals,
                // a sleep).
                () = self.shutdown.cancelled() => break,
                Some(joined) = workers.tasks.join_next(), if !workers.tasks.is_empty() => {
                    if let Some(e) = workers.reap(joined, &coordinator).await {
                        failure = Some(e);
                        break;
                    }
                }
                _ = take_tick.tick() => {
                    let now = Instant::now();
                    let leader = !store.supports_leader_election() || tokio::select! {
                        // Cancel safety: a lock read or write dropped half-way is
                        // decided again at the next pass (or expires).
                        () = self.shutdown.cancelled() => break,
                        leader = decider.is_leader(store.as_ref(), now) => leader,
                    };
                    taker.hand_out = leader && store.supports_leader_election();
                    taker.defer_balancing = !leader && store.supports_leader_election();
                    if leader || scans.due(now) {
                        if !self.take_leases(store.as_ref(), &mut taker, &mut cleanup, &coordinator, &mut incoming, &streams).await {
                            break;
                        }
                        scans.done(Instant::now(), taker.short, taker.table_size);
                    } else {
                        tokio::select! {
                            // Cancel safety: only reads and takes, each fenced.
                            () = self.shutdown.cancelled() => break,
                            () = discover_own_leases(store.as_ref(), &coordinator, &mut incoming, &streams) => {}
                        }
                    }
                    // Every worker reads the whole table when the next lease it watches
                    // would expire, so a dead leader's leases move on time too.
                    next_expiry = taker.next_expiry(&coordinator.held_keys(), Instant::now(), self.lease.failover_time);
                    if first_take {
                        info!(elapsed = ?started.elapsed(), held = coordinator.held_count(), "first lease-taking pass done");
                        first_take = false;
                    }
                }
                () = sleep_until_or_never(next_expiry) => {
                    if !self.take_leases(store.as_ref(), &mut taker, &mut cleanup, &coordinator, &mut incoming, &streams).await {
                        break;
                    }
                    scans.done(Instant::now(), taker.short, taker.table_size);
                    next_expiry = taker.next_expiry(&coordinator.held_keys(), Instant::now(), self.lease.failover_time);
                    // This pass replaces the next regular one.
                    take_tick.reset();
                }
                _ = sync_tick.tick() => {
                    let synced = tokio::select! {
                        // Cancel safety: a sync dropped half-way created its leases
                        // ancestors first; the next worker's sync creates the rest.
                        () = self.shutdown.cancelled() => break,
                        synced = self.sync(&mut streams, store.as_ref(), None) => synced,
                    };
                    match synced {
                        Ok(None) => {}
                        Ok(Some(e)) => {
                            error!(error = %ErrorChain(&e), "the stream does not exist any more; stopping");
                            failure = Some(e);
                            break;
                        }
                        Err(e) => warn!(error = %ErrorChain(&e), "periodic shard sync failed"),
                    }
                }
                () = sleep_until_or_never(streams.next_poll()) => {
                    let added = tokio::select! {
                        // Cancel safety: streams resolved half-way are resolved again
                        // at the next poll.
                        () = self.shutdown.cancelled() => break,
                        added = streams.poll_tracker(&self.kinesis, &self.retrieval_factory, call_timeout) => added,
                    };
                    if !added.is_empty() {
                        // Leases for the new streams now, not at the next shard sync.
                        let synced = tokio::select! {
                            () = self.shutdown.cancelled() => break,
                            synced = self.sync(&mut streams, store.as_ref(), Some(&added)) => synced,
                        };
                        if let Err(e) = synced {
                            warn!(error = %ErrorChain(&e), "creating the leases of new streams failed; the shard sync tries again");
                        }
                        // Take them at once rather than at the next pass.
                        take_tick.reset_immediately();
                    }
                }
                () = sleep_until_or_never(next_retry) => {}
                () = sleep_until_or_never(incoming.next_poll()) => {
                    tokio::select! {
                        // Cancel safety: a poll dropped half-way leaves its handoffs
                        // watched; the old owners complete them whether or not we look.
                        () = self.shutdown.cancelled() => break,
                        () = incoming.poll(&coordinator, &taker, &self.lease) => {}
                    }
                }
            }
            if std::mem::take(&mut workers.sync_requested) {
                sync_tick.reset_immediately();
            }
            for key in std::mem::take(&mut workers.gone_streams) {
                streams.mark_gone(&key);
            }
            workers.start_new(&coordinator, &self.shutdown, &streams).await;
        }

        info!(consumers = workers.running.len(), "shutting down");
        if failure.is_none() {
            // The workers that hold leases now receive this one's: read the table once
            // more, as the last pass may be a whole interval old (a worker that joined
            // since would be missed).
            match tokio::time::timeout(self.lease.lease_store_call_timeout, store.list_readable_leases()).await {
                Ok(Ok(listing)) => taker.observe_table(&listing.leases, Instant::now(), &self.lease),
                Ok(Err(e)) => {
                    debug!(error = %ErrorChain(&e), "cannot read the lease table at shutdown; handing leases to the workers last seen")
                }
                Err(_) => {
                    debug!("reading the lease table at shutdown timed out; handing leases to the workers last seen")
                }
            }
        }
        // Leases let go from here on go to the live workers this one knows of.
        let live = taker.live_workers(coordinator.worker_id(), Instant::now(), self.lease.failover_time);
        coordinator.hand_released_leases_to(live.clone());
        // Leases on their way to this worker go on to another (best effort, within one
        // lease-store call timeout).
        let _ = tokio::time::timeout(
            self.lease.lease_store_call_timeout,
            incoming.pass_on(&coordinator, live),
        )
        .await;
        if failure.is_none() {
            // Announced first, the handoffs are watched by their receivers (from their
            // next lease-taking pass) by the time the consumers stop: a shard then
            // waits for one handoff poll, not for the next pass. Processing goes on
            // meanwhile (the Java KCL 3.x lets a lease being handed over be processed
            // by its old owner until it hands it over, for the same reason).
            let announced = coordinator.announce_handoffs().await;
            if announced > 0 {
                let wait = self.lease.lease_taking_interval + HANDOFF_POLL_INTERVAL;
                info!(
                    leases = announced,
                    ?wait,
                    "handing leases over: processing until the receivers watch them"
                );
                // A fixed wait: the receivers' reads are not visible to this worker.
                tokio::time::sleep(wait).await;
            }
        }
        for (token, _) in workers.running.values() {
            token.cancel();
        }
        let drain = async {
            while let Some(joined) = workers.tasks.join_next().await {
                if let Some(e) = workers.reap(joined, &coordinator).await {
                    failure.get_or_insert(e);
                }
            }
        };
        if tokio::time::timeout(self.coordinator.graceful_shutdown_timeout, drain)
            .await
            .is_err()
        {
            warn!(timeout = ?self.coordinator.graceful_shutdown_timeout, "processors did not finish in time; abandoning them");
            workers.tasks.abort_all();
        }
        // Concurrent and bounded by one lease-store call timeout, however many leases.
        coordinator.release_all().await;
        decider.resign(store.as_ref()).await;
        renewer_stop.cancel();
        let _ = renewer.await;
        info!("shutdown complete");
        failure.map_or(Ok(()), Err)
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

    /// One lease-taking pass: reads the table once, takes what the taker says, and
    /// deletes finished leases the cleanup says nothing needs any more. Corrupt items
    /// are skipped (logged and counted), never fatal. Returns false when a shutdown was
    /// requested while the table was being read (the read is abandoned: it is only a
    /// read).
    async fn take_leases(
        &self,
        store: &dyn LeaseStore,
        taker: &mut LeaseTaker,
        cleanup: &mut LeaseCleanup,
        coordinator: &LeaseCoordinator,
        incoming: &mut IncomingHandoffs,
        streams: &Streams,
    ) -> bool {
        let listing = tokio::select! {
            // Cancel safety: dropping a read loses nothing.
            () = self.shutdown.cancelled() => return false,
            listing = store.list_readable_leases() => listing,
        };
        let mut leases = match listing {
            Ok(listing) => {
                report_corrupt(&listing.corrupt);
                listing.leases
            }
            Err(e) => {
                error!(error = %ErrorChain(&e), "cannot read the lease table; no leases taken this pass");
                return true;
            }
        };
        let now = Instant::now();
        for finished in cleanup.leases_to_delete(
            &leases,
            now,
            self.lease.completed_lease_cleanup_delay,
            self.lease.failover_time,
        ) {
            match store.delete_lease(&finished).await {
                Ok(()) => {
                    info!(shard_id = %finished.lease_key, owner = ?finished.lease_owner, "deleted the lease of a finished shard")
                }
                Err(e) => {
                    warn!(shard_id = %finished.lease_key, error = %ErrorChain(&e), "deleting a finished lease failed")
                }
            }
        }
        // Leases of the other mode (single-stream leases in a multi-stream table, or the
        // reverse) belong to no stream this worker consumes: they are left alone, never
        // deleted, and reported once.
        let other_mode = leases
            .iter()
            .filter(|l| l.stream_name.is_some() != streams.is_multi())
            .count();
        if other_mode > 0 && !self.warned_other_mode.swap(true, std::sync::atomic::Ordering::Relaxed) {
            warn!(
                leases = other_mode,
                "the lease table has leases of the other mode (single-stream leases keyed by shard id in a \
                 multi-stream application, or multi-stream leases in a single-stream one); this worker ignores \
                 them. Switching a table between the modes is not supported: use a new application name"
            );
        }
        if streams.is_multi() {
            if let FormerStreamsLeasesDeletion::AfterDelay(delay) = self.multi_stream.former_streams_leases_deletion {
                // Only multi-stream leases of streams no longer consumed.
                let consumed = |l: &Lease| l.stream_name.is_none() || streams.is_active(l);
                let former = cleanup.former_stream_leases_to_delete(&leases, consumed, now, delay);
                for lease in former {
                    match store.delete_lease(&lease).await {
                        Ok(()) => {
                            info!(shard_id = %lease.lease_key, stream = ?lease.stream_name, "deleted a lease of a stream no longer consumed")
                        }
                        Err(e) => {
                            warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "deleting a lease of a former stream failed")
                        }
                    }
                }
            }
        }
        // Leases of streams this worker does not consume are neither taken nor
        // balanced (all consumed streams' leases are one pool).
        leases.retain(|l| streams.is_active(l));
        let mut held = coordinator.held_keys();
        held.extend(incoming.keys().cloned());
        let mut plan = taker.leases_to_take(&leases, coordinator.worker_id(), &held, Instant::now(), &self.lease);
        // In rounds of concurrent takes; when no other worker is known, the rounds stop
        // at the first lease another worker won (workers starting together then share
        // the table instead of each trying every lease).
        let mut take = plan.take.into_iter().peekable();
        while take.peek().is_some() {
            let round: Vec<Lease> = take.by_ref().take(MAX_CONCURRENT_TAKES).collect();
            let lost = futures::future::join_all(round.into_iter().map(|lease| async move {
                let key = lease.lease_key.clone();
                match coordinator.take(lease).await {
                    Ok(true) => false,
                    Ok(false) => {
                        info!(shard_id = %key, "lease taken by another worker first");
                        true
                    }
                    Err(e) => {
                        warn!(shard_id = %key, error = %ErrorChain(&e), "taking lease failed");
                        false
                    }
                }
            }))
            .await;
            if plan.cautious && lost.contains(&true) {
                info!("another worker is taking leases too; the next pass aims at the fair share");
                plan.short = true;
                break;
            }
        }
        let now = Instant::now();
        for mut lease in plan.steal {
            match coordinator.initiate_handoff(&mut lease).await {
                Ok(true) => incoming.watch(lease, now),
                Ok(false) => info!(shard_id = %lease.lease_key, "lease changed before the handoff could be asked for"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "asking for a handoff failed"),
            }
        }
        for lease in plan.incoming {
            incoming.watch(lease, now);
        }
        for (mut lease, worker) in plan.assign {
            match store.assign_lease(&mut lease, &worker).await {
                Ok(true) => {
                    info!(shard_id = %lease.lease_key, to = %worker, "assigned an unowned or expired lease");
                    taker.note_assigned(&lease);
                }
                Ok(false) => debug!(shard_id = %lease.lease_key, "lease changed before it could be assigned"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "assigning a lease failed"),
            }
        }
        for (mut lease, to) in plan.rebalance {
            let from = lease.lease_owner.clone();
            match store.initiate_graceful_lease_handoff(&mut lease, &to).await {
                Ok(true) => {
                    info!(shard_id = %lease.lease_key, from = ?from, to = %to, "asked for a handoff to balance the load");
                    taker.note_handed(&lease, &to);
                }
                Ok(false) => debug!(shard_id = %lease.lease_key, "lease changed before the handoff could be asked for"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "asking for a handoff failed"),
            }
        }
        taker.short = plan.short;
        taker.table_size = leases.len();
        true
    }
}

/// Sleeps until `deadline`, or forever without one (a `select!` branch that never fires).
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A shard whose consumer failed, waiting to be started again.
#[derive(Debug)]
struct ShardBackoff {
    /// Consecutive failures.
    failures: u32,
    /// When the next consumer may start.
    retry_at: Instant,
}

/// The running shard consumers of a scheduler.
struct Workers {
    ctx: Arc<ConsumerContext>,
    factory: Arc<dyn RecordProcessorFactory>,
    /// Lease key -> the consumer's shutdown token and its stream.
    running: HashMap<String, (CancellationToken, Arc<StreamHandle>)>,
    /// Each task returns the lease period it consumed, so that only that period is
    /// released.
    tasks: JoinSet<(Arc<HeldLease>, ConsumerOutcome)>,
    /// Shards whose consumer failed: not started again before their time. The lease
    /// is kept meanwhile, so the failure does not travel around the fleet.
    backoff: HashMap<String, ShardBackoff>,
    backoff_policy: RetryPolicy,
    /// Set when a shard ended: the shard list is synced at once (in the scheduler loop,
    /// where a shutdown can interrupt it), for children the consumer could not create.
    sync_requested: bool,
    /// Streams (their `streamName`) a consumer found deleted.
    gone_streams: Vec<String>,
}

impl Workers {
    /// Starts a consumer for every held lease that has none and is not backing off.
    /// Finished leases are released instead: there is nothing left to read.
    /// Consumers of streams no longer consumed are asked to shut down gracefully, and
    /// their held leases without a consumer released.
    async fn start_new(&mut self, coordinator: &LeaseCoordinator, root: &CancellationToken, streams: &Streams) {
        if root.is_cancelled() {
            return;
        }
        for (token, stream) in self.running.values() {
            if streams.by_key(stream.key.as_deref()).is_none() && !token.is_cancelled() {
                token.cancel();
            }
        }
        let now = Instant::now();
        self.backoff.retain(|shard_id, _| coordinator.is_held(shard_id));
        for held in coordinator.held_leases() {
            if self.running.contains_key(&held.shard_id) || held.lost.is_cancelled() {
                continue;
            }
            if self.backoff.get(&held.shard_id).is_some_and(|b| b.retry_at > now) {
                continue;
            }
            let (finished, stream, shard) = {
                let lease = held.lease.lock().await;
                (
                    lease.checkpoint.is_shard_end(),
                    streams.of(&lease).cloned(),
                    lease.shard().to_owned(),
                )
            };
            let Some(stream) = stream.filter(|_| !finished && !held.shutdown_requested.is_cancelled()) else {
                // Finished, being handed over before a consumer ran (releasing
                // completes the handoff), or of a stream no longer consumed.
                coordinator.release(&held).await;
                continue;
            };
            let lease_key = held.shard_id.clone();
            let factory = self.factory.clone();
            let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                factory.create_processor_for_stream(&stream.identifier, &shard)
            }));
            let processor = match made {
                Ok(p) => p,
                Err(panic) => {
                    let message = crate::consumer::panic_message(&panic);
                    error!(stream = stream.name(), shard_id = %shard, panic = %message, "processor factory panicked");
                    self.back_off(stream.name(), &shard, &lease_key, now);
                    continue;
                }
            };
            // Cancelled by a handoff of the lease, or by the scheduler's shutdown.
            let token = held.shutdown_requested.clone();
            let span = info_span!("shard_consumer", stream = %stream.name(), shard_id = %shard);
            let handle = stream.clone();
            let consumer = ShardConsumer::new(self.ctx.clone(), stream, shard, held.clone(), processor, token.clone());
            let period = held.clone();
            self.tasks.spawn(
                async move {
                    // Processor panics are caught inside; this catches our own bugs, so
                    // that the lease period is not lost with the task.
                    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(consumer.run()))
                        .await
                        .unwrap_or(ConsumerOutcome::Crashed);
                    (period, outcome)
                }
                .instrument(span),
            );
            self.running.insert(lease_key, (token, handle));
        }
    }

    /// Counts a failure of the consumer of `lease_key` (`shard_id` of `stream`) and
    /// schedules its next start.
    fn back_off(&mut self, stream: &str, shard_id: &str, lease_key: &str, now: Instant) {
        let cap = self.backoff_policy.max_backoff;
        let entry = self.backoff.entry(lease_key.to_owned()).or_insert(ShardBackoff {
            failures: 0,
            retry_at: now,
        });
        // A consumer that ran well past the longest wait since its last failure starts
        // the count afresh.
        if now.saturating_duration_since(entry.retry_at) > cap.saturating_mul(2) {
            entry.failures = 0;
        }
        entry.failures = entry.failures.saturating_add(1);
        let wait = self.backoff_policy.backoff_ceiling(entry.failures);
        entry.retry_at = now + wait;
        metrics::shard_backoff(stream, shard_id);
        warn!(stream, shard_id, failures = entry.failures, retry_in = ?wait, "shard consumer failed; keeping the lease and starting it again after the backoff");
    }

    /// When the next backing-off shard may start.
    fn next_retry(&self) -> Option<Instant> {
        self.backoff
            .iter()
            .filter(|(shard_id, _)| !self.running.contains_key(*shard_id))
            .map(|(_, b)| b.retry_at)
            .min()
    }

    /// Handles a finished consumer. Returns the error that should stop the scheduler.
    async fn reap(
        &mut self,
        joined: Result<(Arc<HeldLease>, ConsumerOutcome), tokio::task::JoinError>,
        coordinator: &LeaseCoordinator,
    ) -> Option<SchedulerError> {
        let (held, outcome) = match joined {
            Ok(v) => v,
            Err(e) => {
                // Only an abort gets here (panics are caught in the task).
                warn!(error = %ErrorChain(&e), "a shard consumer task was aborted");
                return None;
            }
        };
        let shard_id = held.shard_id.clone();
        let stream = self.running.remove(&shard_id).map(|(_, stream)| stream);
        match outcome {
            ConsumerOutcome::Completed(ShutdownReason::ShardEnd) => {
                self.backoff.remove(&shard_id);
                coordinator.release(&held).await;
                self.sync_requested = true;
            }
            ConsumerOutcome::Completed(ShutdownReason::LeaseLost) => {
                self.backoff.remove(&shard_id);
            }
            ConsumerOutcome::Completed(_) | ConsumerOutcome::NotStarted => {
                coordinator.release(&held).await;
            }
            ConsumerOutcome::ShardEndNotCheckpointed
            | ConsumerOutcome::RetrievalFailed
            | ConsumerOutcome::InitializeFailed
            | ConsumerOutcome::Crashed => {
                if coordinator.still_owned(&held) {
                    let shard = held.lease.lock().await.shard().to_owned();
                    let name = stream.as_ref().map_or("", |s| s.name());
                    self.back_off(name, &shard, &shard_id, Instant::now());
                }
            }
            ConsumerOutcome::StreamGone => {
                coordinator.release(&held).await;
                self.gone_streams.extend(stream.and_then(|s| s.key.clone()));
            }
            ConsumerOutcome::Failed(e) => {
                coordinator.release(&held).await;
                return Some(e);
            }
        }
        None
    }
}

/// A worker that is not the leader reads the whole lease table at least every this many
/// lease-taking intervals (and at every pass while it holds less than its share); in
/// between it lists its own leases through the owner index.
const FOLLOWER_FULL_READ_EVERY: u32 = 5;

/// When a worker that is not the leader reads the whole table next.
#[derive(Debug)]
struct FullScans {
    every: Duration,
    /// When the last full read was done, whether this worker was short of its share
    /// after it, and whether the table was small.
    last: Option<(Instant, bool, bool)>,
}

impl FullScans {
    fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// A full read is due: none yet, short or a small table at the last, or the last is
    /// too old.
    fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|(at, short, small)| short || small || now.saturating_duration_since(at) >= self.every)
    }

    fn done(&mut self, at: Instant, short: bool, leases: usize) {
        self.last = Some((at, short, leases <= SMALL_TABLE));
    }
}

/// What a worker that is not the leader does at a lease-taking pass: lists the leases
/// the table gives it (through the owner index), takes those it does not hold yet
/// (assigned by the leader, or handed over), and watches those still being handed over.
async fn discover_own_leases(
    store: &dyn LeaseStore,
    coordinator: &LeaseCoordinator,
    incoming: &mut IncomingHandoffs,
    streams: &Streams,
) {
    let me = coordinator.worker_id().to_owned();
    let keys = match store.list_lease_keys_for_owner(&me).await {
        Ok(keys) => keys,
        Err(e) => {
            warn!(error = %ErrorChain(&e), "cannot list this worker's leases; trying again at the next pass");
            return;
        }
    };
    let held = coordinator.held_keys();
    let now = Instant::now();
    for key in keys {
        if held.contains(&key) || incoming.watched.contains_key(&key) {
            continue;
        }
        let lease = match store.get_lease(&key).await {
            Ok(Some(lease)) if lease.is_owned_by(&me) => lease,
            Ok(_) => continue,
            Err(e) => {
                debug!(shard_id = %key, error = %ErrorChain(&e), "reading a lease given to this worker failed");
                continue;
            }
        };
        if lease.checkpoint.is_shard_end() || !streams.is_active(&lease) {
            continue;
        }
        if lease.is_handoff_pending() {
            incoming.watch(lease, now);
            continue;
        }
        match coordinator.take(lease).await {
            Ok(true) => {}
            Ok(false) => debug!(shard_id = %key, "a lease given to this worker changed before it was taken"),
            Err(e) => warn!(shard_id = %key, error = %ErrorChain(&e), "taking a lease given to this worker failed"),
        }
    }
}

/// At most this many takes of one lease-taking pass are in flight at once.
const MAX_CONCURRENT_TAKES: usize = 16;

/// How often a lease being handed to this worker is read, to start it as soon as the
/// old owner has handed it over (for up to four watched leases; proportionally less
/// often for more, at most every 5 s).
const HANDOFF_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Leases being handed to this worker: each is read every [`HANDOFF_POLL_INTERVAL`]
/// until its old owner completes the handoff (then it is taken and consumed), another
/// worker changes it (then it is forgotten), or the handoff runs out of time (then it is
/// assigned to this worker, which ends the old owner's period).
#[derive(Debug, Default)]
struct IncomingHandoffs {
    /// Lease key -> when this worker started to watch it.
    watched: HashMap<String, Instant>,
    next_poll: Option<Instant>,
}

impl IncomingHandoffs {
    fn watch(&mut self, lease: Lease, now: Instant) {
        self.watched.entry(lease.lease_key).or_insert(now);
        self.next_poll.get_or_insert(now + HANDOFF_POLL_INTERVAL);
    }

    fn keys(&self) -> impl Iterator<Item = &String> {
        self.watched.keys()
    }

    fn next_poll(&self) -> Option<Instant> {
        self.next_poll
    }

    /// At shutdown: passes every lease on its way to this worker on to a live worker
    /// (`successors`, least loaded first), so that its shard does not wait for the
    /// failover time once the old owner completes the handoff to a worker that left
    /// (as in a rolling deploy, where the receiver of a stopping worker's lease stops a
    /// moment later). A handoff still under way is given to another receiver; a lease
    /// already handed over or assigned to this worker but not taken yet is assigned on.
    /// The leases are the watched handoffs and those the owner index names; the
    /// handing-over worker is never chosen. Without a live worker, a lease already
    /// handed over is released instead. Returns how many were passed on.
    async fn pass_on(&mut self, coordinator: &LeaseCoordinator, mut successors: Vec<(String, usize)>) -> usize {
        let me = coordinator.worker_id().to_owned();
        let store = coordinator.store();
        let held = coordinator.held_keys();
        let mut keys: std::collections::BTreeSet<String> = std::mem::take(&mut self.watched).into_keys().collect();
        self.next_poll = None;
        match store.list_lease_keys_for_owner(&me).await {
            Ok(owned) => keys.extend(owned),
            Err(e) => debug!(error = %ErrorChain(&e), "cannot list this worker's leases at shutdown"),
        }
        // Held leases are handed over by their own release.
        keys.retain(|k| !held.contains(k));
        let mut passed = 0;
        for key in keys {
            // Twice: a handoff that completes between the read and the write is read
            // again and assigned instead.
            for _ in 0..2 {
                let mut lease = match store.get_lease(&key).await {
                    Ok(Some(lease)) if lease.is_owned_by(&me) && !lease.checkpoint.is_shard_end() => lease,
                    Ok(_) => break,
                    Err(e) => {
                        debug!(shard_id = %key, error = %ErrorChain(&e), "cannot read a lease on its way to this worker at shutdown");
                        break;
                    }
                };
                let from = lease.checkpoint_owner.clone();
                let Some(to) = successors
                    .iter_mut()
                    .filter(|(w, _)| Some(w) != from.as_ref())
                    .min_by_key(|(w, n)| (*n, w.clone()))
                else {
                    // No live worker to pass it to: a lease already handed over is
                    // released, so that the next worker takes it at once.
                    if !lease.is_handoff_pending() {
                        match store.evict_lease(&mut lease).await {
                            Ok(true) => {
                                info!(shard_id = %key, "a lease handed to this worker but not taken yet was released")
                            }
                            Ok(false) => continue,
                            Err(e) => {
                                debug!(shard_id = %key, error = %ErrorChain(&e), "releasing a lease not taken yet failed")
                            }
                        }
                    }
                    break;
                };
                let written = if lease.is_handoff_pending() {
                    store.retarget_graceful_lease_handoff(&mut lease, &to.0).await
                } else {
                    store.assign_lease(&mut lease, &to.0).await
                };
                match written {
                    Ok(true) => {
                        info!(shard_id = %key, from = ?from, to = %to.0, "a lease on its way to this worker was passed on to a live worker");
                        to.1 += 1;
                        passed += 1;
                        break;
                    }
                    Ok(false) => continue,
                    Err(e) => {
                        debug!(shard_id = %key, error = %ErrorChain(&e), "passing a lease on at shutdown failed; it moves after the failover time");
                        break;
                    }
                }
            }
        }
        passed
    }

    async fn poll(&mut self, coordinator: &LeaseCoordinator, taker: &LeaseTaker, config: &LeaseManagementConfig) {
        let me = coordinator.worker_id().to_owned();
        let keys: Vec<(String, Instant)> = self.watched.iter().map(|(k, t)| (k.clone(), *t)).collect();
        for (key, since) in keys {
            let stored = match coordinator.store().get_lease(&key).await {
                Ok(stored) => stored,
                Err(e) => {
                    debug!(shard_id = %key, error = %ErrorChain(&e), "reading a lease being handed over failed");
                    continue;
                }
            };
            let now = Instant::now();
            let Some(stored) = stored.filter(|l| l.is_owned_by(&me)) else {
                info!(shard_id = %key, "a handoff to this worker was given up: the lease changed");
                self.watched.remove(&key);
                continue;
            };
            if !stored.is_handoff_pending() {
                self.watched.remove(&key);
                match coordinator.take(stored).await {
                    Ok(true) => metrics::lease_handoff("in", "completed"),
                    Ok(false) => info!(shard_id = %key, "a handed-over lease was taken by another worker first"),
                    Err(e) => warn!(shard_id = %key, error = %ErrorChain(&e), "taking a handed-over lease failed"),
                }
                continue;
            }
            // The old owner renews while it hands over; a counter that stands still
            // for the failover time means it is gone.
            let stalled = taker
                .unchanged_since(&key, stored.lease_counter)
                .is_some_and(|t| now.saturating_duration_since(t) >= config.failover_time);
            if now.saturating_duration_since(since) >= config.graceful_lease_handoff_timeout || stalled {
                warn!(
                    shard_id = %key,
                    from = ?stored.checkpoint_owner,
                    timeout = ?config.graceful_lease_handoff_timeout,
                    stalled,
                    "the handoff did not complete in time; taking the lease over"
                );
                self.watched.remove(&key);
                metrics::lease_handoff("in", "timed_out");
                if let Err(e) = coordinator.assign_to_self(stored).await {
                    warn!(shard_id = %key, error = %ErrorChain(&e), "taking over a handed-over lease failed");
                }
            }
        }
        // Each watched lease is one read per poll: with many, poll less often.
        let every = HANDOFF_POLL_INTERVAL * u32::try_from(self.watched.len().div_ceil(4)).unwrap_or(u32::MAX).max(1);
        self.next_poll = (!self.watched.is_empty()).then(|| Instant::now() + every.min(Duration::from_secs(5)));
    }
}

/// Renews each held lease when its renewal is due. It wakes at least every fifth of a
/// renewal interval, so that a lease taken meanwhile is renewed on time. Beside it, a
/// watchdog marks a lease lost the moment it can no longer be proven held, even while
/// a renewal of it hangs.
async fn run_renewer(coordinator: Arc<LeaseCoordinator>, stop: CancellationToken) {
    let every = coordinator.renewal_interval();
    let renewals = async {
        loop {
            let now = Instant::now();
            let wake = coordinator
                .next_renewal_due()
                .map_or(now + every / 5, |due| due.min(now + every / 5));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
            }
            // Leases due within the next few milliseconds go in the same round.
            coordinator.renew_due(Instant::now() + every / 50).await;
        }
    };
    let watchdog = async {
        loop {
            let now = Instant::now();
            let wake = coordinator
                .next_unprovable()
                .map_or(now + every / 5, |at| at.min(now + every / 5));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
            }
            coordinator.expire_unprovable(Instant::now());
        }
    };
    tokio::join!(renewals, watchdog);
}
