//! The recording processor: what every processor of a test saw ([`Recorder`],
//! [`Delivery`], [`Event`]), awaited event by event rather than polled, and the
//! processors that fill it ([`RecordingProcessor`], [`HangingShutdownProcessor`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::bail;
use async_trait::async_trait;
use bytes::Bytes;
use kcl_core::{
    CheckpointError, Checkpointer, InitializationInput, LeaseLostInput, ProcessRecordsInput, ProcessorError,
    RecordProcessor, SequenceNumber, ShardEndedInput, ShutdownRequestedInput,
};
use tokio::sync::Notify;

/// A record as a processor received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The shard it came from.
    pub shard_id: String,
    /// Its sequence number.
    pub sequence_number: SequenceNumber,
    /// Its sub-sequence number.
    pub sub_sequence_number: u64,
    /// Its payload.
    pub data: Bytes,
    /// [`kcl_core::Record::malformed_aggregate`].
    pub malformed_aggregate: bool,
    /// When it was delivered.
    pub at: Instant,
}

/// Lifecycle calls a processor received. The fields name the shard and what the call
/// carried.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Event {
    /// `initialize`, with the checkpoint it started from and any pending (prepared)
    /// checkpoint with its application state.
    Initialized {
        shard_id: String,
        checkpoint: String,
        pending: Option<(String, Option<Bytes>)>,
    },
    /// `lease_lost`.
    LeaseLost { shard_id: String },
    /// `shard_ended`.
    ShardEnded { shard_id: String },
    /// `shutdown_requested`, with the result of the checkpoint made there (if any).
    ShutdownRequested { shard_id: String },
    /// A `process_records` call, with the number of records (for empty batches).
    Batch { shard_id: String, records: usize },
    /// A processor call that failed on purpose (recorded by test processors).
    Failed { shard_id: String },
}

/// What every processor of a test recorded.
#[derive(Debug, Default)]
pub struct RecorderState {
    /// Every record delivered, in delivery order.
    pub deliveries: Vec<Delivery>,
    /// Lifecycle calls, in order.
    pub events: Vec<Event>,
    /// The same calls with the time they were made.
    pub timeline: Vec<(Instant, Event)>,
    /// The last checkpointer handed to each shard's processor.
    pub checkpointers: BTreeMap<String, Checkpointer>,
    /// Errors returned by checkpoints the processors made.
    pub checkpoint_errors: Vec<String>,
}

impl RecorderState {
    fn push(&mut self, event: Event) {
        self.timeline.push((Instant::now(), event.clone()));
        self.events.push(event);
    }

    /// Deliveries per shard, in delivery order.
    pub fn by_shard(&self) -> BTreeMap<String, Vec<SequenceNumber>> {
        let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
        for d in &self.deliveries {
            map.entry(d.shard_id.clone())
                .or_default()
                .push(d.sequence_number.clone());
        }
        map
    }

    /// How many lifecycle events match.
    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }
}

/// Shared, awaitable record of what the processors saw.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    state: Arc<Mutex<RecorderState>>,
    changed: Arc<Notify>,
}

impl Recorder {
    /// Locks the state.
    pub fn state(&self) -> MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event.
    pub fn note(&self, event: Event) {
        self.update(|s| s.push(event));
    }

    fn update(&self, f: impl FnOnce(&mut RecorderState)) {
        f(&mut self.state());
        self.changed.notify_waiters();
    }

    /// Waits until `pred` holds, woken by every change; fails after `timeout` with
    /// `what` in the message.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&RecorderState) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if pred(&self.state()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let s = self.state();
                bail!(
                    "timed out after {timeout:?} waiting for {what}: {} deliveries, events {:?}",
                    s.deliveries.len(),
                    s.events
                );
            }
        }
    }

    /// Waits until at least `n` records were delivered.
    pub async fn wait_for_records(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        self.wait_until(&format!("{n} records"), timeout, |s| s.deliveries.len() >= n)
            .await
    }
}

/// When a [`RecordingProcessor`] checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointMode {
    /// After every batch, and in `shutdown_requested`.
    EveryBatch,
    /// Only in `shutdown_requested`.
    OnShutdown,
    /// Never (the checkpointer is kept in the recorder for the test to use).
    Never,
}

/// A processor that records everything into a [`Recorder`].
#[derive(Debug)]
pub struct RecordingProcessor {
    shard_id: String,
    recorder: Recorder,
    mode: CheckpointMode,
}

impl RecordingProcessor {
    /// A processor for one shard.
    pub fn new(shard_id: &str, recorder: Recorder, mode: CheckpointMode) -> Self {
        Self {
            shard_id: shard_id.to_owned(),
            recorder,
            mode,
        }
    }

    fn note_checkpoint(&self, result: Result<(), CheckpointError>) {
        if let Err(e) = result {
            self.recorder.update(|s| s.checkpoint_errors.push(e.to_string()));
        }
    }
}

#[async_trait]
impl RecordProcessor for RecordingProcessor {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.recorder.note(Event::Initialized {
            shard_id: input.shard_id.clone(),
            checkpoint: input.extended_sequence_number.to_string(),
            pending: input
                .pending_checkpoint
                .as_ref()
                .map(|p| (p.to_string(), input.pending_checkpoint_state.clone())),
        });
        Ok(())
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        let shard_id = self.shard_id.clone();
        self.recorder.update(|s| {
            s.push(Event::Batch {
                shard_id: shard_id.clone(),
                records: input.records.len(),
            });
            let at = Instant::now();
            s.deliveries.extend(input.records.iter().map(|r| Delivery {
                shard_id: shard_id.clone(),
                sequence_number: r.sequence_number.clone(),
                sub_sequence_number: r.sub_sequence_number,
                data: r.data.clone(),
                malformed_aggregate: r.malformed_aggregate,
                at,
            }));
            s.checkpointers.insert(shard_id.clone(), input.checkpointer.clone());
        });
        if self.mode == CheckpointMode::EveryBatch && !input.records.is_empty() {
            let result = input.checkpointer.checkpoint().await;
            self.note_checkpoint(result);
        }
        Ok(())
    }

    async fn lease_lost(&mut self, input: LeaseLostInput) {
        self.recorder.note(Event::LeaseLost {
            shard_id: input.shard_id,
        });
    }

    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        self.recorder.note(Event::ShardEnded {
            shard_id: input.shard_id.clone(),
        });
        input.checkpointer.checkpoint().await?;
        Ok(())
    }

    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        if self.mode != CheckpointMode::Never {
            let result = input.checkpointer.checkpoint().await;
            self.note_checkpoint(result);
        }
        self.recorder.note(Event::ShutdownRequested {
            shard_id: input.shard_id,
        });
        Ok(())
    }
}

/// A processor whose `shutdown_requested` waits until `release` is cancelled before it
/// goes on as the wrapped one: an application that is slow to let a shard go.
#[derive(Debug)]
pub struct HangingShutdownProcessor<P> {
    inner: P,
    release: tokio_util::sync::CancellationToken,
}

impl<P> HangingShutdownProcessor<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, release: tokio_util::sync::CancellationToken) -> Self {
        Self { inner, release }
    }
}

#[async_trait]
impl<P: RecordProcessor> RecordProcessor for HangingShutdownProcessor<P> {
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        self.inner.initialize(input).await
    }
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.inner.process_records(input).await
    }
    async fn lease_lost(&mut self, input: LeaseLostInput) {
        self.inner.lease_lost(input).await;
    }
    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        self.inner.shard_ended(input).await
    }
    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        self.release.cancelled().await;
        self.inner.shutdown_requested(input).await
    }
}
