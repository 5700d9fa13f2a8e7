//! Graceful handoff, both sides (the Java KCL 3.x's `LeaseGracefulShutdownHandler` and
//! the receiving side of its lease assignment).
//!
//! A lease moves between live workers by a graceful handoff: the receiving worker (or
//! the leader, for it) sets `leaseOwner` to the receiver and `checkpointOwner` to the
//! current owner, without moving the counter ([`LeaseCoordinator::initiate_handoff`]).
//! The current owner learns of it at its next write (a checkpoint, or a renewal within
//! a renewal interval): the write is refused, the read that follows shows the handoff,
//! and the owner adopts the new owners and goes on renewing (the renewer's
//! `Verdict::HandingOff`). Its consumer gets `shutdown_requested` (and may checkpoint: a
//! checkpoint by the checkpoint owner is accepted), and once it has stopped, the owner
//! removes `checkpointOwner`, moving the counter ([`LeaseCoordinator::release`]). Only
//! then does the receiver start ([`IncomingHandoffs::poll`]), so no record is processed
//! by both. A handoff that does not complete within `graceful_lease_handoff_timeout`
//! (or whose old owner stops renewing for the failover time) is ended by the receiver
//! with an assignment that moves the counter: the old owner's next write fails and its
//! consumer gets `lease_lost`.
//!
//! At shutdown ([`hand_over_at_shutdown`]) a worker passes on the leases given to it but
//! not taken yet ([`IncomingHandoffs::pass_on`]: an assignment, or an eviction), then
//! begins the handoffs of its own ([`announce_handoffs`]), which its releases complete
//! once its consumers have stopped. A handoff to it still under way is never given to
//! another receiver (a Java KCL 3.x old owner completes a handoff only to the receiver
//! it read): once its consumers stopped, the worker waits for such handoffs to complete
//! and passes their leases on ([`finish_hand_over`]).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::coordinator::LeaseCoordinator;
use super::expiry::Observations;
use super::model::Lease;
use crate::config::LeaseManagementConfig;
use crate::error::ErrorChain;
use crate::metrics;

/// How often a lease being handed to this worker is read, to start it as soon as the
/// old owner has handed it over (for up to four watched leases; proportionally less
/// often for more, at most every 5 s).
const HANDOFF_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Leases being handed to this worker: each is read every [`HANDOFF_POLL_INTERVAL`]
/// until its old owner completes the handoff (then it is taken and consumed), another
/// worker changes it (then it is forgotten), or the handoff runs out of time (then it is
/// assigned to this worker, which ends the old owner's period).
#[derive(Debug, Default)]
pub(crate) struct IncomingHandoffs {
    /// Lease key -> when this worker started to watch it.
    watched: HashMap<String, Instant>,
    next_poll: Option<Instant>,
}

impl IncomingHandoffs {
    pub(crate) fn watch(&mut self, lease: Lease, now: Instant) {
        self.watched.entry(lease.lease_key).or_insert(now);
        self.next_poll.get_or_insert(now + HANDOFF_POLL_INTERVAL);
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.watched.keys()
    }

    /// Whether the lease `key` is being watched.
    pub(crate) fn is_watched(&self, key: &str) -> bool {
        self.watched.contains_key(key)
    }

    pub(crate) fn next_poll(&self) -> Option<Instant> {
        self.next_poll
    }

