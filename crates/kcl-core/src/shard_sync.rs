//! Shard discovery and lease creation (the Java KCL's `ShardDetector` and
//! `HierarchicalShardSyncer`).
//!
//! `ListShards` is paged with `NextToken`. Should a page call fail (an expired token, or
//! a backend that cannot page by token), listing continues from the last shard seen
//! with `ExclusiveStartShardId`, which AWS accepts too.
//!
//! New leases start where they lose nothing: a shard with a leased ancestor starts at
//! `TRIM_HORIZON` (its parents are read to their end first); any other shard starts at
//! the configured initial position, and with `LATEST` closed shards get no lease (they
//! have nothing new to read).

use std::collections::{HashMap, HashSet};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::Shard;
use tracing::{debug, info, warn};

use crate::config::InitialPositionInStream;
use crate::error::{BoxError, LeaseStoreError, SchedulerError};
use crate::lease::{HashKeyRange, Lease, LeaseStore};
use crate::retry::{retry, RetryPolicy};
use crate::sequence::ExtendedSequenceNumber;

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
    page_size: i32,
    retry: RetryPolicy,
}

fn list_shards_retryable(e: &SdkError<ListShardsError>) -> bool {
    match e {
        SdkError::ServiceError(s) => matches!(s.err(), ListShardsError::LimitExceededException(_)),
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => true,
        _ => false,
    }
}

impl ShardDetector {
    pub(crate) fn new(kinesis: aws_sdk_kinesis::Client, stream_name: String, page_size: i32) -> Self {
        Self {
            kinesis,
            stream_name,
            page_size,
            retry: RetryPolicy::default(),
        }
    }

