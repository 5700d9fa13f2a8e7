//! KPL de-aggregation under arbitrary input (property tests): never a panic; a typed
//! error or a correct result. Inputs: arbitrary bytes, bytes behind the KPL magic with
//! a valid digest (so the protobuf decoder sees them), and valid aggregates that were
//! truncated or had a byte changed.

use bytes::Bytes;
use kcl_core::aggregation::{deaggregate, encode_aggregated, AGGREGATED_RECORD_MAGIC};
use kcl_core::{Record, SequenceNumber};
use md5::Digest as _;
use proptest::prelude::*;

fn record(data: Vec<u8>) -> Record {
    Record::new(
        Bytes::from(data),
        "key",
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").expect("valid"),
    )
}

/// `MAGIC || protobuf || MD5(protobuf)`: passes the digest check whatever `protobuf` is.
fn with_valid_digest(protobuf: &[u8]) -> Vec<u8> {
    let mut data = AGGREGATED_RECORD_MAGIC.to_vec();
    data.extend_from_slice(protobuf);
    data.extend_from_slice(&md5::Md5::digest(protobuf));
    data
}

fn user_records() -> impl Strategy<Value = Vec<(String, Option<String>, Vec<u8>)>> {
    prop::collection::vec(
        (
            "[a-z0-9]{1,12}",
            prop::option::of("0|[1-9][0-9]{0,37}"),
            prop::collection::vec(any::<u8>(), 0..64),
        ),
        0..12,
    )
}

/// Checks what a successful de-aggregation promises.
fn check_ok(input: &Record, out: &[Record]) {
    if out.len() == 1 && !out[0].aggregated {
        assert_eq!(out[0], *input, "a plain record comes back unchanged");
        return;
    }
    for (i, r) in out.iter().enumerate() {
        assert!(r.aggregated);
        assert_eq!(r.sub_sequence_number, i as u64);
        assert_eq!(r.sequence_number, input.sequence_number);
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let input = record(data);
        if let Ok(out) = deaggregate(input.clone()) {
            check_ok(&input, &out);
        }
    }

    #[test]
    fn arbitrary_protobuf_behind_a_valid_digest_never_panics(protobuf in prop::collection::vec(any::<u8>(), 0..256)) {
        let input = record(with_valid_digest(&protobuf));
        if let Ok(out) = deaggregate(input.clone()) {
            check_ok(&input, &out);
        }
    }

    #[test]
    fn valid_aggregates_round_trip(users in user_records()) {
        let encoded: Vec<(String, Option<String>, Bytes)> =
            users.iter().map(|(k, e, d)| (k.clone(), e.clone(), Bytes::from(d.clone()))).collect();
        let out = deaggregate(record(encode_aggregated(&encoded).to_vec())).expect("a valid aggregate");
        prop_assert_eq!(out.len(), users.len());
        for (r, (key, ehk, data)) in out.iter().zip(&users) {
            prop_assert_eq!(&*r.partition_key, key.as_str());
            prop_assert_eq!(r.explicit_hash_key.as_deref(), ehk.as_deref());
            prop_assert_eq!(r.data.as_ref(), &data[..]);
        }
    }

    #[test]
    fn truncated_or_altered_aggregates_never_panic(
        users in user_records(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        fix_digest in any::<bool>(),
    ) {
        let encoded: Vec<(String, Option<String>, Bytes)> =
            users.into_iter().map(|(k, e, d)| (k, e, Bytes::from(d))).collect();
        let valid = encode_aggregated(&encoded).to_vec();
        let protobuf = &valid[AGGREGATED_RECORD_MAGIC.len()..valid.len() - 16];
        // Truncated protobuf (with a digest made to match, or the old one), and one byte
        // changed.
        let truncated = &protobuf[..cut.index(protobuf.len() + 1)];
        let mut altered = protobuf.to_vec();
        if !altered.is_empty() {
            let at = flip.index(altered.len());
            altered[at] ^= 0x5a;
        }
        for body in [truncated.to_vec(), altered] {
            let data = if fix_digest {
                with_valid_digest(&body)
            } else {
                let mut d = AGGREGATED_RECORD_MAGIC.to_vec();
                d.extend_from_slice(&body);
                d.extend_from_slice(&valid[valid.len() - 16..]);
                d
            };
            let input = record(data);
            if let Ok(out) = deaggregate(input.clone()) {
                check_ok(&input, &out);
            }
        }
    }
}
