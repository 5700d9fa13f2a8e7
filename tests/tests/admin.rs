//! Issue 13: the admin operations (`shardwise::admin`, run by `shardwise-admin`)
//! against the embedded backend with two workers running: `leases`, `workers` and
//! `lag` show the table's truth; `checkpoint reset` is refused on an owned lease and,
//! on a released one, moves where the next owner starts.

use std::collections::BTreeMap;
use std::time::Duration;

use kcl_core::LeaseStore as _;
use kcl_tests::{load, poll_leases, CheckpointMode, Event, Recorder, TestEnv};
use shardwise::admin::{self, AdminError, NewCheckpoint};

const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_workers_and_lag_show_the_truth_and_checkpoints_move_only_when_released() -> anyhow::Result<()> {
    let env = TestEnv::start(4).await?;
    let written = env.put(200, "admin").await?;
    let store = env.lease_store();
    let (a, b) = (Recorder::default(), Recorder::default());
    let start = |worker: &str, recorder: &Recorder| -> anyhow::Result<_> {
        let scheduler = env
            .scheduler(recorder, CheckpointMode::EveryBatch)
            .worker_id(worker)
            .initial_position(kcl_core::InitialPositionInStream::TrimHorizon)
            .build()?;
        Ok((scheduler.shutdown_handle(), tokio::spawn(scheduler.run())))
    };
    let worker_a = start("a", &a)?;
    let worker_b = start("b", &b)?;
    poll_leases(&store, WAIT, POLL, |_| {}, |o| load(o) == [2, 2]).await?;
    // Settled: no handoff under way (balancing moves leases by handoffs).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let leases = store.list_leases().await?;
        let mut owners: BTreeMap<String, usize> = BTreeMap::new();
        for l in &leases {
            *owners.entry(l.lease_owner.clone().unwrap_or_default()).or_default() += 1;
        }
        if leases.iter().all(|l| !l.is_handoff_pending()) && owners.values().all(|n| *n == 2) && owners.len() == 2 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "not settled: {leases:?}");
        tokio::time::sleep(POLL).await;
    }
    // Every record processed, so that the checkpoints stand at the shards' ends.
    let deadline = std::time::Instant::now() + WAIT;
    while a.state().deliveries.len() + b.state().deliveries.len() < written.len() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "records not processed");
        tokio::time::sleep(POLL).await;
    }

    // leases and workers: what the table says.
    let rows = admin::leases(&store).await?;
    let table: BTreeMap<String, Option<String>> = store
        .list_leases()
        .await?
        .into_iter()
        .map(|l| (l.lease_key, l.lease_owner))
        .collect();
    let shown: BTreeMap<String, Option<String>> = rows.iter().map(|r| (r.shard_id.clone(), r.owner.clone())).collect();
    assert_eq!(shown, table);
    assert!(rows.iter().all(|r| r.state == "owned"), "{rows:?}");
    let workers = admin::workers(&store).await?;
    assert_eq!(workers.keys().cloned().collect::<Vec<_>>(), ["a", "b"]);
    for (worker, shards) in &workers {
        let expected: Vec<String> = table
            .iter()
            .filter(|(_, o)| o.as_deref() == Some(worker.as_str()))
            .map(|(s, _)| s.clone())
            .collect();
        assert_eq!(shards, &expected);
    }
    // lag: every shard, read from its checkpoint (the processors checkpoint each batch
    // and are caught up, so nothing is behind by more than the time since the writes).
    let lag = admin::lag(&store, &env.kinesis, Some(&env.stream)).await?;
    assert_eq!(lag.len(), 4);
    for l in &lag {
        assert!(l.millis_behind_latest.is_some_and(|m| m >= 0), "{l:?}");
    }

    // Refused on an owned lease.
    let shard = written[0].shard_id.clone();
    let refused = admin::set_checkpoint(&store, &shard, NewCheckpoint::TrimHorizon, false).await;
    assert!(matches!(refused, Err(AdminError::Owned { .. })), "{refused:?}");

    // Both workers stop: the last one releases its leases (no live worker to hand them
    // to). A reset then moves where the next owner starts.
    worker_b.0.shutdown();
    worker_b.1.await??;
    // a holds all four (b handed its two over) before it stops in turn.
    poll_leases(&store, WAIT, POLL, |_| {}, |o| load(o) == [4]).await?;
    a.wait_until("a runs all four", WAIT, |s| {
        let shards: std::collections::HashSet<&str> = s
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Initialized { shard_id, .. } => Some(shard_id.as_str()),
                _ => None,
            })
            .collect();
        shards.len() == 4
    })
    .await?;
    worker_a.0.shutdown();
    worker_a.1.await??;
    let released = store.get_lease(&shard).await?.map(|l| l.lease_owner);
    assert_eq!(released, Some(None), "released");
    let row = admin::set_checkpoint(&store, &shard, NewCheckpoint::TrimHorizon, false).await?;
    assert_eq!(row.checkpoint, "TRIM_HORIZON");
    let c = Recorder::default();
    let worker_c = start("c", &c)?;
    let first_of_shard = written
        .iter()
        .find(|w| w.shard_id == shard)
        .map(|w| w.sequence_number.clone());
    c.wait_until("c reads the reset shard from its start", WAIT, |s| {
        s.deliveries
            .iter()
            .any(|d| d.shard_id == shard && Some(&d.sequence_number) == first_of_shard.as_ref())
    })
    .await?;
    assert!(c
        .state()
        .events
        .iter()
        .any(|e| matches!(e, Event::Initialized { shard_id, checkpoint, .. } if *shard_id == shard && checkpoint == "TRIM_HORIZON")));
    worker_c.0.shutdown();
    worker_c.1.await??;
    Ok(())
}

