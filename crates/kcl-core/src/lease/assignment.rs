//! Assignment and balancing (the Java KCL 3.x's `LeaseAssignmentManager` arithmetic):
//! handing unowned and expired leases to the least loaded live workers, and the moves
//! that even out the load, counted in leases or weighed by throughput. Pure functions
//! of one read of the table; the taker decides when each applies.

use std::collections::{BTreeSet, HashMap, HashSet};

use tracing::info;

use super::model::Lease;

/// How much more than the mean throughput a worker may carry before leases are moved
/// from it (balancing by throughput): measurements move, and a move costs a handoff.
pub(super) const THROUGHPUT_TOLERANCE: f64 = 0.1;

/// The weight of a lease when balancing by throughput: its `throughputKBps`, at least a
/// twentieth of the mean of the leases that have one (an idle shard still costs a
/// consumer); a lease without one weighs the mean. With no throughput known at all,
/// every lease weighs 1 and balancing counts leases.
#[derive(Debug)]
pub(super) struct Weigher {
    mean: f64,
}

impl Weigher {
    pub(super) fn new(live: &[&Lease]) -> Self {
        let known: Vec<f64> = live
            .iter()
            .filter_map(|l| l.throughput_kbps)
            .filter(|t| *t > 0.0)
            .collect();
        #[allow(clippy::cast_precision_loss)] // a count of leases
        let mean = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        Self { mean }
    }

    pub(super) fn weight(&self, lease: &Lease) -> f64 {
        lease
            .throughput_kbps
            .filter(|t| *t > 0.0)
            .map_or(self.mean, |t| t.max(self.mean / 20.0))
    }
}

/// One pass's view of the fleet when balancing by throughput.
pub(super) struct Weighed<'a> {
    pub(super) live: &'a [&'a Lease],
    pub(super) alive: &'a HashSet<&'a str>,
    pub(super) me: &'a str,
    pub(super) weigh: &'a Weigher,
}

impl<'a> Weighed<'a> {
    /// Up to `cap` moves, each of one lease (not already being handed over) from the
    /// most loaded live worker, when it carries more than `ceiling`, to `to` (or the
    /// least loaded with `room` for one more lease): the lease that best evens the two
    /// out among those that lower the higher of their loads.
    pub(super) fn moves(
        &self,
        load: &mut HashMap<&'a str, f64>,
        room: &mut HashMap<&'a str, usize>,
        to: Option<&'a str>,
        cap: usize,
        ceiling: f64,
    ) -> Vec<(Lease, String)> {
        let mut movable: HashMap<&str, Vec<&Lease>> = HashMap::new();
        for lease in self.live {
            if let Some(owner) = lease.lease_owner.as_deref() {
                if !lease.is_handoff_pending() && (owner == self.me || self.alive.contains(owner)) {
                    movable.entry(owner).or_default().push(lease);
                }
            }
        }
        let mut moves = Vec::new();
        while moves.len() < cap {
            let most = load
                .iter()
                .filter(|(w, _)| Some(**w) != to)
                .max_by(|a, b| a.1.total_cmp(b.1).then_with(|| b.0.cmp(a.0)))
                .map(|(w, n)| (*w, *n));
            let fewest = match to {
                Some(me) => Some((me, load.get(me).copied().unwrap_or(0.0))),
                None => load
                    .iter()
                    .filter(|(w, _)| room.get(**w).is_some_and(|r| *r > 0))
                    .min_by(|a, b| a.1.total_cmp(b.1).then_with(|| a.0.cmp(b.0)))
                    .map(|(w, n)| (*w, *n)),
            };
            let (Some((giver, high)), Some((taker, low))) = (most, fewest) else {
                break;
            };
            if giver == taker || high <= ceiling {
                break;
            }
            let gap = high - low;
            let Some(candidates) = movable.get_mut(giver) else {
                break;
            };
            let best = candidates
                .iter()
                .enumerate()
                .map(|(i, l)| (i, self.weigh.weight(l)))
                .filter(|(_, w)| *w < gap)
                .min_by(|a, b| (a.1 - gap / 2.0).abs().total_cmp(&(b.1 - gap / 2.0).abs()));
            let Some((index, weight)) = best else {
                break;
            };
            let lease = candidates.swap_remove(index);
            load.insert(giver, high - weight);
            load.insert(taker, low + weight);
            if let Some(r) = room.get_mut(taker) {
                *r = r.saturating_sub(1);
            }
            moves.push((lease.clone(), taker.to_owned()));
        }
        if !moves.is_empty() {
            info!(
                moves = moves.len(),
                mean = ceiling / (1.0 + THROUGHPUT_TOLERANCE),
                "moving leases to balance throughput"
            );
        }
        moves
    }
}

