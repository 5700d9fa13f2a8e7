//! [`SchedulerBuilderExt`]: applies a [`RetrievalMode`] to `kcl-core`'s scheduler
//! builder, installing either the polling retrieval or a [`FanOutRetrievalFactory`].
//!
//! Apart from `config` so that the configuration stays a leaf: this file depends on the
//! configuration and on the publisher, and neither depends on it.

use kcl_core::{ConfigError, SchedulerBuilder};

use crate::config::RetrievalMode;
use crate::publisher::FanOutRetrievalFactory;

/// Adds [`retrieval_mode`](SchedulerBuilderExt::retrieval_mode) to the scheduler builder.
pub trait SchedulerBuilderExt: Sized {
    /// Reads the shards as `mode` says.
    ///
    /// # Errors
    /// [`ConfigError`] when the fan-out settings cannot work (polling settings are
    /// checked by `build()`).
    fn retrieval_mode(self, mode: RetrievalMode) -> Result<SchedulerBuilder, ConfigError>;
}

impl SchedulerBuilderExt for SchedulerBuilder {
    fn retrieval_mode(self, mode: RetrievalMode) -> Result<SchedulerBuilder, ConfigError> {
        Ok(match mode {
            // Both: the factory replaces a fan-out one set before.
            RetrievalMode::Polling(config) => self
                .retrieval_factory(kcl_core::PollingRetrievalFactory::new(config.clone()))
                .retrieval_config(config),
            RetrievalMode::FanOut(config) => self.retrieval_factory(FanOutRetrievalFactory::new(config)?),
        })
    }
}
