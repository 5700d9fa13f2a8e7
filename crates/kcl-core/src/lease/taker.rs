//! The lease taker (the Java KCL's `DynamoDBLeaseTaker`): at each lease-taking pass,
//! which leases this worker takes, asks for by a handoff, watches on their way to it,
//! and (as the leader) assigns or moves between other workers; and the pass that acts
//! on that plan. The plan is a pure function of one read of the table and this
//! worker's [`Observations`], so it is unit-testable with explicit instants.
//!
//! A worker that is not the leader of a large table reads the whole table only every
//! [`FOLLOWER_FULL_READ_EVERY`] passes (and while it is short of its share); in between
//! it finds the leases given to it through the owner index ([`discover_own_leases`]).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::assignment::{hand_out, rebalance, room, Weighed, Weigher, THROUGHPUT_TOLERANCE};
use super::coordinator::LeaseCoordinator;
use super::expiry::Observations;
use super::handoff::IncomingHandoffs;
use super::model::Lease;
use super::store::LeaseStore;
use crate::config::{LeaseBalancing, LeaseManagementConfig};
use crate::error::ErrorChain;

/// What one lease-taking pass should do.
#[derive(Debug, Default)]
pub(crate) struct TakePlan {
    /// Unowned and expired leases, and leases the table already gives this worker that
    /// it does not hold (assigned to it, or held by an earlier process with its id):
    /// taken with a write conditional on the counter.
    pub(crate) take: Vec<Lease>,
    /// Leases of live workers to ask for by a graceful handoff, to balance the load.
    pub(crate) steal: Vec<Lease>,
    /// Leases being handed to this worker that it does not yet watch.
    pub(crate) incoming: Vec<Lease>,
    /// Unowned and expired leases beyond this worker's share, with the live worker each
    /// is assigned to (the leader's job; empty for other workers).
    pub(crate) assign: Vec<(Lease, String)>,
    /// Leases of the most loaded live workers to hand to the least loaded ones (the
    /// leader's job, as the Java KCL 3.x's lease assignment: a graceful handoff).
    pub(crate) rebalance: Vec<(Lease, String)>,
    /// True when this pass takes or asks for leases for this worker: it reads the
    /// whole table again at the next pass, until it has its share.
    pub(crate) short: bool,
    /// True when no other live worker is known while several leases are free: other
    /// workers may be starting too, so takes stop at the first one another worker won,
    /// and the next pass, knowing the others, aims at the fair share.
    pub(crate) cautious: bool,
}

#[cfg(test)]
impl TakePlan {
    /// The leases to take and to ask for, in that order.
    pub(super) fn all(self) -> Vec<Lease> {
        self.take.into_iter().chain(self.steal).collect()
    }
}
/// Decides which leases to take (the Java KCL's `DynamoDBLeaseTaker` arithmetic), as a
/// pure function of the table and this worker's observations, so it is unit-testable
/// with explicit instants.
#[derive(Debug, Default)]
pub(crate) struct LeaseTaker {
    observed: Observations,
    /// Whether this worker hands unowned and expired leases beyond its share to the
    /// other live workers (it is the leader).
    pub(crate) hand_out: bool,
    /// Whether this worker's last pass took or asked for leases.
    pub(crate) short: bool,
    /// Whether another worker (the leader) balances the fleet: then this one asks for
    /// leases only while it holds none.
    pub(crate) defer_balancing: bool,
    /// How many leases the last read of the table listed.
    pub(crate) table_size: usize,
    /// Leases this worker assigned to another worker, with the counter its write left:
    /// until that counter moves, the lease proves nothing about its owner being alive.
    assigned: HashMap<String, u64>,
    /// Leases this worker asked to be handed to another worker, with the receiver.
    handed: HashMap<String, String>,
}

/// Up to how many leases a table is small: every worker reads it whole at each pass
/// (one page, the cost of an owner-index query), judges expiry as precisely as the
/// leader, and balances itself; larger tables are balanced by the leader.
pub(crate) const SMALL_TABLE: usize = 100;

