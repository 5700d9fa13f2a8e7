//! Log capture: [`capture_logs`] records what the library logs into memory, so a test
//! can assert that a failure was reported (and await it).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::bail;
use tokio::sync::Notify;

/// The `EnvFilter` directives of [`capture_logs`].
const FILTER: &str = "warn,kcl_core=debug,kcl_dynamo=debug";

/// Logs captured by [`capture_logs`]; clones share the buffer.
#[derive(Clone, Debug, Default)]
pub struct LogCapture {
    buffer: Arc<Mutex<Vec<u8>>>,
    changed: Arc<Notify>,
}

impl LogCapture {
    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything captured so far (formatted lines, without colors).
    pub fn contents(&self) -> String {
        String::from_utf8_lossy(&self.buffer()).into_owned()
    }

    /// Waits until the captured logs contain `needle`, woken by every write; fails after
    /// `timeout` with what was captured.
    pub async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.contents().contains(needle) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {needle:?} in the logs:\n{}",
                    self.contents()
                );
            }
        }
    }
}

impl io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer().extend_from_slice(buf);
        self.changed.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = Self;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Captures logs into memory: `kcl_core` and `kcl_dynamo` at DEBUG and above (they log
/// nothing at TRACE), everything else at WARN and above, formatted by
/// `tracing_subscriber::fmt` without ANSI colors.
///
/// The subscriber is installed as the process-wide default on the first call (every
/// thread and runtime is captured, `multi_thread` tests included), and every call
/// returns the same shared capture. A test binary that uses it must use it for all its
/// logging: put such tests in their own file under `tests/`, where nothing installed
/// another global subscriber first ([`init_tracing`](crate::init_tracing) only tries,
/// and then leaves this one in place). A thread-local subscriber is not used on
/// purpose: spans that cross threads (the SDK's, the embedded backend's) would be closed
/// in a registry that never opened them.
///
/// # Panics
/// When another global subscriber was installed before the first call.
pub fn capture_logs() -> LogCapture {
    static CAPTURE: std::sync::OnceLock<LogCapture> = std::sync::OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = LogCapture::default();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(FILTER))
                .with_ansi(false)
                .with_writer(capture.clone())
                .finish();
            if tracing::subscriber::set_global_default(subscriber).is_err() {
                panic!("capture_logs must be the first to install a global subscriber in this test binary");
            }
            capture
        })
        .clone()
}
