//! Issue 13: poison records. Under `OnProcessorFailure::Bisect` a batch that keeps
//! failing is split until the failing records are isolated; they go to the
//! application's dead-letter sink and everything else is processed once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use bytes::Bytes;
use kcl_core::{
    Checkpoint, DeadLetterInput, DeadLetterSink, LeaseStore as _, OnProcessorFailure, ProcessRecordsInput,
    ProcessorError, ProcessorErrorPolicy, RecordProcessor, RetryPolicy, Scheduler, SequenceNumber,
};
use kcl_tests::TestEnv;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Seen {
    /// Records processed (by calls that succeeded), in order.
    processed: Vec<Bytes>,
    /// `process_records` calls, failed ones included.
    calls: usize,
    dead_letters: Vec<(String, Vec<Bytes>, String)>,
}

/// Processes a batch as a whole: a batch holding the poison record fails before
/// anything of it is processed; otherwise every record is processed and checkpointed.
#[derive(Debug)]
struct AllOrNothing {
    poison: Bytes,
    seen: Arc<Mutex<Seen>>,
}

#[async_trait]
impl RecordProcessor for AllOrNothing {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.seen.lock().expect("lock").calls += 1;
        if input.records.iter().any(|r| r.data == self.poison) {
            return Err("cannot parse this record".into());
        }
        input.checkpointer.checkpoint().await?;
        let mut seen = self.seen.lock().expect("lock");
        seen.processed.extend(input.records.iter().map(|r| r.data.clone()));
        Ok(())
    }
}

#[derive(Debug)]
struct Collect(Arc<Mutex<Seen>>);

#[async_trait]
impl DeadLetterSink for Collect {
    async fn dead_letter(&self, input: DeadLetterInput) -> Result<(), ProcessorError> {
        let records = input.records.iter().map(|r| r.data.clone()).collect();
        self.0
            .lock()
            .expect("lock")
            .dead_letters
            .push((input.shard_id, records, input.error));
        Ok(())
    }
}

fn bisect_policy() -> ProcessorErrorPolicy {
    ProcessorErrorPolicy {
        retry: RetryPolicy::new(Duration::from_millis(1), Duration::from_millis(1), Some(2)),
        on_exhausted: OnProcessorFailure::Bisect,
    }
}

/// A scheduler from `TRIM_HORIZON` under the bisect policy, its processors failing on
/// `poison` and its sink collecting into `seen`.
fn bisecting_scheduler(env: &TestEnv, poison: &Bytes, seen: &Arc<Mutex<Seen>>) -> anyhow::Result<Scheduler> {
    let (seen, poison) = (seen.clone(), poison.clone());
    let sink = Collect(seen.clone());
    Ok(env
        .trim_horizon_builder(Arc::new(env.lease_store()), move |_: &str| AllOrNothing {
            poison: poison.clone(),
            seen: seen.clone(),
        })
        .processor_error_policy(bisect_policy())
        .dead_letter_sink(sink)
        .build()?)
}

