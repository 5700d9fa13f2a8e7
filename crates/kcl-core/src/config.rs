//! Configuration: one struct per area, each with documented defaults (taken from the
//! Java KCL), validated by [`SchedulerBuilder::build`](crate::SchedulerBuilder::build).
//!
//! The structs have public fields and `Default`; set what you need and take the rest
//! from the defaults: `RetrievalConfig { max_records: 1000, ..Default::default() }`.
//! Every struct derives serde with `deny_unknown_fields`, so a typo in a config file is
//! an error, not a silently ignored setting. Durations are (de)serialized as human
//! readable strings (`"10s"`, `"1500ms"`, `"5m"`; `humantime`'s format).

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
pub use crate::limits::{check_max_durations, MAX_DURATION};
use crate::retry::RetryPolicy;

/// Where to start reading a shard that has no checkpoint yet (the Java KCL's
/// `InitialPositionInStream`). Shards that already have a checkpoint resume after it.
///
/// In a config file: `"latest"`, `"trim_horizon"` or `{ at_timestamp = "2026-12-01T08:00:00Z" }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InitialPositionInStream {
    /// After the newest record: only records written from now on. The default, as in
    /// the Java KCL.
    #[default]
    Latest,
    /// At the oldest record the stream retains.
    TrimHorizon,
    /// At the first record that arrived at or after this time.
    AtTimestamp(#[serde(with = "humantime_serde")] SystemTime),
}

/// Lease management (the Java KCL's `LeaseManagementConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseManagementConfig {
    /// How long a lease's counter may stay unchanged before other workers may take it.
    /// Default 10 s.
    #[serde(with = "humantime_serde")]
    pub failover_time: Duration,
    /// How often a worker renews the leases it holds. Must be shorter than
    /// `failover_time`. Default `failover_time / 3`.
    #[serde(with = "humantime_serde")]
    pub renewal_interval: Duration,
    /// How often a worker reads the lease table to take unowned and expired leases
    /// and to balance. Default `failover_time / 5` (2 s). The Java KCL reads every
    /// `2 * failover_time`; reading more often is what lets a lease released by a
    /// graceful shutdown be picked up within seconds instead of stalling its shard.
    /// Each pass is one `Scan` of the lease table: raise it for tables of thousands of
    /// leases with many workers.
    #[serde(with = "humantime_serde")]
    pub lease_taking_interval: Duration,
    /// The most leases one worker holds. Default unlimited (`usize::MAX`; `"unlimited"`
    /// in a config file).
    #[serde(with = "count_or_unlimited")]
    pub max_leases_for_worker: usize,
    /// The most leases one worker asks others for (by a graceful handoff) in one
    /// lease-taking pass, so that workers converge without thrashing. Default 1.
    pub max_leases_to_steal_at_one_time: usize,
    /// Bound of one single-item lease-table call (renew, take, checkpoint, release,
    /// read, create, delete): one that takes longer counts as failed, with an unknown
    /// outcome. Default `renewal_interval`. `build()` requires
    /// `2 * renewal_interval + lease_store_call_timeout <= failover_time`, so that a
    /// renewal sent one interval after the last one lands while the lease is still
    /// provably held.
    #[serde(with = "humantime_serde")]
    pub lease_store_call_timeout: Duration,
    /// Bound of one full read of the lease table (a `Scan` of all pages, in each
    /// lease-taking pass and shard sync): a pass whose read takes longer is skipped and
    /// tried at the next interval. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub lease_table_scan_timeout: Duration,
    /// How long a finished (`SHARD_END`) lease is kept after all its children have
    /// started (checkpointed past `TRIM_HORIZON`) before it is deleted. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub completed_lease_cleanup_delay: Duration,
    /// How long a worker that asked for a lease by a graceful handoff (to balance the
    /// load) waits for the old owner to stop, checkpoint and hand it over before it
    /// takes the lease anyway (the old owner's processor then gets `lease_lost`). The
    /// Java KCL 3.x's `gracefulLeaseHandoffTimeoutMillis`. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub graceful_lease_handoff_timeout: Duration,
    /// What balancing evens out between workers: the number of leases (the default,
    /// as the Java KCL 2.x), or their throughput (`throughputKBps`, which every worker
    /// records on its leases; closer to the Java KCL 3.x's load-based assignment).
    pub lease_balancing: LeaseBalancing,
}