/// At most this many takes of one lease-taking pass are in flight at once.
const MAX_CONCURRENT_TAKES: usize = 16;

/// A worker that is not the leader reads the whole lease table at least every this many
/// lease-taking intervals (and at every pass while it holds less than its share); in
/// between it lists its own leases through the owner index.
pub(crate) const FOLLOWER_FULL_READ_EVERY: u32 = 5;

/// One pass's view of the fleet.
struct Fleet<'a> {
    /// The leases not finished.
    live: &'a [&'a Lease],
    /// The other workers that proved alive (see [`LeaseTaker::alive_workers`]).
    alive: &'a HashSet<&'a str>,
    me: &'a str,
    /// The table is large: the leader balances it (see [`SMALL_TABLE`]).
    leader_balances: bool,
    /// The leader balances the fleet and this worker holds leases: it asks for none.
    defer: bool,
}

/// Each worker's load as one pass counts it, and the leases free to take.
struct Tally<'a> {
    /// Unowned and expired leases.
    expired: Vec<Lease>,
    /// Leases per worker (this one included, the others only when alive).
    load: HashMap<&'a str, usize>,
    /// The same, weighed by throughput (used when balancing by throughput).
    weighed: HashMap<&'a str, f64>,
}

impl LeaseTaker {
    /// What this worker has observed of the table's counters.
    pub(crate) fn observations(&self) -> &Observations {
        &self.observed
    }

    /// Records a read of the table outside a lease-taking pass (at shutdown).
    pub(crate) fn observe_table(&mut self, leases: &[Lease], now: Instant, config: &LeaseManagementConfig) {
        self.observed
            .observe(leases, now, config.failover_time, config.renewal_interval);
    }

    /// Notes that this worker assigned `lease` (as its write left it) to another worker.
    pub(crate) fn note_assigned(&mut self, lease: &Lease) {
        self.assigned.insert(lease.lease_key.clone(), lease.lease_counter);
    }

    /// Notes that this worker asked for `lease` to be handed to `to`: once the old
    /// owner completes the handoff, the lease counts as assigned to `to`, unproven
    /// until `to` writes it.
    pub(crate) fn note_handed(&mut self, lease: &Lease, to: &str) {
        self.handed.insert(lease.lease_key.clone(), to.to_owned());
    }

    /// What this worker should do now (the Java KCL's algorithm): count the active
    /// workers (owners of unexpired leases, this one included), aim for a fair share
    /// `ceil(leases / workers)` capped by `max_leases_for_worker`, take expired or
    /// unowned leases first, and only when there are none ask the most loaded worker
    /// for a handoff, at most `max_leases_to_steal_at_one_time` per pass. A worker one
    /// lease short of the target does not steal from one that is exactly at it, so
    /// workers converge without trading leases back and forth. Finished (`SHARD_END`)
    /// leases are neither counted nor taken. `held` are the leases this worker holds or
    /// is receiving by a handoff.
    pub(crate) fn leases_to_take(
        &mut self,
        leases: &[Lease],
        worker_id: &str,
        held: &HashSet<String>,
        now: Instant,
        config: &LeaseManagementConfig,
    ) -> TakePlan {
        let failover = config.failover_time;
        self.observed.observe(leases, now, failover, config.renewal_interval);
        self.settle_handoffs(leases);
        let live: Vec<&Lease> = leases.iter().filter(|l| !l.checkpoint.is_shard_end()).collect();
        let alive = self.alive_workers(&live, worker_id, now, failover);
        let weigh = Weigher::new(&live);
        let mut plan = TakePlan::default();
        let tally = self.tally(&live, worker_id, held, &alive, &weigh, now, failover, &mut plan);
        plan.cautious = tally.load.len() == 1 && tally.expired.len() > 1;
        // Only large tables are balanced by the leader: in a small one every worker
        // reads the whole table each pass and balances itself.
        let leader_balances = live.len() > SMALL_TABLE;
        // With a leader balancing the fleet, a worker asks for leases itself only while
        // it has none (the leader does not know of it yet).
        let mine = tally.load.get(worker_id).copied().unwrap_or(0);
        let fleet = Fleet {
            live: &live,
            alive: &alive,
            me: worker_id,
            leader_balances,
            defer: self.defer_balancing && leader_balances && mine > 0,
        };
        if config.lease_balancing == LeaseBalancing::Throughput {
            self.plan_by_throughput(&mut plan, &fleet, &weigh, tally, config);
            plan.short = !plan.take.is_empty() || !plan.steal.is_empty();
        } else {
            self.plan_by_count(&mut plan, &fleet, tally, config);
        }
        plan
    }

