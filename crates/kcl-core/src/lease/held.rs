//! [`HeldLease`]: the state of one lease this worker holds, shared by the renewer, the
//! shard consumer and its checkpointer: the last lease state written, when it was last
//! renewed and is due again, the throughput sampler, and the two tokens its consumer
//! watches (lost, and asked to shut down for a handoff).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::model::Lease;
use crate::metrics;

/// A lease this worker holds, shared by the renewer, the shard consumer and its
/// checkpointer.
#[derive(Debug)]
pub(crate) struct HeldLease {
    pub(crate) shard_id: String,
    /// The last lease state this worker wrote. A tokio mutex because it is held across
    /// the conditional write, which serializes renewals and checkpoints of one lease
    /// (each write must carry the counter the previous one produced).
    pub(crate) lease: tokio::sync::Mutex<Lease>,
    /// When the last successful write was *sent*. Other workers start their expiry
    /// clock no earlier than that, so this is a safe lower bound of our ownership.
    last_renewal_sent: Mutex<Instant>,
    /// When the next renewal is due: a renewal interval after the last successful
    /// write, less a random part; sooner after a failed renewal.
    next_renewal: Mutex<Instant>,
    /// Cancelled when the lease is lost; the shard consumer watches it.
    pub(crate) lost: CancellationToken,
    /// Cancelled when the shard consumer should shut down gracefully: the lease is being
    /// handed to another worker, or the scheduler shuts down.
    pub(crate) shutdown_requested: CancellationToken,
    /// The bytes read from the shard, for the lease's `throughputKBps`.
    throughput: Mutex<Throughput>,
}

/// The read throughput of one shard, sampled at each lease write: the rate since the
/// previous sample, smoothed (the mean of the new rate and the previous estimate).
#[derive(Debug)]
struct Throughput {
    bytes: u64,
    since: Instant,
    kbps: Option<f64>,
}

impl Throughput {
    /// Samples are at least this far apart: a write soon after another keeps the
    /// estimate (and its bytes count towards the next sample).
    const MIN_SAMPLE: Duration = Duration::from_secs(1);

    fn sample(&mut self, now: Instant) -> Option<f64> {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= Self::MIN_SAMPLE {
            #[allow(clippy::cast_precision_loss)] // bytes in a sample fit an f64 exactly enough
            let rate = self.bytes as f64 / 1024.0 / elapsed.as_secs_f64();
            self.kbps = Some(self.kbps.map_or(rate, |previous| (previous + rate) / 2.0));
            self.bytes = 0;
            self.since = now;
        }
        self.kbps
    }
}

impl HeldLease {
    pub(super) fn new(lease: Lease, sent: Instant, renewal_interval: Duration) -> Self {
        // The first renewal falls anywhere in the last four fifths of the interval, so
        // that leases taken together do not renew together.
        let first = renewal_interval.mul_f64(rand::random_range(0.2..=1.0));
        Self {
            shard_id: lease.lease_key.clone(),
            lease: tokio::sync::Mutex::new(lease),
            last_renewal_sent: Mutex::new(sent),
            next_renewal: Mutex::new(sent + first),
            lost: CancellationToken::new(),
            shutdown_requested: CancellationToken::new(),
            throughput: Mutex::new(Throughput {
                bytes: 0,
                since: sent,
                kbps: None,
            }),
        }
    }

    /// Counts `bytes` of record data read from the shard.
    pub(crate) fn record_bytes(&self, bytes: u64) {
        lock(&self.throughput).bytes += bytes;
    }

    /// The shard's recent read throughput in KB/s, for the next write of the lease.
    pub(super) fn sample_throughput(&self, now: Instant) -> Option<f64> {
        lock(&self.throughput).sample(now)
    }

    /// Records a successful write sent at `sent` (a renewal or a checkpoint, which
    /// moves the counter as a renewal does) and schedules the next renewal.
    pub(super) fn record_renewal(&self, sent: Instant, renewal_interval: Duration) {
        let mut last = lock(&self.last_renewal_sent);
        if sent > *last {
            *last = sent;
            let early = renewal_interval.mul_f64(rand::random_range(0.0..0.1));
            *lock(&self.next_renewal) = sent + renewal_interval - early;
        }
    }

    /// Schedules another attempt after a failed renewal: a quarter interval, with
    /// jitter, so that renewals throttled together do not retry together, and at most
    /// `at_most` from `now`.
    pub(super) fn retry_renewal(&self, now: Instant, renewal_interval: Duration, at_most: Duration) {
        *lock(&self.next_renewal) = now
            + (renewal_interval / 4)
                .mul_f64(rand::random_range(0.5..1.5))
                .min(at_most);
    }

    pub(super) fn next_renewal(&self) -> Instant {
        *lock(&self.next_renewal)
    }

    pub(super) fn last_renewal_sent(&self) -> Instant {
        *lock(&self.last_renewal_sent)
    }

    /// Notes that this lease is being handed to another worker (`stored` shows the
    /// handoff): its consumer is asked to shut down gracefully, once.
    pub(super) fn handoff_requested(&self, stored: &Lease) {
        if !self.shutdown_requested.is_cancelled() {
            info!(shard_id = %self.shard_id, to = ?stored.lease_owner, "lease is being handed to another worker; shutting its consumer down gracefully");
            metrics::lease_handoff("out", "requested");
            self.shutdown_requested.cancel();
        }
    }
}

/// A std mutex guard that survives a panicking holder (the data is plain state that
/// stays consistent: every critical section is a few assignments).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
