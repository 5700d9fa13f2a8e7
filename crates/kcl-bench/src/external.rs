//! The backend in a process of its own, so that what a scenario measures in its own
//! process (CPU time, resident memory) is the consumer's alone: this program's hidden
//! `serve` command runs the embedded Kinesis and DynamoDB (the same servers as
//! `kcl-local serve`) on free loopback ports, prints `kinesis URL`, `dynamodb URL` and
//! `ready` on stdout, and serves until its stdin closes (the parent exiting or
//! [`ExternalBackend::stop`]).

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};

use crate::support::Bench;

/// The endpoints of a backend process, as the hidden `*-case` and `*-worker` commands
/// take them (see [`ExternalBackend::endpoint_args`]).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Endpoints {
    /// Kinesis endpoint of the backend process.
    #[arg(long)]
    pub(crate) kinesis_endpoint: String,
    /// DynamoDB endpoint of the backend process.
    #[arg(long)]
    pub(crate) dynamodb_endpoint: String,
}

impl Endpoints {
    /// Clients for them.
    pub(crate) fn bench(&self) -> Bench {
        Bench::connect(&self.kinesis_endpoint, &self.dynamodb_endpoint)
    }
}

/// A `serve` child process and its endpoints.
#[derive(Debug)]
pub(crate) struct ExternalBackend {
    child: tokio::process::Child,
    /// The Kinesis endpoint URL.
    pub(crate) kinesis_endpoint: String,
    /// The DynamoDB endpoint URL.
    pub(crate) dynamodb_endpoint: String,
}

impl ExternalBackend {
    /// Starts `serve` and waits until it is ready.
    pub(crate) async fn start() -> anyhow::Result<Self> {
        Self::start_with_shard_limit(1000).await
    }

    /// Starts `serve` allowing `shard_limit` open shards, and waits until it is ready.
    pub(crate) async fn start_with_shard_limit(shard_limit: u32) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this program to run the backend")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("serve")
            .arg(format!("--shard-limit={shard_limit}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the backend process")?;
        let stdout = child.stdout.take().context("the backend's stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut kinesis, mut dynamodb) = (None, None);
        while let Some(line) = lines.next_line().await? {
            match line.split_once(' ') {
                Some(("kinesis", url)) => kinesis = Some(url.to_owned()),
                Some(("dynamodb", url)) => dynamodb = Some(url.to_owned()),
                _ if line == "ready" => break,
                _ => {}
            }
        }
        let (Some(kinesis_endpoint), Some(dynamodb_endpoint)) = (kinesis, dynamodb) else {
            bail!("the backend process exited before it was ready");
        };
        Ok(Self {
            child,
            kinesis_endpoint,
            dynamodb_endpoint,
        })
    }

    /// Clients for it.
    pub(crate) fn bench(&self) -> Bench {
        Bench::connect(&self.kinesis_endpoint, &self.dynamodb_endpoint)
    }

    /// The arguments that point a case at it.
    pub(crate) fn endpoint_args(&self) -> [String; 2] {
        [
            format!("--kinesis-endpoint={}", self.kinesis_endpoint),
            format!("--dynamodb-endpoint={}", self.dynamodb_endpoint),
        ]
    }

    /// Stops it (closes its stdin) and waits for it to exit.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        match tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}

/// Options of the hidden `serve` command.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ServeArgs {
    /// The most open shards all streams together may have.
    #[arg(long, default_value_t = 1000)]
    pub(crate) shard_limit: u32,
}

/// The hidden `serve` command: the embedded backend until stdin closes.
pub(crate) async fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let mut options = kcl_local::LocalOptions::default();
    options.shard_limit = args.shard_limit;
    let backend = kcl_local::LocalBackend::start_with(options)
        .await
        .context("starting the embedded backend")?;
    println!("kinesis {}", backend.kinesis_endpoint());
    println!("dynamodb {}", backend.dynamodb_endpoint());
    println!("ready");
    let mut stdin = tokio::io::stdin();
    let mut buffer = [0u8; 64];
    // Until the parent closes our stdin (or exits).
    while stdin.read(&mut buffer).await.unwrap_or(0) > 0 {}
    backend.shutdown().await;
    Ok(())
}