    /// Settles the handoffs and assignments this worker made: a handoff it asked for
    /// that the old owner completed moved the counter, but proves nothing about the new
    /// owner, so it counts as an assignment, unproven until the new owner writes the
    /// lease itself (its counter moves).
    fn settle_handoffs(&mut self, leases: &[Lease]) {
        let by_key: HashMap<&str, &Lease> = leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
        let assigned = &mut self.assigned;
        self.handed.retain(|key, to| match by_key.get(key.as_str()) {
            Some(l) if l.is_owned_by(to) && l.is_handoff_pending() => true,
            Some(l) if l.is_owned_by(to) => {
                assigned.insert(key.clone(), l.lease_counter);
                false
            }
            _ => false,
        });
        let observed = &self.observed;
        self.assigned.retain(|key, counter| observed.counter_is(key, *counter));
    }

    /// The other workers that showed they are alive. A worker known only through leases
    /// this one assigned to it (and that it never touched) is not counted, so a dead
    /// worker is not given the same leases again and again. A worker with a lease that
    /// expired is taken for dead: its other leases expire within moments, and handing
    /// it more would only delay them. The worker that writes a lease is the one it
    /// proves alive, or dead when it expires: during a handoff, the old owner (its
    /// checkpoint owner) renews it.
    fn alive_workers<'a>(&self, live: &[&'a Lease], me: &str, now: Instant, failover: Duration) -> HashSet<&'a str> {
        let suspect: HashSet<&str> = live
            .iter()
            .filter(|l| l.actual_owner() != Some(me) && self.observed.is_expired(l, now, failover))
            .filter_map(|l| l.actual_owner())
            .collect();
        live.iter()
            .filter(|l| self.proves_owner_alive(l, now, failover))
            .filter_map(|l| l.actual_owner())
            .filter(|o| !suspect.contains(o))
            .collect()
    }

    /// True when `lease` shows its owner is alive: not expired, and its counter moved
    /// since this worker last assigned it.
    fn proves_owner_alive(&self, lease: &Lease, now: Instant, failover: Duration) -> bool {
        !self.observed.is_expired(lease, now, failover)
            && self.assigned.get(&lease.lease_key) != Some(&lease.lease_counter)
    }

    /// Counts each worker's load and collects the expired leases; leases the table
    /// gives this worker that it does not hold go to `plan` (taken, or watched while
    /// they are being handed over).
    #[allow(clippy::too_many_arguments)]
    fn tally<'a>(
        &self,
        live: &[&'a Lease],
        me: &'a str,
        held: &HashSet<String>,
        alive: &HashSet<&'a str>,
        weigh: &Weigher,
        now: Instant,
        failover: Duration,
        plan: &mut TakePlan,
    ) -> Tally<'a> {
        let mut tally = Tally {
            expired: Vec::new(),
            load: HashMap::from([(me, 0)]),
            weighed: HashMap::from([(me, 0.0)]),
        };
        for lease in live {
            let counted_for = if held.contains(&lease.lease_key) {
                Some(me)
            } else if self.observed.is_expired(lease, now, failover) {
                tally.expired.push((*lease).clone());
                None
            } else if lease.is_owned_by(me) {
                // Given to this worker (by a handoff, an assignment, or an earlier
                // process with its id): it counts as ours.
                if lease.is_handoff_pending() {
                    plan.incoming.push((*lease).clone());
                } else {
                    plan.take.push((*lease).clone());
                }
                Some(me)
            } else {
                lease.lease_owner.as_deref().filter(|o| alive.contains(o))
            };
            if let Some(owner) = counted_for {
                *tally.load.entry(owner).or_default() += 1;
                *tally.weighed.entry(owner).or_default() += weigh.weight(lease);
            }
        }
        tally
    }

    /// The plan when balancing by lease count: expired leases up to the fair share
    /// (the leader hands the rest out), else the leader's balancing moves, else a
    /// steal of up to `max_leases_to_steal_at_one_time` leases from the most loaded
    /// worker.
    fn plan_by_count(&self, plan: &mut TakePlan, fleet: &Fleet<'_>, tally: Tally<'_>, config: &LeaseManagementConfig) {
        let Tally { mut expired, load, .. } = tally;
        let target = fleet.live.len().div_ceil(load.len()).min(config.max_leases_for_worker);
        let mine = load.get(fleet.me).copied().unwrap_or(0);
        let needed = target.saturating_sub(mine);
        if !expired.is_empty() {
            // Shuffled so that workers starting together spread over the table
            // instead of racing for the same keys.
            expired.shuffle(&mut rand::rng());
            let rest = expired.split_off(needed.min(expired.len()));
            plan.short = !expired.is_empty();
            plan.take.extend(expired);
            if self.hand_out {
                #[allow(clippy::cast_precision_loss)] // a count of leases
                let counted: HashMap<&str, f64> = load.iter().map(|(w, n)| (*w, *n as f64)).collect();
                let room = room(&load, config.max_leases_for_worker);
                plan.assign = hand_out(rest, &counted, &room, fleet.me, |_| 1.0);
            }
            return;
        }
        if self.hand_out && fleet.leader_balances {
            plan.rebalance = rebalance(fleet.live, &load, fleet.alive, fleet.me, config.max_leases_for_worker);
            return;
        }
        if needed == 0 || fleet.defer {
            return;
        }
        plan.steal = steal_by_count(fleet, &load, target, needed, config);
        plan.short = !plan.steal.is_empty();
    }

    /// The plan when balancing by throughput: unowned and expired leases are taken
    /// until this worker carries the mean (the leader hands the rest to the least
    /// loaded); with none, a lease moves by a graceful handoff from a worker carrying
    /// more than the mean plus [`THROUGHPUT_TOLERANCE`] to the least loaded (this
    /// worker, or for the leader of a large table any worker) when that lowers the
    /// higher of the two loads.
    fn plan_by_throughput(
        &self,
        plan: &mut TakePlan,
        fleet: &Fleet<'_>,
        weigh: &Weigher,
        tally: Tally<'_>,
        config: &LeaseManagementConfig,
    ) {
        let Tally {
            mut expired,
            load: counted,
            weighed: mut load,
        } = tally;
        // How many more leases this worker may hold (`max_leases_for_worker`).
        let my_room = config
            .max_leases_for_worker
            .saturating_sub(counted.get(fleet.me).copied().unwrap_or(0));
        // And how many more each worker may be given.
        let mut rooms = room(&counted, config.max_leases_for_worker);
        let total: f64 = fleet.live.iter().map(|l| weigh.weight(l)).sum();
        #[allow(clippy::cast_precision_loss)] // a count of workers
        let mean = total / load.len() as f64;
        let ceiling = mean * (1.0 + THROUGHPUT_TOLERANCE);
        let mut mine = load.get(fleet.me).copied().unwrap_or(0.0);
        if !expired.is_empty() {
            expired.shuffle(&mut rand::rng());
            let mut rest = Vec::new();
            for lease in expired {
                if mine < mean && plan.take.len() < my_room {
                    mine += weigh.weight(&lease);
                    plan.take.push(lease);
                } else {
                    rest.push(lease);
                }
            }
            if self.hand_out {
                load.insert(fleet.me, mine);
                plan.assign = hand_out(rest, &load, &rooms, fleet.me, |l| weigh.weight(l));
            }
            return;
        }
        let weighed = Weighed {
            live: fleet.live,
            alive: fleet.alive,
            me: fleet.me,
            weigh,
        };
        if self.hand_out && fleet.leader_balances {
            plan.rebalance = weighed.moves(&mut load, &mut rooms, None, (fleet.live.len() / 20).max(1), ceiling);
        } else if mine < mean && !fleet.defer && my_room > 0 {
            let cap = config.max_leases_to_steal_at_one_time.min(my_room);
            let moves = weighed.moves(&mut load, &mut rooms, Some(fleet.me), cap, ceiling);
            plan.steal = moves.into_iter().map(|(lease, _)| lease).collect();
        }
    }
}

