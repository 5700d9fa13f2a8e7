//! Writing records: a batch of numbered records ([`put_records`], [`TestEnv::put`])
//! that remembers where Kinesis put each, and a keyed producer that writes round after
//! round until cancelled ([`spawn_keyed_producer`]).

use std::time::Duration;

use bytes::Bytes;
use kcl_core::SequenceNumber;

use crate::backends::TestEnv;

impl TestEnv {
    /// Writes `n` records, as [`put_records`] does.
    pub async fn put(&self, n: usize, tag: &str) -> anyhow::Result<Vec<Written>> {
        put_records(&self.kinesis, &self.stream, n, tag).await
    }
}

/// A record the producer wrote, with where Kinesis put it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The shard Kinesis chose.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
    /// The partition key.
    pub partition_key: String,
    /// The payload.
    pub data: Bytes,
}

/// Writes `n` records with `PutRecords` ([`kcl_local::put_records`]: batches of 500,
/// refused entries resent) and returns what was written. Payloads are `"{tag}-{i}"`,
/// partition keys spread over the key space.
pub async fn put_records(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    n: usize,
    tag: &str,
) -> anyhow::Result<Vec<Written>> {
    let records: Vec<(String, Bytes)> = (0..n)
        .map(|i| (format!("key-{tag}-{i}"), Bytes::from(format!("{tag}-{i}"))))
        .collect();
    let results = kcl_local::put_records(kinesis, stream, &records).await?;
    records
        .into_iter()
        .zip(results)
        .map(|((partition_key, data), r)| {
            Ok(Written {
                shard_id: r.shard_id,
                sequence_number: SequenceNumber::parse(&r.sequence_number)?,
                partition_key,
                data,
            })
        })
        .collect()
}

/// A record of a keyed producer: the `n`-th record of partition key `key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyedWritten {
    /// The partition key.
    pub key: String,
    /// Its per-key sequence number, from 0.
    pub n: u64,
    /// Where Kinesis put it.
    pub written: Written,
}

/// Writes rounds of one record per key (`"{key}:{n}"`) until cancelled, each round
/// only after the previous one was acknowledged, so that the per-key order of writes is
/// also their order in time, across shards.
pub fn spawn_keyed_producer(
    kinesis: aws_sdk_kinesis::Client,
    stream: String,
    keys: usize,
    cancel: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<Vec<KeyedWritten>>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut n = 0u64;
        while !cancel.is_cancelled() {
            let round: Vec<(String, Bytes)> = (0..keys)
                .map(|k| (format!("key{k}"), Bytes::from(format!("key{k}:{n}"))))
                .collect();
            let mut attempts = 0;
            let results = loop {
                match kcl_local::put_records(&kinesis, &stream, &round).await {
                    Ok(results) => break results,
                    // A reshard in progress may refuse writes for a moment: the round
                    // is written again (a duplicate of a round is harmless to the
                    // per-key order checks; the next round only starts after this one).
                    Err(e) if attempts < 20 => {
                        attempts += 1;
                        tracing::debug!(error = %e, "round {n} refused; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            for ((key, data), r) in round.into_iter().zip(results) {
                out.push(KeyedWritten {
                    key: key.clone(),
                    n,
                    written: Written {
                        shard_id: r.shard_id,
                        sequence_number: SequenceNumber::parse(&r.sequence_number)?,
                        partition_key: key,
                        data,
                    },
                });
            }
            n += 1;
            tokio::select! {
                () = cancel.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        Ok(out)
    })
}
