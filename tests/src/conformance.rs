//! The conformance backends: kinesis-mock (the npm package `kinesis-local`) and dynalite,
//! pinned in `tests/conformance/package.json` and started as child processes on free
//! loopback ports.
//!
//! They are slower than the embedded backend (kinesis-mock does about 1-2k records/s) but
//! closer to AWS: kinesis-mock returns `ChildShards` from `GetRecords` at a shard's end,
//! honours `ShardFilter`, pages `ListShards` and serves enhanced fan-out consumers. Tests
//! that depend on those behaviours start a [`ConformanceBackend`]; everything else uses the
//! embedded one.
//!
//! [`ConformanceBackend::start`] installs the pinned packages with `npm ci` when they
//! are missing (node 20 and npm must be on the PATH); by hand:
//! `npm ci --prefix tests/conformance` (CI does it in `.ci/run`).
//!
//! Loopback only: kinesis-mock 0.6.2 hard-codes its listen address to `0.0.0.0` and has no
//! setting for it, so it is started with a small Node preload (`LOOPBACK_PRELOAD`) that
//! rewrites every `net.Server.listen` in that process to `127.0.0.1`. dynalite has
//! `--host`.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::process::{Child, Command};

/// How long [`ConformanceBackend::start`] waits for each emulator to answer. kinesis-mock
/// is ready in about a second here, but it is a large Scala.js bundle and a loaded CI
/// machine can take many times that.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How many ports each emulator is given before [`ConformanceBackend::start`] gives up.
/// A port found free can be taken by someone else before the child binds it.
const BIND_ATTEMPTS: usize = 5;
/// The pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The bound of one readiness probe: an emulator that accepted the connection but does
/// not answer yet must not hold up the loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`ConformanceBackend::shutdown`] waits after SIGTERM before SIGKILL. Both
/// emulators exit on SIGTERM within about 50 ms when no client holds a connection open;
/// kinesis-mock's graceful shutdown otherwise waits for the SDK's idle keep-alive
/// connections (more than 3 s here), and may never finish once it served a
/// `SubscribeToShard`. Everything is in memory, so a SIGKILL loses nothing.
const TERM_GRACE: Duration = Duration::from_secs(1);
/// How long kinesis-mock keeps a stream `CREATING`, `UPDATING` (split, merge, resize) or
/// `DELETING`, and a consumer `CREATING`/`DELETING` (its default is 500 ms). Short, so that
/// tests are quick; not zero, so that the transitional states are still observable.
const KINESIS_TRANSITION: &str = "200ms";
/// The same for dynalite's tables, in milliseconds (its default is 500).
const DYNAMODB_TRANSITION_MS: &str = "50";
/// kinesis-mock's shard limit per account and region (its default is 50, which a few
/// tests in one emulator would exhaust).
const KINESIS_SHARD_LIMIT: &str = "10000";
/// The region of the SDK configurations; kinesis-mock puts it in the ARNs it returns.
const REGION: &str = "us-east-1";
/// Lines of each log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// A Node preload (`node --require`) that makes every server in the process listen on
/// `127.0.0.1`, whatever address the program asked for. kinesis-mock (fs2 on Node) calls
/// `server.listen(port, cb)` for its wildcard host, and `server.listen(port, host, cb)`
/// otherwise; both forms, and the options-object form, are rewritten.
const LOOPBACK_PRELOAD: &str = r#"'use strict';
// Written by kcl-tests (tests/src/conformance.rs): tests must send traffic to loopback only.
const net = require('node:net');
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === 'object' && args[0] !== null) {
    args[0] = { ...args[0], host: '127.0.0.1' };
  } else if (typeof args[0] === 'number' || (typeof args[0] === 'string' && /^\d+$/.test(args[0]))) {
    if (typeof args[1] === 'string') args[1] = '127.0.0.1';
    else args.splice(1, 0, '127.0.0.1');
  }
  return listen.apply(this, args);
};
"#;

