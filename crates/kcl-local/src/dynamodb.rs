//! The embedded DynamoDB: dynoxide (DynamoDB on SQLite) on a loopback listener.
//!
//! dynoxide brings its own server (`dynoxide::server::serve_with_shutdown`); this module
//! opens the database (in memory, or a SQLite file in the data directory), binds the
//! listener and runs both on a dedicated runtime thread (see [`crate::thread`]), because
//! dynoxide does blocking SQLite work on its executor threads.
//!
//! dynoxide's graceful shutdown waits for every request in flight, with no bound; this
//! module bounds it by [`DRAIN_TIMEOUT`], after which the runtime is dropped, which drops
//! the remaining connections and closes SQLite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::LocalError;
use crate::options::LocalOptions;
use crate::thread::ServerThread;

/// The name used in errors and logs.
pub(crate) const SERVICE: &str = "dynamodb";

/// Worker threads of the DynamoDB runtime. dynoxide serializes SQLite access behind one
/// lock, so more threads would only wait; two let a request parse while another holds
/// the lock.
const WORKER_THREADS: usize = 2;

/// How long requests in flight may take to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// The SQLite file inside the data directory.
pub(crate) fn dynamodb_file(data_dir: &Path) -> PathBuf {
    data_dir.join("dynamodb.sqlite")
}

/// Binds `127.0.0.1:{options.dynamodb_port}` and starts dynoxide on its own thread.
///
/// # Errors
///
/// [`LocalError::Bind`] if the port is taken, [`LocalError::DataDir`] if the data
/// directory cannot be created or its path is not UTF-8, [`LocalError::Server`] if the
/// database cannot be opened.
pub(crate) async fn start(options: &LocalOptions, cancel: CancellationToken) -> Result<ServerThread, LocalError> {
    let file = match &options.data_dir {
        None => None,
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| LocalError::DataDir {
                path: dir.clone(),
                source,
            })?;
            let file = dynamodb_file(dir);
            // dynoxide takes the path as `&str`.
            let Some(path) = file.to_str() else {
                return Err(LocalError::DataDir {
                    path: file.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path is not valid UTF-8"),
                });
            };
            Some(path.to_owned())
        }
    };
    let listener = crate::thread::bind_loopback(SERVICE, options.dynamodb_port)?;

    ServerThread::spawn(SERVICE, WORKER_THREADS, listener, cancel, move |listener, cancel| {
        let database = match &file {
            None => dynoxide::Database::memory(),
            Some(path) => dynoxide::Database::new(path),
        }
        .map_err(|error| LocalError::server(SERVICE, error))?;

        Ok(async move {
            let shutdown = cancel.clone();
            let server = dynoxide::server::serve_with_shutdown(listener, database, async move {
                shutdown.cancelled().await;
            });
            tokio::select! {
                result = server => result,
                () = async {
                    cancel.cancelled().await;
                    tokio::time::sleep(DRAIN_TIMEOUT).await;
                } => {
                    tracing::debug!(
                        service = SERVICE,
                        "requests still running after the drain timeout; dropping them"
                    );
                    Ok(())
                }
            }
        })
    })
    .await
}