/// One failing record among 1,000 in one batch: it reaches the sink, the other 999 are
/// processed once, in order, and the checkpoint moves to the batch's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_isolated_and_dead_lettered_and_the_rest_processed_once() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(1000, "p").await?;
    let poison = written[500].data.clone();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let scheduler = bisecting_scheduler(&env, &poison, &seen)?;
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    // Another process's view of a processor: there is no event to await but the state.
    let deadline = Instant::now() + WAIT;
    while seen.lock().expect("lock").processed.len() < 999 {
        anyhow::ensure!(Instant::now() < deadline, "not all records were processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.shutdown();
    running.await??;

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    let expected: Vec<Bytes> = written
        .iter()
        .map(|w| w.data.clone())
        .filter(|d| *d != poison)
        .collect();
    assert_eq!(seen.processed, expected, "the other 999 once each, in order");
    assert_eq!(seen.dead_letters.len(), 1);
    let (shard, records, error) = &seen.dead_letters[0];
    assert_eq!(shard, &written[500].shard_id);
    assert_eq!(records, &vec![poison.clone()]);
    assert!(error.contains("cannot parse this record"), "{error}");
    // 2 attempts of the batch, then about 2 log2(1000) halves, and 2 attempts of the
    // poison record alone: far fewer calls than records.
    assert!(seen.calls < 60, "{} calls", seen.calls);
    let lease = env
        .lease_store()
        .get_lease(&written[999].shard_id)
        .await?
        .context("lease")?;
    assert_eq!(
        lease.checkpoint.checkpoint,
        Checkpoint::Sequence(written[999].sequence_number.clone()),
        "the checkpoint moved past the batch"
    );
    Ok(())
}

/// `Bisect` without a sink is refused when the scheduler is built, naming the setting.
#[tokio::test]
async fn bisect_without_a_dead_letter_sink_is_a_configuration_error() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let error = Scheduler::builder(env.stream.clone())
        .kinesis_client(env.kinesis.clone())
        .lease_store(env.lease_store())
        .processor_error_policy(bisect_policy())
        .processor_factory(|_: &str| AllOrNothing {
            poison: Bytes::new(),
            seen: Arc::default(),
        })
        .build()
        .err()
        .context("refused")?;
    assert!(error.to_string().contains("on_exhausted"), "{error}");
    Ok(())
}

/// A batch of one poison record goes to the sink after its retries, without being
/// retried again alone, and `process_records` is never called with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_poison_record_is_retried_once_per_policy_then_dead_lettered() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(1, "lone").await?;
    let poison = written[0].data.clone();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let scheduler = bisecting_scheduler(&env, &poison, &seen)?;
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    let deadline = Instant::now() + WAIT;
    while seen.lock().expect("lock").dead_letters.is_empty() {
        anyhow::ensure!(Instant::now() < deadline, "not dead-lettered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.shutdown();
    running.await??;
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(seen.dead_letters.len(), 1);
    assert_eq!(seen.dead_letters[0].1, vec![poison]);
    assert_eq!(seen.calls, 2, "the policy's two attempts, no more");
    assert!(seen.processed.is_empty());
    Ok(())
}

/// How a test's dead-letter sink behaves.
#[derive(Debug, Clone)]
enum SinkMode {
    /// Every call fails: the scheduler stops after the retries.
    Fails,
    /// The call never returns: the worker "crashes" (its run future is dropped) there.
    Hangs(Arc<tokio::sync::Notify>),
}

#[derive(Debug)]
struct BadSink(SinkMode);

#[async_trait]
impl DeadLetterSink for BadSink {
    async fn dead_letter(&self, _input: DeadLetterInput) -> Result<(), ProcessorError> {
        match &self.0 {
            SinkMode::Fails => Err("dead-letter queue unavailable".into()),
            SinkMode::Hangs(entered) => {
                entered.notify_one();
                std::future::pending().await
            }
        }
    }
}

/// After each successful call: the last record of the call and the checkpoint the lease
/// store then held.
type Steps = Arc<Mutex<Vec<(SequenceNumber, Checkpoint)>>>;

/// As [`AllOrNothing`], and after each checkpoint it reads the stored lease.
#[derive(Debug)]
struct Recording {
    poison: Bytes,
    store: Arc<dyn kcl_core::LeaseStore>,
    steps: Steps,
}

#[async_trait]
impl RecordProcessor for Recording {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        if input.records.iter().any(|r| r.data == self.poison) {
            return Err("cannot parse this record".into());
        }
        input.checkpointer.checkpoint().await?;
        let last = input.records.last().context("a non-empty call")?;
        let stored = self
            .store
            .get_lease(input.checkpointer.shard_id())
            .await?
            .context("lease")?;
        self.steps
            .lock()
            .expect("lock")
            .push((last.sequence_number.clone(), stored.checkpoint.checkpoint));
        Ok(())
    }
}