/// kinesis-mock + dynalite started as child processes from `tests/conformance/node_modules`.
///
/// Both listen on `127.0.0.1` only, keep everything in memory, and are killed when this is
/// dropped (or, gracefully, by [`shutdown`](Self::shutdown)). Their stdout and stderr go to
/// files in [`log_dir`](Self::log_dir), which is deleted with the backend unless the thread
/// is panicking: a failed test leaves its emulator logs behind and prints where they are.
#[derive(Debug)]
pub struct ConformanceBackend {
    /// kinesis-mock, on its plain-HTTP port (the AWS SDK talks plain HTTP to it).
    kinesis: Emulator,
    /// dynalite.
    dynamodb: Emulator,
    /// Holds the logs and the loopback preload. An `Option` so that `Drop` can keep the
    /// directory instead of deleting it when a test panics.
    dir: Option<tempfile::TempDir>,
}

/// One running emulator.
#[derive(Debug)]
struct Emulator {
    kind: Kind,
    child: Child,
    /// The port the AWS SDK talks to.
    port: u16,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// Which emulator, and so how it is started and probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kinesis,
    DynamoDb,
}

/// Why one start attempt failed.
enum StartFailure {
    /// The child could not bind its port (someone took it); worth another port.
    PortTaken(anyhow::Error),
    /// Anything else; retrying would not help.
    Fatal(anyhow::Error),
}

