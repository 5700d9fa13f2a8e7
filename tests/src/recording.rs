//! What a chaos round writes down, and how it is read back for the
//! [`verifier`](crate::verifier): one line per event, space separated, each stamped with
//! the system-wide monotonic clock and the wall clock, in microseconds.
//!
//! Every process of a round (the runner and each worker) appends to its own file, one
//! `write` per line batch and flushed at once, so that a SIGKILL loses at most a line
//! cut short (which the reader skips), and never a delivery whose checkpoint was stored:
//! workers write deliveries before they checkpoint them.
//!
//! Worker lines (`<mono> <wall>` after the tag):
//! - `T <mono> <wall> <worker> <shard> <checkpoint>`: lease taken, processor initialized;
//! - `D <mono> <wall> <worker> <shard> <sequence> <sub-sequence> <key> <counter>`: delivered;
//! - `C <mono> <wall> <worker> <shard> <position>`: checkpoint stored (`SHARD_END` at the end);
//! - `L <mono> <wall> <worker> <shard>`: lease lost;
//! - `E <mono> <wall> <worker> <shard>`: shard ended;
//! - `S <mono> <wall> <worker> <shard>`: shutdown requested;
//! - `F <mono> <wall> <worker> <service> <operation> <fault>`: a fault injected;
//! - `X <mono> <wall> <worker> <ok|error>`: the scheduler returned.
//!
//! Runner lines:
//! - `P <mono> <wall> <key> <counter> <shard> <sequence>`: a record `PutRecords` acknowledged;
//! - `K <mono> <wall> <worker>` / `G <mono> <wall> <worker>`: a worker killed (SIGKILL) /
//!   stopped gracefully (SIGTERM);
//! - `R <mono> <wall> <split|merge> <shard>...`: a reshard;
//! - `N <mono> <wall> <kinesis|dynamodb> <slow|blackout|reset> <parameter>`: a network
//!   fault set on a proxy (`slow 300ms`, `blackout -`, `reset 1200B`: the bytes of each
//!   response passed before the reset).
//!
//! The monotonic clock (`CLOCK_MONOTONIC`) is shared by every process of the machine, so
//! the verifier orders events of different processes by it.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use kcl_core::SequenceNumber;

use crate::verifier::{Produced, Recorded};

/// A point in time on both clocks, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    /// `CLOCK_MONOTONIC`: shared by the processes of one machine, never goes back.
    pub mono_us: u64,
    /// Wall clock since the Unix epoch, for people reading the files.
    pub wall_us: u64,
}

impl Stamp {
    /// Now.
    pub fn now() -> Self {
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let mono_us =
            u64::try_from(mono.tv_sec).unwrap_or(0) * 1_000_000 + u64::try_from(mono.tv_nsec).unwrap_or(0) / 1_000;
        let wall_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self { mono_us, wall_us }
    }

    /// The monotonic time as a duration (for [`Recorded`]'s `at`).
    pub fn at(self) -> Duration {
        Duration::from_micros(self.mono_us)
    }
}

/// An append-only event file of one process, shared by its tasks.
#[derive(Clone, Debug)]
pub struct Recording {
    file: Arc<Mutex<File>>,
    /// The process's name in the lines that carry one (the worker id).
    name: Arc<str>,
}

impl Recording {
    /// Opens (appends to) `path`; `name` goes into the lines that name a worker.
    pub fn open(path: &Path, name: &str) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
            name: name.into(),
        })
    }

    /// The name given at [`open`](Self::open).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Appends lines, each `"<tag> <mono> <wall> <rest>"`, in one write; the stamp is
    /// taken under the file's lock, so the stamps of a file never go back.
    ///
    /// A failed write ends the process (exit code 3): a recording with a hole would make
    /// the verifier report records as lost that were not.
    pub fn write(&self, lines: &[(char, String)]) {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = Stamp::now();
        let mut text = String::new();
        for (tag, rest) in lines {
            text.push_str(&format!("{tag} {} {} {rest}\n", stamp.mono_us, stamp.wall_us));
        }
        if let Err(e) = file.write_all(text.as_bytes()).and_then(|()| file.flush()) {
            eprintln!("cannot write the recording: {e}");
            std::process::exit(3);
        }
    }

    /// Appends one line.
    pub fn line(&self, tag: char, rest: String) {
        self.write(&[(tag, rest)]);
    }
}

