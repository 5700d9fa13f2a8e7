//! In-process workers: scheduler builders with fast test timings ([`fast_config`],
//! [`TestEnv::scheduler`], [`TestEnv::trim_horizon_builder`]), and running and stopping
//! a scheduler on a task ([`spawn_scheduler`], [`stop_scheduler`]).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use kcl_core::{
    CoordinatorConfig, InitialPositionInStream, LeaseManagementConfig, LeaseStore, RecordProcessorFactory,
    RetrievalConfig, RetryPolicy, SchedulerBuilder,
};

use crate::backends::TestEnv;
use crate::recorder::{CheckpointMode, Event, Recorder, RecordingProcessor};

impl TestEnv {
    /// A scheduler builder with fast test timings (failover 3 s, reads every 200 ms).
    pub fn scheduler(&self, recorder: &Recorder, mode: CheckpointMode) -> SchedulerBuilder {
        let recorder = recorder.clone();
        fast_config(
            kcl_core::Scheduler::builder(self.stream.clone())
                .kinesis_client(self.kinesis.clone())
                .lease_store(self.lease_store()),
        )
        .processor_factory(move |shard_id: &str| RecordingProcessor::new(shard_id, recorder.clone(), mode))
    }

    /// A scheduler builder for this test's stream on `store` with fast test timings
    /// ([`fast_config`]), reading from `TRIM_HORIZON`, with the processors `factory`
    /// makes: the start the tests' workers share, to which each adds its own settings
    /// (lease config, worker id, error policy, ...).
    pub fn trim_horizon_builder(
        &self,
        store: Arc<dyn LeaseStore>,
        factory: impl RecordProcessorFactory,
    ) -> SchedulerBuilder {
        fast_config(
            kcl_core::Scheduler::builder(self.stream.clone())
                .kinesis_client(self.kinesis.clone())
                .shared_lease_store(store),
        )
        .initial_position(InitialPositionInStream::TrimHorizon)
        .processor_factory(factory)
    }
}

impl TestEnv {
    /// A scheduler builder ([`TestEnv::scheduler`]) reading from `TRIM_HORIZON` whose
    /// processor factory notes [`Event::Failed`] and panics at every call, so that the
    /// shard's consumer keeps failing, with `backoff` between its starts.
    pub fn failing_factory_scheduler(&self, recorder: &Recorder, backoff: RetryPolicy) -> SchedulerBuilder {
        let factory_recorder = recorder.clone();
        self.scheduler(recorder, CheckpointMode::EveryBatch)
            .processor_factory(move |shard_id: &str| -> RecordingProcessor {
                factory_recorder.note(Event::Failed {
                    shard_id: shard_id.to_owned(),
                });
                panic!("the processor factory fails on purpose")
            })
            .coordinator_config(CoordinatorConfig {
                shard_failure_backoff: backoff,
                ..CoordinatorConfig::default()
            })
            .initial_position(InitialPositionInStream::TrimHorizon)
    }
}

/// Applies fast timings suited to tests to a builder.
pub fn fast_config(builder: SchedulerBuilder) -> SchedulerBuilder {
    let mut lease = LeaseManagementConfig::with_failover_time(Duration::from_secs(3));
    lease.lease_taking_interval = Duration::from_secs(1);
    let retrieval = RetrievalConfig {
        idle_time_between_reads: Duration::from_millis(200),
        ..RetrievalConfig::default()
    };
    let coordinator = CoordinatorConfig {
        parent_shard_poll_interval: Duration::from_millis(200),
        graceful_shutdown_timeout: Duration::from_secs(10),
        ..CoordinatorConfig::default()
    };
    builder
        .lease_config(lease)
        .retrieval_config(retrieval)
        .coordinator_config(coordinator)
}

/// Runs a scheduler on a task; returns its shutdown handle and the task.
pub fn spawn_scheduler(
    scheduler: kcl_core::Scheduler,
) -> (
    kcl_core::ShutdownHandle,
    tokio::task::JoinHandle<Result<(), kcl_core::SchedulerError>>,
) {
    let handle = scheduler.shutdown_handle();
    (handle, tokio::spawn(scheduler.run()))
}

/// Requests a graceful shutdown and waits (at most `timeout`) for `run()` to return.
pub async fn stop_scheduler(
    handle: kcl_core::ShutdownHandle,
    task: tokio::task::JoinHandle<Result<(), kcl_core::SchedulerError>>,
    timeout: Duration,
) -> anyhow::Result<Result<(), kcl_core::SchedulerError>> {
    handle.shutdown();
    Ok(tokio::time::timeout(timeout, task)
        .await
        .context("the scheduler did not stop in time")??)
}
