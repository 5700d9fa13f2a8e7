//! The chaos verifier: given what a producer had acknowledged and what worker processes
//! recorded, checks the promises of the design notes and reports every violation with
//! an example.
//!
//! Inputs are plain data, so that a runner (worker logs, a producer log) and unit tests
//! (hand-made recordings) feed it alike:
//! - [`Produced`]: each record `PutRecords` acknowledged, with its partition key and
//!   per-key counter (the producer keeps each key's records in order across retries);
//! - [`Recorded`]: each worker's deliveries, checkpoints, lease changes and shard ends,
//!   with wall-clock times (one machine: every process shares the clock), and the
//!   runner's own events (kills, graceful stops);
//! - the shard lineage (child -> parents).
//!
//! Checks, one [`ViolationKind`] each:
//! - **lost**: an acknowledged record was never delivered;
//! - **key order**: per key, first deliveries do not follow the counter;
//! - **child before parent**: a child shard record was delivered before a parent's last
//!   record;
//! - **checkpoint backwards**: a shard's stored checkpoint moved back;
//! - **two owners**: two workers delivered the same shard at the same time, beyond the
//!   lease-transfer window;
//! - **unexplained redelivery**: a record delivered again with no crash, graceful stop
//!   or lease loss of the shard's owner in between, or a redelivery that starts before
//!   the last checkpoint stored when the owner changed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use kcl_core::SequenceNumber;
use serde_json::json;

/// A record the producer's `PutRecords` acknowledged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Produced {
    /// The partition key.
    pub key: String,
    /// Its per-key counter (0, 1, ...), in write order.
    pub counter: u64,
    /// The shard Kinesis put it in.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
}

/// What a worker (or the runner) recorded. `at` is wall-clock time since an arbitrary
/// epoch shared by all processes of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// A record handed to a processor.
    Delivered {
        /// The worker.
        worker: String,
        /// The shard.
        shard_id: String,
        /// The record's sequence number.
        sequence_number: SequenceNumber,
        /// Its partition key.
        key: String,
        /// Its per-key counter.
        counter: u64,
        /// When.
        at: Duration,
    },
    /// A checkpoint stored (`None`: `SHARD_END`).
    Checkpointed {
        /// The worker.
        worker: String,
        /// The shard.
        shard_id: String,
        /// The position (`None` for `SHARD_END`).
        sequence_number: Option<SequenceNumber>,
        /// When.
        at: Duration,
    },
    /// The worker took the shard's lease and initialized a processor, resuming after
    /// `resume` (`None`: at the initial position, no checkpoint yet).
    LeaseTaken {
        /// The worker.
        worker: String,
        /// The shard.
        shard_id: String,
        /// The checkpoint it resumes after.
        resume: Option<SequenceNumber>,
        /// When.
        at: Duration,
    },
    /// The worker's processor was told it lost the shard's lease.
    LeaseLost {
        /// The worker.
        worker: String,
        /// The shard.
        shard_id: String,
        /// When.
        at: Duration,
    },
    /// The runner killed the worker (SIGKILL) or stopped it gracefully.
    WorkerStopped {
        /// The worker.
        worker: String,
        /// True for SIGKILL, false for a graceful stop.
        killed: bool,
        /// When.
        at: Duration,
    },
}

impl Recorded {
    fn at(&self) -> Duration {
        match self {
            Self::Delivered { at, .. }
            | Self::Checkpointed { at, .. }
            | Self::LeaseTaken { at, .. }
            | Self::LeaseLost { at, .. }
            | Self::WorkerStopped { at, .. } => *at,
        }
    }
}

/// The kinds of violation, one per promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// An acknowledged record was never delivered.
    Lost,
    /// First deliveries of a key out of counter order.
    KeyOrder,
    /// A child shard record before a parent's last record.
    ChildBeforeParent,
    /// A stored checkpoint moved backwards.
    CheckpointBackwards,
    /// Two workers delivering one shard at once beyond the transfer window.
    TwoOwners,
    /// A redelivery without a crash, stop or lease loss, or not from the checkpoint.
    UnexplainedRedelivery,
}