/// One parsed line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The tag (`D`, `C`, ...).
    pub tag: char,
    /// When.
    pub stamp: Stamp,
    /// The fields after the stamps.
    pub fields: Vec<String>,
}

/// Reads the complete lines of a recording (a line cut short by a SIGKILL is skipped);
/// a missing file has none.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<Line>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    parse_lines(&text).with_context(|| format!("in {}", path.display()))
}

/// Parses the complete lines of `text` (the last one may be cut short).
pub fn parse_lines(text: &str) -> anyhow::Result<Vec<Line>> {
    let mut out = Vec::new();
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let mut f = line.trim_end().split(' ');
        let (Some(tag), Some(mono), Some(wall)) = (f.next(), f.next(), f.next()) else {
            bail!("short line {line:?}");
        };
        let mut chars = tag.chars();
        let (Some(tag), None) = (chars.next(), chars.next()) else {
            bail!("bad tag in {line:?}");
        };
        out.push(Line {
            tag,
            stamp: Stamp {
                mono_us: mono.parse().with_context(|| format!("bad time in {line:?}"))?,
                wall_us: wall.parse().with_context(|| format!("bad time in {line:?}"))?,
            },
            fields: f.map(str::to_owned).collect(),
        });
    }
    Ok(out)
}

/// What the verifier needs from a round's lines, with counts for the report.
#[derive(Debug, Default)]
pub struct Round {
    /// Records acknowledged by the producer.
    pub produced: Vec<Produced>,
    /// Deliveries, checkpoints, lease losses, kills and stops.
    pub recorded: Vec<Recorded>,
    /// Faults injected by the workers' SDK interceptors, by `service/kind`.
    pub sdk_faults: std::collections::BTreeMap<String, usize>,
    /// Network faults set on the proxies, by `service/kind`.
    pub network_faults: std::collections::BTreeMap<String, usize>,
    /// Splits and merges.
    pub splits: usize,
    /// Merges.
    pub merges: usize,
    /// Leases taken (processors initialized).
    pub leases_taken: usize,
    /// Leases lost.
    pub leases_lost: usize,
    /// Shards ended.
    pub shard_ends: usize,
}

impl Round {
    /// Adds the lines of one file.
    pub fn add(&mut self, lines: &[Line]) -> anyhow::Result<()> {
        for line in lines {
            self.add_line(line)
                .with_context(|| format!("line {} {:?}", line.tag, line.fields))?;
        }
        Ok(())
    }

    fn add_line(&mut self, line: &Line) -> anyhow::Result<()> {
        let f = |i: usize| -> anyhow::Result<&str> {
            line.fields
                .get(i)
                .map(String::as_str)
                .with_context(|| format!("field {i} missing"))
        };
        let at = line.stamp.at();
        match line.tag {
            'P' => self.produced.push(Produced {
                key: f(0)?.to_owned(),
                counter: f(1)?.parse()?,
                shard_id: f(2)?.to_owned(),
                sequence_number: SequenceNumber::parse(f(3)?)?,
            }),
            'D' => self.recorded.push(Recorded::Delivered {
                worker: f(0)?.to_owned(),
                shard_id: f(1)?.to_owned(),
                sequence_number: SequenceNumber::parse(f(2)?)?,
                key: f(4)?.to_owned(),
                counter: f(5)?.parse()?,
                at,
            }),
            'C' => self.recorded.push(Recorded::Checkpointed {
                worker: f(0)?.to_owned(),
                shard_id: f(1)?.to_owned(),
                sequence_number: match f(2)? {
                    "SHARD_END" => None,
                    position => Some(parse_position(position)?),
                },
                at,
            }),
            'L' => {
                self.leases_lost += 1;
                self.recorded.push(Recorded::LeaseLost {
                    worker: f(0)?.to_owned(),
                    shard_id: f(1)?.to_owned(),
                    at,
                });
            }
            'K' | 'G' => self.recorded.push(Recorded::WorkerStopped {
                worker: f(0)?.to_owned(),
                killed: line.tag == 'K',
                at,
            }),
            'T' => {
                self.leases_taken += 1;
                let resume = match f(2)? {
                    "SHARD_END" => return Ok(()),
                    "TRIM_HORIZON" | "LATEST" | "AT_TIMESTAMP" => None,
                    position => Some(parse_position(position)?),
                };
                self.recorded.push(Recorded::LeaseTaken {
                    worker: f(0)?.to_owned(),
                    shard_id: f(1)?.to_owned(),
                    resume,
                    at,
                });
            }
            'E' => self.shard_ends += 1,
            'F' => *self.sdk_faults.entry(format!("{}/{}", f(1)?, f(3)?)).or_default() += 1,
            'N' => *self.network_faults.entry(format!("{}/{}", f(0)?, f(1)?)).or_default() += 1,
            'R' => match f(0)? {
                "split" => self.splits += 1,
                _ => self.merges += 1,
            },
            'S' | 'X' => {}
            other => bail!("unknown tag {other}"),
        }
        Ok(())
    }
}

