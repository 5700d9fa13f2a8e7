//! # kcl-efo: enhanced fan-out for the Kinesis Client Library (not implemented yet)
//!
//! This crate will hold the enhanced fan-out retrieval: registering the stream consumer
//! (idempotent, waiting for `ACTIVE`) and a `SubscribeToShard` publisher with
//! resubscription, selected through configuration instead of polling. Until then, use
//! the polling retrieval of `kcl-core`, which is the default.
//!
//! It has no modules yet.
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms, unreachable_pub)]