/// Guards the review of issue 21 item 5: setting a lease to `LATEST` starts it anew.
/// Before, the lease kept where an earlier consumer had started
/// (`latestStartTimestamp`), so the next owner read from that old moment instead of
/// from now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setting_a_lease_to_latest_forgets_where_it_started_before() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let store = env.lease_store();
    store.create_lease_table_if_not_exists().await?;
    let shard = "shardId-000000000000";
    let created = kcl_core::Lease::new(shard, kcl_core::ExtendedSequenceNumber::LATEST);
    anyhow::ensure!(store.create_lease_if_not_exists(&created).await?, "created");
    let mut lease = store.get_lease(shard).await?.ok_or_else(|| anyhow::anyhow!("lease"))?;
    lease.latest_start_timestamp = Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    anyhow::ensure!(store.update_lease_checkpoint(&mut lease).await?, "start stored");
    assert!(store.get_lease(shard).await?.and_then(|l| l.latest_start()).is_some());
    admin::set_checkpoint(&store, shard, NewCheckpoint::Latest, false).await?;
    let after = store.get_lease(shard).await?.ok_or_else(|| anyhow::anyhow!("lease"))?;
    assert_eq!(after.checkpoint, kcl_core::ExtendedSequenceNumber::LATEST);
    assert_eq!(after.latest_start_timestamp, None, "the old start is gone");
    Ok(())
}

/// Issue 23, item 12: `checkpoint reset --force` on a lease a running worker holds
/// fences that worker: it loses the lease (`lease_lost`), and the next owner (here the
/// same worker, taking the lease again) reads from the forced checkpoint, so the
/// shard's records are delivered again. Before, the owner's next write was refused,
/// its read-back still named it, and it adopted the stored lease and wrote its own
/// checkpoint over the forced one: nothing was re-delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_reset_fences_the_running_owner_and_the_shard_is_read_again() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(20, "force").await?;
    let store = env.lease_store();
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .worker_id("owner")
        .initial_position(kcl_core::InitialPositionInStream::TrimHorizon)
        .build()?;
    let (handle, task) = (scheduler.shutdown_handle(), tokio::spawn(scheduler.run()));
    recorder
        .wait_until("every record processed", WAIT, |s| s.deliveries.len() >= written.len())
        .await?;
    let shard = written[0].shard_id.clone();
    let first = written[0].sequence_number.clone();
    let row = admin::set_checkpoint(&store, &shard, NewCheckpoint::TrimHorizon, true).await?;
    assert_eq!(row.checkpoint, "TRIM_HORIZON");
    recorder
        .wait_until(
            "the owner lost the lease and read the shard again from its start",
            WAIT,
            |s| {
                s.events
                    .iter()
                    .any(|e| matches!(e, Event::LeaseLost { shard_id } if *shard_id == shard))
                    && s.deliveries.iter().filter(|d| d.sequence_number == first).count() >= 2
            },
        )
        .await?;
    handle.shutdown();
    task.await??;
    Ok(())
}
