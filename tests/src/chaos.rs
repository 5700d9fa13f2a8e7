//! The chaos runner's schedule: what happens when in a round, drawn up front from the
//! seed, so that the same seed gives the same schedule (the runner prints it).
//!
//! A round has, spread over its length:
//! - **disruptions**, one every 12 to 30 s: a random running worker is killed with
//!   SIGKILL (three times in four) or stopped with SIGTERM, and restarted 0.5 to 3 s
//!   later as a new worker id (`w<slot>-<incarnation>`); at least one worker always runs;
//! - **reshards**, the first after 20 to 40 s, then every 60 to 120 s, splits and merges
//!   in turn (which shard is picked at run time from the open shards, by a drawn index);
//! - **network faults** (with faults on), one every 5 to 15 s on the Kinesis or the
//!   DynamoDB proxy: slow responses (100 to 600 ms a chunk, for 2 to 6 s), a blackout
//!   (1 to 3 s), or resets after 200 to 4,000 bytes of each response (1 to 4 s).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::proxy::ProxyFault;
use crate::sdk_faults::Service;

/// How a worker reads its shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retrieval {
    /// `GetRecords` polling.
    Polling,
    /// Enhanced fan-out.
    FanOut,
}

/// Which retrieval the workers of a round use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// All polling.
    Polling,
    /// All fan-out.
    FanOut,
    /// Both at once: slots and incarnations alternate.
    Mixed,
}

impl Mode {
    /// The retrieval of worker `slot`'s `incarnation`-th process.
    pub fn retrieval(self, slot: usize, incarnation: usize) -> Retrieval {
        match self {
            Self::Polling => Retrieval::Polling,
            Self::FanOut => Retrieval::FanOut,
            Self::Mixed if (slot + incarnation).is_multiple_of(2) => Retrieval::Polling,
            Self::Mixed => Retrieval::FanOut,
        }
    }
}

/// One thing the runner does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL the worker in `slot`.
    Kill(usize),
    /// SIGTERM the worker in `slot` (a graceful stop).
    Stop(usize),
    /// Start a new worker in `slot`.
    Restart(usize),
    /// Split open shard number `pick % open shards` (sorted by id) in half.
    Split(u64),
    /// Merge adjacent pair number `pick % adjacent pairs` of open shards.
    Merge(u64),
    /// Set a fault on a service's proxy.
    Network(Service, ProxyFault),
    /// Clear the faults of a service's proxy.
    Heal(Service),
}

/// An action and when, from the start of the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// When.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// What a round is made of.
#[derive(Clone, Copy, Debug)]
pub struct ScheduleOptions {
    /// The round's length (disruptions and faults stop then; the drain follows).
    pub length: Duration,
    /// Worker slots.
    pub workers: usize,
    /// Whether network faults are scheduled.
    pub network_faults: bool,
    /// The seed.
    pub seed: u64,
}

fn secs(rng: &mut StdRng, from: f64, to: f64) -> Duration {
    Duration::from_secs_f64(rng.random_range(from..to))
}