/// What lease balancing evens out between workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LeaseBalancing {
    /// Every worker holds about as many leases as the others.
    #[default]
    LeaseCount,
    /// Every worker reads about as many kilobytes a second as the others, within 10 %:
    /// a hot shard counts as many quiet ones. A lease's weight is its `throughputKBps`
    /// (at least a twentieth of the mean, since an idle shard still costs a consumer);
    /// leases without one weigh the mean. Moves are graceful handoffs.
    Throughput,
}

impl Default for LeaseManagementConfig {
    fn default() -> Self {
        Self::with_failover_time(Duration::from_secs(10))
    }
}

impl LeaseManagementConfig {
    /// Defaults derived from a failover time: renew every `failover / 3` (as the Java
    /// KCL), read the lease table every `failover / 5`.
    pub fn with_failover_time(failover_time: Duration) -> Self {
        let renewal_interval = failover_time / 3;
        Self {
            failover_time,
            renewal_interval,
            lease_taking_interval: failover_time / 5,
            max_leases_for_worker: usize::MAX,
            max_leases_to_steal_at_one_time: 1,
            lease_store_call_timeout: renewal_interval,
            lease_table_scan_timeout: Duration::from_secs(30),
            completed_lease_cleanup_delay: Duration::from_secs(300),
            graceful_lease_handoff_timeout: Duration::from_secs(30),
            lease_balancing: LeaseBalancing::LeaseCount,
        }
    }

    /// Checks the settings against each other and their ranges (as `build()` does).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_max_durations(&[
            ("lease.failover_time", self.failover_time),
            ("lease.renewal_interval", self.renewal_interval),
            ("lease.lease_taking_interval", self.lease_taking_interval),
            ("lease.lease_store_call_timeout", self.lease_store_call_timeout),
            ("lease.lease_table_scan_timeout", self.lease_table_scan_timeout),
            (
                "lease.completed_lease_cleanup_delay",
                self.completed_lease_cleanup_delay,
            ),
            (
                "lease.graceful_lease_handoff_timeout",
                self.graceful_lease_handoff_timeout,
            ),
        ])?;
        if self.failover_time < Duration::from_millis(100) {
            return Err(ConfigError::new("lease.failover_time", "must be at least 100 ms"));
        }
        if self.renewal_interval.is_zero() || self.renewal_interval >= self.failover_time {
            return Err(ConfigError::new(
                "lease.renewal_interval",
                format!(
                    "must be above zero and shorter than failover_time ({:?}); got {:?}",
                    self.failover_time, self.renewal_interval
                ),
            ));
        }
        if self.lease_taking_interval.is_zero() {
            return Err(ConfigError::new("lease.lease_taking_interval", "must be above zero"));
        }
        if self.max_leases_for_worker == 0 {
            return Err(ConfigError::new("lease.max_leases_for_worker", "must be at least 1"));
        }
        if self.lease_store_call_timeout.is_zero() {
            return Err(ConfigError::new("lease.lease_store_call_timeout", "must be above zero"));
        }
        if self.graceful_lease_handoff_timeout.is_zero() {
            return Err(ConfigError::new(
                "lease.graceful_lease_handoff_timeout",
                "must be above zero",
            ));
        }
        if self.lease_table_scan_timeout.is_zero() {
            return Err(ConfigError::new("lease.lease_table_scan_timeout", "must be above zero"));
        }
        // A lease is provably held for `failover - renewal` after the last renewal was
        // sent; the next renewal is sent `renewal` later and may take the call timeout.
        // Without room for both, every lease counts as lost every cycle.
        let needed = self.renewal_interval.saturating_mul(2) + self.lease_store_call_timeout;
        if needed > self.failover_time {
            let max_renewal = self.failover_time.saturating_sub(self.lease_store_call_timeout) / 2;
            return Err(ConfigError::new(
                "lease.renewal_interval",
                format!(
                    "2 x renewal_interval ({:?}) + lease_store_call_timeout ({:?}) must not exceed failover_time ({:?}): \
                     a lease is provably held only for failover_time - renewal_interval, and the next renewal must land \
                     within it. Set renewal_interval to at most {max_renewal:?} (failover_time / 3 with the default \
                     timeout), or lower lease_store_call_timeout",
                    self.renewal_interval, self.lease_store_call_timeout, self.failover_time
                ),
            ));
        }
        Ok(())
    }
}

