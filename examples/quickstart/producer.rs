//! The producer side of the demo: click events as JSON, written with `kcl-producer`'s
//! [`KinesisProducer`]: it batches them into `PutRecords` calls, resends exactly the
//! entries a partial failure reports (`ProvisionedThroughputExceededException` on a
//! failed entry, for example) with a backoff, keeps each user's clicks in order, and
//! holds each shard to its write limits.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use kcl_producer::{KinesisProducer, ProducerConfig};
use serde::{Deserialize, Serialize};

/// Pages the demo's users click on.
const PAGES: [&str; 6] = ["/", "/pricing", "/docs", "/blog", "/signup", "/checkout"];

/// How many distinct users the demo invents; the user id is the partition key, so this
/// spreads the events over the shards.
const USERS: u64 = 500;

/// Records written (or processed), per shard id.
pub(crate) type ShardCounts = BTreeMap<String, u64>;

/// One click on a page: the payload of every record the demo writes.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ClickEvent {
    /// Who clicked; also the record's partition key.
    pub(crate) user_id: String,
    /// The page clicked.
    pub(crate) page: String,
    /// When, in milliseconds since the Unix epoch.
    pub(crate) timestamp: u64,
    /// The event's number in this run, from 0.
    pub(crate) sequence: u64,
}

impl ClickEvent {
    /// The `i`-th made-up click of a run, stamped with `timestamp`.
    fn made_up(i: u64, timestamp: u64) -> Self {
        let page = PAGES[usize::try_from(i.wrapping_mul(31)).unwrap_or(0) % PAGES.len()];
        Self {
            user_id: format!("user-{:03}", i.wrapping_mul(7919) % USERS),
            page: page.to_owned(),
            timestamp,
            sequence: i,
        }
    }
}

/// Writes `count` click events to `stream` and returns how many landed on each shard.
///
/// # Errors
/// A record that cannot be written within the producer's time to live (30 s), or that
/// Kinesis refuses for good (a missing stream, for example).
pub(crate) async fn put_clicks(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    count: u64,
) -> anyhow::Result<ShardCounts> {
    let now_millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let timestamp = u64::try_from(now_millis).unwrap_or(u64::MAX);
    let producer = KinesisProducer::try_new(client.clone(), stream, ProducerConfig::default())?;
    let mut acknowledgements = Vec::new();
    for i in 0..count {
        let event = ClickEvent::made_up(i, timestamp);
        let data = serde_json::to_vec(&event).context("serializing a click event")?;
        acknowledgements.push(producer.put(event.user_id, data.into()).await?);
    }
    let mut written = ShardCounts::new();
    for acknowledgement in acknowledgements {
        let result = acknowledgement
            .await
            .with_context(|| format!("writing a click event to stream {stream:?}"))?;
        *written.entry(result.shard_id).or_default() += 1;
    }
    producer.close().await;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_events_are_json_click_events() {
        let event = ClickEvent::made_up(42, 1_700_000_000_000);
        let json = serde_json::to_vec(&event).expect("serializable");
        let back: ClickEvent = serde_json::from_slice(&json).expect("round trip");
        assert_eq!(back.sequence, 42);
        assert_eq!(back.user_id, event.user_id);
    }
}
