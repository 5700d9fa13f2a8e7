//! One emulator per dedicated OS thread, each with its own Tokio runtime.
//!
//! Why not spawn the servers on the caller's runtime? Two reasons. dynoxide does blocking
//! SQLite work on its executor threads, which would stall every other task of a shared
//! runtime; and a plain `#[tokio::test]` runs a current-thread runtime, which only drives
//! the servers while the test itself is awaiting something — a test that blocks, or
//! a benchmark that saturates its runtime, would starve its own backend. With a runtime
//! per emulator, the backend makes progress whatever the caller does.
//!
//! [`ServerThread::spawn`] hands the thread a bound `std` listener (so the port is known,
//! and connections queue in the backlog, before the server runs), lets the emulator
//! build itself inside the new runtime, and waits asynchronously for it to report that
//! it is serving. [`ServerThread::stop`] waits, again asynchronously, for the thread to
//! finish after the shared [`CancellationToken`] was cancelled. [`bind_loopback`] binds
//! that listener, on `127.0.0.1` only.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::LocalError;

/// How long a runtime may take to stop its remaining tasks (connection tasks, the
/// retention reaper, blocking SQLite calls) once its server has returned.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// What an emulator's server future resolves to: `Err` carries a message for the log.
pub(crate) type ServeResult = Result<(), String>;

/// A running emulator on its own thread.
#[derive(Debug)]
pub(crate) struct ServerThread {
    /// `"kinesis"` or `"dynamodb"`, for errors and logs.
    service: &'static str,
    /// The address the listener is bound to (the real port, even if `0` was asked for).
    addr: SocketAddr,
    /// Resolves (or errors, if the thread panicked) once the thread has dropped its
    /// runtime and everything the emulator owned. Awaiting this instead of joining
    /// keeps [`ServerThread::stop`] from blocking the caller's runtime.
    finished: Option<oneshot::Receiver<()>>,
    /// Joined after `finished` fired, when joining no longer blocks for long.
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Starts an emulator on a new thread named `kcl-local-{service}`.
    ///
    /// `listener` must already be bound. `build` runs on the new thread inside the new
    /// runtime's context (so it may `tokio::spawn`, and may block briefly, for example to
    /// open a SQLite file); it returns the server future, which must resolve soon after
    /// the token passed to it is cancelled.
    ///
    /// Returns once the server future is about to run.
    ///
    /// # Errors
    ///
    /// [`LocalError::Runtime`] if the thread or runtime cannot be created, or whatever
    /// `build` returns; [`LocalError::Server`] if the thread dies before reporting.
    pub(crate) async fn spawn<B, F>(
        service: &'static str,
        worker_threads: usize,
        listener: std::net::TcpListener,
        cancel: CancellationToken,
        build: B,
    ) -> Result<Self, LocalError>
    where
        B: FnOnce(tokio::net::TcpListener, CancellationToken) -> Result<F, LocalError> + Send + 'static,
        F: Future<Output = ServeResult> + 'static,
    {
        let addr = listener
            .local_addr()
            .map_err(|source| LocalError::Runtime { service, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LocalError::Runtime { service, source })?;

        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), LocalError>>();
        let (finished_tx, finished_rx) = oneshot::channel::<()>();

        let thread = std::thread::Builder::new()
            .name(format!("kcl-local-{service}"))
            .spawn(move || {
                run_thread(service, worker_threads, listener, cancel, build, ready_tx);
                // Last: everything the emulator owned has been dropped by now.
                let _ = finished_tx.send(());
            })
            .map_err(|source| LocalError::Runtime { service, source })?;

        let mut server = Self {
            service,
            addr,
            finished: Some(finished_rx),
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(server),
            Ok(Err(error)) => {
                server.stop().await;
                Err(error)
            }
            Err(_) => {
                server.stop().await;
                Err(LocalError::server(
                    service,
                    "the emulator thread ended before it started serving",
                ))
            }
        }
    }

    /// The address the emulator listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the thread to finish and joins it. The caller must have cancelled the
    /// token given to [`ServerThread::spawn`]; otherwise this waits until it is.
    ///
    /// Calling it again does nothing.
    pub(crate) async fn stop(&mut self) {
        if let Some(finished) = self.finished.take() {
            // An error means the thread panicked and dropped the sender; join reports it.
            let _ = finished.await;
        }
        if let Some(thread) = self.thread.take() {
            // The thread has sent `finished` as its very last act, so this returns at once.
            if thread.join().is_err() {
                tracing::error!(service = self.service, "emulator thread panicked");
            }
        }
    }
}

/// The body of an emulator thread: build a runtime, build the server in it, report,
/// serve until cancelled, then stop the runtime.
fn run_thread<B, F>(
    service: &'static str,
    worker_threads: usize,
    listener: std::net::TcpListener,
    cancel: CancellationToken,
    build: B,
    ready_tx: oneshot::Sender<Result<(), LocalError>>,
) where
    B: FnOnce(tokio::net::TcpListener, CancellationToken) -> Result<F, LocalError>,
    F: Future<Output = ServeResult>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .thread_name(format!("kcl-local-{service}-worker"))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = ready_tx.send(Err(LocalError::Runtime { service, source }));
            return;
        }
    };

    let server = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
            .map_err(|source| LocalError::Runtime { service, source })
            .and_then(|listener| build(listener, cancel.clone()))
    };
    match server {
        Err(error) => {
            let _ = ready_tx.send(Err(error));
        }
        Ok(server) => {
            if ready_tx.send(Ok(())).is_err() {
                // The caller gave up waiting (its future was dropped): nobody can stop
                // this server any more except through the token, so stop now.
                cancel.cancel();
            }
            match runtime.block_on(server) {
                Ok(()) => tracing::debug!(service, "emulator stopped"),
                Err(message) => tracing::error!(service, %message, "emulator failed"),
            }
        }
    }
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
}

/// Binds a listener on `127.0.0.1:port` (never on another interface).
pub(crate) fn bind_loopback(service: &'static str, port: u16) -> Result<std::net::TcpListener, LocalError> {
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    std::net::TcpListener::bind(addr).map_err(|source| LocalError::Bind { service, addr, source })
}
