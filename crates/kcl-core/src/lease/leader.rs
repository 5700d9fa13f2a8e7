//! Leader election (the Java KCL 3.x's `LeaderDecider`), through a lock the lease store
//! keeps ([`LeaseStore::read_leader_lock`], [`LeaseStore::write_leader_lock`]).
//!
//! The lock works as a lease: its holder writes it (a new version) every renewal
//! interval; a worker that sees the same version for the failover time on its own clock
//! may take it over with a write conditional on that version. A holder that cannot
//! write it stops counting itself leader a renewal interval before others may take it.
//! Two leaders at once would only cost reads: every lease write stays fenced.
//!
//! The leader reads the whole lease table at each lease-taking pass, takes and hands
//! out unowned and expired leases; the other workers list their own leases through the
//! owner index and read the whole table only when they are short of their share, or
//! every few passes.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::model::LeaderLock;
use super::store::LeaseStore;
use crate::error::ErrorChain;

/// The owner written into a lock given up: the next worker to read it takes it.
const RESIGNED: &str = "(resigned)";

/// The lock as this worker holds it.
#[derive(Debug)]
struct Held {
    lock: LeaderLock,
    /// When the last successful write of it was sent.
    sent: Instant,
}

/// Decides, pass by pass, whether this worker is the leader.
#[derive(Debug)]
pub(crate) struct LeaderDecider {
    worker_id: String,
    /// How long an unchanged lock stands before others may take it over.
    lock_lease: Duration,
    /// How often the holder writes it.
    heartbeat: Duration,
    /// How often a worker that is not the leader reads it.
    check_every: Duration,
    held: Option<Held>,
    /// The lock as last read, and since when it was seen at that version.
    seen: Option<(LeaderLock, Instant)>,
    next_check: Option<Instant>,
}

impl LeaderDecider {
    /// A decider for `worker_id`: the lock lasts `lock_lease` and is written every
    /// `heartbeat`; others read it every `lock_lease / 2`.
    pub(crate) fn new(worker_id: impl Into<String>, lock_lease: Duration, heartbeat: Duration) -> Self {
        Self {
            worker_id: worker_id.into(),
            lock_lease,
            heartbeat,
            check_every: lock_lease / 2,
            held: None,
            seen: None,
            next_check: None,
        }
    }

    /// Whether this worker is the leader now, writing or reading the lock when due.
    pub(crate) async fn is_leader(&mut self, store: &dyn LeaseStore, now: Instant) -> bool {
        if let Some(held) = &self.held {
            if now.saturating_duration_since(held.sent) < self.heartbeat {
                return true;
            }
            let sent = Instant::now();
            match store.write_leader_lock(Some(&held.lock), &self.worker_id).await {
                Ok(Some(lock)) => {
                    self.held = Some(Held { lock, sent });
                    return true;
                }
                Ok(None) => {
                    info!("another worker took the leader lock; no longer the leader");
                    self.held = None;
                }
                Err(e) => {
                    let safe = self.lock_lease.saturating_sub(self.heartbeat);
                    if now.saturating_duration_since(held.sent) < safe {
                        warn!(error = %ErrorChain(&e), "writing the leader lock failed; trying again at the next pass");
                        return true;
                    }
                    warn!(error = %ErrorChain(&e), "the leader lock could not be written in time; no longer the leader");
                    self.held = None;
                }
            }
        }
        if self.next_check.is_some_and(|at| now < at) {
            return false;
        }
        self.next_check = Some(now + self.check_every);
        let stored = match store.read_leader_lock().await {
            Ok(stored) => stored,
            Err(e) => {
                debug!(error = %ErrorChain(&e), "reading the leader lock failed");
                return false;
            }
        };
        let Some(lock) = stored else {
            return self.acquire(store, None).await;
        };
        if lock.owner == self.worker_id || lock.owner == RESIGNED {
            // Given up, or held by an earlier process with this worker id.
            return self.acquire(store, Some(&lock)).await;
        }
        match &self.seen {
            Some((seen, since)) if seen.version == lock.version => {
                if now.saturating_duration_since(*since) >= self.lock_lease {
                    info!(leader = %lock.owner, "the leader lock was not renewed for the failover time; taking it over");
                    return self.acquire(store, Some(&lock)).await;
                }
                false
            }
            _ => {
                self.seen = Some((lock, now));
                false
            }
        }
    }

    async fn acquire(&mut self, store: &dyn LeaseStore, expected: Option<&LeaderLock>) -> bool {
        let sent = Instant::now();
        match store.write_leader_lock(expected, &self.worker_id).await {
            Ok(Some(lock)) => {
                info!(version = lock.version, "became the leader");
                self.held = Some(Held { lock, sent });
                self.seen = None;
                true
            }
            Ok(None) => false,
            Err(e) => {
                debug!(error = %ErrorChain(&e), "taking the leader lock failed");
                false
            }
        }
    }

