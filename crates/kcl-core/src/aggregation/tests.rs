//! Unit tests of the KPL aggregate decoder: well-formed aggregates, and hostile ones.

use std::time::{Duration, SystemTime};

use super::*;

fn seq(s: &str) -> SequenceNumber {
    SequenceNumber::parse(s).expect("valid sequence number")
}

const OUTER_SEQ: &str = "49590338271490256608559692538361571095921575989136588898";

fn outer(data: Bytes) -> Record {
    let mut record = Record::new(data, "outer-key", seq(OUTER_SEQ));
    record.approximate_arrival_timestamp = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    record
}

/// Frames a hand-built protobuf as an aggregated record with a valid digest.
fn frame(protobuf: &[u8]) -> Bytes {
    let mut out = AGGREGATED_RECORD_MAGIC.to_vec();
    out.extend_from_slice(protobuf);
    out.extend_from_slice(&Md5::digest(protobuf));
    Bytes::from(out)
}

fn user(pk: &str, ehk: Option<&str>, data: &[u8]) -> (String, Option<String>, Bytes) {
    (pk.to_owned(), ehk.map(str::to_owned), Bytes::copy_from_slice(data))
}

#[test]
fn round_trips_with_shared_keys_and_explicit_hash_key() {
    let users = vec![
        user("alpha", None, b"one"),
        user("beta", Some("170141183460469231731687303715884105728"), b"two"),
        user("alpha", None, b""),
        user("beta", None, b"four"),
        user("gamma", Some("170141183460469231731687303715884105728"), b"five"),
    ];
    let data = encode_aggregated(&users);

    // The tables are de-duplicated.
    let (protobuf, _) = split_aggregated(&data).expect("framed");
    let message = proto::AggregatedRecord::decode(protobuf).expect("decodes");
    assert_eq!(message.partition_key_table, ["alpha", "beta", "gamma"]);
    assert_eq!(message.explicit_hash_key_table.len(), 1);

    let input = outer(data);
    let records = deaggregate(input.clone()).expect("deaggregates");
    assert_eq!(records.len(), users.len());
    for (i, (record, (pk, ehk, bytes))) in records.iter().zip(&users).enumerate() {
        assert_eq!(&*record.partition_key, pk);
        assert_eq!(record.explicit_hash_key.as_deref(), ehk.as_deref());
        assert_eq!(&record.data, bytes);
        assert_eq!(record.sub_sequence_number, i as u64);
        assert_eq!(record.sequence_number, input.sequence_number);
        assert_eq!(
            record.approximate_arrival_timestamp,
            input.approximate_arrival_timestamp
        );
        assert!(record.aggregated);
    }
}

#[test]
fn sequence_numbers_are_outer_and_sub_sequence_numbers_count_up() {
    let users: Vec<_> = (0..7)
        .map(|i| user(&format!("pk{}", i % 2), None, &[i as u8]))
        .collect();
    let records = deaggregate(outer(encode_aggregated(&users))).expect("deaggregates");
    let subs: Vec<u64> = records.iter().map(|r| r.sub_sequence_number).collect();
    assert_eq!(subs, (0..7).collect::<Vec<u64>>());
    assert!(records.iter().all(|r| r.sequence_number == seq(OUTER_SEQ)));
    // Positions are strictly increasing, so checkpoints can name each user record.
    for pair in records.windows(2) {
        assert!(pair[0].extended_sequence_number() < pair[1].extended_sequence_number());
    }
}

#[test]
fn user_data_shares_the_outer_buffer() {
    let data = encode_aggregated(&[user("k", None, b"payload-bytes")]);
    let range = data.as_ptr_range();
    let records = deaggregate(outer(data.clone())).expect("deaggregates");
    let inner = records[0].data.as_ptr_range();
    assert!(range.start <= inner.start && inner.end <= range.end, "data was copied");
}

