//! [`LocalBackend`]: both emulators, started and stopped together, and SDK clients for them.
//! Its options, [`LocalOptions`], are in `options`, which the emulator modules read too.
//!
//! Starting binds two loopback listeners (Kinesis, then DynamoDB), starts each emulator on
//! its own runtime thread, and returns once both are serving. All of the backend's threads
//! share one [`CancellationToken`]: [`LocalBackend::shutdown`] cancels it and waits for the
//! threads; dropping the backend only cancels it (a `Drop` cannot await), and the threads
//! then finish on their own.

use aws_types::SdkConfig;
use tokio_util::sync::CancellationToken;

use crate::config::sdk_config_for_endpoint;
use crate::error::LocalError;
use crate::options::LocalOptions;
use crate::thread::ServerThread;

/// An embedded Kinesis (ferrokinesis) and DynamoDB (dynoxide) on `127.0.0.1`.
///
/// Each emulator runs on its own thread with its own Tokio runtime, so the backend works
/// under any caller runtime, including the current-thread runtime of `#[tokio::test]`,
/// and whatever the caller blocks on.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let backend = kcl_local::LocalBackend::start().await?;
/// let kinesis = backend.kinesis_client();
/// kcl_local::create_stream(&kinesis, "orders", 2).await?;
/// // ... run a Scheduler against backend.kinesis_sdk_config() and
/// //     backend.dynamodb_sdk_config() ...
/// backend.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct LocalBackend {
    /// The region handed to both emulators and to the SDK configs.
    region: String,
    /// Cancelled by [`LocalBackend::shutdown`] and by `Drop`; every emulator thread
    /// stops when it fires.
    cancel: CancellationToken,
    /// The ferrokinesis thread.
    kinesis: ServerThread,
    /// The dynoxide thread.
    dynamodb: ServerThread,
}

impl LocalBackend {
    /// Starts both emulators with [`LocalOptions::default`]: any free ports, in memory.
    ///
    /// # Errors
    ///
    /// See [`LocalBackend::start_with`].
    pub async fn start() -> Result<Self, LocalError> {
        Self::start_with(LocalOptions::default()).await
    }

    /// Starts both emulators with `options` and returns once both are serving.
    ///
    /// # Errors
    ///
    /// [`LocalError::Bind`] if a port is taken; [`LocalError::DataDir`] if the data
    /// directory is unusable; [`LocalError::Runtime`] or [`LocalError::Server`] if an
    /// emulator cannot start (for example, persisted state that cannot be loaded).
    /// Nothing is left running after an error.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops whatever it had started.
    pub async fn start_with(options: LocalOptions) -> Result<Self, LocalError> {
        let cancel = CancellationToken::new();
        // Until both are up, dropping this (on error or cancellation) stops what started.
        let guard = cancel.clone().drop_guard();

        let mut kinesis = crate::kinesis::start(&options, cancel.clone()).await?;
        let dynamodb = match crate::dynamodb::start(&options, cancel.clone()).await {
            Ok(dynamodb) => dynamodb,
            Err(error) => {
                cancel.cancel();
                kinesis.stop().await;
                return Err(error);
            }
        };
        guard.disarm();

        tracing::info!(
            kinesis = %kinesis.addr(),
            dynamodb = %dynamodb.addr(),
            data_dir = ?options.data_dir,
            "kcl-local backend started"
        );
        Ok(Self {
            region: options.region,
            cancel,
            kinesis,
            dynamodb,
        })
    }

    /// The Kinesis endpoint URL, for example `http://127.0.0.1:40123`.
    pub fn kinesis_endpoint(&self) -> String {
        format!("http://{}", self.kinesis.addr())
    }

    /// The DynamoDB endpoint URL, for example `http://127.0.0.1:40124`.
    pub fn dynamodb_endpoint(&self) -> String {
        format!("http://{}", self.dynamodb.addr())
    }

    /// The region the backend was started with.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// An [`SdkConfig`] for the Kinesis emulator: static test credentials, the region,
    /// and the Kinesis endpoint. See [`sdk_config_for_endpoint`].
    pub fn kinesis_sdk_config(&self) -> SdkConfig {
        sdk_config_for_endpoint(&self.kinesis_endpoint(), &self.region)
    }

    /// An [`SdkConfig`] for the DynamoDB emulator: static test credentials, the region,
    /// and the DynamoDB endpoint. See [`sdk_config_for_endpoint`].
    pub fn dynamodb_sdk_config(&self) -> SdkConfig {
        sdk_config_for_endpoint(&self.dynamodb_endpoint(), &self.region)
    }

    /// A Kinesis client for this backend. Use it inside a Tokio runtime.
    pub fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::new(&self.kinesis_sdk_config())
    }

    /// A DynamoDB client for this backend. Use it inside a Tokio runtime.
    pub fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.dynamodb_sdk_config())
    }

    /// Stops both emulators and waits for their threads to finish.
    ///
    /// Requests in flight get a short grace period (about a second for Kinesis, two for
    /// DynamoDB; an open `SubscribeToShard` stream is cut); after that, requests to the
    /// endpoints fail to connect. With a data directory, the state is on disk and the
    /// SQLite file is closed when this returns, so a new backend may reopen it.
    ///
    /// Does not block the caller's runtime: the threads are awaited, not joined blindly.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future still stops the emulators, but without waiting for them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        self.kinesis.stop().await;
        self.dynamodb.stop().await;
        tracing::info!("kcl-local backend stopped");
    }
}

impl Drop for LocalBackend {
    /// Signals both emulators to stop, without waiting (use [`LocalBackend::shutdown`]
    /// to wait).
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