/// How many more leases each worker may hold: `max_leases_for_worker` less the leases
/// `counted` for it. Every worker is taken to run with the same `max_leases_for_worker`
/// as this one: its own cap is not in the table.
pub(super) fn room<'a>(counted: &HashMap<&'a str, usize>, max_leases_for_worker: usize) -> HashMap<&'a str, usize> {
    counted
        .iter()
        .map(|(w, n)| (*w, max_leases_for_worker.saturating_sub(*n)))
        .collect()
}

/// Assigns `leases` one by one to the least loaded live worker other than `me` with
/// `room` for one more (ties to the first name), each adding its `weight` to that
/// worker's load; none when there is no such worker. Counting leases is weighing each
/// as 1.
pub(super) fn hand_out(
    leases: Vec<Lease>,
    load: &HashMap<&str, f64>,
    room: &HashMap<&str, usize>,
    me: &str,
    weight: impl Fn(&Lease) -> f64,
) -> Vec<(Lease, String)> {
    let mut others: Vec<(&str, f64, usize)> = load
        .iter()
        .filter(|(w, _)| **w != me)
        .map(|(w, n)| (*w, *n, room.get(w).copied().unwrap_or(0)))
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    let mut out = Vec::new();
    for lease in leases {
        // The first of the least loaded: ties go to the first name.
        let Some(least) = others
            .iter_mut()
            .filter(|(_, _, room)| *room > 0)
            .min_by(|a, b| a.1.total_cmp(&b.1))
        else {
            break;
        };
        least.1 += weight(&lease);
        least.2 -= 1;
        out.push((lease, least.0.to_owned()));
    }
    out
}

/// The leader's balancing moves: while the most loaded live worker holds more than
/// the fair share rounded up and the least loaded fewer than rounded down (and than
/// `max_leases_for_worker`), one of the former's leases (not already being handed
/// over) goes to the latter; at most one move per 20 leases of the table per pass.
pub(super) fn rebalance(
    live: &[&Lease],
    load: &HashMap<&str, usize>,
    alive: &HashSet<&str>,
    me: &str,
    max_leases_for_worker: usize,
) -> Vec<(Lease, String)> {
    let workers = load.len();
    if workers < 2 {
        return Vec::new();
    }
    let (floor, ceil) = (live.len() / workers, live.len().div_ceil(workers));
    let mut movable: HashMap<&str, Vec<&Lease>> = HashMap::new();
    for lease in live {
        if let Some(owner) = lease.lease_owner.as_deref() {
            if !lease.is_handoff_pending() && (owner == me || alive.contains(owner)) {
                movable.entry(owner).or_default().push(lease);
            }
        }
    }
    let mut by_load: BTreeSet<(usize, &str)> = load.iter().map(|(w, n)| (*n, *w)).collect();
    let mut moves = Vec::new();
    let cap = (live.len() / 20).max(1);
    while moves.len() < cap {
        let (Some(&(most, giver)), Some(&(fewest, taker))) = (by_load.last(), by_load.first()) else {
            break;
        };
        if most <= ceil || fewest >= floor.min(max_leases_for_worker) || giver == taker {
            break;
        }
        let Some(lease) = movable.get_mut(giver).and_then(Vec::pop) else {
            break;
        };
        by_load.remove(&(most, giver));
        by_load.remove(&(fewest, taker));
        by_load.insert((most - 1, giver));
        by_load.insert((fewest + 1, taker));
        moves.push((lease.clone(), taker.to_owned()));
    }
    if !moves.is_empty() {
        info!(
            moves = moves.len(),
            floor, ceil, "handing leases from the most to the least loaded workers"
        );
    }
    moves
}
