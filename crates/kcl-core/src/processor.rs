//! The application's side: the [`RecordProcessor`] trait (the Java KCL's
//! `ShardRecordProcessor`), the inputs of its methods, and the factory that makes one
//! processor per shard.
//!
//! Call order for one shard and one lease period:
//!
//! ```text
//! initialize ─► process_records* ─┬─► shard_ended          (shard read to its end)
//!                                 ├─► shutdown_requested   (graceful shutdown)
//!                                 └─► lease_lost           (lease taken by another worker)
//! ```
//!
//! One of the three last methods is called, once, unless the worker process dies;
//! `shutdown_requested` may be followed by `lease_lost` when the lease is lost while it
//! runs (its checkpoint then fails with `LeaseLost`). The methods of one processor are
//! never called concurrently.

use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;

use crate::checkpoint::Checkpointer;
use crate::error::ProcessorError;
use crate::record::Record;
use crate::sequence::ExtendedSequenceNumber;
use crate::stream::StreamIdentifier;

/// Input of [`RecordProcessor::initialize`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InitializationInput {
    /// The shard this processor reads.
    pub shard_id: String,
    /// The shard's stream (in multi-stream mode with its account and creation time).
    pub stream: StreamIdentifier,
    /// The checkpoint the shard resumes after (or the initial-position sentinel).
    pub extended_sequence_number: ExtendedSequenceNumber,
    /// A checkpoint that was prepared (two-phase) but not committed by the previous
    /// owner; the application decides whether to redo its side effects.
    pub pending_checkpoint: Option<ExtendedSequenceNumber>,
    /// The application state saved with the pending checkpoint.
    pub pending_checkpoint_state: Option<Bytes>,
}

/// Input of [`RecordProcessor::process_records`].
#[derive(Debug)]
#[non_exhaustive]
pub struct ProcessRecordsInput {
    /// The records, in sequence order, none at or before the last one delivered.
    /// Aggregated (KPL) records arrive unpacked, one entry per user record.
    pub records: Vec<Record>,
    /// How far the shard's newest record is ahead of this batch, when Kinesis said.
    pub millis_behind_latest: Option<i64>,
    /// When the batch was fetched (it may have waited in the prefetch queue since).
    pub cache_entry_time: Instant,
    /// Checkpoints this shard. May be cloned and kept for later use.
    pub checkpointer: Checkpointer,
}

/// Input of [`RecordProcessor::lease_lost`]. There is no checkpointer: the lease
/// belongs to another worker now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LeaseLostInput {
    /// The shard.
    pub shard_id: String,
}

/// Input of [`RecordProcessor::shard_ended`].
#[derive(Debug)]
#[non_exhaustive]
pub struct ShardEndedInput {
    /// The shard.
    pub shard_id: String,
    /// Must be used to checkpoint `SHARD_END` ([`Checkpointer::checkpoint`]) before
    /// `shard_ended` returns; otherwise the shard is not finished and is retried.
    pub checkpointer: Checkpointer,
}

/// Input of [`RecordProcessor::shutdown_requested`].
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownRequestedInput {
    /// The shard.
    pub shard_id: String,
    /// The last chance to checkpoint before the lease is released.
    pub checkpointer: Checkpointer,
}

