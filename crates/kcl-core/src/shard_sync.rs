//! Lease creation for the shards a [`ShardDetector`](crate::shard_detector) lists (the
//! Java KCL's `HierarchicalShardSyncer`).
//!
//! New leases start where they lose nothing: a shard with a leased ancestor starts at
//! `TRIM_HORIZON` (its parents are read to their end first); any other shard starts at
//! the configured initial position, and with `LATEST` closed shards get no lease (they
//! have nothing new to read).
//!
//! A shard without a lease is taken for finished when a descendant's lease has
//! started (its checkpoint is past `TRIM_HORIZON` or `AT_TIMESTAMP`, or is `LATEST`):
//! the lease cleanup deletes a finished parent only then. A descendant that has not
//! started proves nothing, since it waits on its ancestors: should a parent's lease
//! never have been created (its creation at the grandparent's end failed, then the
//! child was merged into a shard whose lease the other parent created), the parent
//! gets its lease at the next sync instead of being hidden by its grandchild's.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::info;

use crate::config::InitialPositionInStream;
use crate::error::{ErrorChain, LeaseStoreError, SchedulerError};
use crate::lease::{Lease, LeaseStore};
use crate::retry::{retry, RetryPolicy};
use crate::sequence::{Checkpoint, ExtendedSequenceNumber};
use crate::shard_detector::ShardInfo;
use crate::streams::StreamHandle;

/// The leases to create for shards that have none, per the rules in the module docs.
pub(crate) fn new_leases(
    shards: &[ShardInfo],
    existing: &HashSet<String>,
    unstarted: &HashSet<String>,
    initial: InitialPositionInStream,
) -> Vec<Lease> {
    let by_id: HashMap<&str, &ShardInfo> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let initial_checkpoint = match initial {
        InitialPositionInStream::Latest => ExtendedSequenceNumber::LATEST,
        InitialPositionInStream::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON,
        InitialPositionInStream::AtTimestamp(_) => ExtendedSequenceNumber::AT_TIMESTAMP,
    };
    // The walks (`leased_ancestor`, `started_descendant`, `depth`) are memoized:
    // lineage is a DAG whose paths double with every split-then-merge generation, so
    // an unmemoized walk of k generations within the retention period visits ~2^k
    // paths.
    let mut memo: HashMap<String, bool> = HashMap::new();
    // A shard none of whose descendants has a started lease still needs reading; one
    // with a started descendant was finished (its lease may have been cleaned up since:
    // the cleanup waits for every child to start) and must not be read again. A
    // descendant still at `TRIM_HORIZON` or `AT_TIMESTAMP` proves nothing: it waits on
    // its ancestors, whose leases may never have been created. One at `LATEST` counts
    // as started: it reads none of its ancestors' records, as in the Java KCL.
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in shards {
        for p in &s.parents {
            children.entry(p.as_str()).or_default().push(s.shard_id.as_str());
        }
    }
    let started = |id: &str| existing.contains(id) && !unstarted.contains(id);
    let mut descendant_memo: HashMap<&str, bool> = HashMap::new();
    let mut out = Vec::new();
    for shard in shards {
        if existing.contains(&shard.shard_id)
            || started_descendant(&shard.shard_id, &children, &started, &mut descendant_memo, 0)
        {
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
    // The depth is the longest chain of known ancestors, memoized like the walks above.
    let mut depth_memo: HashMap<&str, usize> = HashMap::new();
    let depths: HashMap<String, usize> = out
        .iter()
        .map(|l| (l.lease_key.clone(), depth(&l.lease_key, &by_id, &mut depth_memo, 0)))
        .collect();
    out.sort_by_cached_key(|l| (depths.get(&l.lease_key).copied().unwrap_or(0), l.lease_key.clone()));
    out
}

/// Whether a shard has an ancestor with a lease (memoized: lineage is a DAG, merges
/// join two).
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

/// Whether a shard has a descendant whose lease has `started` (memoized).
fn started_descendant<'a>(
    id: &'a str,
    children: &HashMap<&'a str, Vec<&'a str>>,
    started: &dyn Fn(&str) -> bool,
    memo: &mut HashMap<&'a str, bool>,
    depth: usize,
) -> bool {
    if let Some(v) = memo.get(id) {
        return *v;
    }
    let v = depth < 10_000
        && children.get(id).is_some_and(|cs| {
            cs.iter()
                .any(|c| started(c) || started_descendant(c, children, started, memo, depth + 1))
        });
    memo.insert(id, v);
    v
}

/// The longest chain of known ancestors of a shard (memoized).
fn depth<'a>(
    id: &'a str,
    by_id: &HashMap<&'a str, &'a ShardInfo>,
    memo: &mut HashMap<&'a str, usize>,
    guard: usize,
) -> usize {
    if let Some(d) = memo.get(id) {
        return *d;
    }
    let d = match by_id.get(id) {
        Some(s) if guard < 10_000 => s
            .parents
            .iter()
            .map(|p| 1 + depth(p, by_id, memo, guard + 1))
            .max()
            .unwrap_or(0),
        _ => 0,
    };
    memo.insert(id, d);
    d
}

