//! Settings from a TOML file, with environment overrides: [`AppConfig`].
//!
//! Every setting of every config struct has a key; durations are human readable
//! (`"10s"`, `"1500ms"`, `"5m"`); unknown keys are errors. Layers, the later winning:
//! the defaults, the file, then environment variables named `SHARDWISE_` + the key path
//! in capitals with `__` between levels (`SHARDWISE_LEASE__FAILOVER_TIME=20s`,
//! `SHARDWISE_APPLICATION__WORKER_ID=host-7`). `examples/shardwise.toml` lists every
//! setting with its default.
//!
//! ```toml
//! [application]
//! application_name = "orders-app"   # names the lease table
//! stream_name = "orders"
//! initial_position = "trim_horizon"
//!
//! [lease]
//! failover_time = "10s"
//! ```
//!
//! Multi-stream mode lists the streams instead of `stream_name` (each a name, an ARN or
//! `account-id:stream-name:creation-epoch`, with its own initial position or the
//! application's):
//!
//! ```toml
//! [application]
//! application_name = "events-app"
//! streams = [
//!     { stream = "orders", initial_position = "trim_horizon" },
//!     { stream = "arn:aws:kinesis:eu-west-1:123456789012:stream/payments" },
//! ]
//!
//! [multi_stream]
//! stream_tracker_interval = "1m"
//! former_streams_leases_deletion = { after_delay = "1h" }   # or "keep"
//! ```

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::Figment;
use kcl_core::{
    CoordinatorConfig, InitialPositionInStream, LeaseManagementConfig, MultiStreamConfig, ProcessorErrorPolicy,
    RetrievalConfig, SchedulerBuilder, StreamConfig,
};
use serde::{Deserialize, Serialize};

use crate::ConfigsBuilder;

/// The prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "SHARDWISE_";

/// Which application reads which stream, and as which worker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ApplicationSettings {
    /// The application's name: the lease table's (the Java KCL's `applicationName`).
    /// Required.
    pub application_name: String,
    /// The stream to read. Required, unless `streams` lists several (multi-stream
    /// mode).
    pub stream_name: String,
    /// Multi-stream mode: the streams to read, with one lease table (leave
    /// `stream_name` empty). Default: none.
    pub streams: Vec<StreamSettings>,
    /// This worker's id in the lease table. Default: unique per process.
    pub worker_id: Option<String>,
    /// Where shards without a checkpoint start. Default `latest`.
    pub initial_position: InitialPositionInStream,
}

/// One stream of a multi-stream application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StreamSettings {
    /// The stream's name, ARN, or `account-id:stream-name:creation-epoch`.
    pub stream: String,
    /// Where its shards without a checkpoint start; default the application's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_position: Option<InitialPositionInStream>,
}

impl StreamSettings {
    /// A stream with the application's initial position.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            initial_position: None,
        }
    }
}

/// Every setting of a worker, as a config file holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AppConfig {
    /// `[application]`.
    pub application: ApplicationSettings,
    /// `[lease]`: [`LeaseManagementConfig`].
    pub lease: LeaseManagementConfig,
    /// `[retrieval]`: [`RetrievalConfig`] (polling).
    pub retrieval: RetrievalConfig,
    /// `[coordinator]`: [`CoordinatorConfig`].
    pub coordinator: CoordinatorConfig,
    /// `[processor_error_policy]`: [`ProcessorErrorPolicy`].
    pub processor_error_policy: ProcessorErrorPolicy,
    /// `[multi_stream]`: [`MultiStreamConfig`] (used when `application.streams` is set).
    pub multi_stream: MultiStreamConfig,
    /// `[fan_out]`: when present, shards are read through enhanced fan-out with these
    /// settings (feature `fan-out`) instead of polling.
    #[cfg(feature = "fan-out")]
    pub fan_out: Option<kcl_efo::FanOutConfig>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file does not exist.
    #[error("config file {path:?} not found")]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// A key has a value that is not allowed, is unknown, or is missing.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key, as `section.setting`.
        key: String,
        /// What is wrong, what is allowed, and where the value came from.
        reason: String,
    },
}

impl From<kcl_core::ConfigError> for ConfigFileError {
    fn from(e: kcl_core::ConfigError) -> Self {
        Self::Invalid {
            key: e.field.to_owned(),
            reason: e.reason,
        }
    }
}

