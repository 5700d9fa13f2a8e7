//! The producer side of the demo: click events as JSON, written with `PutRecords` in
//! batches of up to 500, resending exactly the entries that a partial failure reports.
//!
//! `PutRecords` is not all-or-nothing: a call can succeed while some of its entries fail
//! (`FailedRecordCount` > 0, with an `ErrorCode` such as
//! `ProvisionedThroughputExceededException` on each failed entry). Those entries, and
//! only those, are sent again after a backoff, a bounded number of times.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use kcl_core::RetryPolicy;
use serde::{Deserialize, Serialize};

/// `PutRecords` accepts at most 500 entries per call.
const MAX_ENTRIES_PER_CALL: u64 = 500;

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

    /// The `PutRecords` entry for this event.
    fn to_entry(&self) -> anyhow::Result<PutRecordsRequestEntry> {
        let data = serde_json::to_vec(self).context("serializing a click event")?;
        Ok(PutRecordsRequestEntry::builder()
            .data(Blob::new(data))
            .partition_key(&self.user_id)
            .build()?)
    }
}

/// Writes `count` click events to `stream` and returns how many landed on each shard.
///
/// # Errors
/// A `PutRecords` call that fails as a whole (after the SDK's own retries), or entries
/// that still fail after [`resend_policy`]'s attempts.
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
    let mut written = ShardCounts::new();
    let mut next = 0;
    while next < count {
        let end = count.min(next + MAX_ENTRIES_PER_CALL);
        let entries = (next..end)
            .map(|i| ClickEvent::made_up(i, timestamp).to_entry())
            .collect::<anyhow::Result<Vec<_>>>()?;
        put_batch(client, stream, entries, &mut written).await?;
        next = end;
    }
    Ok(written)
}

/// The backoff between two sends of a batch's failed entries: kcl-core's one retry
/// mechanism (exponential, full jitter), 8 sends at most, waits up to 100 ms, 200 ms,
/// ... capped at 2 s.
fn resend_policy() -> RetryPolicy {
    RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(2), Some(8))
}

/// Sends one batch, then resends the entries that failed until none is left or the
/// [`resend_policy`] gives up. Counts every accepted entry in `written`.
async fn put_batch(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    mut pending: Vec<PutRecordsRequestEntry>,
    written: &mut ShardCounts,
) -> anyhow::Result<()> {
    let policy = resend_policy();
    let mut attempt = 1;
    loop {
        let output = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(pending.clone()))
            .send()
            .await
            .with_context(|| format!("PutRecords to stream {stream:?}"))?;
        let outcome = sort_results(pending, output.records(), written)?;
        let Some(error_code) = outcome.last_error_code else {
            return Ok(());
        };
        let failed = outcome.failed.len();
        if !policy.should_retry(attempt) {
            bail!("{failed} records were still rejected after {attempt} PutRecords attempts (last error code {error_code})");
        }
        tracing::warn!(
            failed,
            error_code,
            attempt,
            "PutRecords partially failed; resending the failed records"
        );
        tokio::time::sleep(policy.backoff(attempt)).await;
        pending = outcome.failed;
        attempt += 1;
    }
}

/// What one `PutRecords` response says about the entries sent.
#[derive(Debug)]
struct SortedResults {
    /// The entries to send again, in their original order.
    failed: Vec<PutRecordsRequestEntry>,
    /// The error code of the last failed entry; `None` when every entry was accepted.
    last_error_code: Option<String>,
}

/// Pairs each sent entry with its result (the response lists them in request order),
/// counts the accepted ones per shard in `written`, and keeps the failed ones.
///
/// # Errors
/// When the response does not have one result per entry, or an accepted entry has no
/// shard id: the response cannot be trusted, and resending could duplicate records.
fn sort_results(
    sent: Vec<PutRecordsRequestEntry>,
    results: &[PutRecordsResultEntry],
    written: &mut ShardCounts,
) -> anyhow::Result<SortedResults> {
    ensure!(
        sent.len() == results.len(),
        "PutRecords answered {} results for {} records",
        results.len(),
        sent.len()
    );
    let mut sorted = SortedResults {
        failed: Vec::new(),
        last_error_code: None,
    };
    for (entry, result) in sent.into_iter().zip(results) {
        if let Some(code) = result.error_code() {
            sorted.last_error_code = Some(code.to_owned());
            sorted.failed.push(entry);
        } else {
            let shard_id = result
                .shard_id()
                .context("PutRecords accepted a record without saying on which shard")?;
            *written.entry(shard_id.to_owned()).or_default() += 1;
        }
    }
    Ok(sorted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> PutRecordsRequestEntry {
        PutRecordsRequestEntry::builder()
            .data(Blob::new(key.as_bytes()))
            .partition_key(key)
            .build()
            .expect("data and partition key are set")
    }

    #[test]
    fn only_the_failed_entries_are_kept_for_resending() {
        let sent = vec![entry("a"), entry("b"), entry("c")];
        let results = [
            PutRecordsResultEntry::builder()
                .shard_id("shard-1")
                .sequence_number("1")
                .build(),
            PutRecordsResultEntry::builder()
                .error_code("ProvisionedThroughputExceededException")
                .build(),
            PutRecordsResultEntry::builder()
                .shard_id("shard-2")
                .sequence_number("2")
                .build(),
        ];
        let mut written = ShardCounts::new();
        let sorted = sort_results(sent, &results, &mut written).expect("consistent response");
        assert_eq!(sorted.failed.len(), 1);
        assert_eq!(sorted.failed[0].partition_key(), Some("b"));
        assert_eq!(
            sorted.last_error_code.as_deref(),
            Some("ProvisionedThroughputExceededException")
        );
        assert_eq!(
            written,
            ShardCounts::from([("shard-1".into(), 1), ("shard-2".into(), 1)])
        );
    }

    #[test]
    fn a_response_with_the_wrong_number_of_results_is_an_error() {
        let results = [PutRecordsResultEntry::builder().shard_id("shard-1").build()];
        let mut written = ShardCounts::new();
        assert!(sort_results(vec![entry("a"), entry("b")], &results, &mut written).is_err());
        assert!(written.is_empty());
    }

    #[test]
    fn made_up_events_are_json_click_events() {
        let event = ClickEvent::made_up(42, 1_700_000_000_000);
        let json = serde_json::to_vec(&event).expect("serializable");
        let back: ClickEvent = serde_json::from_slice(&json).expect("round trip");
        assert_eq!(back.sequence, 42);
        assert_eq!(back.user_id, event.user_id);
    }
}