/// Installs the pinned packages (`npm ci`) when they are missing, so that `cargo test`
/// works on a fresh checkout with node and npm on the PATH. Test binaries run in
/// parallel: an exclusive lock on a file next to `package.json` makes one install and
/// the others wait for it.
fn ensure_installed(conformance: &Path) -> anyhow::Result<()> {
    let installed = |dir: &Path| {
        let modules = dir.join("node_modules");
        modules.join("kinesis-local").join("main.js").is_file() && modules.join("dynalite").join("cli.js").is_file()
    };
    if installed(conformance) {
        return Ok(());
    }
    let lock_path = conformance.join("node_modules.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if installed(conformance) {
        return Ok(());
    }
    let output = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--prefix"])
        .arg(conformance)
        .output()
        .context("running `npm ci` for the conformance backends (node 20 and npm are needed)")?;
    if !output.status.success() {
        bail!(
            "`npm ci --prefix tests/conformance` failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

impl ConformanceBackend {
    /// Starts both emulators on free loopback ports (concurrently) and waits until
    /// kinesis-mock answers `ListStreams` and dynalite answers `ListTables`, for at most 60
    /// seconds each. Takes about a second here.
    ///
    /// # Errors
    ///
    /// When `tests/conformance/node_modules` is missing (run
    /// `npm ci --prefix tests/conformance`), when `node` cannot be started, when an
    /// emulator exits or does not answer in time (the error quotes the end of its logs and
    /// names the log directory, which is kept), or when no free port could be bound after
    /// several attempts.
    pub async fn start() -> anyhow::Result<Self> {
        let conformance = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
        let dir = conformance.clone();
        tokio::task::spawn_blocking(move || ensure_installed(&dir)).await??;
        Self::start_from(&conformance).await
    }

    /// [`start`](Self::start) with the npm project at `conformance` (the folder holding
    /// `package.json` and `node_modules`).
    async fn start_from(conformance: &Path) -> anyhow::Result<Self> {
        let node_modules = conformance.join("node_modules");
        let kinesis_main = node_modules.join("kinesis-local").join("main.js");
        let dynalite_cli = node_modules.join("dynalite").join("cli.js");
        for entry in [&kinesis_main, &dynalite_cli] {
            if !entry.is_file() {
                bail!(
                    "the conformance backends are not installed: {} is missing; run \
                     `npm ci --prefix tests/conformance` in the workspace root (needs node 20 and npm)",
                    entry.display()
                );
            }
        }

        let dir = tempfile::Builder::new()
            .prefix("kcl-conformance-")
            .tempdir()
            .context("creating the log directory of the conformance backends")?;
        let preload = dir.path().join("loopback.cjs");
        std::fs::write(&preload, LOOPBACK_PRELOAD).with_context(|| format!("writing {}", preload.display()))?;

        let launch = Launch {
            dir: dir.path(),
            preload: &preload,
            kinesis_main: &kinesis_main,
            dynalite_cli: &dynalite_cli,
        };
        let started = tokio::try_join!(launch.start(Kind::Kinesis), launch.start(Kind::DynamoDb));
        match started {
            Ok((kinesis, dynamodb)) => Ok(Self {
                kinesis,
                dynamodb,
                dir: Some(dir),
            }),
            Err(error) => {
                // The error names files in this directory: keep them for the reader.
                let kept = dir.keep();
                Err(error.context(format!(
                    "starting the conformance backends (logs kept in {})",
                    kept.display()
                )))
            }
        }
    }

    /// kinesis-mock's plain-HTTP endpoint, `http://127.0.0.1:<port>`.
    pub fn kinesis_endpoint(&self) -> String {
        endpoint(self.kinesis.port)
    }

    /// dynalite's endpoint, `http://127.0.0.1:<port>`.
    pub fn dynamodb_endpoint(&self) -> String {
        endpoint(self.dynamodb.port)
    }

    /// SDK configuration for kinesis-mock: static fake credentials, `us-east-1`.
    pub fn kinesis_sdk_config(&self) -> aws_types::SdkConfig {
        kcl_local::sdk_config_for_endpoint(&self.kinesis_endpoint(), REGION)
    }

    /// SDK configuration for dynalite: static fake credentials, `us-east-1`.
    pub fn dynamodb_sdk_config(&self) -> aws_types::SdkConfig {
        kcl_local::sdk_config_for_endpoint(&self.dynamodb_endpoint(), REGION)
    }

    /// A Kinesis client for kinesis-mock, with the SDK's standard retries.
    pub fn kinesis_client(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::new(&self.kinesis_sdk_config())
    }

    /// A DynamoDB client for dynalite, with the SDK's standard retries.
    pub fn dynamodb_client(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.dynamodb_sdk_config())
    }

    /// Where the emulators' stdout and stderr go: `kinesis-mock.<attempt>.out` / `.err`
    /// and `dynalite.<attempt>.out` / `.err` (the attempt counts ports tried, usually 1).
    pub fn log_dir(&self) -> &Path {
        self.dir.as_ref().map_or_else(|| Path::new(""), |dir| dir.path())
    }

    /// Stops both emulators: SIGTERM, then SIGKILL for whichever has not exited after a
    /// second, and waits for both to be gone. Never fails: the processes are gone when
    /// this returns.
    ///
    /// Drop the clients first for a quick exit: kinesis-mock does not exit on SIGTERM while
    /// an SDK client keeps an idle connection open (nor, sometimes, after a
    /// `SubscribeToShard`), and then costs the full second before the SIGKILL.
    pub async fn shutdown(mut self) {
        tokio::join!(self.kinesis.stop(), self.dynamodb.stop());
    }
}

impl Drop for ConformanceBackend {
    /// SIGKILLs both emulators (no grace: a drop cannot wait) — they must not outlive the
    /// test. `kill_on_drop` on the children would do the same a moment later; this makes
    /// it explicit and immediate.
    fn drop(&mut self) {
        // Already exited (for example after `shutdown`) is not an error here.
        let _ = self.kinesis.child.start_kill();
        let _ = self.dynamodb.child.start_kill();
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("conformance backend logs kept in {}", dir.keep().display());
            }
        }
    }
}

/// What both emulators' start attempts share.
struct Launch<'a> {
    dir: &'a Path,
    preload: &'a Path,
    kinesis_main: &'a Path,
    dynalite_cli: &'a Path,
}