/// The leases to ask the most loaded worker for, when this one `needed` more to reach
/// `target`: none when that worker is below the target (or, when only one is needed,
/// not above it); at most `max_leases_to_steal_at_one_time`.
fn steal_by_count(
    fleet: &Fleet<'_>,
    load: &HashMap<&str, usize>,
    target: usize,
    needed: usize,
    config: &LeaseManagementConfig,
) -> Vec<Lease> {
    let Some((victim, victim_load)) = load
        .iter()
        .filter(|(w, _)| **w != fleet.me)
        .max_by_key(|(w, n)| (**n, std::cmp::Reverse(**w)))
        .map(|(w, n)| (w.to_string(), *n))
    else {
        return Vec::new();
    };
    let threshold = if needed > 1 { target } else { target + 1 };
    if victim_load < threshold {
        return Vec::new();
    }
    // One lease from a worker exactly at the target when this one needs more than
    // one (as the Java KCL does): otherwise a worker could stay two short forever.
    let over = (victim_load - target).max(usize::from(needed > 1));
    let steal = needed.min(over).min(config.max_leases_to_steal_at_one_time);
    // A lease already being handed over cannot be asked for again.
    let mut theirs: Vec<Lease> = fleet
        .live
        .iter()
        .filter(|l| l.is_owned_by(&victim) && !l.is_handoff_pending())
        .map(|l| (*l).clone())
        .collect();
    theirs.shuffle(&mut rand::rng());
    theirs.truncate(steal);
    if !theirs.is_empty() {
        info!(victim = %victim, count = theirs.len(), target, "asking for leases to balance load");
    }
    theirs
}

