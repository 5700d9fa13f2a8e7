//! The counters and gauges an operator watches, emitted through the [`metrics`] facade:
//! install any `metrics` recorder (Prometheus, StatsD, ...) in the application to
//! export them; without one they cost next to nothing. Per-shard series carry the
//! stream's name (`stream`) beside the shard id, in single- and multi-stream mode.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `kcl_records_processed_total` | counter | `stream`, `shard_id` | records handed to processors that returned `Ok` |
//! | `kcl_millis_behind_latest` | gauge | `stream`, `shard_id` | how far the last batch was behind the shard's tip |
//! | `kcl_leases_held` | gauge | | leases this worker holds |
//! | `kcl_streams_consumed` | gauge | | streams this worker consumes (1 in single-stream mode; the tracker's in multi-stream mode) |
//! | `kcl_lease_renewals_failed_total` | counter | | renewals that failed with an error or timed out |
//! | `kcl_leases_lost_total` | counter | | leases lost (refused renewal or checkpoint, or not renewed in time) |
//! | `kcl_lease_handoffs_total` | counter | `direction` (`in`, `out`), `outcome` (`requested`, `completed`, `timed_out`) | graceful lease handoffs asked for, completed, and (for `in`) ended by a take after the timeout |
//! | `kcl_throttles_total` | counter | `operation` | throttled Kinesis calls |
//! | `kcl_processor_failures_total` | counter | `stream`, `shard_id` | processor errors and panics |
//! | `kcl_batches_skipped_total` | counter | `stream`, `shard_id` | batches skipped by the `SkipBatch` policy |
//! | `kcl_records_dead_lettered_total` | counter | `stream`, `shard_id` | records handed to the dead-letter sink by the `Bisect` policy |
//! | `kcl_corrupt_leases_total` | counter | | lease items skipped because an attribute cannot be read (each read of the table counts each) |
//! | `kcl_shard_backoffs_total` | counter | `stream`, `shard_id` | failed shard consumers restarted after a backoff |
//! | `kcl_shards_gone_total` | counter | `stream`, `shard_id` | shards treated as ended because Kinesis no longer knows them (`ResourceNotFoundException`) |
//! | `kcl_checkpoints_expired_total` | counter | `stream`, `shard_id` | checkpoints older than the stream's retention, resumed at `TRIM_HORIZON` instead |
//! | `kcl_records_invalid_sequence_number_total` | counter | `stream`, `shard_id` | records skipped because their sequence number cannot be parsed |
//! | `kcl_records_malformed_aggregate_total` | counter | `stream`, `shard_id` | KPL aggregated records that could not be de-aggregated, delivered as they are |
//! | `kcl_fanout_resubscriptions_total` | counter | `stream`, `shard_id` | enhanced fan-out: subscriptions after a shard's first (emitted by `kcl-efo`) |
//! | `kcl_fanout_subscription_errors_total` | counter | `stream`, `shard_id` | enhanced fan-out: refused subscriptions and failed event streams (emitted by `kcl-efo`) |

pub(crate) fn records_processed(stream: &str, shard_id: &str, n: usize) {
    ::metrics::counter!("kcl_records_processed_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(n as u64);
}

pub(crate) fn millis_behind_latest(stream: &str, shard_id: &str, millis: i64) {
    ::metrics::gauge!("kcl_millis_behind_latest", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned())
        .set(millis as f64);
}

pub(crate) fn streams_consumed(n: usize) {
    ::metrics::gauge!("kcl_streams_consumed").set(n as f64);
}

pub(crate) fn leases_held(n: usize) {
    ::metrics::gauge!("kcl_leases_held").set(n as f64);
}

pub(crate) fn lease_renewal_failed() {
    ::metrics::counter!("kcl_lease_renewals_failed_total").increment(1);
}

pub(crate) fn lease_lost() {
    ::metrics::counter!("kcl_leases_lost_total").increment(1);
}

/// `direction`: `out` (this worker hands a lease over) or `in` (it receives one);
/// `outcome`: `requested`, `completed` or `timed_out`.
pub(crate) fn lease_handoff(direction: &'static str, outcome: &'static str) {
    ::metrics::counter!("kcl_lease_handoffs_total", "direction" => direction, "outcome" => outcome).increment(1);
}

pub(crate) fn throttled(operation: &'static str) {
    ::metrics::counter!("kcl_throttles_total", "operation" => operation).increment(1);
}

pub(crate) fn processor_failure(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_processor_failures_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(1);
}

pub(crate) fn batch_skipped(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_batches_skipped_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned())
        .increment(1);
}

pub(crate) fn corrupt_lease() {
    ::metrics::counter!("kcl_corrupt_leases_total").increment(1);
}

pub(crate) fn shard_backoff(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_shard_backoffs_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned())
        .increment(1);
}

pub(crate) fn shard_gone(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_shards_gone_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned())
        .increment(1);
}

pub(crate) fn checkpoint_expired(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_checkpoints_expired_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(1);
}

pub(crate) fn invalid_sequence_number(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_records_invalid_sequence_number_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(1);
}

pub(crate) fn malformed_aggregate(stream: &str, shard_id: &str) {
    ::metrics::counter!("kcl_records_malformed_aggregate_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(1);
}

pub(crate) fn dead_lettered(stream: &str, shard_id: &str, n: usize) {
    ::metrics::counter!("kcl_records_dead_lettered_total", "stream" => stream.to_owned(), "shard_id" => shard_id.to_owned()).increment(n as u64);
}