/// The sequence number of a position written as `<sequence>` or
/// `<sequence>/<sub-sequence>`.
fn parse_position(position: &str) -> anyhow::Result<SequenceNumber> {
    Ok(SequenceNumber::parse(position.split('/').next().unwrap_or(position))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_cut_short_is_skipped_and_the_rest_parse() -> anyhow::Result<()> {
        let text = "D 10 20 w1 shard-1 5 0 k3 7\nC 11 21 w1 shard-1 5\nD 12 2";
        let lines = parse_lines(text)?;
        assert_eq!(lines.len(), 2);
        let mut round = Round::default();
        round.add(&lines)?;
        assert_eq!(
            round.recorded,
            vec![
                Recorded::Delivered {
                    worker: "w1".into(),
                    shard_id: "shard-1".into(),
                    sequence_number: SequenceNumber::parse("5")?,
                    key: "k3".into(),
                    counter: 7,
                    at: Duration::from_micros(10),
                },
                Recorded::Checkpointed {
                    worker: "w1".into(),
                    shard_id: "shard-1".into(),
                    sequence_number: Some(SequenceNumber::parse("5")?),
                    at: Duration::from_micros(11),
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn runner_lines_count_and_a_bad_line_is_an_error() -> anyhow::Result<()> {
        let text = "P 1 1 k0 0 shard-0 9\nT 1 1 w1-0 shard-0 TRIM_HORIZON\nT 1 1 w1-0 shard-1 5/2\nK 2 2 w1-0\nR 3 3 split shard-0\nR 4 4 merge a b\n\
                    N 5 5 kinesis blackout -\nF 6 6 w2-1 dynamodb PutItem throttle\nC 7 7 w2-1 shard-0 SHARD_END\n";
        let mut round = Round::default();
        round.add(&parse_lines(text)?)?;
        assert_eq!(round.produced.len(), 1);
        assert_eq!(round.leases_taken, 2);
        assert!(round.recorded.contains(&Recorded::LeaseTaken {
            worker: "w1-0".into(),
            shard_id: "shard-1".into(),
            resume: Some(SequenceNumber::parse("5")?),
            at: Duration::from_micros(1),
        }));
        assert_eq!((round.splits, round.merges), (1, 1));
        assert_eq!(round.network_faults.get("kinesis/blackout"), Some(&1));
        assert_eq!(round.sdk_faults.get("dynamodb/throttle"), Some(&1));
        assert!(matches!(
            round.recorded.last(),
            Some(Recorded::Checkpointed {
                sequence_number: None,
                ..
            })
        ));
        assert!(Round::default()
            .add(&parse_lines("D 1 1 w1 shard-0 notanumber 0 k 1\n")?)
            .is_err());
        assert!(parse_lines("D x 1 w1\n").is_err());
        Ok(())
    }

    #[test]
    fn stamps_of_one_file_never_go_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("r.log");
        let recording = Recording::open(&path, "w1")?;
        for i in 0..200 {
            recording.line('S', format!("w1 shard-{i}"));
        }
        let lines = read_lines(&path)?;
        assert_eq!(lines.len(), 200);
        assert!(lines.windows(2).all(|w| w[0].stamp.mono_us <= w[1].stamp.mono_us));
        assert!(
            lines[0].stamp.wall_us > 1_600_000_000_000_000,
            "wall clock in microseconds"
        );
        Ok(())
    }
}