impl LeaseTaker {
    /// Carries out `plan`, made from a read of `table_size` leases: takes, asks for
    /// handoffs, watches incoming handoffs and (as the leader) assigns and moves
    /// leases. Each write is conditional; one that fails is logged and tried again at
    /// a later pass if the plan still says so.
    pub(crate) async fn carry_out(
        &mut self,
        mut plan: TakePlan,
        coordinator: &LeaseCoordinator,
        incoming: &mut IncomingHandoffs,
        table_size: usize,
    ) {
        if take_in_rounds(coordinator, std::mem::take(&mut plan.take), plan.cautious).await {
            info!("another worker is taking leases too; the next pass aims at the fair share");
            plan.short = true;
        }
        let now = Instant::now();
        for mut lease in plan.steal {
            match coordinator.initiate_handoff(&mut lease).await {
                Ok(true) => incoming.watch(lease, now),
                Ok(false) => info!(shard_id = %lease.lease_key, "lease changed before the handoff could be asked for"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "asking for a handoff failed"),
            }
        }
        for lease in plan.incoming {
            incoming.watch(lease, now);
        }
        let store = coordinator.store();
        for (mut lease, worker) in plan.assign {
            match store.assign_lease(&mut lease, &worker).await {
                Ok(true) => {
                    info!(shard_id = %lease.lease_key, to = %worker, "assigned an unowned or expired lease");
                    self.note_assigned(&lease);
                }
                Ok(false) => debug!(shard_id = %lease.lease_key, "lease changed before it could be assigned"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "assigning a lease failed"),
            }
        }
        for (mut lease, to) in plan.rebalance {
            let from = lease.lease_owner.clone();
            match store.initiate_graceful_lease_handoff(&mut lease, &to).await {
                Ok(true) => {
                    info!(shard_id = %lease.lease_key, from = ?from, to = %to, "asked for a handoff to balance the load");
                    self.note_handed(&lease, &to);
                }
                Ok(false) => debug!(shard_id = %lease.lease_key, "lease changed before the handoff could be asked for"),
                Err(e) => warn!(shard_id = %lease.lease_key, error = %ErrorChain(&e), "asking for a handoff failed"),
            }
        }
        self.short = plan.short;
        self.table_size = table_size;
    }
}

