//! Sequence numbers: Kinesis's decimal sequence numbers, the KCL's sentinels, and the
//! `(sequence, sub-sequence)` pair that orders records of aggregated (KPL) batches.
//!
//! Kinesis sequence numbers are decimal strings of up to 128 bits and more digits than a
//! `u128` holds, so they are kept as validated strings and compared numerically (by
//! length, then digit by digit) without a big-integer dependency.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::error::InvalidSequenceNumber;

/// A Kinesis sequence number: a non-empty string of decimal digits, kept without
/// leading zeros so that numeric order is (length, lexicographic) order. Cloning is
/// cheap (a shared buffer): positions are copied on every record's way through.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(std::sync::Arc<str>);

impl SequenceNumber {
    /// Parses a decimal sequence number as Kinesis returns it.
    ///
    /// # Errors
    /// [`InvalidSequenceNumber`] when `s` is empty or has a character that is not a digit.
    pub fn parse(s: &str) -> Result<Self, InvalidSequenceNumber> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidSequenceNumber(s.to_owned()));
        }
        let trimmed = s.trim_start_matches('0');
        Ok(Self(if trimmed.is_empty() { "0".into() } else { trimmed.into() }))
    }

    /// [`parse`](Self::parse) of an owned string (the error keeps it without a copy).
    pub(crate) fn parse_owned(s: String) -> Result<Self, InvalidSequenceNumber> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidSequenceNumber(s));
        }
        Self::parse(&s)
    }

    /// The decimal form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.len().cmp(&other.0.len()).then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for SequenceNumber {
    type Err = InvalidSequenceNumber;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A position in a shard as stored in a lease's `checkpoint` attribute: either a real
/// sequence number or one of the Java KCL's sentinels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// Nothing processed yet; start at the oldest record retained (`TRIM_HORIZON`).
    TrimHorizon,
    /// Nothing processed yet; start after the newest record (`LATEST`).
    Latest,
    /// Nothing processed yet; start at the configured timestamp (`AT_TIMESTAMP`).
    AtTimestamp,
    /// Every record up to and including this one has been processed.
    Sequence(SequenceNumber),
    /// The shard was read to its end and every record processed (`SHARD_END`).
    ShardEnd,
}

impl Checkpoint {
    /// The string stored in the lease table.
    pub fn as_str(&self) -> &str {
        match self {
            Self::TrimHorizon => "TRIM_HORIZON",
            Self::Latest => "LATEST",
            Self::AtTimestamp => "AT_TIMESTAMP",
            Self::ShardEnd => "SHARD_END",
            Self::Sequence(s) => s.as_str(),
        }
    }

    /// Parses the stored string: a sentinel or a decimal sequence number.
    ///
    /// # Errors
    /// [`InvalidSequenceNumber`] for anything else.
    pub fn parse(s: &str) -> Result<Self, InvalidSequenceNumber> {
        Ok(match s {
            "TRIM_HORIZON" => Self::TrimHorizon,
            "LATEST" => Self::Latest,
            "AT_TIMESTAMP" => Self::AtTimestamp,
            "SHARD_END" => Self::ShardEnd,
            other => Self::Sequence(SequenceNumber::parse(other)?),
        })
    }

    /// True for the three "nothing processed yet" sentinels.
    pub fn is_initial_position(&self) -> bool {
        matches!(self, Self::TrimHorizon | Self::Latest | Self::AtTimestamp)
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A checkpoint with the sub-sequence number that orders the user records packed into
/// one aggregated Kinesis record (the Java KCL's `ExtendedSequenceNumber`).
///
/// Ordering: the initial-position sentinels sort before every sequence number and
/// `SHARD_END` after every one, so "never backwards" is a plain comparison.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ExtendedSequenceNumber {
    /// The sequence number or sentinel.
    pub checkpoint: Checkpoint,
    /// The index of the user record inside an aggregated record; 0 for plain records.
    pub sub_sequence_number: u64,
}

impl ExtendedSequenceNumber {
    /// `TRIM_HORIZON`.
    pub const TRIM_HORIZON: Self = Self::sentinel(Checkpoint::TrimHorizon);
    /// `LATEST`.
    pub const LATEST: Self = Self::sentinel(Checkpoint::Latest);
    /// `AT_TIMESTAMP`.
    pub const AT_TIMESTAMP: Self = Self::sentinel(Checkpoint::AtTimestamp);
    /// `SHARD_END`.
    pub const SHARD_END: Self = Self::sentinel(Checkpoint::ShardEnd);

