//! The producer's counters, gauges and histogram (listed in the crate overview).

use std::time::Duration;

pub(crate) fn acknowledged(user_records: usize, bytes: usize, latency: Duration) {
    ::metrics::counter!("kcl_producer_user_records_put_total").increment(user_records as u64);
    ::metrics::counter!("kcl_producer_kinesis_records_put_total").increment(1);
    ::metrics::counter!("kcl_producer_bytes_put_total").increment(bytes as u64);
    ::metrics::histogram!("kcl_producer_put_latency_seconds").record(latency.as_secs_f64());
}

pub(crate) fn retried(reason: &str) {
    ::metrics::counter!("kcl_producer_retries_total", "reason" => reason.to_owned()).increment(1);
}

pub(crate) fn throttled() {
    ::metrics::counter!("kcl_producer_throttles_total").increment(1);
}

pub(crate) fn failed(reason: &'static str, n: usize) {
    ::metrics::counter!("kcl_producer_failures_total", "reason" => reason).increment(n as u64);
}

pub(crate) fn buffered(records: usize, bytes: usize) {
    ::metrics::gauge!("kcl_producer_buffered_records").set(records as f64);
    ::metrics::gauge!("kcl_producer_buffered_bytes").set(bytes as f64);
}