/// One violation, with an example that shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which promise.
    pub kind: ViolationKind,
    /// What was seen.
    pub example: String,
}

/// Duplicates by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Duplicates {
    /// After a SIGKILL of the shard's previous owner.
    pub after_kill: usize,
    /// After a graceful stop of the previous owner.
    pub after_stop: usize,
    /// After a lease loss (balancing, an expired lease).
    pub after_lease_loss: usize,
    /// Unexplained (each also a violation).
    pub unexplained: usize,
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Records acknowledged by the producer.
    pub produced: usize,
    /// Deliveries recorded (with repeats).
    pub delivered: usize,
    /// Repeated deliveries by cause.
    pub duplicates: Duplicates,
    /// Kills and graceful stops seen.
    pub kills: usize,
    /// Graceful stops seen.
    pub stops: usize,
    /// Every violation.
    pub violations: Vec<Violation>,
}

impl Report {
    /// The report as one JSON object, with a `violations` count.
    pub fn json(&self) -> serde_json::Value {
        let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
        for v in &self.violations {
            *by_kind.entry(format!("{:?}", v.kind)).or_default() += 1;
        }
        json!({
            "produced": self.produced,
            "delivered": self.delivered,
            "duplicates": {
                "after_kill": self.duplicates.after_kill,
                "after_stop": self.duplicates.after_stop,
                "after_lease_loss": self.duplicates.after_lease_loss,
                "unexplained": self.duplicates.unexplained,
            },
            "kills": self.kills,
            "stops": self.stops,
            "violations": self.violations.len(),
            "violations_by_kind": by_kind,
        })
    }
}

impl Report {
    /// The human part of the report: counts, then each kind of violation with up to five
    /// examples (the counts are in [`json`](Self::json)).
    pub fn human(&self) -> String {
        let mut f = String::new();
        self.write_human(&mut f).unwrap_or(());
        f
    }

    fn write_human(&self, f: &mut impl fmt::Write) -> fmt::Result {
        writeln!(f, "produced {}, delivered {}", self.produced, self.delivered)?;
        writeln!(
            f,
            "duplicates: {} after kills, {} after graceful stops, {} after lease losses, {} unexplained",
            self.duplicates.after_kill,
            self.duplicates.after_stop,
            self.duplicates.after_lease_loss,
            self.duplicates.unexplained
        )?;
        writeln!(f, "kills {}, graceful stops {}", self.kills, self.stops)?;
        let mut shown: BTreeMap<ViolationKind, usize> = BTreeMap::new();
        for v in &self.violations {
            let n = shown.entry(v.kind).or_default();
            *n += 1;
            // Every kind with a few examples; the count is in the JSON.
            if *n <= 5 {
                writeln!(f, "VIOLATION {:?}: {}", v.kind, v.example)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    /// A human report, the JSON object as its last line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.human(), self.json())
    }
}

/// Settings of the checks.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// How long two workers may both deliver a shard while its lease moves (the old
    /// owner stops within the failover time after losing the lease).
    pub transfer_window: Duration,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            transfer_window: Duration::from_secs(10),
        }
    }
}