    /// Every shard of the stream, all pages.
    pub(crate) async fn list_shards(&self) -> Result<Vec<ShardInfo>, SchedulerError> {
        let mut shards: Vec<ShardInfo> = Vec::new();
        let mut next_token: Option<String> = None;
        let mut exclusive_start: Option<String> = None;
        let mut seen_tokens = HashSet::new();
        loop {
            let page = retry(&self.retry, list_shards_retryable, || {
                let mut req = self.kinesis.list_shards().max_results(self.page_size);
                req = match &next_token {
                    Some(token) => req.next_token(token),
                    None => req
                        .stream_name(&self.stream_name)
                        .set_exclusive_start_shard_id(exclusive_start.clone()),
                };
                req.send()
            })
            .await;
            let page = match page {
                Ok(page) => page,
                Err(e) if next_token.is_some() && !shards.is_empty() => {
                    warn!(error = %e.code().unwrap_or("unknown"), "ListShards page by NextToken failed; continuing from the last shard");
                    next_token = None;
                    exclusive_start = shards.last().map(|s| s.shard_id.clone());
                    continue;
                }
                Err(e) => return Err(self.map_error(e)),
            };
            let before = shards.len();
            for s in page.shards() {
                if !shards.iter().any(|known| known.shard_id == s.shard_id()) {
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

/// The leases to create for shards that have none, per the rules in the module docs.
pub(crate) fn new_leases(
    shards: &[ShardInfo],
    existing: &HashSet<String>,
    initial: InitialPositionInStream,
) -> Vec<Lease> {
    let by_id: HashMap<&str, &ShardInfo> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let initial_checkpoint = match initial {
        InitialPositionInStream::Latest => ExtendedSequenceNumber::LATEST,
        InitialPositionInStream::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON,
        InitialPositionInStream::AtTimestamp(_) => ExtendedSequenceNumber::AT_TIMESTAMP,
    };
    // Memoized "has an ancestor with a lease" walk; lineage is a DAG (merges join two).
    let mut memo: HashMap<String, bool> = HashMap::new();
    fn leased_ancestor(
        id: &str,
        by_id: &HashMap<&str, &ShardInfo>,
        existing: &HashSet<String>,
        memo: &mut HashMap<String, bool>,
        depth: usize,
    ) -> bool {
        if let Some(v) = memo.get(id) {
            return *v;
        }
        let v = depth < 10_000
            && by_id.get(id).is_some_and(|s| {
                s.parents
                    .iter()
                    .any(|p| existing.contains(p) || leased_ancestor(p, by_id, existing, memo, depth + 1))
            });
        memo.insert(id.to_owned(), v);
        v
    }
    // A shard none of whose descendants has a lease still needs reading; one with a
    // leased descendant was finished (its lease may have been cleaned up since) and must
    // not be read again.
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in shards {
        for p in &s.parents {
            children.entry(p.as_str()).or_default().push(s.shard_id.as_str());
        }
    }
    fn leased_descendant(
        id: &str,
        children: &HashMap<&str, Vec<&str>>,
        existing: &HashSet<String>,
        depth: usize,
    ) -> bool {
        depth < 10_000
            && children.get(id).is_some_and(|cs| {
                cs.iter()
                    .any(|c| existing.contains(*c) || leased_descendant(c, children, existing, depth + 1))
            })
    }
    let mut out = Vec::new();
    for shard in shards {
        if existing.contains(&shard.shard_id) || leased_descendant(&shard.shard_id, &children, existing, 0) {
            continue;
        }
        let checkpoint = if leased_ancestor(&shard.shard_id, &by_id, existing, &mut memo, 0) {
            ExtendedSequenceNumber::TRIM_HORIZON
        } else if shard.closed && initial == InitialPositionInStream::Latest {
            continue;
        } else {
            initial_checkpoint.clone()
        };
        let mut lease = Lease::new(shard.shard_id.clone(), checkpoint).with_parents(shard.parents.iter().cloned());
        lease.hash_key_range = shard.hash_key_range.clone();
        out.push(lease);
    }
    // Ancestors first: should a sync stop half-way, no child lease exists whose parent
    // lease was never created (the child would then hide the parent from later syncs).
    let depth = |id: &str| {
        let mut d = 0;
        let mut frontier = vec![id];
        while let Some(next) = frontier.pop() {
            if let Some(s) = by_id.get(next) {
                if !s.parents.is_empty() && d < 10_000 {
                    d += 1;
                    frontier.extend(s.parents.iter().map(String::as_str));
                }
            }
        }
        d
    };
    out.sort_by_cached_key(|l| (depth(&l.lease_key), l.lease_key.clone()));
    out
}

/// Lists the shards and creates a lease for each that has none. Returns how many
/// leases were created.
pub(crate) async fn sync_shards(
    detector: &ShardDetector,
    store: &dyn LeaseStore,
    initial: InitialPositionInStream,
) -> Result<usize, SchedulerError> {
    let shards = detector.list_shards().await?;
    let leases = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
        store.list_leases()
    })
    .await?;
    let existing: HashSet<String> = leases.into_iter().map(|l| l.lease_key).collect();
    let mut created = 0;
    for lease in new_leases(&shards, &existing, initial) {
        let ok = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
            store.create_lease_if_not_exists(&lease)
        })
        .await?;
        if ok {
            created += 1;
        }
    }
    if created > 0 {
        info!(created, shards = shards.len(), "created leases for new shards");
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            hash_key_range: None,
            closed,
        }
    }

