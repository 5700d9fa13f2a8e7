//! Lease-management paths that used to stall a shard with no time limit (issue 23),
//! each reproduced with real worker processes (`kcl-worker`) on the embedded backend.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kcl_core::{LeaseStore as _, RetryPolicy};
use kcl_tests::{
    load, poll_leases, spawn_scheduler, stop_scheduler, worker_deliveries, Event, Recorder, TestEnv, WorkerProcess,
    WorkerSpec,
};

const WORKER: &str = env!("CARGO_BIN_EXE_kcl-worker");
const WAIT: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(100);
const SHARD0: &str = "shardId-000000000000";

/// Two workers hold eight shards 4/4; a third joins and asks for a lease; at the moment
/// the table shows that handoff (`checkpointOwner` set), the old owner and the joining
/// worker are killed with -9. The survivor processes every shard again within twice the
/// failover time and two seconds, the shard under handoff included (it used to wait
/// forever: the handoff moved `leaseOwner` without the counter, and the survivor judged
/// expiry by the owner it had seen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_cut_by_the_death_of_both_sides_is_taken_over_by_the_survivor() -> anyhow::Result<()> {
    // The kills must land before the old owner notices the handoff (within a renewal
    // interval); when one does not, the scenario runs again.
    for attempt in 1..=3 {
        if let Some(took) = cut_a_handoff_by_two_kills().await? {
            eprintln!("every shard processed again {took:?} after the kills (attempt {attempt})");
            return Ok(());
        }
        eprintln!("the old owner noticed the handoff before the kills; again");
    }
    anyhow::bail!("the kills never landed during a handoff")
}

/// One run of the scenario: how long after the kills the survivor had processed
/// every shard again, or `None` when the handoff was no longer untouched at the kills.
async fn cut_a_handoff_by_two_kills() -> anyhow::Result<Option<Duration>> {
    let env = TestEnv::start(8).await?;
    let dir = tempfile::tempdir()?;
    let spec = WorkerSpec::default();
    let store = env.lease_store();
    let mut w1 = WorkerProcess::start(WORKER, &env, dir.path(), "w1", &spec)?;
    let mut w2 = WorkerProcess::start(WORKER, &env, dir.path(), "w2", &spec)?;
    poll_leases(&store, WAIT, POLL, |_| {}, |o| o.len() == 8 && load(o) == [4, 4]).await?;
    // Settled: 4/4 and no handoff between the two under way.
    let deadline = Instant::now() + WAIT;
    loop {
        let leases = store.list_leases().await?;
        let owners = leases
            .iter()
            .map(|l| (l.lease_key.clone(), l.lease_owner.clone()))
            .collect();
        if leases.len() == 8 && load(&owners) == [4, 4] && leases.iter().all(|l| l.checkpoint_owner.is_none()) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "w1 and w2 never settled at 4/4: {leases:?}");
        tokio::time::sleep(POLL).await;
    }

    let mut joining = WorkerProcess::start(WORKER, &env, dir.path(), "w3", &spec)?;
    // The handoff is visible for about a renewal interval (until the old owner notices
    // it and its consumer stops): poll the table closely.
    let deadline = Instant::now() + WAIT;
    let handed = loop {
        let leases = store.list_leases().await?;
        let to_joining = leases
            .iter()
            .find(|l| l.checkpoint_owner.is_some() && l.lease_owner.as_deref() == Some("w3"));
        if let Some(l) = to_joining {
            break l.clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no handoff to the joining worker: {leases:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let old_owner = handed.checkpoint_owner.clone().context("checkpoint owner")?;
    let survivor = if old_owner == "w1" {
        w1.kill9().await?;
        w2
    } else {
        w2.kill9().await?;
        w1
    };
    joining.kill9().await?;
    let killed = Instant::now();
    let after = store.get_lease(&handed.lease_key).await?.context("lease")?;
    if after.lease_counter != handed.lease_counter || after.checkpoint_owner.is_none() {
        return Ok(None);
    }
    eprintln!("killed {old_owner} and w3 during the handoff of {}", handed.lease_key);

    // Records on every shard after the kills; the survivor must deliver them all.
    let written = env.put(400, "after").await?;
    let shards: BTreeSet<String> = written.iter().map(|w| w.shard_id.clone()).collect();
    anyhow::ensure!(shards.len() == 8, "the records cover every shard: {shards:?}");
    let limit = spec.failover * 2 + Duration::from_secs(2);
    loop {
        let delivered = worker_deliveries(&survivor.lines()?);
        let missing: Vec<&String> = written
            .iter()
            .filter(|w| {
                !delivered
                    .get(&w.shard_id)
                    .is_some_and(|s| s.contains(&w.sequence_number))
            })
            .map(|w| &w.shard_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if missing.is_empty() {
            break;
        }
        let elapsed = killed.elapsed();
        anyhow::ensure!(
            elapsed < limit,
            "after {elapsed:?} the survivor has not processed shards {missing:?} (the handoff of {} was cut)",
            handed.lease_key
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(Some(killed.elapsed()))
}

/// Item 7: a handoff asked of a worker whose consumer of the shard failed and is backing
/// off completes at once (there is no consumer to stop), instead of waiting for the
/// backoff to end (up to a minute) or for the receiver's handoff timeout (30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_of_a_backing_off_shard_completes_without_waiting_for_the_backoff() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let recorder = Recorder::default();
    let backoff = RetryPolicy::new(Duration::from_secs(60), Duration::from_secs(60), None);
    let scheduler = env.failing_factory_scheduler(&recorder, backoff).build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    recorder
        .wait_until("the factory failed", WAIT, |s| {
            s.count(|e| matches!(e, Event::Failed { .. })) >= 1
        })
        .await?;
    // Another worker asks for the lease (as its lease taker would).
    let store = env.lease_store();
    let asked = Instant::now();
    let mut asked_for = false;
    for _ in 0..20 {
        let mut lease = store.get_lease(SHARD0).await?.context("lease")?;
        if store.initiate_graceful_lease_handoff(&mut lease, "receiver").await? {
            asked_for = true;
            break;
        }
    }
    anyhow::ensure!(asked_for, "the handoff could not be asked for");
    // The old owner notices at its next renewal (within a renewal interval, 1 s here)
    // and, having no consumer to stop, completes the handoff.
    let limit = Duration::from_secs(4);
    loop {
        let lease = store.get_lease(SHARD0).await?.context("lease")?;
        if lease.checkpoint_owner.is_none() && lease.lease_owner.as_deref() == Some("receiver") {
            break;
        }
        anyhow::ensure!(
            asked.elapsed() < limit,
            "the handoff of a backing-off shard was not completed within {limit:?}: {lease:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    eprintln!("handoff completed {:?} after it was asked for", asked.elapsed());
    stop_scheduler(handle, task, WAIT).await??;
    Ok(())
}