/// Checks the recordings of a round against what was produced and the lineage
/// (`child -> parents`).
pub fn verify(
    produced: &[Produced],
    recorded: &[Recorded],
    lineage: &BTreeMap<String, Vec<String>>,
    options: &VerifyOptions,
) -> Report {
    let mut events: Vec<&Recorded> = recorded.iter().collect();
    events.sort_by_key(|e| e.at());
    let mut violations = Vec::new();

    // Deliveries per shard, in time order.
    let mut deliveries: BTreeMap<&str, Vec<(&str, &SequenceNumber, Duration)>> = BTreeMap::new();
    let mut first_of: HashMap<(&str, &SequenceNumber), Duration> = HashMap::new();
    let mut delivered = 0;
    let mut first_by_key: BTreeMap<&str, Vec<(Duration, u64)>> = BTreeMap::new();
    for e in &events {
        if let Recorded::Delivered {
            worker,
            shard_id,
            sequence_number,
            key,
            counter,
            at,
        } = e
        {
            delivered += 1;
            deliveries
                .entry(shard_id)
                .or_default()
                .push((worker, sequence_number, *at));
            if !first_of.contains_key(&(shard_id.as_str(), sequence_number)) {
                first_of.insert((shard_id, sequence_number), *at);
                first_by_key.entry(key).or_default().push((*at, *counter));
            }
        }
    }

    // Lost.
    for p in produced {
        if !first_of.contains_key(&(p.shard_id.as_str(), &p.sequence_number)) {
            violations.push(Violation {
                kind: ViolationKind::Lost,
                example: format!(
                    "{}/{} (key {} #{}) was acknowledged and never delivered",
                    p.shard_id, p.sequence_number, p.key, p.counter
                ),
            });
        }
    }

    // Key order of first deliveries.
    for (key, firsts) in &first_by_key {
        for pair in firsts.windows(2) {
            if pair[1].1 < pair[0].1 {
                violations.push(Violation {
                    kind: ViolationKind::KeyOrder,
                    example: format!("key {key}: #{} first delivered after #{}", pair[1].1, pair[0].1),
                });
            }
        }
    }

    // Children after every parent's last record.
    let last_of_shard: BTreeMap<&str, Duration> = produced
        .iter()
        .filter_map(|p| {
            first_of
                .get(&(p.shard_id.as_str(), &p.sequence_number))
                .map(|t| (p.shard_id.as_str(), *t))
        })
        .fold(BTreeMap::new(), |mut m, (s, t)| {
            let e = m.entry(s).or_insert(t);
            if t > *e {
                *e = t;
            }
            m
        });
    for (child, parents) in lineage {
        let Some(child_first) = deliveries.get(child.as_str()).and_then(|d| d.first()).map(|d| d.2) else {
            continue;
        };
        for parent in parents {
            if let Some(parent_last) = last_of_shard.get(parent.as_str()) {
                if child_first < *parent_last {
                    violations.push(Violation {
                        kind: ViolationKind::ChildBeforeParent,
                        example: format!(
                            "child {child} delivered at {child_first:?}, before parent {parent}'s last record at {parent_last:?}"
                        ),
                    });
                }
            }
        }
    }

    // Checkpoints never backwards.
    let mut stored: BTreeMap<&str, Option<&SequenceNumber>> = BTreeMap::new();
    let mut ended: BTreeSet<&str> = BTreeSet::new();
    for e in &events {
        if let Recorded::Checkpointed {
            shard_id,
            sequence_number,
            worker,
            ..
        } = e
        {
            match sequence_number {
                None => {
                    ended.insert(shard_id);
                }
                Some(seq) => {
                    if ended.contains(shard_id.as_str()) {
                        violations.push(Violation {
                            kind: ViolationKind::CheckpointBackwards,
                            example: format!("{shard_id}: {worker} checkpointed {seq} after SHARD_END"),
                        });
                    }
                    if let Some(Some(before)) = stored.get(shard_id.as_str()) {
                        if seq < before {
                            violations.push(Violation {
                                kind: ViolationKind::CheckpointBackwards,
                                example: format!("{shard_id}: {worker} checkpointed {seq} after {before}"),
                            });
                        }
                    }
                    stored.insert(shard_id, Some(seq));
                }
            }
        }
    }

    // Ownership: who delivers each shard when, and why a record comes again.
    let (duplicates, kills, stops) = check_ownership(&events, options, &mut violations);

    Report {
        produced: produced.len(),
        delivered,
        duplicates,
        kills,
        stops,
        violations,
    }
}

