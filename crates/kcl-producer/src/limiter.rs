//! Per-shard token buckets holding each shard to the service's write limits.

use std::time::{Duration, Instant};

/// One shard's budget of records and bytes, refilled continuously up to one second's
/// worth.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    records: f64,
    bytes: f64,
    at: Instant,
}

impl TokenBucket {
    pub(crate) fn full(records_per_second: u32, bytes_per_second: u32, now: Instant) -> Self {
        Self {
            records: f64::from(records_per_second),
            bytes: f64::from(bytes_per_second),
            at: now,
        }
    }

    /// Takes one record of `bytes`, or says how long until there is room for it.
    pub(crate) fn take(
        &mut self,
        bytes: usize,
        records_per_second: u32,
        bytes_per_second: u32,
        now: Instant,
    ) -> Result<(), Duration> {
        let (rps, bps) = (f64::from(records_per_second), f64::from(bytes_per_second));
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.records = (self.records + elapsed * rps).min(rps);
        self.bytes = (self.bytes + elapsed * bps).min(bps);
        self.at = now;
        #[allow(clippy::cast_precision_loss)] // at most 1 MiB
        let need = (bytes as f64).min(bps);
        if self.records >= 1.0 && self.bytes >= need {
            self.records -= 1.0;
            self.bytes -= need;
            return Ok(());
        }
        let wait_records = (1.0 - self.records).max(0.0) / rps;
        let wait_bytes = (need - self.bytes).max(0.0) / bps;
        // A zero rate is refused by the config's validation; should one get here, wait a
        // second rather than panic on an infinite wait.
        let wait = Duration::try_from_secs_f64(wait_records.max(wait_bytes)).unwrap_or(Duration::from_secs(1));
        Err(wait.max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_rate_and_says_how_long_to_wait_beyond_it() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(10, 1000, t0);
        for _ in 0..10 {
            assert_eq!(bucket.take(10, 10, 1000, t0), Ok(()));
        }
        let wait = bucket.take(10, 10, 1000, t0).expect_err("out of records");
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(101),
            "{wait:?}"
        );
        assert_eq!(bucket.take(10, 10, 1000, t0 + Duration::from_millis(100)), Ok(()));
        // Bytes limit: 1000 a second; 900 needs 0.9 s after the bucket is drained.
        let mut bucket = TokenBucket::full(1000, 1000, t0);
        assert_eq!(bucket.take(1000, 1000, 1000, t0), Ok(()));
        let wait = bucket.take(900, 1000, 1000, t0).expect_err("out of bytes");
        assert!(wait >= Duration::from_millis(899), "{wait:?}");
    }
}