    const fn sentinel(checkpoint: Checkpoint) -> Self {
        Self {
            checkpoint,
            sub_sequence_number: 0,
        }
    }

    /// A position at a record.
    pub fn new(sequence_number: SequenceNumber, sub_sequence_number: u64) -> Self {
        Self {
            checkpoint: Checkpoint::Sequence(sequence_number),
            sub_sequence_number,
        }
    }

    /// The sequence number, when this is not a sentinel.
    pub fn sequence_number(&self) -> Option<&SequenceNumber> {
        match &self.checkpoint {
            Checkpoint::Sequence(s) => Some(s),
            _ => None,
        }
    }

    /// True when the shard is finished.
    pub fn is_shard_end(&self) -> bool {
        self.checkpoint == Checkpoint::ShardEnd
    }

    fn rank(&self) -> u8 {
        match self.checkpoint {
            Checkpoint::TrimHorizon | Checkpoint::Latest | Checkpoint::AtTimestamp => 0,
            Checkpoint::Sequence(_) => 1,
            Checkpoint::ShardEnd => 2,
        }
    }
}

impl PartialOrd for ExtendedSequenceNumber {
    /// Sentinels of the initial kind are not ordered among themselves (`TRIM_HORIZON`
    /// and `LATEST` are different places, not bigger or smaller), so this is partial.
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        match (self.rank(), other.rank()) {
            (0, 0) => (self.checkpoint == other.checkpoint).then_some(Ordering::Equal),
            (1, 1) => {
                let (Checkpoint::Sequence(a), Checkpoint::Sequence(b)) = (&self.checkpoint, &other.checkpoint) else {
                    return None;
                };
                Some(a.cmp(b).then(self.sub_sequence_number.cmp(&other.sub_sequence_number)))
            }
            (a, b) => Some(a.cmp(&b)),
        }
    }
}

impl fmt::Display for ExtendedSequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sub_sequence_number == 0 {
            write!(f, "{}", self.checkpoint)
        } else {
            write!(f, "{}/{}", self.checkpoint, self.sub_sequence_number)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn compares_numerically_beyond_u128() {
        let a = seq("49590338271490256608559692538361571095921575989136588898");
        let b = seq("49590338271490256608559692538361571095921575989136588899");
        let short = seq("9");
        assert!(a < b);
        assert!(short < a);
        assert_eq!(seq("0007"), seq("7"));
        assert_eq!(seq("000"), seq("0"));
    }

    #[test]
    fn rejects_non_digits() {
        assert!(SequenceNumber::parse("").is_err());
        assert!(SequenceNumber::parse("12a").is_err());
        assert!(SequenceNumber::parse("-1").is_err());
    }

    #[test]
    fn checkpoint_round_trips_sentinels() {
        for s in ["TRIM_HORIZON", "LATEST", "AT_TIMESTAMP", "SHARD_END", "123"] {
            assert_eq!(Checkpoint::parse(s).expect("valid").as_str(), s);
        }
        assert!(Checkpoint::parse("trim_horizon").is_err());
    }

    #[test]
    fn extended_ordering() {
        let a = ExtendedSequenceNumber::new(seq("10"), 0);
        let a1 = ExtendedSequenceNumber::new(seq("10"), 1);
        let b = ExtendedSequenceNumber::new(seq("11"), 0);
        assert!(a < a1 && a1 < b);
        assert!(ExtendedSequenceNumber::TRIM_HORIZON < a);
        assert!(ExtendedSequenceNumber::LATEST < a);
        assert!(b < ExtendedSequenceNumber::SHARD_END);
        assert_eq!(
            ExtendedSequenceNumber::TRIM_HORIZON.partial_cmp(&ExtendedSequenceNumber::LATEST),
            None
        );
    }
}
