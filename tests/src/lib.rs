//! Shared support for the integration tests: a fresh stream and lease table per test
//! on the embedded backend, a producer that remembers what it wrote, a recording
//! processor, and event-driven waiting.
//!
//! Every helper here talks to the real Kinesis and DynamoDB wire protocols through the
//! AWS SDK; nothing is faked in memory. One module per role, their items re-exported
//! here (`kcl_tests::TestEnv`, `kcl_tests::Recorder`, ...):
//!
//! - [`backends`]: each test's world ([`TestEnv`]: a backend, a stream, a lease table)
//!   on the embedded backend or the npm conformance ones ([`Backend`]);
//! - [`producers`]: putting records ([`put_records`], [`TestEnv::put`],
//!   [`spawn_keyed_producer`]) and what was written ([`Written`], [`KeyedWritten`]);
//! - [`recorder`]: the recording processors ([`RecordingProcessor`],
//!   [`HangingShutdownProcessor`]) and what they saw ([`Recorder`], [`Delivery`],
//!   [`Event`]), awaited rather than polled;
//! - [`workers`]: in-process workers: scheduler builders with fast test timings
//!   ([`fast_config`], [`TestEnv::scheduler`], [`TestEnv::trim_horizon_builder`]),
//!   spawning and stopping them ([`spawn_scheduler`], [`stop_scheduler`]);
//! - [`processes`]: workers as `kcl-worker` child processes ([`WorkerProcess`]) and
//!   their logs ([`WorkerLine`]);
//! - [`leases`]: the lease table seen from outside ([`poll_leases`], [`load`],
//!   [`steal_lease`]);
//! - [`streams`]: shards and resharding ([`list_shards`], [`split_shard_in_half`],
//!   [`merge_shards`], [`wait_for_active`]) and [`stream_identifier`];
//! - [`assertions`]: checks on delivered records ([`by_shard`],
//!   [`assert_keyed_order`]);
//! - [`conformance`] starts the npm conformance backends (kinesis-mock, dynalite);
//! - [`faults`]: Kinesis-side faults no emulator produces on its own ([`FaultInjector`]:
//!   throttling, expired iterators, internal failures, crafted responses;
//!   [`HangingHttpClient`]: requests that never complete);
//! - [`faulty_store`]: lease-table faults ([`FaultyLeaseStore`]: partitions, failed
//!   renewals and reads, writes that land but report failure);
//! - [`logs`]: in-memory log capture ([`capture_logs`]).
//! - [`proxy`]: a TCP proxy for network faults (resets mid-response, slowness,
//!   blackouts) through the real client code paths ([`proxy::ChaosProxy`]).
//! - [`verifier`]: the chaos verifier, which checks the design's promises against what a
//!   producer acknowledged and what workers recorded.
//! - [`chaos`]: the chaos runner's seeded schedule (kills, stops, reshards, network
//!   faults); [`recording`]: the event files of a round and how they are read back;
//!   [`sdk_faults`]: faults at a rate in Kinesis and DynamoDB responses
//!   ([`sdk_faults::RandomFaults`]). The runner itself is `src/bin/chaos.rs`.

pub mod assertions;
pub mod backends;
pub mod chaos;
pub mod conformance;
pub mod faults;
pub mod faulty_store;
pub mod leases;
pub mod logs;
pub mod processes;
pub mod producers;
pub mod proxy;
pub mod recorder;
pub mod recording;
pub mod sdk_faults;
pub mod streams;
pub mod verifier;
pub mod workers;

pub use assertions::{assert_keyed_order, by_shard};
pub use backends::{init_tracing, unique, Backend, TestEnv};
pub use faults::{Fault, FaultInjector, HangingHttpClient, StreamMessage};
pub use faulty_store::FaultyLeaseStore;
pub use leases::{load, poll_leases, steal_lease};
pub use logs::{capture_logs, LogCapture};
pub use processes::{read_worker_log, worker_deliveries, WorkerLine, WorkerProcess, WorkerSpec};
pub use producers::{put_records, spawn_keyed_producer, KeyedWritten, Written};
pub use recorder::{
    CheckpointMode, Delivery, Event, HangingShutdownProcessor, Recorder, RecorderState, RecordingProcessor,
};
pub use streams::{list_shards, merge_shards, split_shard_in_half, stream_identifier, wait_for_active};
pub use workers::{fast_config, spawn_scheduler, stop_scheduler};