/// Logs and counts the corrupt items of a lease-table read, and returns their keys.
pub(crate) fn report_corrupt(corrupt: &[LeaseStoreError]) -> Vec<String> {
    corrupt
        .iter()
        .map(|e| {
            crate::metrics::corrupt_lease();
            tracing::error!(error = %ErrorChain(e), "skipping a lease item that cannot be read; fix or delete it");
            match e {
                LeaseStoreError::CorruptLease { lease_key, .. } => lease_key.clone(),
                _ => String::new(),
            }
        })
        .filter(|k| !k.is_empty())
        .collect()
}

/// Lists the shards of each stream and creates a lease for each shard that has none,
/// from one read of the lease table. Returns, per stream, how many leases were created.
pub(crate) async fn sync_shards(
    streams: &[Arc<StreamHandle>],
    store: &dyn LeaseStore,
) -> Result<Vec<(Arc<StreamHandle>, Result<usize, SchedulerError>)>, SchedulerError> {
    let listing = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
        store.list_readable_leases()
    })
    .await?;
    // A corrupt item still stands for its shard: it is neither recreated nor taken for
    // absent when deciding where its children start.
    let corrupt: HashSet<String> = report_corrupt(&listing.corrupt).into_iter().collect();
    // The shard ids that have a lease, and those whose lease has not started and
    // reads its ancestors first (`TRIM_HORIZON`, `AT_TIMESTAMP`), per `streamName`
    // (one pass over the table).
    let mut by_stream: HashMap<Option<&str>, (HashSet<String>, HashSet<String>)> = HashMap::new();
    for lease in &listing.leases {
        let (existing, unstarted) = by_stream.entry(lease.stream_name.as_deref()).or_default();
        existing.insert(lease.shard().to_owned());
        if matches!(
            lease.checkpoint.checkpoint,
            Checkpoint::TrimHorizon | Checkpoint::AtTimestamp
        ) {
            unstarted.insert(lease.shard().to_owned());
        }
    }
    let mut out = Vec::with_capacity(streams.len());
    for stream in streams {
        let (existing, unstarted) = by_stream.remove(&stream.key.as_deref()).unwrap_or_default();
        let existing: HashSet<String> = existing
            .into_iter()
            .chain(corrupt.iter().map(|key| {
                match &stream.key {
                    Some(prefix) => key
                        .strip_prefix(prefix.as_str())
                        .and_then(|k| k.strip_prefix(':'))
                        .unwrap_or(key)
                        .to_owned(),
                    None => key.clone(),
                }
            }))
            .collect();
        let result = sync_stream(stream, store, &existing, &unstarted).await;
        out.push((stream.clone(), result));
    }
    Ok(out)
}