/// Polling retrieval (the Java KCL's `PollingConfig` and prefetch settings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrievalConfig {
    /// `Limit` of one `GetRecords` call, 1 to 10,000. Default 10,000.
    pub max_records: i32,
    /// Pause between `GetRecords` calls on one shard while it is caught up, measured from
    /// the start of the previous call. At least 200 ms (Kinesis allows five reads per
    /// shard per second). Default 1.5 s.
    #[serde(with = "humantime_serde")]
    pub idle_time_between_reads: Duration,
    /// Pause between calls while the shard has a backlog (the last call returned a full
    /// batch or reported being behind). Default 200 ms.
    #[serde(with = "humantime_serde")]
    pub backlog_time_between_reads: Duration,
    /// Batches fetched ahead of the processor. Default 3.
    pub max_pending_batches: usize,
    /// Records fetched ahead of the processor; one more batch may be in flight.
    /// Default 30,000.
    pub max_prefetch_records: usize,
    /// Bytes of record data fetched ahead of the processor; one more batch may be in
    /// flight. Default 8 MiB.
    ///
    /// Sizing memory: per shard, count this limit plus one whole `GetRecords` response
    /// (up to `max_records` records, at most 10 MiB) plus a few times that while a
    /// response is decoded. For large records lower `max_records` (for example 1,000
    /// for 1 KiB records) so that one batch stays well under this limit.
    pub max_prefetch_bytes: usize,
    /// Bound of one Kinesis call made by the worker (`GetRecords`, `GetShardIterator`,
    /// `ListShards`, `DescribeStreamSummary`): a call that takes longer is abandoned and
    /// retried with backoff, so that a hung connection never stalls a shard while its
    /// lease stays renewed. Default 30 s (the Java KCL's bound of polling requests).
    #[serde(with = "humantime_serde")]
    pub kinesis_call_timeout: Duration,
    /// Backoff of `GetRecords`/`GetShardIterator` after throttling or a transient
    /// failure. Retries never end (giving up would stall the shard silently); each
    /// failure is logged and counted.
    pub retry: RetryPolicy,
}

impl Default for RetrievalConfig {
    fn default() -> Self {
        Self {
            max_records: 10_000,
            idle_time_between_reads: Duration::from_millis(1500),
            backlog_time_between_reads: Duration::from_millis(200),
            max_pending_batches: 3,
            max_prefetch_records: 30_000,
            max_prefetch_bytes: 8 * 1024 * 1024,
            kinesis_call_timeout: Duration::from_secs(30),
            retry: RetryPolicy::new(Duration::from_millis(200), Duration::from_secs(10), None),
        }
    }
}

impl RetrievalConfig {
    /// Checks the settings against each other and their ranges (as `build()` does).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_max_durations(&[
            ("retrieval.idle_time_between_reads", self.idle_time_between_reads),
            ("retrieval.backlog_time_between_reads", self.backlog_time_between_reads),
            ("retrieval.kinesis_call_timeout", self.kinesis_call_timeout),
        ])?;
        self.retry.validate("retrieval.retry")?;
        if !(1..=10_000).contains(&self.max_records) {
            return Err(ConfigError::new("retrieval.max_records", "must be 1 to 10,000"));
        }
        let min = Duration::from_millis(200);
        if self.idle_time_between_reads < min {
            return Err(ConfigError::new(
                "retrieval.idle_time_between_reads",
                "must be at least 200 ms (five GetRecords calls per shard per second)",
            ));
        }
        if self.backlog_time_between_reads < min {
            return Err(ConfigError::new(
                "retrieval.backlog_time_between_reads",
                "must be at least 200 ms (five GetRecords calls per shard per second)",
            ));
        }
        if self.max_pending_batches == 0 {
            return Err(ConfigError::new("retrieval.max_pending_batches", "must be at least 1"));
        }
        if self.kinesis_call_timeout.is_zero() {
            return Err(ConfigError::new("retrieval.kinesis_call_timeout", "must be above zero"));
        }
        if self.max_prefetch_records == 0 || self.max_prefetch_bytes == 0 {
            return Err(ConfigError::new(
                "retrieval.max_prefetch_records",
                "prefetch limits must be above zero",
            ));
        }
        Ok(())
    }
}

