//! The embedded Kinesis: ferrokinesis served over HTTP/1.1 and h2c on a loopback listener.
//!
//! ferrokinesis without its `server` feature gives us an axum `Router` and no server, so
//! this module has its own accept loop: one task per connection, hyper-util's `auto`
//! builder (it detects the HTTP/2 preface, so both the SDK's HTTP/1.1 `SubscribeToShard`
//! and h2c clients work), and a graceful shutdown driven by a [`CancellationToken`].
//! The server runs on its own runtime thread (see [`crate::thread`]).
//!
//! With a data directory, ferrokinesis's durable mode keeps the streams and records in a
//! write-ahead log plus snapshots. Beware its cost: every mutation (each `PutRecord`)
//! serializes the whole store to JSON and fsyncs it, so durable mode is for development,
//! not for benchmarks or large backlogs.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use ferrokinesis::store::{DurableStateOptions, StoreOptions, DEFAULT_DURABLE_SNAPSHOT_INTERVAL_SECS};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::LocalError;
use crate::options::LocalOptions;
use crate::thread::{ServeResult, ServerThread};

/// The name used in errors and logs.
pub(crate) const SERVICE: &str = "kinesis";

/// Worker threads of the Kinesis runtime: enough to use both cores of a small machine
/// when a benchmark writes and reads at once.
const WORKER_THREADS: usize = 2;

/// How long open connections may take to finish once shutdown starts. Requests to an
/// in-memory emulator take microseconds; what can still be open is a `SubscribeToShard`
/// stream, which would otherwise hold shutdown for up to five minutes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// How long to pause after a failed `accept` (for example when out of file descriptors)
/// before trying again, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Ferrokinesis's simulated account id, which appears in stream ARNs.
const ACCOUNT_ID: &str = "000000000000";

/// Translates the backend options into ferrokinesis's options.
fn store_options(options: &LocalOptions) -> StoreOptions {
    // Saturate rather than fail: a delay of 584 million years is as good as infinite.
    let delay_ms = u64::try_from(options.stream_delay.as_millis()).unwrap_or(u64::MAX);
    StoreOptions {
        create_stream_ms: delay_ms,
        delete_stream_ms: delay_ms,
        update_stream_ms: delay_ms,
        shard_limit: options.shard_limit,
        durable: options.data_dir.as_deref().map(|dir| DurableStateOptions {
            state_dir: kinesis_state_dir(dir),
            snapshot_interval_secs: DEFAULT_DURABLE_SNAPSHOT_INTERVAL_SECS,
            max_retained_bytes: None,
        }),
        aws_account_id: ACCOUNT_ID.to_owned(),
        aws_region: options.region.clone(),
        ..StoreOptions::default()
    }
}

/// Where the Kinesis state lives inside the data directory.
pub(crate) fn kinesis_state_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("kinesis")
}

/// Binds `127.0.0.1:{options.kinesis_port}` and starts ferrokinesis on its own thread.
///
/// # Errors
///
/// [`LocalError::Bind`] if the port is taken, [`LocalError::DataDir`] if the state folder
/// cannot be created, [`LocalError::Server`] if persisted state cannot be loaded.
pub(crate) async fn start(options: &LocalOptions, cancel: CancellationToken) -> Result<ServerThread, LocalError> {
    let store_options = store_options(options);
    if let Some(durable) = &store_options.durable {
        std::fs::create_dir_all(&durable.state_dir).map_err(|source| LocalError::DataDir {
            path: durable.state_dir.clone(),
            source,
        })?;
    }
    let listener = crate::thread::bind_loopback(SERVICE, options.kinesis_port)?;

    ServerThread::spawn(SERVICE, WORKER_THREADS, listener, cancel, move |listener, cancel| {
        // Inside the runtime: create_app may spawn background tasks, and loads durable
        // state synchronously (which is fine on this thread).
        let (router, store) = ferrokinesis::create_app(store_options);
        // ferrokinesis does not fail on bad durable state; it marks the store unhealthy
        // and rejects every request. Fail the start instead, with its reason.
        store
            .check_ready()
            .map_err(|error| LocalError::server(SERVICE, error))?;
        // The connection handler is built here, where the router's type is known, so
        // this crate needs no direct dependency on axum to name it.
        let connect = move |stream: TcpStream, watcher: Watcher| {
            let service = TowerToHyperService::new(router.clone());
            let connection = AutoBuilder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            watcher.watch(connection)
        };
        Ok(serve(listener, connect, cancel))
    })
    .await
}

/// Accepts connections until `cancel` fires, serving each with `connect` on its own task;
/// then drains them for at most [`DRAIN_TIMEOUT`] and aborts the rest.
async fn serve<C, F, E>(listener: TcpListener, connect: C, cancel: CancellationToken) -> ServeResult
where
    C: Fn(TcpStream, Watcher) -> F,
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        tracing::warn!(service = SERVICE, %error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                // Small requests and responses: don't let Nagle delay them.
                let _ = stream.set_nodelay(true);
                let connection = connect(stream, graceful.watcher());
                connections.spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(service = SERVICE, %error, "connection closed with an error");
                    }
                });
            }
            // Reap finished connection tasks so the set does not grow without bound.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);

    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::debug!(
            service = SERVICE,
            open = connections.len(),
            "connections still open after the drain timeout; aborting them"
        );
    }
    connections.shutdown().await;
    Ok(())
}