fn recording_scheduler(env: &TestEnv, poison: &Bytes, steps: &Steps, sink: SinkMode) -> anyhow::Result<Scheduler> {
    let (steps, poison) = (steps.clone(), poison.clone());
    let store: Arc<dyn kcl_core::LeaseStore> = Arc::new(env.lease_store());
    Ok(env
        .trim_horizon_builder(Arc::new(env.lease_store()), move |_: &str| Recording {
            poison: poison.clone(),
            store: store.clone(),
            steps: steps.clone(),
        })
        .processor_error_policy(bisect_policy())
        .dead_letter_sink(BadSink(sink))
        .build()?)
}

/// The checkpoint stored in `shard`'s lease.
async fn stored_checkpoint(env: &TestEnv, shard: &str) -> anyhow::Result<Checkpoint> {
    Ok(env
        .lease_store()
        .get_lease(shard)
        .await?
        .context("lease")?
        .checkpoint
        .checkpoint)
}

/// Every successful call's checkpoint is the end of that call's records, never the end
/// of the batch being bisected.
fn assert_each_step_checkpointed_its_own_records(steps: &Steps) {
    let steps = steps.lock().expect("lock");
    assert!(!steps.is_empty(), "some halves were processed");
    for (last, stored) in steps.iter() {
        assert_eq!(
            stored,
            &Checkpoint::Sequence(last.clone()),
            "a checkpoint inside a half covers that half only"
        );
    }
}

/// A sink that keeps failing stops the scheduler; the checkpoint is then before the
/// poison record, so the next owner processes (or dead-letters) it and all after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_leaves_the_checkpoint_before_the_poison_record() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(100, "f").await?;
    let poison = written[50].data.clone();
    let steps = Steps::default();
    let scheduler = recording_scheduler(&env, &poison, &steps, SinkMode::Fails)?;
    let result = tokio::time::timeout(WAIT, scheduler.run()).await?;
    assert!(result.is_err(), "a sink that keeps failing stops the scheduler");
    assert_each_step_checkpointed_its_own_records(&steps);
    assert_eq!(
        stored_checkpoint(&env, &written[0].shard_id).await?,
        Checkpoint::Sequence(written[49].sequence_number.clone()),
        "stored checkpoint: at the last record before the poison one"
    );
    Ok(())
}

/// A worker that crashes while the poison record is on its way to the sink leaves the
/// checkpoint before it; the next worker hands it to its sink and processes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_bisect_loses_no_record() -> anyhow::Result<()> {
    let env = TestEnv::start(1).await?;
    let written = env.put(100, "c").await?;
    let poison = written[50].data.clone();
    let steps = Steps::default();
    let entered = Arc::new(tokio::sync::Notify::new());
    let scheduler = recording_scheduler(&env, &poison, &steps, SinkMode::Hangs(entered.clone()))?;
    let running = tokio::spawn(scheduler.run());
    tokio::time::timeout(WAIT, entered.notified()).await?;
    running.abort();
    let _ = running.await;
    assert_each_step_checkpointed_its_own_records(&steps);
    assert_eq!(
        stored_checkpoint(&env, &written[0].shard_id).await?,
        Checkpoint::Sequence(written[49].sequence_number.clone()),
        "stored checkpoint after the crash: before the poison record"
    );

    // The next worker: the poison record reaches its sink, the rest after it is processed.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let scheduler = bisecting_scheduler(&env, &poison, &seen)?;
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    let deadline = Instant::now() + WAIT;
    while seen.lock().expect("lock").processed.len() < 49 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the records after the poison one were not processed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.shutdown();
    running.await??;
    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert_eq!(
        seen.dead_letters.len(),
        1,
        "the poison record reached the next worker's sink"
    );
    assert_eq!(seen.dead_letters[0].1, vec![poison]);
    let after: Vec<Bytes> = written[51..].iter().map(|w| w.data.clone()).collect();
    assert_eq!(
        seen.processed, after,
        "everything after the poison record, once, in order"
    );
    Ok(())
}