impl Launch<'_> {
    /// Starts one emulator, with another free port whenever the child reports it could not
    /// bind the one it was given.
    async fn start(&self, kind: Kind) -> anyhow::Result<Emulator> {
        let mut last = None;
        for attempt in 1..=BIND_ATTEMPTS {
            match self.attempt(kind, attempt).await {
                Ok(emulator) => return Ok(emulator),
                Err(StartFailure::Fatal(error)) => return Err(error),
                Err(StartFailure::PortTaken(error)) => last = Some(error),
            }
        }
        let error = last.unwrap_or_else(|| anyhow::anyhow!("no attempt made"));
        Err(error.context(format!(
            "{} could not bind a free loopback port in {BIND_ATTEMPTS} attempts",
            kind.name()
        )))
    }

    /// One start: free ports, spawn, wait until it answers a real request.
    async fn attempt(&self, kind: Kind, attempt: usize) -> Result<Emulator, StartFailure> {
        let name = kind.name();
        // Both of kinesis-mock's ports are reserved at once so that they differ.
        let ports = free_loopback_ports(2)
            .context("finding free loopback ports")
            .map_err(StartFailure::Fatal)?;
        let port = ports[0];
        let stdout = self.dir.join(format!("{name}.{attempt}.out"));
        let stderr = self.dir.join(format!("{name}.{attempt}.err"));
        let log = |path: &Path| {
            std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))
                .map_err(StartFailure::Fatal)
        };
        let (out_file, err_file) = (log(&stdout)?, log(&stderr)?);

        let mut command = Command::new("node");
        command
            .current_dir(self.dir)
            .stdin(Stdio::null())
            .stdout(out_file)
            .stderr(err_file)
            .kill_on_drop(true);
        match kind {
            Kind::Kinesis => {
                let cert = self.kinesis_main.with_file_name("server.json");
                command
                    .arg("--require")
                    .arg(self.preload)
                    .arg(self.kinesis_main)
                    .env("KINESIS_MOCK_PLAIN_PORT", port.to_string())
                    // The TLS port is unused by the tests but always opened.
                    .env("KINESIS_MOCK_TLS_PORT", ports[1].to_string())
                    .env("KINESIS_MOCK_CERT_PATH", cert)
                    .env("SHARD_LIMIT", KINESIS_SHARD_LIMIT)
                    .env("ON_DEMAND_STREAM_COUNT_LIMIT", "1000")
                    .env("AWS_REGION", REGION)
                    // Its README says INFO is the default, but with LOG_LEVEL unset 0.6.2 logs
                    // nothing at all, not even startup or bind errors.
                    .env("LOG_LEVEL", "INFO")
                    .env("ROOT_LOG_LEVEL", "ERROR")
                    .env("SHOULD_PERSIST_DATA", "false")
                    .env("LOAD_DATA_IF_EXISTS", "false")
                    // Settings a developer's shell might carry that would change what a
                    // test sees.
                    .env_remove("INITIALIZE_STREAMS")
                    .env_remove("AWS_ACCOUNT_ID")
                    .env_remove("PERSIST_PATH");
                for variable in [
                    "CREATE_STREAM_DURATION",
                    "DELETE_STREAM_DURATION",
                    "REGISTER_STREAM_CONSUMER_DURATION",
                    "DEREGISTER_STREAM_CONSUMER_DURATION",
                    "START_STREAM_ENCRYPTION_DURATION",
                    "STOP_STREAM_ENCRYPTION_DURATION",
                    "MERGE_SHARDS_DURATION",
                    "SPLIT_SHARD_DURATION",
                    "UPDATE_SHARD_COUNT_DURATION",
                    "UPDATE_STREAM_MODE_DURATION",
                ] {
                    command.env(variable, KINESIS_TRANSITION);
                }
            }
            Kind::DynamoDb => {
                command
                    .arg(self.dynalite_cli)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--createTableMs", DYNAMODB_TRANSITION_MS])
                    .args(["--deleteTableMs", DYNAMODB_TRANSITION_MS])
                    .args(["--updateTableMs", DYNAMODB_TRANSITION_MS]);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: is `node` (version 20) on PATH?"))
            .map_err(StartFailure::Fatal)?;
        let mut emulator = Emulator {
            kind,
            child,
            port,
            stdout,
            stderr,
        };
        match emulator.wait_ready().await {
            Ok(()) => Ok(emulator),
            Err(Unready::Exited(status)) => {
                let error = anyhow::anyhow!("{name} exited before answering ({status}){}", emulator.log_tails());
                let stderr = std::fs::read_to_string(&emulator.stderr).unwrap_or_default();
                if stderr.contains("EADDRINUSE") || stderr.contains("Address already in use") {
                    Err(StartFailure::PortTaken(error))
                } else {
                    Err(StartFailure::Fatal(error))
                }
            }
            Err(Unready::TimedOut(last)) => {
                let _ = emulator.child.start_kill();
                Err(StartFailure::Fatal(anyhow::anyhow!(
                    "{name} did not answer within {START_TIMEOUT:?} on port {port}; last probe: {last}{}",
                    emulator.log_tails()
                )))
            }
        }
    }
}