impl AppConfig {
    /// Loads the defaults, then `path` (when given), then the `SHARDWISE_` environment
    /// variables, and validates the result.
    ///
    /// # Errors
    /// [`ConfigFileError::NotFound`] for a missing file; [`ConfigFileError::Invalid`]
    /// naming the key of an unknown setting, a value of the wrong type or format (a
    /// duration that does not parse), a missing application or stream name, or
    /// settings that contradict each other (a renewal interval not shorter than the
    /// failover time).
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigFileError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = path {
            if !path.is_file() {
                return Err(ConfigFileError::NotFound { path: path.to_owned() });
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__"));
        let config: Self = figment.extract().map_err(from_figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no environment overrides) and validates it.
    ///
    /// # Errors
    /// As [`AppConfig::load`].
    pub fn from_toml(text: &str) -> Result<Self, ConfigFileError> {
        let config: Self = Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(from_figment)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the settings that map from a Java KCL MultiLang daemon `.properties` file
    /// (`streamName`, `applicationName`, `workerId`, `initialPositionInStream`,
    /// `failoverTimeMillis`, `maxLeasesForWorker`, `maxLeasesToStealAtOneTime`,
    /// `maxRecords`, `idleTimeBetweenReadsInMillis`, `shardSyncIntervalMillis`,
    /// `parentShardPollIntervalMillis`, `callProcessRecordsEvenForEmptyRecordList`),
    /// so that a migrating team keeps its settings; the rest take their defaults (a
    /// failover time also sets the renewal interval and lease-taking interval derived
    /// from it). Returns the settings and the keys that do not map (for example
    /// `executableName`, `AWSCredentialsProvider`), sorted.
    ///
    /// # Errors
    /// [`ConfigFileError::Invalid`] naming the Java key of a value that does not parse,
    /// or the failed validation.
    pub fn from_java_properties(text: &str) -> Result<(Self, Vec<String>), ConfigFileError> {
        let properties = java_properties::read(text.as_bytes()).map_err(|e| ConfigFileError::Invalid {
            key: format!("line {}", e.line_number().unwrap_or(0)),
            reason: e.to_string(),
        })?;
        let mut config = Self::default();
        let mut ignored = Vec::new();
        let number = |key: &str, value: &str| -> Result<u64, ConfigFileError> {
            value.trim().parse::<u64>().map_err(|_| ConfigFileError::Invalid {
                key: key.to_owned(),
                reason: format!("{value:?} is not a whole number"),
            })
        };
        let millis = |key: &str, value: &str| number(key, value).map(std::time::Duration::from_millis);
        // The failover time first: other lease settings derive from it.
        if let Some(value) = properties.get("failoverTimeMillis") {
            config.lease = LeaseManagementConfig::with_failover_time(millis("failoverTimeMillis", value)?);
        }
        let mut keys: Vec<&String> = properties.keys().collect();
        keys.sort();
        for key in keys {
            let value = properties[key].trim();
            match key.as_str() {
                "failoverTimeMillis" => {}
                "streamName" => config.application.stream_name = value.to_owned(),
                "applicationName" => config.application.application_name = value.to_owned(),
                "workerId" => config.application.worker_id = Some(value.to_owned()),
                "initialPositionInStream" => {
                    config.application.initial_position = match value {
                        "LATEST" => InitialPositionInStream::Latest,
                        "TRIM_HORIZON" => InitialPositionInStream::TrimHorizon,
                        other => {
                            return Err(ConfigFileError::Invalid {
                                key: key.clone(),
                                reason: format!(
                                    "{other:?}: LATEST or TRIM_HORIZON (set AT_TIMESTAMP in the TOML file)"
                                ),
                            })
                        }
                    }
                }
                "maxLeasesForWorker" => {
                    config.lease.max_leases_for_worker = usize::try_from(number(key, value)?).unwrap_or(usize::MAX);
                }
                "maxLeasesToStealAtOneTime" => {
                    config.lease.max_leases_to_steal_at_one_time =
                        usize::try_from(number(key, value)?).unwrap_or(usize::MAX);
                }
                "maxRecords" => {
                    config.retrieval.max_records = i32::try_from(number(key, value)?).unwrap_or(i32::MAX);
                }
                "idleTimeBetweenReadsInMillis" => config.retrieval.idle_time_between_reads = millis(key, value)?,
                "shardSyncIntervalMillis" => config.coordinator.shard_sync_interval = millis(key, value)?,
                "parentShardPollIntervalMillis" => config.coordinator.parent_shard_poll_interval = millis(key, value)?,
                "callProcessRecordsEvenForEmptyRecordList" => {
                    config.coordinator.call_process_records_even_for_empty_list = value.eq_ignore_ascii_case("true");
                }
                _ => ignored.push(key.clone()),
            }
        }
        config.validate()?;
        Ok((config, ignored))
    }

    /// The settings as TOML (every key, defaults included).
    ///
    /// # Errors
    /// Never for the settings this crate defines; the TOML serializer's message
    /// otherwise.
    pub fn to_toml(&self) -> Result<String, ConfigFileError> {
        toml::to_string(self).map_err(|e| ConfigFileError::Invalid {
            key: String::new(),
            reason: e.to_string(),
        })
    }

    /// Checks what the types cannot: required names and settings that must agree.
    ///
    /// # Errors
    /// [`ConfigFileError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigFileError> {
        if self.application.application_name.trim().is_empty() {
            return Err(ConfigFileError::Invalid {
                key: "application.application_name".into(),
                reason: "is required (it names the lease table)".into(),
            });
        }
        let single = !self.application.stream_name.trim().is_empty();
        let multi = !self.application.streams.is_empty();
        if single == multi {
            return Err(ConfigFileError::Invalid {
                key: "application.stream_name".into(),
                reason: if single {
                    "set either stream_name (one stream) or streams (multi-stream mode), not both".into()
                } else {
                    "is required (or list the streams of a multi-stream application in streams)".into()
                },
            });
        }
        self.stream_configs()?;
        if multi {
            self.multi_stream.validate()?;
        }
        self.lease.validate()?;
        self.retrieval.validate()?;
        self.coordinator.validate()?;
        Ok(())
    }

    /// A scheduler builder with every setting applied and clients from `sdk_config`;
    /// add a processor factory and build.
    ///
    /// # Errors
    /// [`ConfigFileError::Invalid`] for fan-out settings that cannot work.
    pub fn scheduler_builder(&self, sdk_config: &aws_config::SdkConfig) -> Result<SchedulerBuilder, ConfigFileError> {
        self.scheduler_builder_with_clients(
            aws_sdk_kinesis::Client::new(sdk_config),
            aws_sdk_dynamodb::Client::new(sdk_config),
        )
    }

    /// The streams of a multi-stream application, as the scheduler takes them
    /// (empty in single-stream mode).
    ///
    /// # Errors
    /// [`ConfigFileError::Invalid`] naming the entry that is not a stream name, ARN or
    /// identifier.
    pub fn stream_configs(&self) -> Result<Vec<StreamConfig>, ConfigFileError> {
        self.application
            .streams
            .iter()
            .enumerate()
            .map(|(i, s)| {
                StreamConfig::new(s.stream.clone())
                    .map(|c| c.initial_position(s.initial_position.unwrap_or(self.application.initial_position)))
                    .map_err(|e| ConfigFileError::Invalid {
                        key: format!("application.streams[{i}].stream"),
                        reason: e.reason,
                    })
            })
            .collect()
    }

    /// As [`AppConfig::scheduler_builder`], with clients built by the caller.
    ///
    /// # Errors
    /// As [`AppConfig::scheduler_builder`].
    pub fn scheduler_builder_with_clients(
        &self,
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
    ) -> Result<SchedulerBuilder, ConfigFileError> {
        let streams = self.stream_configs()?;
        let configs = if streams.is_empty() {
            ConfigsBuilder::with_clients(
                self.application.stream_name.clone(),
                self.application.application_name.clone(),
                kinesis,
                dynamodb,
            )
        } else {
            ConfigsBuilder::for_streams_with_clients(
                streams,
                self.application.application_name.clone(),
                kinesis,
                dynamodb,
            )
        };
        self.apply(configs)
    }

    fn apply(&self, mut configs: ConfigsBuilder) -> Result<SchedulerBuilder, ConfigFileError> {
        if let Some(id) = &self.application.worker_id {
            configs = configs.worker_identifier(id.clone());
        }
        let builder = configs
            .scheduler_builder()
            .initial_position(self.application.initial_position)
            .lease_config(self.lease.clone())
            .retrieval_config(self.retrieval.clone())
            .coordinator_config(self.coordinator.clone())
            .multi_stream_config(self.multi_stream.clone())
            .processor_error_policy(self.processor_error_policy.clone());
        #[cfg(feature = "fan-out")]
        if let Some(fan_out) = &self.fan_out {
            use kcl_efo::SchedulerBuilderExt as _;
            return Ok(builder.retrieval_mode(kcl_efo::RetrievalMode::FanOut(fan_out.clone()))?);
        }
        Ok(builder)
    }
}

/// The first error of a figment extraction, named by its key.
fn from_figment(error: figment::Error) -> ConfigFileError {
    let source = error
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    let mut key = error.path.join(".");
    let reason = match &error.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            if error.path.last() != Some(field) {
                key = if key.is_empty() {
                    field.clone()
                } else {
                    format!("{key}.{field}")
                };
            }
            format!("unknown setting; allowed here: {}", expected.join(", "))
        }
        kind => kind.to_string(),
    };
    ConfigFileError::Invalid {
        key,
        reason: format!("{reason}{source}"),
    }
}