/// The round's events, in time order.
pub fn schedule(options: &ScheduleOptions) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let end = options.length;
    let mut events = Vec::new();

    // Disruptions: a slot is down from its kill or stop to its restart.
    let mut down_until = vec![Duration::ZERO; options.workers];
    let mut at = secs(&mut rng, 8.0, 20.0);
    while at < end {
        let up: Vec<usize> = (0..options.workers).filter(|&s| down_until[s] <= at).collect();
        if up.len() > 1 || (up.len() == 1 && options.workers == 1) {
            let slot = up[rng.random_range(0..up.len())];
            let kill = rng.random_bool(0.75);
            let restart = at + secs(&mut rng, 0.5, 3.0);
            events.push(Event {
                at,
                action: if kill { Action::Kill(slot) } else { Action::Stop(slot) },
            });
            events.push(Event {
                at: restart,
                action: Action::Restart(slot),
            });
            down_until[slot] = restart;
        }
        at += secs(&mut rng, 12.0, 30.0);
    }

    // Reshards, splits and merges in turn.
    let mut at = secs(&mut rng, 20.0, 40.0);
    let mut split = true;
    while at < end {
        let pick = rng.random::<u64>();
        events.push(Event {
            at,
            action: if split {
                Action::Split(pick)
            } else {
                Action::Merge(pick)
            },
        });
        split = !split;
        at += secs(&mut rng, 60.0, 120.0);
    }

    // Network faults, one at a time.
    if options.network_faults {
        let mut at = secs(&mut rng, 3.0, 10.0);
        while at < end {
            let service = if rng.random_bool(0.5) {
                Service::Kinesis
            } else {
                Service::DynamoDb
            };
            let (fault, length) = match rng.random_range(0..3) {
                0 => (
                    ProxyFault::Slow(Duration::from_millis(rng.random_range(100..600))),
                    secs(&mut rng, 2.0, 6.0),
                ),
                1 => (ProxyFault::Blackout, secs(&mut rng, 1.0, 3.0)),
                _ => (
                    ProxyFault::ResetAfter(rng.random_range(200..4_000)),
                    secs(&mut rng, 1.0, 4.0),
                ),
            };
            events.push(Event {
                at,
                action: Action::Network(service, fault),
            });
            events.push(Event {
                at: (at + length).min(end),
                action: Action::Heal(service),
            });
            at += length + secs(&mut rng, 5.0, 15.0);
        }
    }

    events.sort_by_key(|e| e.at);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(seconds: u64, seed: u64) -> ScheduleOptions {
        ScheduleOptions {
            length: Duration::from_secs(seconds),
            workers: 4,
            network_faults: true,
            seed,
        }
    }

    fn count(events: &[Event], f: impl Fn(&Action) -> bool) -> usize {
        events.iter().filter(|e| f(&e.action)).count()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(schedule(&options(600, 3)), schedule(&options(600, 3)));
        assert_ne!(schedule(&options(600, 3)), schedule(&options(600, 4)));
    }

    #[test]
    fn a_long_round_has_what_the_issue_asks_for() {
        for seed in 0..20 {
            let events = schedule(&options(1200, seed));
            let kills = count(&events, |a| matches!(a, Action::Kill(_)));
            let reshards = count(&events, |a| matches!(a, Action::Split(_) | Action::Merge(_)));
            assert!(kills >= 30, "seed {seed}: {kills} kills");
            assert!(reshards >= 6, "seed {seed}: {reshards} reshards");
            assert!(events.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(events.iter().all(|e| e.at <= Duration::from_secs(1200 + 3)));
        }
    }

    #[test]
    fn a_short_round_splits_and_merges_and_always_keeps_a_worker() {
        for seed in 0..20 {
            let events = schedule(&options(180, seed));
            assert!(count(&events, |a| matches!(a, Action::Split(_))) >= 1, "seed {seed}");
            assert!(count(&events, |a| matches!(a, Action::Merge(_))) >= 1, "seed {seed}");
            assert!(
                count(&events, |a| matches!(a, Action::Kill(_) | Action::Stop(_))) >= 4,
                "seed {seed}"
            );
            // Replay the slots: never all down, each restart after its stop.
            let mut up = [true; 4];
            for e in &events {
                match e.action {
                    Action::Kill(s) | Action::Stop(s) => {
                        assert!(up[s], "seed {seed}: slot {s} stopped twice");
                        up[s] = false;
                        assert!(up.iter().any(|u| *u), "seed {seed}: every worker down at {:?}", e.at);
                    }
                    Action::Restart(s) => {
                        assert!(!up[s]);
                        up[s] = true;
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn mixed_mode_alternates_across_slots_and_restarts() {
        assert_ne!(Mode::Mixed.retrieval(0, 0), Mode::Mixed.retrieval(1, 0));
        assert_ne!(Mode::Mixed.retrieval(0, 0), Mode::Mixed.retrieval(0, 1));
        assert_eq!(Mode::Polling.retrieval(1, 3), Retrieval::Polling);
    }
}