    /// Gives the lock up on shutdown (best effort): the next worker to read it takes
    /// it over at once.
    pub(crate) async fn resign(&mut self, store: &dyn LeaseStore) {
        if let Some(held) = self.held.take() {
            match store.write_leader_lock(Some(&held.lock), RESIGNED).await {
                Ok(_) => info!("gave up the leader lock"),
                Err(e) => debug!(error = %ErrorChain(&e), "giving up the leader lock failed; it expires"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::LeaseStoreError;
    use crate::lease::in_memory::InMemoryLeaseStore;
    use crate::lease::model::Lease;
    use std::sync::Mutex;

    /// An in-memory store with a leader lock.
    #[derive(Debug, Default)]
    struct LockStore {
        leases: InMemoryLeaseStore,
        lock: Mutex<Option<LeaderLock>>,
    }

    #[async_trait::async_trait]
    impl LeaseStore for LockStore {
        async fn create_lease_table_if_not_exists(&self) -> Result<bool, LeaseStoreError> {
            Ok(false)
        }
        async fn list_leases(&self) -> Result<Vec<Lease>, LeaseStoreError> {
            self.leases.list_leases().await
        }
        async fn get_lease(&self, k: &str) -> Result<Option<Lease>, LeaseStoreError> {
            self.leases.get_lease(k).await
        }
        async fn create_lease_if_not_exists(&self, l: &Lease) -> Result<bool, LeaseStoreError> {
            self.leases.create_lease_if_not_exists(l).await
        }
        async fn renew_lease(&self, l: &mut Lease) -> Result<bool, LeaseStoreError> {
            self.leases.renew_lease(l).await
        }
        async fn take_lease(&self, l: &mut Lease, o: &str) -> Result<bool, LeaseStoreError> {
            self.leases.take_lease(l, o).await
        }
        async fn evict_lease(&self, l: &mut Lease) -> Result<bool, LeaseStoreError> {
            self.leases.evict_lease(l).await
        }
        async fn initiate_graceful_lease_handoff(&self, l: &mut Lease, o: &str) -> Result<bool, LeaseStoreError> {
            self.leases.initiate_graceful_lease_handoff(l, o).await
        }
        async fn assign_lease(&self, l: &mut Lease, o: &str) -> Result<bool, LeaseStoreError> {
            self.leases.assign_lease(l, o).await
        }
        async fn update_lease_checkpoint(&self, l: &mut Lease) -> Result<bool, LeaseStoreError> {
            self.leases.update_lease_checkpoint(l).await
        }
        async fn delete_lease(&self, l: &Lease) -> Result<(), LeaseStoreError> {
            self.leases.delete_lease(l).await
        }
        async fn read_leader_lock(&self) -> Result<Option<LeaderLock>, LeaseStoreError> {
            Ok(self.lock.lock().expect("lock").clone())
        }
        async fn write_leader_lock(
            &self,
            expected: Option<&LeaderLock>,
            owner: &str,
        ) -> Result<Option<LeaderLock>, LeaseStoreError> {
            let mut stored = self.lock.lock().expect("lock");
            if stored.as_ref() != expected {
                return Ok(None);
            }
            let next = LeaderLock::new(owner, expected.map_or(1, |l| l.version + 1));
            *stored = Some(next.clone());
            Ok(Some(next))
        }
        fn supports_leader_election(&self) -> bool {
            true
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_leader_and_a_dead_leader_is_replaced_after_the_lock_lease() {
        let store = LockStore::default();
        let lease = Duration::from_secs(10);
        let beat = Duration::from_secs(3);
        let mut a = LeaderDecider::new("a", lease, beat);
        let mut b = LeaderDecider::new("b", lease, beat);
        let t0 = Instant::now();
        assert!(a.is_leader(&store, t0).await, "the first to write the lock leads");
        assert!(!b.is_leader(&store, t0).await);
        // a keeps writing; b never takes over.
        for i in 1..=10 {
            tokio::time::advance(Duration::from_secs(2)).await;
            let now = Instant::now();
            assert!(a.is_leader(&store, now).await, "pass {i}");
            assert!(!b.is_leader(&store, now).await, "pass {i}");
        }
        // a dies: b takes over once the version stood still for the lock lease (seen
        // at b's next read, within half a lease).
        let died = Instant::now();
        let mut took_over = None;
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(1)).await;
            if b.is_leader(&store, Instant::now()).await {
                took_over = Some(Instant::now() - died);
                break;
            }
        }
        let took_over = took_over.expect("b leads");
        assert!(
            took_over >= lease - beat,
            "not before the lock could have expired: {took_over:?}"
        );
        assert!(
            took_over <= lease + lease / 2,
            "within the lock lease and one read: {took_over:?}"
        );
        // a comes back: it finds its lock taken and follows.
        assert!(!a.is_leader(&store, Instant::now()).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_resigned_lock_is_taken_at_the_next_read() {
        let store = LockStore::default();
        let mut a = LeaderDecider::new("a", Duration::from_secs(10), Duration::from_secs(3));
        let mut b = LeaderDecider::new("b", Duration::from_secs(10), Duration::from_secs(3));
        assert!(a.is_leader(&store, Instant::now()).await);
        assert!(!b.is_leader(&store, Instant::now()).await);
        a.resign(&store).await;
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.is_leader(&store, Instant::now()).await);
    }
}
