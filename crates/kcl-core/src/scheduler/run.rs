//! One run of a [`Scheduler`]: the state of its loop, and one method per step (the Java
//! KCL's `Scheduler.runProcessLoop`).
//!
//! [`Run::start`] checks the stream, creates the lease table, syncs the shards and
//! starts the renewer; [`Run::process_loop`] then waits for whichever comes first of a
//! shutdown request, a finished consumer, a lease-taking pass, the expiry of a lease
//! another worker holds, a shard sync, a stream-tracker poll, a shard's backoff ending
//! and a poll of the leases being handed to this worker, and after each step starts
//! the consumers of newly held leases; [`Run::shut_down`] hands the leases over and
//! stops.

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, error, info, warn, Instrument};

use super::workers::Workers;
use super::{Scheduler, StreamSource};
use crate::consumer::{ConsumerContext, ConsumerOutcome};
use crate::error::{ErrorChain, LeaseStoreError, SchedulerError};
use crate::lease::cleanup::LeaseCleanup;
use crate::lease::coordinator::LeaseCoordinator;
use crate::lease::handoff::{finish_hand_over, hand_over_at_shutdown, IncomingHandoffs};
use crate::lease::held::HeldLease;
use crate::lease::leader::LeaderDecider;
use crate::lease::taker::{discover_own_leases, FullScans, LeaseTaker, FOLLOWER_FULL_READ_EVERY};
use crate::lease::timed::TimedLeaseStore;
use crate::lease::{Lease, LeaseStore};
use crate::retry::{retry, RetryPolicy};
use crate::shard_sync::report_corrupt;
use crate::stream::{FormerStreamsLeasesDeletion, StreamIdentifier};
use crate::streams::{StreamHandle, Streams};

impl Scheduler {
    /// [`Scheduler::run`], inside its span.
    pub(super) async fn run_inner(self) -> Result<(), SchedulerError> {
        let mut run = Run::start(&self).await?;
        let failure = run.process_loop().await;
        run.shut_down(failure).await
    }
}

/// What the loop does after a step.
enum Step {
    Continue,
    /// A shutdown was requested: hand the leases over and stop.
    Shutdown,
    /// Stop with this error (the consumers still shut down gracefully).
    Failed(SchedulerError),
}

/// The state of one run of a scheduler.
struct Run<'a> {
    scheduler: &'a Scheduler,
    started: Instant,
    streams: Streams,
    /// Every lease-table call through it is bounded.
    store: Arc<dyn LeaseStore>,
    coordinator: Arc<LeaseCoordinator>,
    renewer: JoinHandle<()>,
    renewer_stop: CancellationToken,
    /// Should the run's future be dropped (not cancel safe: see `Scheduler::run`), the
    /// renewer stops with it, so that the leases expire and move instead of being
    /// renewed, without consumers, for as long as the process lives.
    _stop_renewer_when_dropped: DropGuard,
    workers: Workers,
    taker: LeaseTaker,
    cleanup: LeaseCleanup,
    incoming: IncomingHandoffs,
    decider: LeaderDecider,
    scans: FullScans,
    take_tick: Interval,
    sync_tick: Interval,
    first_take: bool,
    /// When a lease another worker holds expires if it is not renewed before: a pass
    /// then, so that a crashed worker's shards move after the failover time and not up
    /// to a taking interval later.
    next_expiry: Option<Instant>,
    /// Set once the table was found to hold leases of the other mode.
    warned_other_mode: bool,
}