/// When each worker stopped (killed or not), and when it lost each shard's lease.
#[derive(Default)]
struct Departures<'a> {
    stopped: HashMap<&'a str, (Duration, bool)>,
    lost: HashMap<(&'a str, &'a str), Vec<Duration>>,
}

impl<'a> Departures<'a> {
    fn new(events: &[&'a Recorded]) -> Self {
        let mut d = Self::default();
        for e in events {
            match e {
                Recorded::WorkerStopped { worker, killed, at } => {
                    d.stopped.entry(worker).or_insert((*at, *killed));
                }
                Recorded::LeaseLost { worker, shard_id, at } => {
                    d.lost.entry((worker, shard_id)).or_default().push(*at);
                }
                _ => {}
            }
        }
        d
    }

    /// Why `worker`'s delivery of a `shard` record at `then` may come again at `now`
    /// from another worker: it was killed or stopped before `now`, or lost the lease
    /// after `then` and at most `window` after `now` (a worker learns of a lost lease at
    /// its next renewal, and may deliver until then).
    fn cause(
        &self,
        worker: &str,
        shard: &str,
        then: Duration,
        now: Duration,
        window: Duration,
    ) -> Option<&'static str> {
        if let Some((at, killed)) = self.stopped.get(worker) {
            if *at <= now + window {
                return Some(if *killed { "kill" } else { "stop" });
            }
        }
        self.lost
            .get(&(worker, shard))
            .is_some_and(|times| times.iter().any(|t| *t >= then && *t <= now + window))
            .then_some("lease loss")
    }

    /// Whether `worker` lost `shard`'s lease between `then` and `now`.
    fn lost_between(&self, worker: &str, shard: &str, then: Duration, now: Duration) -> bool {
        self.lost
            .get(&(worker, shard))
            .is_some_and(|times| times.iter().any(|t| *t >= then && *t <= now))
    }
}

/// Open tenures per (shard, worker), with the resume point of the lease taken.
type OpenTenures<'a> = BTreeMap<(&'a str, &'a str), (Option<Tenure>, Option<Option<&'a SequenceNumber>>)>;

/// Ends the open tenure of `key` (shard, worker), if any.
fn close<'a>(
    open: &mut OpenTenures<'a>,
    closed: &mut BTreeMap<&'a str, Vec<(&'a str, Tenure)>>,
    key: (&'a str, &'a str),
) {
    if let Some((Some(tenure), _)) = open.remove(&key) {
        closed.entry(key.0).or_default().push((key.1, tenure));
    }
}

/// A worker's stretch of deliveries of one shard: from its first delivery after taking
/// the lease to its last before losing it, stopping or taking it again.
#[derive(Clone, Copy, Debug)]
struct Tenure {
    first: Duration,
    last: Duration,
}