#[test]
fn plain_records_pass_through_unchanged() {
    for data in [
        &b""[..],
        b"hello, world",
        &AGGREGATED_RECORD_MAGIC[..2],
        &AGGREGATED_RECORD_MAGIC[..],
        // Magic plus fewer bytes than a digest.
        &[
            0xF3, 0x89, 0x9A, 0xC2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
        ],
    ] {
        let input = outer(Bytes::copy_from_slice(data));
        assert_eq!(deaggregate(input.clone()).expect("plain"), vec![input]);
    }
}

#[test]
fn magic_with_wrong_md5_passes_through_unchanged() {
    let mut data = encode_aggregated(&[user("k", None, b"v")]).to_vec();
    let last = data.len() - 1;
    data[last] ^= 0x01;
    let input = outer(Bytes::from(data));
    assert_eq!(deaggregate(input.clone()).expect("plain"), vec![input]);
}

#[test]
fn garbage_protobuf_with_valid_md5_is_an_error() {
    // Wire type 7 does not exist.
    let input = outer(frame(&[0xFF, 0xFF, 0xFF, 0x0F]));
    match deaggregate(input) {
        Err(DeaggregationError::Malformed {
            sequence_number,
            reason,
        }) => {
            assert_eq!(sequence_number, seq(OUTER_SEQ));
            assert!(!reason.is_empty());
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn missing_required_fields_are_errors() {
    let no_pk_index = proto::AggregatedRecord {
        partition_key_table: vec!["k".to_owned()],
        explicit_hash_key_table: Vec::new(),
        records: vec![proto::UserRecord {
            partition_key_index: None,
            explicit_hash_key_index: None,
            data: Some(Bytes::from_static(b"v")),
            tags: Vec::new(),
        }],
    };
    let mut no_data = no_pk_index.clone();
    no_data.records[0].partition_key_index = Some(0);
    no_data.records[0].data = None;
    let mut tag_without_key = no_pk_index.clone();
    tag_without_key.records[0].partition_key_index = Some(0);
    tag_without_key.records[0].tags = vec![proto::Tag {
        key: None,
        value: Some("v".to_owned()),
    }];
    for message in [no_pk_index, no_data, tag_without_key] {
        let result = deaggregate(outer(frame(&message.encode_to_vec())));
        assert!(
            matches!(result, Err(DeaggregationError::Malformed { .. })),
            "{result:?}"
        );
    }
}

#[test]
fn index_out_of_range_is_an_error() {
    let message = proto::AggregatedRecord {
        partition_key_table: vec!["a".to_owned(), "b".to_owned()],
        explicit_hash_key_table: vec!["1".to_owned()],
        records: vec![
            proto::UserRecord {
                partition_key_index: Some(1),
                explicit_hash_key_index: None,
                data: Some(Bytes::from_static(b"ok")),
                tags: Vec::new(),
            },
            proto::UserRecord {
                partition_key_index: Some(2),
                explicit_hash_key_index: None,
                data: Some(Bytes::from_static(b"bad pk")),
                tags: Vec::new(),
            },
        ],
    };
    let err = deaggregate(outer(frame(&message.encode_to_vec()))).expect_err("out of range");
    assert_eq!(
        err,
        DeaggregationError::IndexOutOfRange {
            sequence_number: seq(OUTER_SEQ),
            sub_sequence_number: 1,
            table: KeyTable::PartitionKey,
            index: 2,
            table_len: 2,
        }
    );
    assert!(!err.to_string().contains("bad pk"));

    let mut bad_ehk = message;
    bad_ehk.records[1].partition_key_index = Some(0);
    bad_ehk.records[0].explicit_hash_key_index = Some(u64::MAX);
    let err = deaggregate(outer(frame(&bad_ehk.encode_to_vec()))).expect_err("out of range");
    assert_eq!(
        err,
        DeaggregationError::IndexOutOfRange {
            sequence_number: seq(OUTER_SEQ),
            sub_sequence_number: 0,
            table: KeyTable::ExplicitHashKey,
            index: u64::MAX,
            table_len: 1,
        }
    );
}

#[test]
fn empty_aggregated_record_yields_no_records() {
    assert!(deaggregate(outer(encode_aggregated(&[]))).expect("empty").is_empty());
    // Tables but no records.
    let message = proto::AggregatedRecord {
        partition_key_table: vec!["k".to_owned()],
        ..Default::default()
    };
    let framed = frame(&message.encode_to_vec());
    assert!(deaggregate(outer(framed)).expect("empty").is_empty());
}

#[test]
fn deaggregate_all_keeps_order_and_mixes_plain_records() {
    let plain = outer(Bytes::from_static(b"plain"));
    let agg = outer(encode_aggregated(&[user("a", None, b"1"), user("b", None, b"2")]));
    let empty = outer(encode_aggregated(&[]));
    let out = deaggregate_all([plain.clone(), agg, empty, plain.clone()]).expect("ok");
    let datas: Vec<&[u8]> = out.iter().map(|r| &r.data[..]).collect();
    assert_eq!(datas, [&b"plain"[..], b"1", b"2", b"plain"]);
    assert!(!out[0].aggregated && out[1].aggregated && !out[3].aggregated);

    let broken = outer(frame(&[0xFF]));
    assert!(deaggregate_all([plain, broken]).is_err());
}

/// An aggregate of `n` empty user records that all use one partition key of
/// `key_len` bytes (the hostile record of the hardening review, scaled).
fn one_key_many_records(key: String, n: usize) -> Bytes {
    let message = proto::AggregatedRecord {
        partition_key_table: vec![key],
        explicit_hash_key_table: Vec::new(),
        records: vec![
            proto::UserRecord {
                partition_key_index: Some(0),
                explicit_hash_key_index: None,
                data: Some(Bytes::new()),
                tags: Vec::new(),
            };
            n
        ],
    };
    frame(&message.encode_to_vec())
}

/// Bytes held by the distinct partition-key buffers of `records`: what keys cost
/// in memory (one buffer when they are shared, one per record when copied).
fn key_bytes_allocated(records: &[Record]) -> usize {
    let mut seen = std::collections::HashSet::new();
    records
        .iter()
        .filter(|r| seen.insert(r.partition_key.as_ptr()))
        .map(|r| r.partition_key.len())
        .sum()
}

/// The hostile aggregate: one key far beyond Kinesis's 256 characters shared by many
/// empty user records. Before, every user record got its own copy of the key (a
/// ~1 MB record with a 400 KB key and 100,000 records made 40 GB); scaled down here
/// (40 KB x 1,000 = 40 MB) so that the failing run shows the blow-up without taking
/// the machine down. Now the key is refused and the record is malformed.
#[test]
fn a_partition_key_beyond_kinesis_limits_makes_the_aggregate_malformed() {
    let data = one_key_many_records("k".repeat(40_000), 1_000);
    match deaggregate(outer(data)) {
        Ok(records) => panic!(
            "a 40,000-character partition key was accepted: {} user records, {} bytes allocated for keys",
            records.len(),
            key_bytes_allocated(&records)
        ),
        Err(e) => {
            assert!(
                matches!(
                    e,
                    DeaggregationError::InvalidKey {
                        table: KeyTable::PartitionKey,
                        index: 0,
                        ..
                    }
                ),
                "{e:?}"
            );
            assert!(e.to_string().contains("40000 characters"), "{e}");
        }
    }
    // The full-size record of the review: refused the same way, at once.
    let data = one_key_many_records("k".repeat(400_000), 100_000);
    assert!(data.len() < 1_100_000, "about 1 MB: {}", data.len());
    assert!(matches!(
        deaggregate(outer(data)),
        Err(DeaggregationError::InvalidKey { .. })
    ));
}

/// A valid key used by many user records is stored once: every user record shares
/// it (before, 10,000 records of a 256-character key held 10,000 copies, 2.5 MB).
#[test]
fn user_records_share_their_aggregate_keys() {
    let records = deaggregate(outer(one_key_many_records("k".repeat(256), 10_000))).expect("valid");
    assert_eq!(records.len(), 10_000);
    assert_eq!(key_bytes_allocated(&records), 256, "one shared key buffer");
}

/// Keys Kinesis itself would refuse: empty or over 256 characters (characters, not
/// bytes), and explicit hash keys that are not a decimal number up to 2^128 - 1.
#[test]
fn keys_beyond_kinesis_limits_are_malformed() {
    let bad: [(&str, Option<&str>); 7] = [
        ("", None),
        (&"k".repeat(257), None),
        ("k", Some("")),
        ("k", Some("abc")),
        ("k", Some("-1")),
        ("k", Some("007")),
        ("k", Some("340282366920938463463374607431768211456")),
    ];
    for (pk, ehk) in bad {
        let data = encode_aggregated(&[user(pk, ehk, b"v")]);
        assert!(
            deaggregate(outer(data)).is_err(),
            "pk of {} chars, ehk {ehk:?}",
            pk.chars().count()
        );
    }
    let crab = "🦀".repeat(256);
    let good: [(&str, Option<&str>); 4] = [
        ("k", None),
        (&crab, None),
        ("k", Some("0")),
        ("k", Some("340282366920938463463374607431768211455")),
    ];
    for (pk, ehk) in good {
        let data = encode_aggregated(&[user(pk, ehk, b"v")]);
        assert!(
            deaggregate(outer(data)).is_ok(),
            "pk of {} chars, ehk {ehk:?}",
            pk.chars().count()
        );
    }
}

/// Kinesis allows records of up to 10 MiB: an aggregate that size (one user record
/// over 1 MiB among others) unpacks like any other, its data not copied.
#[test]
fn aggregates_of_up_to_10_mib_unpack() {
    let big = Bytes::from(vec![7u8; 3 * 1024 * 1024 + 1]);
    let mut users = vec![user("big", None, &big)];
    users.extend((0..6).map(|i| user(&format!("k{i}"), None, &vec![i as u8; 1024 * 1024])));
    let data = encode_aggregated(&users);
    assert!(
        data.len() > 9 * 1024 * 1024 && data.len() <= 10 * 1024 * 1024,
        "{}",
        data.len()
    );
    let range = data.as_ptr_range();
    let records = deaggregate(outer(data.clone())).expect("deaggregates");
    assert_eq!(records.len(), 7);
    assert_eq!(records[0].data, big);
    for (record, (_, _, bytes)) in records.iter().zip(&users) {
        assert_eq!(&record.data, bytes);
        let inner = record.data.as_ptr_range();
        assert!(range.start <= inner.start && inner.end <= range.end, "data was copied");
    }
}

/// SplitMix64: a small deterministic generator, so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn aggregate_then_deaggregate_is_identity() {
    let key_pool = ["x", "a", "partition-ключ", "🦀", "k-0123456789"];
    let ehk_pool = ["0", "340282366920938463463374607431768211455", "42"];
    let mut rng = Rng(0x5EED);
    for case in 0..400 {
        let n = rng.below(24) as usize;
        let users: Vec<_> = (0..n)
            .map(|_| {
                let pk = if rng.below(4) == 0 {
                    format!("pk-{}", rng.next())
                } else {
                    key_pool[rng.below(key_pool.len() as u64) as usize].to_owned()
                };
                let ehk = (rng.below(3) == 0).then(|| ehk_pool[rng.below(ehk_pool.len() as u64) as usize].to_owned());
                let len = rng.below(80) as usize;
                let mut data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                // Some user payloads look aggregated themselves; they must stay opaque.
                if rng.below(8) == 0 {
                    data.splice(0..0, AGGREGATED_RECORD_MAGIC);
                }
                (pk, ehk, Bytes::from(data))
            })
            .collect();
        let records = deaggregate(outer(encode_aggregated(&users))).unwrap_or_else(|e| panic!("case {case}: {e}"));
        let round_tripped: Vec<_> = records
            .into_iter()
            .map(|r| {
                (
                    r.partition_key.to_string(),
                    r.explicit_hash_key.map(|k| k.to_string()),
                    r.data,
                )
            })
            .collect();
        assert_eq!(round_tripped, users, "case {case}");
    }
}