    fn checkpoints(leases: &[Lease]) -> Vec<(String, String)> {
        leases
            .iter()
            .map(|l| (l.lease_key.clone(), l.checkpoint.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn list_shards_reads_every_page() {
        let backend = kcl_local::LocalBackend::start().await.expect("backend");
        let kinesis = backend.kinesis_client();
        kcl_local::create_stream(&kinesis, "paged", 7).await.expect("stream");
        // Two shards a page. The embedded backend refuses a page by NextToken alone, so
        // this also exercises the fallback to ExclusiveStartShardId.
        let detector = ShardDetector::new(kinesis, "paged".into(), 2);
        let shards = detector.list_shards().await.expect("listed");
        let ids: Vec<String> = shards.into_iter().map(|s| s.shard_id).collect();
        let expected: Vec<String> = (0..7).map(|i| format!("shardId-{i:012}")).collect();
        assert_eq!(ids, expected);
        let missing = ShardDetector::new(backend.kinesis_client(), "missing".into(), 2);
        assert!(matches!(
            missing.list_shards().await,
            Err(SchedulerError::StreamNotFound { .. })
        ));
        backend.shutdown().await;
    }

    #[test]
    fn first_sync_uses_the_initial_position() {
        let shards = vec![shard("a", &[], false), shard("b", &[], false)];
        let leases = new_leases(&shards, &HashSet::new(), InitialPositionInStream::TrimHorizon);
        assert_eq!(
            checkpoints(&leases),
            [("a".into(), "TRIM_HORIZON".into()), ("b".into(), "TRIM_HORIZON".into())]
        );
        assert!(new_leases(
            &shards,
            &["a".to_string(), "b".to_string()].into(),
            InitialPositionInStream::Latest
        )
        .is_empty());
    }

    #[test]
    fn children_of_leased_shards_start_at_trim_horizon_whatever_the_initial_position() {
        // a was split into c and d; c and e were merged into f.
        let shards = vec![
            shard("a", &[], true),
            shard("c", &["a"], true),
            shard("d", &["a"], false),
            shard("e", &[], true),
            shard("f", &["c", "e"], false),
        ];
        let existing: HashSet<String> = ["a".to_string()].into();
        let leases = new_leases(&shards, &existing, InitialPositionInStream::Latest);
        assert_eq!(
            checkpoints(&leases),
            [
                ("c".into(), "TRIM_HORIZON".into()),
                ("d".into(), "TRIM_HORIZON".into()),
                ("f".into(), "TRIM_HORIZON".into()),
            ],
            "e is closed with no leased ancestor: LATEST gives it no lease"
        );
        let f = leases.iter().find(|l| l.lease_key == "f").expect("f");
        assert_eq!(f.parent_shard_ids.iter().cloned().collect::<Vec<_>>(), ["c", "e"]);
    }

    #[test]
    fn shards_with_a_leased_descendant_are_finished_and_get_no_lease() {
        // p was split into c1 and c2; p's lease was cleaned up after they started.
        let shards = vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
        ];
        let existing: HashSet<String> = ["c1".to_string(), "c2".to_string()].into();
        for initial in [InitialPositionInStream::TrimHorizon, InitialPositionInStream::Latest] {
            assert!(new_leases(&shards, &existing, initial).is_empty(), "{initial:?}");
        }
        // Grandparents too.
        let shards = vec![
            shard("g", &[], true),
            shard("p", &["g"], true),
            shard("c", &["p"], false),
        ];
        let existing: HashSet<String> = ["c".to_string()].into();
        assert!(new_leases(&shards, &existing, InitialPositionInStream::TrimHorizon).is_empty());
    }

    #[test]
    fn ancestors_are_created_before_descendants() {
        let shards = vec![
            shard("z-child", &["a-parent"], false),
            shard("a-parent", &["m-grandparent"], true),
            shard("m-grandparent", &[], true),
        ];
        let leases = new_leases(&shards, &HashSet::new(), InitialPositionInStream::TrimHorizon);
        let order: Vec<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        assert_eq!(order, ["m-grandparent", "a-parent", "z-child"]);
    }

    #[test]
    fn latest_skips_closed_shards_and_trim_horizon_keeps_them() {
        let shards = vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
        ];
        let latest = new_leases(&shards, &HashSet::new(), InitialPositionInStream::Latest);
        assert_eq!(
            checkpoints(&latest),
            [("c1".into(), "LATEST".into()), ("c2".into(), "LATEST".into())]
        );
        let th = new_leases(&shards, &HashSet::new(), InitialPositionInStream::TrimHorizon);
        assert_eq!(th.len(), 3);
        assert!(th.iter().all(|l| l.checkpoint == ExtendedSequenceNumber::TRIM_HORIZON));
    }
}
