//! Workers as child processes: starting, killing and stopping `kcl-worker`
//! ([`WorkerProcess`], [`WorkerSpec`]) and reading back its log ([`WorkerLine`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context as _};
use kcl_core::SequenceNumber;

use crate::backends::TestEnv;

/// A line of a `kcl-worker` log file (see that binary's docs). The fields name what
/// the line carries.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum WorkerLine {
    /// `I`: initialized at a checkpoint.
    Initialized { shard_id: String, checkpoint: String },
    /// `D`: a delivered record.
    Delivered {
        shard_id: String,
        sequence_number: SequenceNumber,
        payload: String,
    },
    /// `C`: a stored checkpoint.
    Checkpointed { shard_id: String, position: String },
    /// `L`: lease lost.
    LeaseLost { shard_id: String },
    /// `E`: shard ended.
    ShardEnded { shard_id: String },
    /// `S`: shutdown requested.
    ShutdownRequested { shard_id: String },
    /// `X`: the scheduler returned.
    Exited { ok: bool },
}

/// Reads a worker log; a missing file is an empty log.
pub fn read_worker_log(path: &std::path::Path) -> anyhow::Result<Vec<WorkerLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    // The last line may be cut short by a kill -9 mid-write: only complete lines count.
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let f: Vec<&str> = line.trim_end().split(' ').collect();
        let shard = || f.get(1).map(|s| s.to_string()).unwrap_or_default();
        out.push(match f.first().copied() {
            Some("I") => WorkerLine::Initialized {
                shard_id: shard(),
                checkpoint: f.get(2).unwrap_or(&"").to_string(),
            },
            Some("D") => WorkerLine::Delivered {
                shard_id: shard(),
                sequence_number: SequenceNumber::parse(f.get(2).unwrap_or(&""))?,
                payload: f.get(4).unwrap_or(&"").to_string(),
            },
            Some("C") => WorkerLine::Checkpointed {
                shard_id: shard(),
                position: f.get(2).unwrap_or(&"").to_string(),
            },
            Some("L") => WorkerLine::LeaseLost { shard_id: shard() },
            Some("E") => WorkerLine::ShardEnded { shard_id: shard() },
            Some("S") => WorkerLine::ShutdownRequested { shard_id: shard() },
            Some("X") => WorkerLine::Exited {
                ok: f.get(1) == Some(&"ok"),
            },
            _ => bail!("unexpected worker log line {line:?}"),
        });
    }
    Ok(out)
}

/// Delivered sequence numbers per shard, in log order.
pub fn worker_deliveries(lines: &[WorkerLine]) -> BTreeMap<String, Vec<SequenceNumber>> {
    let mut map: BTreeMap<String, Vec<SequenceNumber>> = BTreeMap::new();
    for line in lines {
        if let WorkerLine::Delivered {
            shard_id,
            sequence_number,
            ..
        } = line
        {
            map.entry(shard_id.clone()).or_default().push(sequence_number.clone());
        }
    }
    map
}

/// A `kcl-worker` child process, killed when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    /// The worker id.
    pub worker_id: String,
    /// Its log file.
    pub log: std::path::PathBuf,
    child: tokio::process::Child,
}

/// Settings of a `kcl-worker` process.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// Failover time.
    pub failover: Duration,
    /// Lease-taking interval.
    pub taking_interval: Duration,
    /// GetRecords limit.
    pub max_records: i32,
    /// `Some(consumer name)`: read through enhanced fan-out with that stream consumer
    /// (`--retrieval fan-out --consumer-name NAME`); `None`: polling.
    pub fan_out_consumer: Option<String>,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        Self {
            failover: Duration::from_secs(3),
            taking_interval: Duration::from_millis(500),
            max_records: 10_000,
            fan_out_consumer: None,
        }
    }
}

impl WorkerProcess {
    /// Starts `kcl-worker` (the binary at `binary`: pass `env!("CARGO_BIN_EXE_kcl-worker")`,
    /// which Cargo defines for integration tests only) against `env`'s backend, stream
    /// and table; its log goes to `dir/<worker_id>.log` and its stderr to
    /// `dir/<worker_id>.err`.
    pub fn start(
        binary: &str,
        env: &TestEnv,
        dir: &std::path::Path,
        worker_id: &str,
        spec: &WorkerSpec,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{worker_id}.log"));
        let err = std::fs::File::create(dir.join(format!("{worker_id}.err")))?;
        let mut command = tokio::process::Command::new(binary);
        if let Some(consumer) = &spec.fan_out_consumer {
            command.args(["--retrieval", "fan-out", "--consumer-name", consumer]);
        }
        let child = command
            .args(["--kinesis-endpoint", &env.backend.kinesis_endpoint()])
            .args(["--dynamodb-endpoint", &env.backend.dynamodb_endpoint()])
            .args([
                "--stream",
                &env.stream,
                "--application",
                &env.table,
                "--worker-id",
                worker_id,
            ])
            .arg("--output")
            .arg(&log)
            .args(["--failover-ms", &spec.failover.as_millis().to_string()])
            .args(["--taking-interval-ms", &spec.taking_interval.as_millis().to_string()])
            .args(["--max-records", &spec.max_records.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting kcl-worker")?;
        Ok(Self {
            worker_id: worker_id.to_owned(),
            log,
            child,
        })
    }

    /// The log so far.
    pub fn lines(&self) -> anyhow::Result<Vec<WorkerLine>> {
        read_worker_log(&self.log)
    }

    /// `kill -9`: no shutdown, no release, nothing flushed beyond what was written.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM (graceful shutdown), then waits for the exit.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().context("worker already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("worker did not exit")??)
    }
}
