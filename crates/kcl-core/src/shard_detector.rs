//! Shard discovery (the Java KCL's `ShardDetector`): the shards of a stream, as the
//! shard sync needs them.
//!
//! `ListShards` is paged with `NextToken`. Should a page call fail (an expired token, or
//! a backend that cannot page by token), listing continues from the last shard seen
//! with `ExclusiveStartShardId`, which AWS accepts too.

use std::collections::HashSet;
use std::sync::Arc;

use aws_sdk_kinesis::error::{DisplayErrorContext, SdkError};
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::Shard;
use tracing::{debug, warn};

use crate::error::{BoxError, SchedulerError};
use crate::lease::HashKeyRange;
use crate::retry::{retry, with_timeout, RetryPolicy};

/// A shard as the syncer needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ShardInfo {
    pub(crate) shard_id: String,
    /// `ParentShardId` and `AdjacentParentShardId`, when present.
    pub(crate) parents: Vec<String>,
    pub(crate) hash_key_range: Option<HashKeyRange>,
    /// True when the shard has an ending sequence number (it was split or merged).
    pub(crate) closed: bool,
}

impl From<&Shard> for ShardInfo {
    fn from(s: &Shard) -> Self {
        let parents = [s.parent_shard_id(), s.adjacent_parent_shard_id()]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect();
        Self {
            shard_id: s.shard_id().to_owned(),
            parents,
            hash_key_range: s.hash_key_range().map(|r| HashKeyRange {
                starting_hash_key: r.starting_hash_key().to_owned(),
                ending_hash_key: r.ending_hash_key().to_owned(),
            }),
            closed: s
                .sequence_number_range()
                .is_some_and(|r| r.ending_sequence_number().is_some()),
        }
    }
}

/// Lists the shards of a stream.
#[derive(Debug, Clone)]
pub(crate) struct ShardDetector {
    kinesis: aws_sdk_kinesis::Client,
    stream_name: String,
    /// Set when calls address the stream by ARN alone.
    stream_arn: Option<String>,
    page_size: i32,
    retry: RetryPolicy,
    /// Bound of one `ListShards` call.
    call_timeout: std::time::Duration,
    /// The shard ids of the last complete listing (shared by clones).
    last_listing: Arc<std::sync::Mutex<Option<Arc<HashSet<String>>>>>,
}

fn list_shards_retryable(e: &SdkError<ListShardsError>) -> bool {
    match e {
        SdkError::ServiceError(s) => matches!(s.err(), ListShardsError::LimitExceededException(_)),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        _ => false,
    }
}

impl ShardDetector {
    pub(crate) fn new(
        kinesis: aws_sdk_kinesis::Client,
        stream_name: String,
        page_size: i32,
        call_timeout: std::time::Duration,
    ) -> Self {
        Self {
            kinesis,
            stream_name,
            stream_arn: None,
            page_size,
            retry: RetryPolicy::default(),
            call_timeout,
            last_listing: Arc::default(),
        }
    }

    /// The shard ids of the last listing of this stream, if one succeeded.
    pub(crate) fn last_listing(&self) -> Option<Arc<HashSet<String>>> {
        self.last_listing.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Addresses the stream by this ARN alone (when `Some`).
    pub(crate) fn with_arn(mut self, arn: Option<String>) -> Self {
        self.stream_arn = arn;
        self
    }

    /// Every shard of the stream, all pages.
    pub(crate) async fn list_shards(&self) -> Result<Vec<ShardInfo>, SchedulerError> {
        let mut shards: Vec<ShardInfo> = Vec::new();
        let mut next_token: Option<String> = None;
        let mut exclusive_start: Option<String> = None;
        let mut seen_tokens = HashSet::new();
        let mut known: HashSet<String> = HashSet::new();
        loop {
            let page = retry(&self.retry, list_shards_retryable, || {
                let mut req = self.kinesis.list_shards().max_results(self.page_size);
                req = match &next_token {
                    Some(token) => req.next_token(token),
                    None => req
                        .set_stream_name(self.stream_arn.is_none().then(|| self.stream_name.clone()))
                        .set_stream_arn(self.stream_arn.clone())
                        .set_exclusive_start_shard_id(exclusive_start.clone()),
                };
                with_timeout(self.call_timeout, req.send())
            })
            .await;
            let page = match page {
                Ok(page) => page,
                Err(e) if next_token.is_some() && !shards.is_empty() => {
                    warn!(error = %DisplayErrorContext(&e), "ListShards page by NextToken failed; continuing from the last shard");
                    next_token = None;
                    exclusive_start = shards.last().map(|s| s.shard_id.clone());
                    continue;
                }
                Err(e) => return Err(self.map_error(e)),
            };
            let before = shards.len();
            for s in page.shards() {
                if known.insert(s.shard_id().to_owned()) {
                    shards.push(ShardInfo::from(s));
                }
            }
            match page.next_token() {
                // A token seen before, or a full page that added nothing, would loop.
                Some(token) if seen_tokens.insert(token.to_owned()) && shards.len() > before => {
                    next_token = Some(token.to_owned());
                }
                Some(_) => {
                    warn!("ListShards returned a repeating NextToken; stopping the listing there");
                    break;
                }
                None => break,
            }
        }
        debug!(shards = shards.len(), "listed shards");
        let ids: HashSet<String> = shards.iter().map(|s| s.shard_id.clone()).collect();
        *self.last_listing.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(ids));
        Ok(shards)
    }

    fn map_error(&self, e: SdkError<ListShardsError>) -> SchedulerError {
        if let SdkError::ServiceError(s) = &e {
            if matches!(s.err(), ListShardsError::ResourceNotFoundException(_)) {
                return SchedulerError::StreamNotFound {
                    stream: self.stream_name.clone(),
                };
            }
        }
        SchedulerError::Kinesis {
            operation: "ListShards",
            source: BoxError::from(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn list_shards_reads_every_page() {
        let backend = kcl_local::LocalBackend::start().await.expect("backend");
        let kinesis = backend.kinesis_client();
        kcl_local::create_stream(&kinesis, "paged", 7).await.expect("stream");
        // Two shards a page. The embedded backend refuses a page by NextToken alone, so
        // this also exercises the fallback to ExclusiveStartShardId.
        let detector = ShardDetector::new(kinesis, "paged".into(), 2, std::time::Duration::from_secs(30));
        let shards = detector.list_shards().await.expect("listed");
        let ids: Vec<String> = shards.into_iter().map(|s| s.shard_id).collect();
        let expected: Vec<String> = (0..7).map(|i| format!("shardId-{i:012}")).collect();
        assert_eq!(ids, expected);
        let missing = ShardDetector::new(
            backend.kinesis_client(),
            "missing".into(),
            2,
            std::time::Duration::from_secs(30),
        );
        assert!(matches!(
            missing.list_shards().await,
            Err(SchedulerError::StreamNotFound { .. })
        ));
        backend.shutdown().await;
    }
}