impl<'a> Run<'a> {
    /// Checks the stream (or polls the tracker), creates the lease table if need be,
    /// syncs the shards into leases and starts the renewer.
    async fn start(scheduler: &'a Scheduler) -> Result<Self, SchedulerError> {
        let started = Instant::now();
        let mut streams = open_streams(scheduler).await?;
        let store: Arc<dyn LeaseStore> = Arc::new(TimedLeaseStore::new(
            scheduler.store.clone(),
            scheduler.lease.lease_store_call_timeout,
            scheduler.lease.lease_table_scan_timeout,
        ));
        let created = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
            store.create_lease_table_if_not_exists()
        })
        .await?;
        if created {
            info!("created the lease table");
        }
        if let Some(e) = scheduler.sync(&mut streams, store.as_ref(), None).await? {
            return Err(e);
        }
        let lease = &scheduler.lease;
        let coordinator = Arc::new(LeaseCoordinator::new(
            store.clone(),
            scheduler.worker_id.clone(),
            lease.clone(),
        ));
        let renewer_stop = CancellationToken::new();
        let renewer = tokio::spawn({
            let (coordinator, stop) = (coordinator.clone(), renewer_stop.clone());
            async move { coordinator.renewer().run(stop).await }.in_current_span()
        });
        let ctx = Arc::new(ConsumerContext {
            kinesis: scheduler.kinesis.clone(),
            coordinator: coordinator.clone(),
            kinesis_call_timeout: scheduler.retrieval.kinesis_call_timeout,
            kinesis_retry: scheduler.retrieval.retry.clone(),
            coordinator_config: scheduler.coordinator.clone(),
            error_policy: scheduler.error_policy.clone(),
            dead_letters: scheduler.dead_letters.clone(),
        });
        let workers = Workers::new(
            ctx,
            scheduler.factory.clone(),
            scheduler.coordinator.shard_failure_backoff.clone(),
        );
        let mut take_tick = tokio::time::interval(lease.lease_taking_interval);
        take_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let sync_interval = scheduler.coordinator.shard_sync_interval;
        let mut sync_tick = tokio::time::interval_at(Instant::now() + sync_interval, sync_interval);
        sync_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Ok(Self {
            scheduler,
            started,
            streams,
            store,
            coordinator,
            renewer,
            _stop_renewer_when_dropped: renewer_stop.clone().drop_guard(),
            renewer_stop,
            workers,
            taker: LeaseTaker::default(),
            cleanup: LeaseCleanup::default(),
            incoming: IncomingHandoffs::default(),
            // The lock lasts three failover times and is written every failover time:
            // a dead leader's leases are taken by the others' expiry passes long before
            // its lock expires, so the lock only bounds how long handing out waits.
            decider: LeaderDecider::new(
                scheduler.worker_id.clone(),
                lease.failover_time * 3,
                lease.failover_time,
            ),
            scans: FullScans::new(lease.lease_taking_interval * FOLLOWER_FULL_READ_EVERY),
            take_tick,
            sync_tick,
            first_take: true,
            next_expiry: None,
            warned_other_mode: false,
        })
    }

    /// Runs steps until a shutdown is requested (returns `None`) or a step fails
    /// (returns its error).
    async fn process_loop(&mut self) -> Option<SchedulerError> {
        loop {
            match self.step().await {
                Step::Continue => {}
                Step::Shutdown => return None,
                Step::Failed(e) => return Some(e),
            }
            self.start_consumers().await;
        }
    }

    /// Waits for the first thing to do, and does it.
    async fn step(&mut self) -> Step {
        let shutdown = &self.scheduler.shutdown;
        let next_retry = self.workers.next_retry();
        let handoff_while_backing_off = self.workers.handoff_while_backing_off(&self.coordinator);
        tokio::select! {
            biased;
            // Cancel safety: every branch is cancel safe (token, JoinSet, intervals, a
            // sleep).
            () = shutdown.cancelled() => Step::Shutdown,
            Some(joined) = self.workers.tasks.join_next(), if !self.workers.tasks.is_empty() => self.reap(joined).await,
            _ = self.take_tick.tick() => self.lease_taking_pass().await,
            () = sleep_until_or_never(self.next_expiry) => self.expiry_pass().await,
            _ = self.sync_tick.tick() => self.periodic_sync().await,
            () = sleep_until_or_never(self.streams.next_poll()) => self.poll_tracker().await,
            // A shard's backoff ended: its consumer starts after the step.
            () = sleep_until_or_never(next_retry) => Step::Continue,
            // A handoff of a backing-off lease: released after the step.
            () = handoff_while_backing_off => Step::Continue,
            () = sleep_until_or_never(self.incoming.next_poll()) => self.poll_incoming().await,
        }
    }

    /// Handles a finished consumer.
    async fn reap(&mut self, joined: Result<(Arc<HeldLease>, ConsumerOutcome), tokio::task::JoinError>) -> Step {
        match self.workers.reap(joined, &self.coordinator).await {
            Some(e) => Step::Failed(e),
            None => Step::Continue,
        }
    }

    /// The regular lease-taking pass. The leader reads the whole table and takes,
    /// hands out and balances; with a lease store without leader election every
    /// worker reads it and takes (and steals) for itself; the others read it when a
    /// full scan is due, and otherwise only look up the leases given to them.
    async fn lease_taking_pass(&mut self) -> Step {
        let now = Instant::now();
        let elects = self.store.supports_leader_election();
        let leader = !elects || {
            let store = self.store.clone();
            tokio::select! {
                // Cancel safety: a lock read or write dropped half-way is decided again
                // at the next pass (or expires).
                () = self.scheduler.shutdown.cancelled() => return Step::Shutdown,
                leader = self.decider.is_leader(store.as_ref(), now) => leader,
            }
        };
        self.taker.hand_out = leader && elects;
        self.taker.defer_balancing = !leader && elects;
        if leader || self.scans.due(now) {
            if let Step::Shutdown = self.full_pass().await {
                return Step::Shutdown;
            }
        } else {
            let streams = &self.streams;
            tokio::select! {
                // Cancel safety: only reads and takes, each fenced.
                () = self.scheduler.shutdown.cancelled() => return Step::Shutdown,
                () = discover_own_leases(&self.coordinator, &mut self.incoming, |l| streams.is_active(l)) => {}
            }
        }
        // Every worker reads the whole table when the next lease it watches would
        // expire, so a dead leader's leases move on time too.
        self.watch_next_expiry();
        if self.first_take {
            info!(elapsed = ?self.started.elapsed(), held = self.coordinator.held_count(), "first lease-taking pass done");
            self.first_take = false;
        }
        Step::Continue
    }

    /// A pass at the moment a lease another worker holds would expire. It replaces the
    /// next regular one.
    async fn expiry_pass(&mut self) -> Step {
        if let Step::Shutdown = self.full_pass().await {
            return Step::Shutdown;
        }
        self.watch_next_expiry();
        self.take_tick.reset();
        Step::Continue
    }

    fn watch_next_expiry(&mut self) {
        let failover = self.scheduler.lease.failover_time;
        self.next_expiry =
            self.taker
                .observations()
                .next_expiry(&self.coordinator.held_keys(), Instant::now(), failover);
    }

    /// Reads the whole table and acts on it ([`Run::take_leases`]), and notes the full
    /// scan (also after a failed read, with the last pass's figures: as before the
    /// split; see the note on issue 22).
    async fn full_pass(&mut self) -> Step {
        let step = self.take_leases().await;
        if let Step::Continue = step {
            self.scans.done(Instant::now(), self.taker.short, self.taker.table_size);
        }
        step
    }

    /// One lease-taking pass: reads the table once, deletes the finished leases (and
    /// former streams' ones) the cleanup says nothing needs any more, and carries out
    /// what the taker plans. Corrupt items are skipped (logged and counted), never
    /// fatal. A shutdown requested while the table is being read abandons the read (it
    /// is only a read).
    async fn take_leases(&mut self) -> Step {
        let store = self.store.clone();
        let listing = tokio::select! {
            // Cancel safety: dropping a read loses nothing.
            () = self.scheduler.shutdown.cancelled() => return Step::Shutdown,
            listing = store.list_readable_leases() => listing,
        };
        let mut leases = match listing {
            Ok(listing) => {
                report_corrupt(&listing.corrupt);
                listing.leases
            }
            Err(e) => {
                error!(error = %ErrorChain(&e), "cannot read the lease table; no leases taken this pass");
                return Step::Continue;
            }
        };
        let now = Instant::now();
        let config = &self.scheduler.lease;
        self.cleanup.delete_finished(store.as_ref(), &leases, now, config).await;
        self.warn_of_other_mode(&leases);
        if let (true, FormerStreamsLeasesDeletion::AfterDelay(delay)) = (
            self.streams.is_multi(),
            self.scheduler.multi_stream.former_streams_leases_deletion,
        ) {
            // Only multi-stream leases of streams no longer consumed.
            let streams = &self.streams;
            let consumed = |l: &Lease| l.stream_name.is_none() || streams.is_active(l);
            self.cleanup
                .delete_former_stream_leases(store.as_ref(), &leases, consumed, now, delay)
                .await;
        }
        // Leases of streams this worker does not consume are neither taken nor
        // balanced (all consumed streams' leases are one pool).
        leases.retain(|l| self.streams.is_active(l));
        let mut held = self.coordinator.held_keys();
        held.extend(self.incoming.keys().cloned());
        let me = self.coordinator.worker_id();
        let plan = self.taker.leases_to_take(&leases, me, &held, Instant::now(), config);
        self.taker
            .carry_out(plan, &self.coordinator, &mut self.incoming, leases.len())
            .await;
        Step::Continue
    }

    /// Leases of the other mode (single-stream leases in a multi-stream table, or the
    /// reverse) belong to no stream this worker consumes: they are left alone, never
    /// deleted, and reported once.
    fn warn_of_other_mode(&mut self, leases: &[Lease]) {
        let multi = self.streams.is_multi();
        let other_mode = leases.iter().filter(|l| l.stream_name.is_some() != multi).count();
        if other_mode > 0 && !std::mem::replace(&mut self.warned_other_mode, true) {
            warn!(
                leases = other_mode,
                "the lease table has leases of the other mode (single-stream leases keyed by shard id in a \
                 multi-stream application, or multi-stream leases in a single-stream one); this worker ignores \
                 them. Switching a table between the modes is not supported: use a new application name"
            );
        }
    }

    /// The periodic shard sync. A single stream that no longer exists stops the
    /// scheduler.
    async fn periodic_sync(&mut self) -> Step {
        let synced = tokio::select! {
            // Cancel safety: a sync dropped half-way created its leases ancestors
            // first; the next worker's sync creates the rest.
            () = self.scheduler.shutdown.cancelled() => return Step::Shutdown,
            synced = self.scheduler.sync(&mut self.streams, self.store.as_ref(), None) => synced,
        };
        match synced {
            Ok(None) => Step::Continue,
            Ok(Some(e)) => {
                error!(error = %ErrorChain(&e), "the stream does not exist any more; stopping");
                Step::Failed(e)
            }
            Err(e) => {
                warn!(error = %ErrorChain(&e), "periodic shard sync failed");
                Step::Continue
            }
        }
    }

    /// Asks the multi-stream tracker for its streams; the leases of new ones are
    /// created and taken at once rather than at the next sync and pass.
    async fn poll_tracker(&mut self) -> Step {
        let scheduler = self.scheduler;
        let call_timeout = scheduler.retrieval.kinesis_call_timeout;
        let added = tokio::select! {
            // Cancel safety: streams resolved half-way are resolved again at the next
            // poll.
            () = scheduler.shutdown.cancelled() => return Step::Shutdown,
            added = self.streams.poll_tracker(&scheduler.kinesis, &scheduler.retrieval_factory, call_timeout) => added,
        };
        if added.is_empty() {
            return Step::Continue;
        }
        let synced = tokio::select! {
            () = scheduler.shutdown.cancelled() => return Step::Shutdown,
            synced = scheduler.sync(&mut self.streams, self.store.as_ref(), Some(&added)) => synced,
        };
        if let Err(e) = synced {
            warn!(error = %ErrorChain(&e), "creating the leases of new streams failed; the shard sync tries again");
        }
        self.take_tick.reset_immediately();
        Step::Continue
    }

    /// Reads the leases being handed to this worker; starts those handed over.
    async fn poll_incoming(&mut self) -> Step {
        tokio::select! {
            // Cancel safety: a poll dropped half-way leaves its handoffs watched; the
            // old owners complete them whether or not we look.
            () = self.scheduler.shutdown.cancelled() => Step::Shutdown,
            () = self.incoming.poll(&self.coordinator, self.taker.observations(), &self.scheduler.lease) => Step::Continue,
        }
    }

    /// After every step: a shard sync at once if a shard ended, streams a consumer
    /// found deleted no longer consumed, and a consumer for every newly held lease.
    async fn start_consumers(&mut self) {
        if std::mem::take(&mut self.workers.sync_requested) {
            self.sync_tick.reset_immediately();
        }
        for key in std::mem::take(&mut self.workers.gone_streams) {
            self.streams.mark_gone(&key);
        }
        self.workers
            .start_new(&self.coordinator, &self.scheduler.shutdown, &self.streams)
            .await;
    }

    /// The graceful shutdown, after the loop stopped (with `failure`, or on request):
    /// hands the leases over, stops the consumers, releases the leases, resigns the
    /// leadership, passes on the leases that reached this worker meanwhile, and stops
    /// the renewer.
    async fn shut_down(mut self, failure: Option<SchedulerError>) -> Result<(), SchedulerError> {
        info!(consumers = self.workers.running.len(), "shutting down");
        if failure.is_none() {
            self.observe_table_once_more().await;
        }
        let config = &self.scheduler.lease;
        let live =
            self.taker
                .observations()
                .live_workers(self.coordinator.worker_id(), Instant::now(), config.failover_time);
        let announce = failure.is_none();
        hand_over_at_shutdown(&self.coordinator, &mut self.incoming, live, announce, config).await;
        let failure = self.stop_consumers(failure).await;
        // Concurrent and bounded by one lease-store call timeout, however many leases.
        self.coordinator.release_all().await;
        self.decider.resign(self.store.as_ref()).await;
        finish_hand_over(&self.coordinator, &mut self.incoming, config).await;
        self.renewer_stop.cancel();
        let _ = (&mut self.renewer).await;
        info!("shutdown complete");
        failure.map_or(Ok(()), Err)
    }

    /// The workers that hold leases receive this one's at shutdown: the table is read
    /// once more, as the last pass may be a whole interval old (a worker that joined
    /// since would be missed).
    async fn observe_table_once_more(&mut self) {
        let config = &self.scheduler.lease;
        match tokio::time::timeout(config.lease_store_call_timeout, self.store.list_readable_leases()).await {
            Ok(Ok(listing)) => self.taker.observe_table(&listing.leases, Instant::now(), config),
            Ok(Err(e)) => {
                debug!(error = %ErrorChain(&e), "cannot read the lease table at shutdown; handing leases to the workers last seen")
            }
            Err(_) => {
                debug!("reading the lease table at shutdown timed out; handing leases to the workers last seen")
            }
        }
    }

    /// Asks every consumer to shut down and waits for them, for at most the graceful
    /// shutdown timeout (then abandons them). Returns `failure`, or the first failure
    /// of a consumer.
    async fn stop_consumers(&mut self, mut failure: Option<SchedulerError>) -> Option<SchedulerError> {
        for (token, _) in self.workers.running.values() {
            token.cancel();
        }
        let (workers, coordinator) = (&mut self.workers, &self.coordinator);
        let drain = async {
            while let Some(joined) = workers.tasks.join_next().await {
                if let Some(e) = workers.reap(joined, coordinator).await {
                    failure.get_or_insert(e);
                }
            }
        };
        let timeout = self.scheduler.coordinator.graceful_shutdown_timeout;
        if tokio::time::timeout(timeout, drain).await.is_err() {
            warn!(?timeout, "processors did not finish in time; abandoning them");
            self.workers.tasks.abort_all();
        }
        failure
    }
}