/// What to do after a processor's `process_records` returned an error or panicked on
/// the same batch `retry.max_attempts` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnProcessorFailure {
    /// Stop the worker: every other shard shuts down gracefully, the failed shard's
    /// lease is released without a checkpoint, and [`Scheduler::run`](crate::Scheduler::run)
    /// returns [`SchedulerError::ProcessorFailed`](crate::SchedulerError::ProcessorFailed).
    /// Nothing is skipped. The default.
    StopScheduler,
    /// Log the failure, count it in `kcl_batches_skipped_total`, and go on with the
    /// next batch. The batch's records are not processed: choose this only when losing
    /// a poison batch is better than stopping.
    SkipBatch,
    /// Isolate the records that fail, as AWS Lambda's bisect-on-error does: the batch
    /// is split in halves and each half given to `process_records` (once); a half that
    /// fails is split again, down to single records, which get the full retry policy.
    /// A record that still fails is handed to the [`DeadLetterSink`](crate::DeadLetterSink)
    /// (set with `SchedulerBuilder::dead_letter_sink`, required with this policy) and
    /// processing goes on with the next one; nothing is dropped without passing through
    /// it (a sink that keeps failing stops the scheduler). Records before a failing one
    /// are processed once; the processor checkpoints as usual, so its next checkpoint
    /// covers the dead-lettered records.
    Bisect,
}

/// The policy for a processor that fails: retry the batch with backoff, then act.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessorErrorPolicy {
    /// How often and how patiently to retry the same batch. `max_attempts: None`
    /// retries without end. Default: 10 attempts, backoff from 100 ms up to 10 s.
    pub retry: RetryPolicy,
    /// What to do when the retries are exhausted. Default [`OnProcessorFailure::StopScheduler`].
    pub on_exhausted: OnProcessorFailure,
}

impl Default for ProcessorErrorPolicy {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            on_exhausted: OnProcessorFailure::StopScheduler,
        }
    }
}

/// The scheduler's own timing (the Java KCL's `CoordinatorConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// How often the shard list is synced into the lease table. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub shard_sync_interval: Duration,
    /// How often a consumer waiting on parent shards re-reads their leases. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub parent_shard_poll_interval: Duration,
    /// How long a graceful shutdown waits for processors to finish
    /// `shutdown_requested` before it abandons them. Default 20 s. Reading the lease
    /// table once more, passing on leases on their way to this worker, and releasing
    /// its leases take at most one `lease_store_call_timeout` each, so
    /// [`Scheduler::run`](crate::Scheduler::run) returns within this plus three of
    /// those after the shutdown was requested, even when the lease table hangs (plus,
    /// when other workers are alive to receive its leases, one lease-taking interval
    /// during which it goes on processing while they start watching the handoffs).
    #[serde(with = "humantime_serde")]
    pub graceful_shutdown_timeout: Duration,
    /// Backoff of a shard whose consumer failed (its retrieval failed, its processor
    /// factory panicked, its `initialize` kept failing, or its `SHARD_END` was not
    /// written): the worker keeps the lease and starts a new consumer after
    /// `initial_backoff * 2^(failures - 1)`, capped at `max_backoff` (no jitter: the
    /// lease is held, so no other worker races for the shard). Each wait is logged and
    /// counted in `kcl_shard_backoffs_total`. `max_attempts` is ignored: a shard is never
    /// given up. Default: from 1 s up to 60 s.
    pub shard_failure_backoff: RetryPolicy,
    /// Calls `process_records` even for an empty batch. Default false.
    pub call_process_records_even_for_empty_list: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            shard_sync_interval: Duration::from_secs(60),
            parent_shard_poll_interval: Duration::from_secs(10),
            graceful_shutdown_timeout: Duration::from_secs(20),
            shard_failure_backoff: RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(60), None),
            call_process_records_even_for_empty_list: false,
        }
    }
}