    /// At shutdown: passes every lease handed over or assigned to this worker but not
    /// taken yet on to a live worker (the coordinator's successors, least loaded first, below
    /// `max_leases_for_worker`), so that its shard does not wait for the failover time
    /// (as in a rolling deploy, where the receiver of a stopping worker's lease stops a
    /// moment later). The leases are the watched handoffs and those the owner index
    /// names. Without a live worker with room, such a lease is released instead.
    ///
    /// A handoff still under way is left as its old owner read it, and stays watched:
    /// a Java KCL 3.x old owner completes a handoff only to the receiver it read
    /// (`assignLease`, conditional on that `leaseOwner`), so that giving it to another
    /// receiver would make the old owner drop the lease. [`finish_hand_over`] passes it
    /// on once it is complete. Returns how many leases were passed on.
    pub(crate) async fn pass_on(&mut self, coordinator: &LeaseCoordinator) -> usize {
        let me = coordinator.worker_id().to_owned();
        let store = coordinator.store();
        let held = coordinator.held_keys();
        // The watched set changes only as each lease is judged, so that a pass cut
        // short by its time bound forgets nothing.
        let mut keys: BTreeSet<String> = self.watched.keys().cloned().collect();
        match store.list_lease_keys_for_owner(&me).await {
            Ok(owned) => keys.extend(owned),
            Err(e) => debug!(error = %ErrorChain(&e), "cannot list this worker's leases at shutdown"),
        }
        // Held leases are handed over by their own release.
        keys.retain(|k| !held.contains(k));
        let now = Instant::now();
        let mut passed = 0;
        for key in keys {
            // Twice: a write refused because the lease changed since the read (a
            // handoff completed, a renewal) is read again and tried once more.
            for _ in 0..2 {
                let mut lease = match store.get_lease(&key).await {
                    Ok(Some(lease)) if lease.is_owned_by(&me) && !lease.checkpoint.is_shard_end() => lease,
                    Ok(_) => {
                        self.watched.remove(&key);
                        break;
                    }
                    Err(e) => {
                        debug!(shard_id = %key, error = %ErrorChain(&e), "cannot read a lease on its way to this worker at shutdown");
                        // Read again by the next pass.
                        self.watched.entry(key.clone()).or_insert(now);
                        break;
                    }
                };
                if lease.is_handoff_pending() {
                    self.watched.entry(key.clone()).or_insert(now);
                    break;
                }
                self.watched.remove(&key);
                let Some(to) = coordinator.next_successor() else {
                    // No live worker with room for it: released, so that the next
                    // worker with room takes it at once.
                    match store.evict_lease(&mut lease).await {
                        Ok(true) => {
                            info!(shard_id = %key, "a lease handed to this worker but not taken yet was released")
                        }
                        Ok(false) => continue,
                        Err(e) => {
                            debug!(shard_id = %key, error = %ErrorChain(&e), "releasing a lease not taken yet failed")
                        }
                    }
                    break;
                };
                match store.assign_lease(&mut lease, &to).await {
                    Ok(true) => {
                        info!(shard_id = %key, to = %to, "a lease handed to this worker but not taken yet was passed on to a live worker");
                        passed += 1;
                        break;
                    }
                    Ok(false) => {
                        coordinator.uncount_successor(&to);
                        continue;
                    }
                    Err(e) => {
                        coordinator.uncount_successor(&to);
                        debug!(shard_id = %key, error = %ErrorChain(&e), "passing a lease on at shutdown failed; it moves after the failover time");
                        break;
                    }
                }
            }
        }
        self.next_poll = None;
        passed
    }