/// Takes `leases` in rounds of [`MAX_CONCURRENT_TAKES`] concurrent takes. When
/// `cautious` (no other worker is known), the rounds stop at the first lease another
/// worker won: workers starting together then share the table instead of each trying
/// every lease. Returns true when it stopped so.
async fn take_in_rounds(coordinator: &LeaseCoordinator, leases: Vec<Lease>, cautious: bool) -> bool {
    let mut take = leases.into_iter().peekable();
    while take.peek().is_some() {
        let round: Vec<Lease> = take.by_ref().take(MAX_CONCURRENT_TAKES).collect();
        let lost = futures::future::join_all(round.into_iter().map(|lease| async move {
            let key = lease.lease_key.clone();
            match coordinator.take(lease).await {
                Ok(true) => false,
                Ok(false) => {
                    info!(shard_id = %key, "lease taken by another worker first");
                    true
                }
                Err(e) => {
                    warn!(shard_id = %key, error = %ErrorChain(&e), "taking lease failed");
                    false
                }
            }
        }))
        .await;
        if cautious && lost.contains(&true) {
            return true;
        }
    }
    false
}

/// When a worker that is not the leader reads the whole table next.
#[derive(Debug)]
pub(crate) struct FullScans {
    every: Duration,
    /// When the last full read was done, whether this worker was short of its share
    /// after it, and whether the table was small.
    last: Option<(Instant, bool, bool)>,
}

impl FullScans {
    pub(crate) fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// A full read is due: none yet, short or a small table at the last, or the last is
    /// too old.
    pub(crate) fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|(at, short, small)| short || small || now.saturating_duration_since(at) >= self.every)
    }

    pub(crate) fn done(&mut self, at: Instant, short: bool, leases: usize) {
        self.last = Some((at, short, leases <= SMALL_TABLE));
    }
}

/// What a worker that is not the leader does at a lease-taking pass: lists the leases
/// the table gives it (through the owner index), takes those it does not hold yet
/// (assigned by the leader, or handed over), and watches those still being handed over.
/// Leases that are finished or not `active` (of a stream not consumed) are left alone.
pub(crate) async fn discover_own_leases(
    coordinator: &LeaseCoordinator,
    incoming: &mut IncomingHandoffs,
    active: impl Fn(&Lease) -> bool,
) {
    let store: &dyn LeaseStore = coordinator.store().as_ref();
    let me = coordinator.worker_id().to_owned();
    let keys = match store.list_lease_keys_for_owner(&me).await {
        Ok(keys) => keys,
        Err(e) => {
            warn!(error = %ErrorChain(&e), "cannot list this worker's leases; trying again at the next pass");
            return;
        }
    };
    let held = coordinator.held_keys();
    let now = Instant::now();
    for key in keys {
        if held.contains(&key) || incoming.is_watched(&key) {
            continue;
        }
        let lease = match store.get_lease(&key).await {
            Ok(Some(lease)) if lease.is_owned_by(&me) => lease,
            Ok(_) => continue,
            Err(e) => {
                debug!(shard_id = %key, error = %ErrorChain(&e), "reading a lease given to this worker failed");
                continue;
            }
        };
        if lease.checkpoint.is_shard_end() || !active(&lease) {
            continue;
        }
        if lease.is_handoff_pending() {
            incoming.watch(lease, now);
            continue;
        }
        match coordinator.take(lease).await {
            Ok(true) => {}
            Ok(false) => debug!(shard_id = %key, "a lease given to this worker changed before it was taken"),
            Err(e) => warn!(shard_id = %key, error = %ErrorChain(&e), "taking a lease given to this worker failed"),
        }
    }
}
