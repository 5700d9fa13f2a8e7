//! Expiry observation (the Java KCL's rule): a lease held by another worker is expired
//! when its counter has not changed for `failover_time` as seen on *this* worker's
//! monotonic clock, so wall-clock skew between machines never matters.
//!
//! Two refinements, both here and nowhere else:
//! - A lease first seen unowned is available at once; one first seen owned by another
//!   worker gets a full failover time from that first read.
//! - A counter seen changed counts as unchanged since *half a renewal interval before*
//!   the read that saw it: the write that changed it was sent before the read, and its
//!   writer stops using the lease a whole renewal interval before the failover time has
//!   passed since it sent its last successful write, so judging expiry from that moment
//!   leaves the writer half a renewal interval to notice (workers of one application
//!   share `failover_time` and `renewal_interval`), and a crashed worker's leases are
//!   taken about one failover time after its last write rather than after this read.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::model::Lease;

/// What this worker remembers of a lease between reads of the table, to judge expiry.
#[derive(Debug, Clone)]
struct Observation {
    counter: u64,
    owner: Option<String>,
    /// Since when, on this worker's clock, the counter counts as unchanged.
    since: Instant,
}

/// This worker's observations of the lease table's counters.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    observed: HashMap<String, Observation>,
}

impl Observations {
    /// Records the table as read at `now` (see the module's rules); leases no longer in
    /// the table are forgotten.
    pub(crate) fn observe(&mut self, leases: &[Lease], now: Instant, failover: Duration, renewal: Duration) {
        let present: HashSet<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        self.observed.retain(|k, _| present.contains(k.as_str()));
        let changed_since = now.checked_sub(renewal / 2).unwrap_or(now);
        for lease in leases {
            match self.observed.get_mut(&lease.lease_key) {
                // A handoff begins or is re-targeted without moving the counter: the
                // owner is updated, the clock is not (expiry is the counter's alone).
                Some(o) if o.counter == lease.lease_counter => o.owner.clone_from(&lease.lease_owner),
                Some(o) => {
                    *o = Observation {
                        counter: lease.lease_counter,
                        owner: lease.lease_owner.clone(),
                        since: changed_since,
                    }
                }
                None => {
                    let since = if lease.lease_owner.is_none() {
                        now.checked_sub(failover).unwrap_or(now)
                    } else {
                        now
                    };
                    self.observed.insert(
                        lease.lease_key.clone(),
                        Observation {
                            counter: lease.lease_counter,
                            owner: lease.lease_owner.clone(),
                            since,
                        },
                    );
                }
            }
        }
    }

    /// True when `lease` (as just read) is unowned, or its counter has stood still for
    /// the failover time. The counter alone decides, as in the Java KCL: a handoff that
    /// began (or was re-targeted) changed `leaseOwner` without moving it, and a lease
    /// whose old owner and receiver both died must still expire.
    pub(crate) fn is_expired(&self, lease: &Lease, now: Instant, failover: Duration) -> bool {
        if lease.lease_owner.is_none() {
            return true;
        }
        self.observed
            .get(&lease.lease_key)
            .is_some_and(|o| o.counter == lease.lease_counter && now.saturating_duration_since(o.since) >= failover)
    }

    /// Whether the counter of `lease_key` is still `counter`, as last observed.
    pub(crate) fn counter_is(&self, lease_key: &str, counter: u64) -> bool {
        self.observed.get(lease_key).is_some_and(|o| o.counter == counter)
    }

    /// The next moment after `after` at which a lease this worker does not hold expires,
    /// if nothing renews it first: a taking pass then finds a crashed worker's leases
    /// without waiting for the next regular pass.
    pub(crate) fn next_expiry(&self, held: &HashSet<String>, after: Instant, failover: Duration) -> Option<Instant> {
        self.observed
            .iter()
            .filter(|(key, o)| o.owner.is_some() && !held.contains(*key))
            .map(|(_, o)| o.since + failover)
            .filter(|at| *at > after)
            .min()
    }

    /// The other workers that held unexpired leases at the last read, with how many.
    pub(crate) fn live_workers(&self, me: &str, now: Instant, failover: Duration) -> Vec<(String, usize)> {
        let mut load: HashMap<&str, usize> = HashMap::new();
        for o in self.observed.values() {
            if let Some(owner) = o.owner.as_deref() {
                if owner != me && now.saturating_duration_since(o.since) < failover {
                    *load.entry(owner).or_default() += 1;
                }
            }
        }
        load.into_iter().map(|(w, n)| (w.to_owned(), n)).collect()
    }

    /// When the counter of `lease_key` was last seen to change (or first seen), if it
    /// is still `counter`.
    pub(crate) fn unchanged_since(&self, lease_key: &str, counter: u64) -> Option<Instant> {
        self.observed
            .get(lease_key)
            .filter(|o| o.counter == counter)
            .map(|o| o.since)
    }
}