/// The streams a scheduler consumes at its start: its one stream, checked to exist
/// (and its retrieval initialized), or those its tracker lists.
async fn open_streams(scheduler: &Scheduler) -> Result<Streams, SchedulerError> {
    let call_timeout = scheduler.retrieval.kinesis_call_timeout;
    match &scheduler.source {
        StreamSource::Single(name) => {
            scheduler.check_stream(name).await?;
            scheduler
                .retrieval_factory
                .initialize(&scheduler.kinesis, name)
                .await
                .map_err(|source| SchedulerError::Retrieval { source })?;
            Ok(Streams::single(StreamHandle::new(
                StreamIdentifier::single_stream(name.clone()),
                None,
                scheduler.initial_position,
                scheduler.retrieval_factory.clone(),
                scheduler.kinesis.clone(),
                call_timeout,
            )))
        }
        StreamSource::Multi(tracker) => {
            let mut streams = Streams::multi(tracker.clone(), scheduler.multi_stream.stream_tracker_interval);
            let added = streams
                .poll_tracker(&scheduler.kinesis, &scheduler.retrieval_factory, call_timeout)
                .await;
            info!(streams = added.len(), "multi-stream mode");
            Ok(streams)
        }
    }
}

/// Sleeps until `deadline`, or forever without one (a `select!` branch that never fires).
async fn sleep_until_or_never(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