    pub(crate) async fn poll(
        &mut self,
        coordinator: &LeaseCoordinator,
        observations: &Observations,
        config: &LeaseManagementConfig,
    ) {
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
            let stalled = observations
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

/// Begins a graceful handoff of every held lease (not finished, not already being
/// handed over) to the successors, least loaded first, as a worker shutting down
/// does before it stops its consumers: the receivers notice at their next
/// lease-taking pass and watch the leases while this worker goes on processing and
/// renewing them; its release then completes each handoff, and the receiver starts
/// within one poll. Returns how many handoffs began; a lease whose handoff could not
/// begin is assigned or released at its release as before.
pub(crate) async fn announce_handoffs(coordinator: &LeaseCoordinator) -> usize {
    let held = coordinator.held_leases();
    let begun = futures::future::join_all(held.iter().map(|h| async move {
        if h.lost.is_cancelled() {
            return false;
        }
        let mut guard = h.lease.lock().await;
        if guard.is_handoff_pending() || guard.checkpoint.is_shard_end() {
            return false;
        }
        let Some(to) = coordinator.next_successor() else {
            return false;
        };
        let mut next = guard.clone();
        match coordinator.store().initiate_graceful_lease_handoff(&mut next, &to).await {
            Ok(true) => {
                info!(shard_id = %h.shard_id, to = %to, "handing the lease over; processing it until the handoff completes");
                *guard = next;
                true
            }
            Ok(false) => false,
            Err(e) => {
                debug!(shard_id = %h.shard_id, error = %ErrorChain(&e), "beginning a handoff failed; the lease is handed over at its release");
                false
            }
        }
    }))
    .await;
    begun.into_iter().filter(|b| *b).count()
}

/// The shutdown side of graceful handoff (the Java KCL 3.x's
/// `LeaseGracefulShutdownHandler`), before the consumers are stopped: leases let go
/// from here on go to the `live` workers (least loaded first); leases on their way to
/// this worker go on to them (best effort, within one lease-store call timeout); and,
/// when `announce`, every held lease's handoff begins and this worker goes on
/// processing until the receivers watch them.
pub(crate) async fn hand_over_at_shutdown(
    coordinator: &LeaseCoordinator,
    incoming: &mut IncomingHandoffs,
    live: Vec<(String, usize)>,
    announce: bool,
    config: &LeaseManagementConfig,
) {
    coordinator.hand_released_leases_to(live);
    let _ = tokio::time::timeout(config.lease_store_call_timeout, incoming.pass_on(coordinator)).await;
    if !announce {
        return;
    }
    // Announced first, the handoffs are watched by their receivers (from their next
    // lease-taking pass) by the time the consumers stop: a shard then waits for one
    // handoff poll, not for the next pass. Processing goes on meanwhile (the Java KCL
    // 3.x lets a lease being handed over be processed by its old owner until it hands
    // it over, for the same reason).
    let announced = announce_handoffs(coordinator).await;
    if announced > 0 {
        let wait = config.lease_taking_interval + HANDOFF_POLL_INTERVAL;
        info!(
            leases = announced,
            ?wait,
            "handing leases over: processing until the receivers watch them"
        );
        // A fixed wait: the receivers' reads are not visible to this worker.
        tokio::time::sleep(wait).await;
    }
}

/// The end of a graceful shutdown, after the consumers stopped and the held leases were
/// released: passes on the leases whose handoff to this worker was still under way at
/// [`hand_over_at_shutdown`] (once an old owner completed it), waiting for them every
/// [`HANDOFF_POLL_INTERVAL`], for at most the failover time (and at most
/// `graceful_lease_handoff_timeout`). A handoff completed later, or a lease assigned
/// to this worker after [`hand_over_at_shutdown`], stays in this worker's name until it
/// expires. With no handoff under way it costs no call, so that a hanging table does
/// not lengthen the shutdown.
pub(crate) async fn finish_hand_over(
    coordinator: &LeaseCoordinator,
    incoming: &mut IncomingHandoffs,
    config: &LeaseManagementConfig,
) {
    if incoming.watched.is_empty() {
        return;
    }
    let deadline = Instant::now() + config.failover_time.min(config.graceful_lease_handoff_timeout);
    loop {
        let pass = tokio::time::timeout_at(deadline, incoming.pass_on(coordinator)).await;
        if pass.is_err() || incoming.watched.is_empty() {
            break;
        }
        if Instant::now() + HANDOFF_POLL_INTERVAL >= deadline {
            let waiting: Vec<&String> = incoming.keys().collect();
            info!(
                leases = ?waiting,
                "handoffs to this worker did not complete before it stopped; their leases move after the failover time"
            );
            break;
        }
        tokio::time::sleep(HANDOFF_POLL_INTERVAL).await;
    }
}
