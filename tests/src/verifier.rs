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

impl fmt::Display for Report {
    /// A human report, the JSON object as its last line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
        write!(f, "{}", self.json())
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

    // Ownership: who delivers each shard, and why a record comes again.
    let mut duplicates = Duplicates::default();
    let (mut kills, mut stops) = (0, 0);
    // The last time each worker delivered each shard.
    let mut last_delivery: BTreeMap<(&str, &str), Duration> = BTreeMap::new();
    // Shard -> (owner, its last delivery).
    let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
    // Why the last owner of a shard left, with the checkpoint stored then.
    let mut handover: BTreeMap<&str, (&'static str, Option<&SequenceNumber>)> = BTreeMap::new();
    let mut seen: BTreeSet<(&str, &SequenceNumber)> = BTreeSet::new();
    let mut checkpoint_now: BTreeMap<&str, &SequenceNumber> = BTreeMap::new();
    let mut redelivery_checked: BTreeSet<(&str, &str)> = BTreeSet::new();
    for e in &events {
        match e {
            Recorded::WorkerStopped { worker, killed, .. } => {
                if *killed {
                    kills += 1;
                } else {
                    stops += 1;
                }
                for (shard, o) in &owner {
                    if o == worker {
                        let cause = if *killed { "kill" } else { "stop" };
                        handover.insert(shard, (cause, checkpoint_now.get(shard).copied()));
                    }
                }
            }
            Recorded::LeaseLost { worker, shard_id, .. } => {
                if owner.get(shard_id.as_str()) == Some(&worker.as_str()) {
                    handover.insert(shard_id, ("lease loss", checkpoint_now.get(shard_id.as_str()).copied()));
                }
            }
            Recorded::Checkpointed {
                shard_id,
                sequence_number: Some(seq),
                ..
            } => {
                checkpoint_now.insert(shard_id, seq);
            }
            Recorded::Checkpointed { .. } => {}
            Recorded::Delivered {
                worker,
                shard_id,
                sequence_number,
                at,
                ..
            } => {
                let shard = shard_id.as_str();
                match owner.get(shard) {
                    Some(previous) if previous != worker => {
                        let previous_last = last_delivery.get(&(*previous, shard)).copied().unwrap_or_default();
                        let explained = handover.contains_key(shard);
                        if !explained && at.saturating_sub(previous_last) < options.transfer_window {
                            violations.push(Violation {
                                kind: ViolationKind::TwoOwners,
                                example: format!(
                                    "{shard}: {worker} delivered {sequence_number} at {at:?}, {previous} delivered at {previous_last:?}, no crash, stop or lease loss between"
                                ),
                            });
                        }
                        owner.insert(shard, worker);
                    }
                    Some(_) => {}
                    None => {
                        owner.insert(shard, worker);
                    }
                }
                last_delivery.insert((worker, shard), *at);
                if !seen.insert((shard, sequence_number)) {
                    match handover.get(shard) {
                        Some((cause, checkpoint)) => {
                            match *cause {
                                "kill" => duplicates.after_kill += 1,
                                "stop" => duplicates.after_stop += 1,
                                _ => duplicates.after_lease_loss += 1,
                            }
                            // The first redelivery after a handover starts right after the
                            // checkpoint stored then.
                            if redelivery_checked.insert((shard, worker)) {
                                if let Some(cp) = checkpoint {
                                    if sequence_number <= cp {
                                        violations.push(Violation {
                                            kind: ViolationKind::UnexplainedRedelivery,
                                            example: format!(
                                                "{shard}: {worker} redelivered {sequence_number}, at or before the checkpoint {cp} stored at the {cause}"
                                            ),
                                        });
                                    }
                                }
                            }
                        }
                        None => {
                            duplicates.unexplained += 1;
                            violations.push(Violation {
                                kind: ViolationKind::UnexplainedRedelivery,
                                example: format!(
                                    "{shard}: {worker} delivered {sequence_number} again with no crash, stop or lease loss before"
                                ),
                            });
                        }
                    }
                } else if handover.contains_key(shard) && owner.get(shard) == Some(&worker.as_str()) {
                    // New records under the new owner: the handover is complete.
                    handover.remove(shard);
                    redelivery_checked.retain(|(s, _)| *s != shard);
                }
            }
        }
    }

    Report {
        produced: produced.len(),
        delivered,
        duplicates,
        kills,
        stops,
        violations,
    }
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

    #[test]
    fn two_owners_at_once_are_reported() {
        let p: Vec<Produced> = (1..=4).map(|i| produced("s0", i, "k", i - 1)).collect();
        // b starts delivering s0 while a is still at it, with no crash, stop or loss.
        let r = vec![
            delivered("a", &p[0], 10),
            delivered("a", &p[1], 11),
            delivered("b", &p[2], 12),
            delivered("b", &p[3], 13),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::TwoOwners]);
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

        // After a kill with checkpoint 2 stored, the survivor starts at 1: too early.
        let r = vec![
            delivered("a", &p[0], 10),
            delivered("a", &p[1], 11),
            checkpointed("a", "s0", Some(2), 12),
            Recorded::WorkerStopped {
                worker: "a".into(),
                killed: true,
                at: ms(20),
            },
            delivered("b", &p[0], 5000),
            delivered("b", &p[1], 5001),
            delivered("b", &p[2], 5002),
        ];
        let report = verify(&p, &r, &BTreeMap::new(), &VerifyOptions::default());
        assert_eq!(kinds(&report), [ViolationKind::UnexplainedRedelivery]);
        assert!(report.violations[0].example.contains("checkpoint 2"));
    }
}