impl CoordinatorConfig {
    /// Checks the settings against each other and their ranges (as `build()` does).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_max_durations(&[
            ("coordinator.shard_sync_interval", self.shard_sync_interval),
            (
                "coordinator.parent_shard_poll_interval",
                self.parent_shard_poll_interval,
            ),
            ("coordinator.graceful_shutdown_timeout", self.graceful_shutdown_timeout),
        ])?;
        self.shard_failure_backoff
            .validate("coordinator.shard_failure_backoff")?;
        if self.shard_sync_interval.is_zero() {
            return Err(ConfigError::new(
                "coordinator.shard_sync_interval",
                "must be above zero",
            ));
        }
        if self.parent_shard_poll_interval.is_zero() {
            return Err(ConfigError::new(
                "coordinator.parent_shard_poll_interval",
                "must be above zero",
            ));
        }
        if self.shard_failure_backoff.initial_backoff.is_zero()
            || self.shard_failure_backoff.max_backoff < self.shard_failure_backoff.initial_backoff
        {
            return Err(ConfigError::new(
                "coordinator.shard_failure_backoff",
                "initial_backoff must be above zero and max_backoff at least initial_backoff",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards issue 21 item 12: a duration far too large (a config file can say
    /// "584942417355y") is refused by name, instead of panicking later where it is
    /// added to an `Instant`.
    #[test]
    fn a_duration_beyond_a_year_is_refused_by_name() {
        let huge = Duration::MAX;
        type Set<C> = fn(&mut C, Duration);
        let lease: [(&str, Set<LeaseManagementConfig>); 7] = [
            ("lease.failover_time", |c, d| c.failover_time = d),
            ("lease.renewal_interval", |c, d| c.renewal_interval = d),
            ("lease.lease_taking_interval", |c, d| c.lease_taking_interval = d),
            ("lease.lease_store_call_timeout", |c, d| c.lease_store_call_timeout = d),
            ("lease.lease_table_scan_timeout", |c, d| c.lease_table_scan_timeout = d),
            ("lease.completed_lease_cleanup_delay", |c, d| {
                c.completed_lease_cleanup_delay = d
            }),
            ("lease.graceful_lease_handoff_timeout", |c, d| {
                c.graceful_lease_handoff_timeout = d
            }),
        ];
        for (field, set) in lease {
            let mut c = LeaseManagementConfig::default();
            set(&mut c, huge);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field));
        }
        let retrieval: [(&str, Set<RetrievalConfig>); 5] = [
            ("retrieval.idle_time_between_reads", |c, d| {
                c.idle_time_between_reads = d
            }),
            ("retrieval.backlog_time_between_reads", |c, d| {
                c.backlog_time_between_reads = d
            }),
            ("retrieval.kinesis_call_timeout", |c, d| c.kinesis_call_timeout = d),
            ("retrieval.retry", |c, d| c.retry.initial_backoff = d),
            ("retrieval.retry", |c, d| c.retry.max_backoff = d),
        ];
        for (field, set) in retrieval {
            let mut c = RetrievalConfig::default();
            set(&mut c, huge);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field));
        }
        let coordinator: [(&str, Set<CoordinatorConfig>); 4] = [
            ("coordinator.shard_sync_interval", |c, d| c.shard_sync_interval = d),
            ("coordinator.parent_shard_poll_interval", |c, d| {
                c.parent_shard_poll_interval = d
            }),
            ("coordinator.graceful_shutdown_timeout", |c, d| {
                c.graceful_shutdown_timeout = d
            }),
            ("coordinator.shard_failure_backoff", |c, d| {
                c.shard_failure_backoff.max_backoff = d
            }),
        ];
        for (field, set) in coordinator {
            let mut c = CoordinatorConfig::default();
            set(&mut c, huge);
            assert_eq!(c.validate().map_err(|e| e.field), Err(field));
        }
        // A year itself is allowed.
        let c = CoordinatorConfig {
            shard_sync_interval: MAX_DURATION,
            ..CoordinatorConfig::default()
        };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn defaults_match_the_java_kcl_and_validate() {
        let lease = LeaseManagementConfig::default();
        assert_eq!(lease.failover_time, Duration::from_secs(10));
        assert_eq!(lease.renewal_interval, Duration::from_secs(10) / 3);
        assert_eq!(lease.lease_taking_interval, Duration::from_secs(2));
        lease.validate().expect("default lease config is valid");
        let retrieval = RetrievalConfig::default();
        assert_eq!(retrieval.max_records, 10_000);
        assert_eq!(retrieval.idle_time_between_reads, Duration::from_millis(1500));
        retrieval.validate().expect("default retrieval config is valid");
        CoordinatorConfig::default()
            .validate()
            .expect("default coordinator config is valid");
    }

    #[test]
    fn renewal_must_be_shorter_than_failover() {
        let mut lease = LeaseManagementConfig::default();
        lease.renewal_interval = lease.failover_time;
        let err = lease.validate().expect_err("renewal == failover is invalid");
        assert_eq!(err.field, "lease.renewal_interval");
    }

    /// Guards hardening item 7: a renewal interval of half the failover time or more
    /// loses every lease each cycle, and must be refused by `build()`.
    #[test]
    fn renewal_must_leave_room_for_a_renewal_within_the_provable_window() {
        let failover = Duration::from_secs(10);
        for renewal in [
            Duration::from_secs(5),
            Duration::from_secs(6),
            Duration::from_millis(9_999),
        ] {
            let lease = LeaseManagementConfig {
                renewal_interval: renewal,
                lease_store_call_timeout: Duration::from_millis(100),
                ..LeaseManagementConfig::with_failover_time(failover)
            };
            let err = lease.validate().expect_err("renewal >= failover / 2 is refused");
            assert_eq!(err.field, "lease.renewal_interval");
            assert!(err.reason.contains("at most 4.95s"), "{}", err.reason);
        }
        // The call timeout needs room too: 2 x 3 s + 4.1 s > 10 s.
        let lease = LeaseManagementConfig {
            renewal_interval: Duration::from_secs(3),
            lease_store_call_timeout: Duration::from_millis(4100),
            ..LeaseManagementConfig::with_failover_time(failover)
        };
        assert_eq!(lease.validate().map_err(|e| e.field), Err("lease.renewal_interval"));
        // Derived defaults fit exactly, at any failover time.
        for secs in [1, 3, 10, 60] {
            LeaseManagementConfig::with_failover_time(Duration::from_secs(secs))
                .validate()
                .expect("derived defaults are valid");
        }
    }

    #[test]
    fn retrieval_limits_are_checked() {
        let mut r = RetrievalConfig {
            max_records: 0,
            ..RetrievalConfig::default()
        };
        assert_eq!(r.validate().map_err(|e| e.field), Err("retrieval.max_records"));
        r.max_records = 100;
        r.idle_time_between_reads = Duration::from_millis(10);
        assert_eq!(
            r.validate().map_err(|e| e.field),
            Err("retrieval.idle_time_between_reads")
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<CoordinatorConfig>(r#"{"shard_sync_intervall": 1}"#);
        assert!(err.is_err());
    }
}

/// A count where `usize::MAX` means no limit: `"unlimited"` in config files (TOML has
/// no integer that large).
mod count_or_unlimited {
    use serde::{Deserialize, Deserializer, Serializer};

    const UNLIMITED: &str = "unlimited";

    pub(super) fn serialize<S: Serializer>(value: &usize, serializer: S) -> Result<S::Ok, S::Error> {
        if *value == usize::MAX {
            serializer.serialize_str(UNLIMITED)
        } else {
            serializer.serialize_u64(*value as u64)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum CountOrWord {
            Count(u64),
            Word(String),
        }
        match CountOrWord::deserialize(deserializer)? {
            CountOrWord::Count(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            CountOrWord::Word(w) if w == UNLIMITED => Ok(usize::MAX),
            CountOrWord::Word(w) => Err(serde::de::Error::custom(format!(
                "{w:?} is neither a count nor \"{UNLIMITED}\""
            ))),
        }
    }
}