/// The ownership checks: two owners beyond the transfer window, redeliveries without a
/// crash, stop or lease loss, resumes before the last checkpoint. Returns the
/// duplicates by cause, kills and stops.
fn check_ownership<'a>(
    events: &[&'a Recorded],
    options: &VerifyOptions,
    violations: &mut Vec<Violation>,
) -> (Duplicates, usize, usize) {
    let window = options.transfer_window;
    let departures = Departures::new(events);
    let mut duplicates = Duplicates::default();
    let (mut kills, mut stops) = (0, 0);
    // The first delivery of each record: who, when.
    let mut first: HashMap<(&'a str, &'a SequenceNumber), (&'a str, Duration)> = HashMap::new();
    // Each worker's last delivery of each record.
    let mut last_own: HashMap<(&str, &str, &SequenceNumber), Duration> = HashMap::new();
    // The checkpoint stored last, per shard.
    let mut stored: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    let mut open = OpenTenures::new();
    let mut closed: BTreeMap<&str, Vec<(&str, Tenure)>> = BTreeMap::new();
    for e in events {
        match e {
            Recorded::WorkerStopped { worker, killed, .. } => {
                if *killed {
                    kills += 1;
                } else {
                    stops += 1;
                }
                let keys: Vec<(&str, &str)> = open.keys().filter(|k| k.1 == worker).copied().collect();
                for key in keys {
                    close(&mut open, &mut closed, key);
                }
            }
            Recorded::LeaseLost { worker, shard_id, .. } => close(&mut open, &mut closed, (shard_id, worker)),
            Recorded::Checkpointed {
                shard_id,
                sequence_number: Some(seq),
                ..
            } => {
                stored.insert(shard_id, seq);
            }
            Recorded::Checkpointed { .. } => {}
            Recorded::LeaseTaken {
                worker,
                shard_id,
                resume,
                at,
            } => {
                if let Some(last) = stored.get(shard_id.as_str()) {
                    if resume.as_ref().is_none_or(|r| r < *last) {
                        violations.push(Violation {
                            kind: ViolationKind::UnexplainedRedelivery,
                            example: format!(
                                "{shard_id}: {worker} took the lease at {at:?} resuming after {}, before the checkpoint {last} stored earlier",
                                resume.as_ref().map_or("the initial position".to_owned(), ToString::to_string)
                            ),
                        });
                    }
                }
                close(&mut open, &mut closed, (shard_id, worker));
                open.insert((shard_id, worker), (None, Some(resume.as_ref())));
            }
            Recorded::Delivered {
                worker,
                shard_id,
                sequence_number,
                at,
                ..
            } => {
                let (shard, worker) = (shard_id.as_str(), worker.as_str());
                let (tenure, resume) = open.entry((shard, worker)).or_insert((None, None));
                match tenure {
                    None => {
                        *tenure = Some(Tenure { first: *at, last: *at });
                        // A tenure starts right after the checkpoint it resumed from.
                        if let Some(Some(resume)) = resume {
                            if sequence_number <= *resume {
                                violations.push(Violation {
                                    kind: ViolationKind::UnexplainedRedelivery,
                                    example: format!(
                                        "{shard}: {worker} resumed after {resume} and delivered {sequence_number}, at or before it"
                                    ),
                                });
                            }
                        }
                    }
                    Some(t) => t.last = *at,
                }
                if let Some((by, then)) = first.get(&(shard, sequence_number)).copied() {
                    let cause = if by == worker {
                        let previous = last_own.get(&(worker, shard, sequence_number)).copied().unwrap_or(then);
                        departures
                            .lost_between(worker, shard, previous, *at)
                            .then_some("lease loss")
                    } else {
                        // The first deliverer left, or this one is a stale owner that
                        // learns of its lost lease at its next renewal.
                        departures.cause(by, shard, then, *at, window).or_else(|| {
                            departures
                                .lost_between(worker, shard, *at, *at + window)
                                .then_some("lease loss")
                        })
                    };
                    match cause {
                        Some("kill") => duplicates.after_kill += 1,
                        Some("stop") => duplicates.after_stop += 1,
                        Some(_) => duplicates.after_lease_loss += 1,
                        None => {
                            duplicates.unexplained += 1;
                            violations.push(Violation {
                                kind: ViolationKind::UnexplainedRedelivery,
                                example: format!(
                                    "{shard}: {worker} delivered {sequence_number} at {at:?}, first delivered by {by} at {then:?}, with no crash, stop or lease loss of {by} in between"
                                ),
                            });
                        }
                    }
                } else {
                    first.insert((shard, sequence_number), (worker, *at));
                }
                last_own.insert((worker, shard, sequence_number), *at);
            }
        }
    }
    let keys: Vec<(&str, &str)> = open.keys().copied().collect();
    for key in keys {
        close(&mut open, &mut closed, key);
    }

    // Two tenures of different workers overlapping by more than the window.
    for (shard, tenures) in &mut closed {
        tenures.sort_by_key(|(_, t)| t.first);
        for (i, (a, ta)) in tenures.iter().enumerate() {
            for (b, tb) in &tenures[i + 1..] {
                if tb.first > ta.last {
                    break;
                }
                let overlap = ta.last.min(tb.last) - tb.first;
                if a != b && overlap > window {
                    violations.push(Violation {
                        kind: ViolationKind::TwoOwners,
                        example: format!(
                            "{shard}: {a} delivered from {:?} to {:?} and {b} from {:?} to {:?}: {overlap:?} at once",
                            ta.first, ta.last, tb.first, tb.last
                        ),
                    });
                }
            }
        }
    }
    (duplicates, kills, stops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(n: u64) -> SequenceNumber {
        SequenceNumber::parse(&n.to_string()).expect("valid")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn produced(shard: &str, n: u64, key: &str, counter: u64) -> Produced {
        Produced {
            key: key.into(),
            counter,
            shard_id: shard.into(),
            sequence_number: seq(n),
        }
    }

    fn delivered(worker: &str, p: &Produced, at: u64) -> Recorded {
        Recorded::Delivered {
            worker: worker.into(),
            shard_id: p.shard_id.clone(),
            sequence_number: p.sequence_number.clone(),
            key: p.key.clone(),
            counter: p.counter,
            at: ms(at),
        }
    }

    fn checkpointed(worker: &str, shard: &str, n: Option<u64>, at: u64) -> Recorded {
        Recorded::Checkpointed {
            worker: worker.into(),
            shard_id: shard.into(),
            sequence_number: n.map(seq),
            at: ms(at),
        }
    }

    fn kinds(report: &Report) -> Vec<ViolationKind> {
        report.violations.iter().map(|v| v.kind).collect()
    }

    /// A clean round: a crash, a takeover from the checkpoint, duplicates explained.
    fn clean() -> (Vec<Produced>, Vec<Recorded>) {
        let p: Vec<Produced> = (1..=4).map(|i| produced("s0", i, "k", i - 1)).collect();
        let r = vec![
            delivered("a", &p[0], 10),
            delivered("a", &p[1], 11),
            checkpointed("a", "s0", Some(1), 12),
            Recorded::WorkerStopped {
                worker: "a".into(),
                killed: true,
                at: ms(20),
            },
            delivered("b", &p[1], 5000),
            delivered("b", &p[2], 5001),
            delivered("b", &p[3], 5002),
            checkpointed("b", "s0", Some(4), 5003),
        ];
        (p, r)
    }

    #[test]
    fn a_clean_round_has_no_violation_and_counts_duplicates_by_cause() {
        let (p, r) = clean();
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), []);
        assert_eq!(report.duplicates.after_kill, 1);
        assert_eq!(report.kills, 1);
        assert_eq!(report.json()["violations"], 0);
        assert!(report.to_string().lines().last().is_some_and(|l| l.starts_with('{')));
    }

    #[test]
    fn a_lost_record_is_reported() {
        let (mut p, r) = clean();
        p.push(produced("s0", 9, "k", 4));
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::Lost]);
        assert!(report.violations[0].example.contains("s0/9"));
    }

    #[test]
    fn a_reordered_key_is_reported() {
        let p = vec![produced("s0", 1, "k", 0), produced("s1", 2, "k", 1)];
        // #1 (on another shard) reaches a processor before #0.
        let r = vec![delivered("a", &p[1], 10), delivered("a", &p[0], 20)];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::KeyOrder]);
    }

    #[test]
    fn a_child_before_its_parent_is_reported() {
        let p = vec![produced("parent", 1, "k", 0), produced("child", 2, "j", 0)];
        let r = vec![delivered("a", &p[1], 10), delivered("a", &p[0], 20)];
        let lineage = BTreeMap::from([("child".to_owned(), vec!["parent".to_owned()])]);
        let report = verify(&p, &r, &lineage, &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::ChildBeforeParent]);
    }

    #[test]
    fn a_backwards_checkpoint_is_reported() {
        let (p, mut r) = clean();
        r.push(checkpointed("b", "s0", Some(2), 6000));
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::CheckpointBackwards]);
        let (p, mut r) = clean();
        r.push(checkpointed("b", "s0", None, 6000));
        r.push(checkpointed("b", "s0", Some(4), 6001));
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::CheckpointBackwards]);
    }

    fn lease_lost(worker: &str, shard: &str, at: u64) -> Recorded {
        Recorded::LeaseLost {
            worker: worker.into(),
            shard_id: shard.into(),
            at: ms(at),
        }
    }

    fn taken(worker: &str, shard: &str, resume: Option<u64>, at: u64) -> Recorded {
        Recorded::LeaseTaken {
            worker: worker.into(),
            shard_id: shard.into(),
            resume: resume.map(seq),
            at: ms(at),
        }
    }

    #[test]
    fn two_owners_at_once_are_reported() {
        let p: Vec<Produced> = (1..=4).map(|i| produced("s0", i, "k", i - 1)).collect();
        // b delivers s0 for 15 s while a is still at it, and a never loses the lease.
        let r = vec![
            delivered("a", &p[0], 0),
            delivered("b", &p[1], 1_000),
            delivered("a", &p[2], 15_000),
            delivered("b", &p[3], 16_000),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::TwoOwners]);
        assert!(
            report.violations[0].example.contains("14s at once"),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn a_stolen_lease_may_overlap_within_the_window_and_its_duplicates_are_lease_losses() {
        let p: Vec<Produced> = (1..=4).map(|i| produced("s0", i, "k", i - 1)).collect();
        // b steals s0 at checkpoint 1; a delivers 2 and 3 before it learns at its renewal.
        let r = vec![
            taken("a", "s0", None, 0),
            delivered("a", &p[0], 10),
            checkpointed("a", "s0", Some(1), 11),
            taken("b", "s0", Some(1), 100),
            delivered("b", &p[1], 101),
            delivered("a", &p[1], 102),
            delivered("b", &p[2], 103),
            delivered("a", &p[2], 104),
            lease_lost("a", "s0", 900),
            delivered("b", &p[3], 1000),
            checkpointed("b", "s0", Some(4), 1001),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), []);
        assert_eq!(report.duplicates.after_lease_loss, 2);
        // Without the lease loss, the same is two workers reading one shard.
        let r: Vec<Recorded> = r
            .into_iter()
            .filter(|e| !matches!(e, Recorded::LeaseLost { .. }))
            .collect();
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(
            kinds(&report),
            [
                ViolationKind::UnexplainedRedelivery,
                ViolationKind::UnexplainedRedelivery
            ]
        );
    }

    #[test]
    fn unexplained_redeliveries_and_redeliveries_before_the_checkpoint_are_reported() {
        let p: Vec<Produced> = (1..=3).map(|i| produced("s0", i, "k", i - 1)).collect();
        let r = vec![
            delivered("a", &p[0], 10),
            delivered("a", &p[1], 11),
            delivered("a", &p[0], 12),
            delivered("a", &p[2], 13),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::UnexplainedRedelivery]);
        assert_eq!(report.duplicates.unexplained, 1);

        // After a kill with checkpoint 2 stored, the survivor resumes from it and
        // starts at 1: too early.
        let mut r = vec![
            delivered("a", &p[0], 10),
            delivered("a", &p[1], 11),
            checkpointed("a", "s0", Some(2), 12),
            Recorded::WorkerStopped {
                worker: "a".into(),
                killed: true,
                at: ms(20),
            },
            taken("b", "s0", Some(2), 4999),
            delivered("b", &p[0], 5000),
            delivered("b", &p[1], 5001),
            delivered("b", &p[2], 5002),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::UnexplainedRedelivery]);
        assert!(
            report.violations[0].example.contains("resumed after 2"),
            "{:?}",
            report.violations
        );
        // Resuming before the checkpoint stored is reported too.
        r[4] = taken("b", "s0", Some(1), 4999);
        r.drain(5..7);
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::UnexplainedRedelivery]);
        assert!(
            report.violations[0].example.contains("before the checkpoint 2"),
            "{:?}",
            report.violations
        );
    }
}
