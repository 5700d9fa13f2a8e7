//! The stream itself: its multi-stream identifier ([`stream_identifier`]), its shards
//! ([`list_shards`]), and resharding ([`split_shard_in_half`], [`merge_shards`],
//! [`wait_for_active`]).

use std::time::Duration;

use anyhow::Context as _;

/// The multi-stream identifier the backend gives `stream` (the account from its ARN,
/// its creation time), as a multi-stream worker resolves it.
pub async fn stream_identifier(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<kcl_core::StreamIdentifier> {
    let summary = kinesis.describe_stream_summary().stream_name(stream).send().await?;
    let d = summary.stream_description_summary().context("description")?;
    let account = d.stream_arn().split(':').nth(4).context("account in the ARN")?;
    Ok(kcl_core::StreamIdentifier::multi_stream(
        account,
        stream,
        d.stream_creation_timestamp().secs(),
    ))
}

/// Waits until the stream is `ACTIVE` again after a reshard (bounded poll: the stream
/// status is the only signal Kinesis gives).
pub async fn wait_for_active(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let out = kinesis.describe_stream_summary().stream_name(stream).send().await?;
        let status = out.stream_description_summary().map(|d| d.stream_status().clone());
        if status == Some(aws_sdk_kinesis::types::StreamStatus::Active) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "stream {stream} not ACTIVE: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The stream's shards (all pages, by `ExclusiveStartShardId`, which every backend here
/// supports).
pub async fn list_shards(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
) -> anyhow::Result<Vec<aws_sdk_kinesis::types::Shard>> {
    let mut shards: Vec<aws_sdk_kinesis::types::Shard> = Vec::new();
    loop {
        let mut req = kinesis.list_shards().stream_name(stream);
        if let Some(last) = shards.last() {
            req = req.exclusive_start_shard_id(last.shard_id());
        }
        let page = req.send().await?;
        if page.shards().is_empty() {
            return Ok(shards);
        }
        shards.extend(page.shards().iter().cloned());
        if page.next_token().is_none() {
            return Ok(shards);
        }
    }
}

/// Splits a shard at the middle of its hash key range and waits until the stream is
/// `ACTIVE`.
pub async fn split_shard_in_half(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
) -> anyhow::Result<()> {
    let shards = list_shards(kinesis, stream).await?;
    let shard = shards
        .iter()
        .find(|s| s.shard_id() == shard_id)
        .context("shard to split")?;
    let range = shard.hash_key_range().context("hash key range")?;
    let start: u128 = range.starting_hash_key().parse()?;
    let end: u128 = range.ending_hash_key().parse()?;
    let middle = start + (end - start) / 2 + 1;
    kinesis
        .split_shard()
        .stream_name(stream)
        .shard_to_split(shard_id)
        .new_starting_hash_key(middle.to_string())
        .send()
        .await?;
    wait_for_active(kinesis, stream).await
}

/// Merges two adjacent shards and waits until the stream is `ACTIVE`.
pub async fn merge_shards(kinesis: &aws_sdk_kinesis::Client, stream: &str, a: &str, b: &str) -> anyhow::Result<()> {
    kinesis
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(a)
        .adjacent_shard_to_merge(b)
        .send()
        .await?;
    wait_for_active(kinesis, stream).await
}
