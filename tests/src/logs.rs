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
/// `tracing_subscriber::fmt` without ANSI colors. Logging goes there until the guard is
/// dropped.
///
/// The subscriber is the default of the **current thread** only
/// ([`tracing::subscriber::set_default`]): it sees what runs on this thread, and nothing
/// of other threads. Tests using it must therefore run on the default current-thread
/// runtime (`#[tokio::test]`, not `flavor = "multi_thread"`), where tasks spawned with
/// `tokio::spawn` run on the same thread; tasks of other runtimes (`spawn_blocking`,
/// the embedded backend's threads, a `kcl-worker` process) are not captured.
pub fn capture_logs() -> (LogCapture, tracing::subscriber::DefaultGuard) {
    let capture = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(FILTER))
        .with_ansi(false)
        .with_writer(capture.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    (capture, guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn warnings_are_captured_and_awaited() -> anyhow::Result<()> {
        let (logs, _guard) = capture_logs();
        tracing::debug!(target: "elsewhere", "filtered-out-debug");
        tracing::debug!(target: "kcl_core::lease", "library-debug");
        let task = tokio::spawn(async {
            tokio::task::yield_now().await;
            tracing::warn!(shard = "shardId-1", "spawned-warning");
        });
        logs.wait_for("spawned-warning", Duration::from_secs(1)).await?;
        task.await?;
        let text = logs.contents();
        assert!(text.contains("WARN") && text.contains("shard=\"shardId-1\""), "{text}");
        assert!(text.contains("library-debug"), "{text}");
        assert!(!text.contains("filtered-out-debug"), "{text}");
        assert!(!text.contains('\u{1b}'), "no ANSI escapes: {text}");
        assert!(logs.wait_for("never-logged", Duration::from_millis(20)).await.is_err());
        Ok(())
    }
}
