//! Issue 21 item 13: a checkpoint that fails for a retryable reason (the lease table
//! throttles or is briefly unreachable) is retried by the checkpointer itself while the
//! lease is provably owned, and a batch is never delivered again only because its
//! checkpoint failed.

use std::collections::HashMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use kcl_core::{Checkpoint, LeaseStore as _, ProcessRecordsInput, ProcessorError, RecordProcessor};
use kcl_tests::{spawn_scheduler, stop_scheduler, FaultyLeaseStore, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

/// Deliveries per record (by sequence number), and checkpoint errors seen.
#[derive(Debug, Default)]
struct Seen {
    deliveries: HashMap<String, usize>,
    checkpoint_errors: usize,
}

/// The README's processor: processes, then `checkpoint()?`.
#[derive(Debug)]
struct CheckpointEveryBatch(Arc<Mutex<Seen>>);

#[async_trait]
impl RecordProcessor for CheckpointEveryBatch {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        {
            let mut seen = self.0.lock().expect("lock");
            for r in &input.records {
                *seen.deliveries.entry(r.sequence_number.to_string()).or_default() += 1;
            }
        }
        if let Err(e) = input.checkpointer.checkpoint().await {
            self.0.lock().expect("lock").checkpoint_errors += 1;
            return Err(e.into());
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_checkpoint_is_retried_and_its_batch_is_not_delivered_again() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(300, "ck").await?;
    let store = FaultyLeaseStore::new(env.lease_store(), Duration::ZERO, 0);
    // The next five checkpoints fail as a timed-out write would (outcome unknown).
    store.land_then_fail_checkpoints.store(5, SeqCst);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let processors = seen.clone();
    let scheduler = env
        .trim_horizon_builder(Arc::new(store.clone()), move |_: &str| {
            CheckpointEveryBatch(processors.clone())
        })
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    let last = written.last().context("written")?;
    let deadline = Instant::now() + WAIT;
    loop {
        // The table is created by the scheduler: until then there is nothing to read.
        let lease = env.lease_store().get_lease(&last.shard_id).await.ok().flatten();
        if lease.is_some_and(|l| l.checkpoint.checkpoint == Checkpoint::Sequence(last.sequence_number.clone())) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the checkpoint never reached the last record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_scheduler(handle, task, WAIT).await??;
    let hit = 5 - store.land_then_fail_checkpoints.load(SeqCst);
    assert!(hit >= 2, "the faults were hit: {hit}");
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(seen.checkpoint_errors, 0, "retried inside the checkpointer");
    assert_eq!(seen.deliveries.len(), written.len(), "every record delivered");
    let twice: Vec<_> = seen.deliveries.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "records delivered more than once: {}", twice.len());
    Ok(())
}

/// Checkpoints every batch and keeps each checkpoint error: whether it is retryable,
/// and its source chain.
#[derive(Debug)]
struct KeepCheckpointErrors {
    errors: Arc<Mutex<Vec<(bool, String)>>>,
    delivered: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl RecordProcessor for KeepCheckpointErrors {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.delivered.fetch_add(input.records.len(), SeqCst);
        if let Err(e) = input.checkpointer.checkpoint().await {
            let chain = format!("{}", kcl_core::error::ErrorChain(&e));
            self.errors.lock().expect("lock").push((e.is_retryable(), chain));
        }
        Ok(())
    }
}

/// Guards the review of issue 21 (finding 4): a checkpoint the lease store refuses for
/// a reason retrying cannot fix (here the lease table was deleted) is not reported as
/// retryable, and names the table. Before, it was `CheckpointError::Dependency`, whose
/// `is_retryable()` told the processor to carry on without checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_into_a_deleted_table_is_not_retryable() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let errors = Arc::new(Mutex::new(Vec::new()));
    let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (e, d) = (errors.clone(), delivered.clone());
    let scheduler = env
        .trim_horizon_builder(Arc::new(env.lease_store()), move |_: &str| KeepCheckpointErrors {
            errors: e.clone(),
            delivered: d.clone(),
        })
        .build()?;
    let (handle, task) = spawn_scheduler(scheduler);
    env.put(10, "before").await?;
    let deadline = Instant::now() + WAIT;
    while delivered.load(SeqCst) < 10 {
        anyhow::ensure!(Instant::now() < deadline, "the first records were never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.dynamodb.delete_table().table_name(&env.table).send().await?;
    env.put(10, "after").await?;
    while errors.lock().expect("lock").is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no checkpoint failed after the table was deleted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The scheduler fails or stops: either way the test is done with it.
    let _ = stop_scheduler(handle, task, WAIT).await;
    let (retryable, chain) = errors.lock().expect("lock")[0].clone();
    assert!(!retryable, "a deleted table is not retryable: {chain}");
    assert!(chain.contains(&env.table), "the error names the table: {chain}");
    Ok(())
}