/// Processes the records of one shard. Implement this; the [`Scheduler`](crate::Scheduler)
/// calls it.
///
/// Returning `Err` from [`process_records`](Self::process_records) (or panicking) is
/// handled by the scheduler's [`ProcessorErrorPolicy`](crate::config::ProcessorErrorPolicy):
/// by default the same batch is retried with backoff and, if it keeps failing, the
/// worker stops without skipping anything.
///
/// # Cancel safety
/// The scheduler never drops a method's future half-way on purpose: shutdown and lease
/// loss are acted on between calls. Only when a graceful shutdown exceeds its timeout
/// are the remaining futures dropped.
#[async_trait]
pub trait RecordProcessor: Send + 'static {
    /// Called once before the first batch. May not checkpoint (there is nothing new).
    ///
    /// # Errors
    /// An error is retried like a failing batch.
    async fn initialize(&mut self, input: InitializationInput) -> Result<(), ProcessorError> {
        let _ = input;
        Ok(())
    }

    /// Called with each batch, in order. May checkpoint through `input.checkpointer`,
    /// at any record of this or an earlier batch.
    ///
    /// # Errors
    /// An error (or a panic) makes the scheduler retry the same batch per its
    /// [`ProcessorErrorPolicy`](crate::config::ProcessorErrorPolicy).
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError>;

    /// Called when this worker lost the shard's lease (another worker took it, or it
    /// could not be renewed in time). Checkpointing is no longer possible; the next
    /// owner resumes after the last checkpoint.
    async fn lease_lost(&mut self, input: LeaseLostInput) {
        let _ = input;
    }

    /// Called when every record of the shard was delivered. Must checkpoint `SHARD_END`
    /// (the default implementation does exactly that) so that child shards can start.
    ///
    /// # Errors
    /// An error, or returning without the `SHARD_END` checkpoint, leaves the shard
    /// unfinished: it is retried.
    async fn shard_ended(&mut self, input: ShardEndedInput) -> Result<(), ProcessorError> {
        input.checkpointer.checkpoint().await?;
        Ok(())
    }

    /// Called during a graceful shutdown, before the lease is released. The place to
    /// checkpoint what was processed. The default does nothing (the next owner resumes
    /// after the last checkpoint, re-delivering what came after it).
    ///
    /// # Errors
    /// An error is logged; the lease is released all the same.
    async fn shutdown_requested(&mut self, input: ShutdownRequestedInput) -> Result<(), ProcessorError> {
        let _ = input;
        Ok(())
    }
}

/// Makes a [`RecordProcessor`] for each shard a worker starts consuming (the Java
/// KCL's `ShardRecordProcessorFactory`). Any `Fn(&str) -> P` closure is a factory.
pub trait RecordProcessorFactory: Send + Sync + 'static {
    /// A new processor for `shard_id`.
    fn create_processor(&self, shard_id: &str) -> Box<dyn RecordProcessor>;

    /// A new processor for `shard_id` of `stream` (the Java KCL's
    /// `shardRecordProcessor(StreamIdentifier)`): the scheduler calls this one. The
    /// default calls [`create_processor`](Self::create_processor); override it when
    /// processors differ by stream, or use [`stream_processor_factory`].
    fn create_processor_for_stream(&self, stream: &StreamIdentifier, shard_id: &str) -> Box<dyn RecordProcessor> {
        let _ = stream;
        self.create_processor(shard_id)
    }
}

/// A factory from a closure that learns each shard's stream:
/// `stream_processor_factory(|stream: &StreamIdentifier, shard_id: &str| MyProcessor::new(stream))`.
pub fn stream_processor_factory<F, P>(make: F) -> impl RecordProcessorFactory
where
    F: Fn(&StreamIdentifier, &str) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    StreamProcessorFactory(make)
}

struct StreamProcessorFactory<F>(F);

impl<F, P> RecordProcessorFactory for StreamProcessorFactory<F>
where
    F: Fn(&StreamIdentifier, &str) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    fn create_processor(&self, shard_id: &str) -> Box<dyn RecordProcessor> {
        Box::new((self.0)(&StreamIdentifier::single_stream(""), shard_id))
    }

    fn create_processor_for_stream(&self, stream: &StreamIdentifier, shard_id: &str) -> Box<dyn RecordProcessor> {
        Box::new((self.0)(stream, shard_id))
    }
}

impl<F, P> RecordProcessorFactory for F
where
    F: Fn(&str) -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    fn create_processor(&self, shard_id: &str) -> Box<dyn RecordProcessor> {
        Box::new(self(shard_id))
    }
}

/// Input of [`DeadLetterSink::dead_letter`].
#[derive(Debug)]
#[non_exhaustive]
pub struct DeadLetterInput {
    /// The shard the records come from.
    pub shard_id: String,
    /// The shard's stream.
    pub stream: StreamIdentifier,
    /// The records `process_records` kept failing on (one, under the `Bisect` policy).
    pub records: Vec<Record>,
    /// The last failure, with its whole source chain.
    pub error: String,
}

/// Where records go that the processor cannot process, under
/// [`OnProcessorFailure::Bisect`](crate::OnProcessorFailure::Bisect): a queue, a table,
/// a log of the application's choice. Called from the shard's consumer, between two
/// `process_records` calls.
#[async_trait]
pub trait DeadLetterSink: Send + Sync + std::fmt::Debug + 'static {
    /// Keeps the records somewhere. An error is retried per the processor error
    /// policy's retry settings; one that persists stops the scheduler, so that no
    /// record is lost silently.
    async fn dead_letter(&self, input: DeadLetterInput) -> Result<(), ProcessorError>;
}