/// Why an emulator never became ready.
enum Unready {
    /// The child exited.
    Exited(ExitStatus),
    /// It did not answer in time; the last probe's outcome.
    TimedOut(String),
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kinesis => "kinesis-mock",
            Kind::DynamoDb => "dynalite",
        }
    }
}

impl Emulator {
    /// Polls with a real request (`ListStreams` / `ListTables`, no SDK retries, each
    /// bounded) until it succeeds, the child exits, or [`START_TIMEOUT`] passes. A log line
    /// would not do: kinesis-mock logs "Starting Kinesis Plain Mock Service" before it
    /// binds.
    async fn wait_ready(&mut self) -> Result<(), Unready> {
        let deadline = Instant::now() + START_TIMEOUT;
        let config = kcl_local::sdk_config_for_endpoint(&endpoint(self.port), REGION);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Unready::Exited(status));
            }
            let probe = match self.kind {
                Kind::Kinesis => {
                    let config = aws_sdk_kinesis::config::Builder::from(&config)
                        .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
                        .build();
                    let client = aws_sdk_kinesis::Client::from_conf(config);
                    tokio::time::timeout(PROBE_TIMEOUT, client.list_streams().send())
                        .await
                        .map(|answer| {
                            answer
                                .map(drop)
                                .map_err(|e| format!("{}", aws_sdk_kinesis::error::DisplayErrorContext(e)))
                        })
                }
                Kind::DynamoDb => {
                    let config = aws_sdk_dynamodb::config::Builder::from(&config)
                        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
                        .build();
                    let client = aws_sdk_dynamodb::Client::from_conf(config);
                    tokio::time::timeout(PROBE_TIMEOUT, client.list_tables().send())
                        .await
                        .map(|answer| {
                            answer
                                .map(drop)
                                .map_err(|e| format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(e)))
                        })
                }
            };
            let last = match probe {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => error,
                Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
            };
            if Instant::now() >= deadline {
                return Err(Unready::TimedOut(last));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// SIGTERM, [`TERM_GRACE`], then SIGKILL; waits for the exit either way.
    async fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Some(pid) = self.child.id() {
            // `kill` the command: this crate has no signal library, and a failure (the
            // process just exited) is handled by the wait below.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if tokio::time::timeout(TERM_GRACE, self.child.wait()).await.is_err() {
            // SIGKILL, then wait; an error means it is already gone.
            let _ = self.child.kill().await;
        }
    }

    /// The end of both logs, for an error message.
    fn log_tails(&self) -> String {
        let mut text = String::new();
        for path in [&self.stderr, &self.stdout] {
            let content = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = content.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            text.push_str(&format!("\n--- {} (last {} lines)", path.display(), tail.len()));
            for line in tail {
                text.push_str("\n  ");
                text.push_str(line);
            }
        }
        text
    }
}

/// `http://127.0.0.1:<port>`.
fn endpoint(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// `count` distinct ports that were free on `127.0.0.1` a moment ago: bound together (so
/// they differ), read, released. Another process may take one before the child binds it;
/// [`Launch::start`] then tries again.
fn free_loopback_ports(count: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|address| address.port()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_node_modules_says_how_to_install() {
        let empty = tempfile::tempdir().expect("temp dir");
        let error = ConformanceBackend::start_from(empty.path())
            .await
            .expect_err("nothing is installed there");
        let message = format!("{error:#}");
        assert!(
            message.contains("npm ci --prefix tests/conformance"),
            "unhelpful error: {message}"
        );
    }

    #[test]
    fn free_ports_differ() {
        let ports = free_loopback_ports(2).expect("ports");
        assert_ne!(ports[0], ports[1]);
        assert!(ports.iter().all(|&port| port != 0));
    }
}