/// Lists one stream's shards and creates the leases its shards miss (`existing` holds
/// the shard ids that have one, `unstarted` those of them still at `TRIM_HORIZON` or
/// `AT_TIMESTAMP`).
async fn sync_stream(
    stream: &StreamHandle,
    store: &dyn LeaseStore,
    existing: &HashSet<String>,
    unstarted: &HashSet<String>,
) -> Result<usize, SchedulerError> {
    let shards = stream.detector.list_shards().await?;
    let mut created = 0;
    for lease in new_leases(&shards, existing, unstarted, stream.initial_position) {
        let lease = stream.qualify(lease);
        let ok = retry(&RetryPolicy::default(), LeaseStoreError::is_retryable, || {
            store.create_lease_if_not_exists(&lease)
        })
        .await?;
        if ok {
            created += 1;
        }
    }
    if created > 0 {
        info!(
            stream = stream.name(),
            created,
            shards = shards.len(),
            "created leases for new shards"
        );
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `new_leases` for a table whose existing leases have all started.
    fn started_leases(
        shards: &[ShardInfo],
        existing: &HashSet<String>,
        initial: InitialPositionInStream,
    ) -> Vec<Lease> {
        new_leases(shards, existing, &HashSet::new(), initial)
    }

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

    #[test]
    fn first_sync_uses_the_initial_position() {
        let shards = vec![shard("a", &[], false), shard("b", &[], false)];
        let leases = new_leases(
            &shards,
            &HashSet::new(),
            &HashSet::new(),
            InitialPositionInStream::TrimHorizon,
        );
        assert_eq!(
            checkpoints(&leases),
            [("a".into(), "TRIM_HORIZON".into()), ("b".into(), "TRIM_HORIZON".into())]
        );
        assert!(new_leases(
            &shards,
            &["a".to_string(), "b".to_string()].into(),
            &HashSet::new(),
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
        let leases = started_leases(&shards, &existing, InitialPositionInStream::Latest);
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
            assert!(started_leases(&shards, &existing, initial).is_empty(), "{initial:?}");
        }
        // Grandparents too.
        let shards = vec![
            shard("g", &[], true),
            shard("p", &["g"], true),
            shard("c", &["p"], false),
        ];
        let existing: HashSet<String> = ["c".to_string()].into();
        assert!(started_leases(&shards, &existing, InitialPositionInStream::TrimHorizon).is_empty());
    }

    /// Guards issue 21 item 10: a leased descendant proves its ancestors finished only
    /// once it has started. Here b's lease was never created (its creation at a's end
    /// and the shard syncs after failed) and b was then merged with d into e, whose
    /// lease e's other parent created at its end: b still has every record and gets
    /// its lease. Before, e's lease hid b from every later sync.
    #[test]
    fn a_shard_whose_only_leased_descendants_have_not_started_gets_a_lease() {
        let shards = vec![
            shard("a", &[], true),
            shard("b", &["a"], true),
            shard("c", &["a"], false),
            shard("d", &[], true),
            shard("e", &["b", "d"], false),
        ];
        let existing: HashSet<String> = ["a", "c", "d", "e"].map(String::from).into();
        let unstarted: HashSet<String> = ["c", "e"].map(String::from).into();
        for initial in [InitialPositionInStream::TrimHorizon, InitialPositionInStream::Latest] {
            let leases = new_leases(&shards, &existing, &unstarted, initial);
            assert_eq!(
                checkpoints(&leases),
                [("b".into(), "TRIM_HORIZON".into())],
                "{initial:?}"
            );
        }
        // Once e has started, b was read before it: no lease.
        let started = HashSet::from(["c".to_string()]);
        assert!(new_leases(&shards, &existing, &started, InitialPositionInStream::TrimHorizon).is_empty());
    }

    #[test]
    fn ancestors_are_created_before_descendants() {
        let shards = vec![
            shard("z-child", &["a-parent"], false),
            shard("a-parent", &["m-grandparent"], true),
            shard("m-grandparent", &[], true),
        ];
        let leases = new_leases(
            &shards,
            &HashSet::new(),
            &HashSet::new(),
            InitialPositionInStream::TrimHorizon,
        );
        let order: Vec<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        assert_eq!(order, ["m-grandparent", "a-parent", "z-child"]);
    }

    /// Guards hardening item 4: lineage walks are linear. 40 generations of
    /// split-then-merge give 2^40 paths from the first shard to the last; the walks must
    /// not follow them one by one (today's sync would never return).
    #[test]
    fn forty_generations_of_splits_and_merges_are_walked_in_linear_time() {
        let mut shards = vec![shard("g0", &[], true)];
        for g in 1..=40 {
            let parent = format!("g{}", g - 1);
            let (a, b) = (format!("a{g}"), format!("b{g}"));
            shards.push(shard(&a, &[&parent], true));
            shards.push(shard(&b, &[&parent], true));
            shards.push(shard(&format!("g{g}"), &[&a, &b], g < 40));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = shards.clone();
        // On a thread with a deadline, so that a regression fails instead of hanging.
        std::thread::spawn(move || {
            let fresh = new_leases(
                &worker,
                &HashSet::new(),
                &HashSet::new(),
                InitialPositionInStream::TrimHorizon,
            );
            // Only the last generation has a lease: every ancestor is finished.
            let leased: HashSet<String> = ["g40".to_string()].into();
            let after = started_leases(&worker, &leased, InitialPositionInStream::TrimHorizon);
            let _ = tx.send((fresh, after));
        });
        let (fresh, after) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("lineage walks of 40 generations finish within seconds");
        assert_eq!(fresh.len(), shards.len());
        assert_eq!(
            fresh.first().map(|l| l.lease_key.as_str()),
            Some("g0"),
            "ancestors first"
        );
        assert_eq!(fresh.last().map(|l| l.lease_key.as_str()), Some("g40"));
        assert!(after.is_empty(), "no lease for a shard with a leased descendant");
    }

    #[test]
    fn latest_skips_closed_shards_and_trim_horizon_keeps_them() {
        let shards = vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
        ];
        let latest = new_leases(
            &shards,
            &HashSet::new(),
            &HashSet::new(),
            InitialPositionInStream::Latest,
        );
        assert_eq!(
            checkpoints(&latest),
            [("c1".into(), "LATEST".into()), ("c2".into(), "LATEST".into())]
        );
        let th = new_leases(
            &shards,
            &HashSet::new(),
            &HashSet::new(),
            InitialPositionInStream::TrimHorizon,
        );
        assert_eq!(th.len(), 3);
        assert!(th.iter().all(|l| l.checkpoint == ExtendedSequenceNumber::TRIM_HORIZON));
    }
}
