//! Tests of the embedded backend and of the `kcl-local serve` binary, through the stock
//! AWS SDK clients.
//!
//! Every test starts its own backend on fresh ports, so they run in parallel. They run
//! under the plain current-thread `#[tokio::test]` runtime on purpose: the backend must
//! not need the caller's runtime to make progress.

use std::io::BufRead as _;
use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{ShardIteratorType, StartingPosition, StreamStatus};
use kcl_local::{create_stream, sdk_config_for_endpoint, LocalBackend, LocalError, LocalOptions};

/// Upper bound for anything a test waits for; generous for a loaded 2-core machine.
const WAIT: Duration = Duration::from_secs(30);

/// Host and port of an endpoint URL `http://HOST:PORT`.
fn host_and_port(endpoint: &str) -> anyhow::Result<(IpAddr, u16)> {
    let authority = endpoint
        .strip_prefix("http://")
        .with_context(|| format!("endpoint {endpoint:?} is not http://"))?;
    let (host, port) = authority
        .rsplit_once(':')
        .with_context(|| format!("endpoint {endpoint:?} has no port"))?;
    Ok((host.parse()?, port.parse()?))
}

/// A Kinesis client that does not retry, to see a failure at once.
fn kinesis_without_retries(config: &aws_types::SdkConfig) -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::config::Builder::from(config)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

/// A DynamoDB client that does not retry, to see a failure at once.
fn dynamodb_without_retries(config: &aws_types::SdkConfig) -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::from(config)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// Writes one record to `stream` and returns its shard id and sequence number.
async fn put_one(kinesis: &aws_sdk_kinesis::Client, stream: &str, data: &[u8]) -> anyhow::Result<(String, String)> {
    let put = kinesis
        .put_record()
        .stream_name(stream)
        .partition_key("pk-1")
        .data(Blob::new(data))
        .send()
        .await?;
    Ok((put.shard_id().to_owned(), put.sequence_number().to_owned()))
}

/// Reads a shard from TRIM_HORIZON and returns the records' (sequence number, data).
async fn read_shard(
    kinesis: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let iterator = kinesis
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await?
        .shard_iterator
        .context("GetShardIterator returned no iterator")?;
    let records = kinesis
        .get_records()
        .shard_iterator(iterator)
        .send()
        .await?
        .records
        .into_iter()
        .map(|record| (record.sequence_number, record.data.into_inner()))
        .collect();
    Ok(records)
}

/// Creates a table with a string hash key `pk`.
async fn create_table(dynamodb: &aws_sdk_dynamodb::Client, table: &str) -> anyhow::Result<()> {
    dynamodb
        .create_table()
        .table_name(table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await?;
    Ok(())
}

/// Reads the attribute `value` of the item `pk` (strongly consistent).
async fn get_value(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
    pk: &str,
) -> anyhow::Result<Option<AttributeValue>> {
    let item = dynamodb
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(pk.to_owned()))
        .consistent_read(true)
        .send()
        .await?
        .item;
    Ok(item.and_then(|mut item| item.remove("value")))
}

#[tokio::test]
async fn kinesis_round_trips_a_record() -> anyhow::Result<()> {
    let started = Instant::now();
    let backend = LocalBackend::start().await?;
    eprintln!("backend start-up took {:?}", started.elapsed());

    for endpoint in [backend.kinesis_endpoint(), backend.dynamodb_endpoint()] {
        let (host, port) = host_and_port(&endpoint)?;
        assert_eq!(host, IpAddr::from([127, 0, 0, 1]), "{endpoint}");
        assert_ne!(port, 0, "{endpoint}");
    }
    assert_ne!(backend.kinesis_endpoint(), backend.dynamodb_endpoint());

    let kinesis = backend.kinesis_client();
    let started = Instant::now();
    create_stream(&kinesis, "round-trip", 2).await?;
    eprintln!("create_stream took {:?}", started.elapsed());

    let summary = kinesis
        .describe_stream_summary()
        .stream_name("round-trip")
        .send()
        .await?
        .stream_description_summary
        .context("no summary")?;
    assert_eq!(summary.stream_status, StreamStatus::Active);
    assert_eq!(summary.open_shard_count, 2);
    assert!(
        summary.stream_arn.contains(":us-east-1:"),
        "region in ARN: {}",
        summary.stream_arn
    );

    let (shard_id, sequence_number) = put_one(&kinesis, "round-trip", b"hello, shard").await?;
    let records = read_shard(&kinesis, "round-trip", &shard_id).await?;
    assert_eq!(records, vec![(sequence_number, b"hello, shard".to_vec())]);

    backend.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn dynamodb_round_trips_an_item() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await?;
    let dynamodb = backend.dynamodb_client();

    create_table(&dynamodb, "leases").await?;
    dynamodb
        .put_item()
        .table_name("leases")
        .item("pk", AttributeValue::S("shardId-000000000000".into()))
        .item("value", AttributeValue::N("42".into()))
        .send()
        .await?;

    let value = get_value(&dynamodb, "leases", "shardId-000000000000").await?;
    assert_eq!(value, Some(AttributeValue::N("42".into())));
    assert_eq!(get_value(&dynamodb, "leases", "missing").await?, None);

    backend.shutdown().await;
    Ok(())
}

/// The Kinesis endpoint speaks HTTP/2 with prior knowledge (h2c) as well as HTTP/1.1.
#[tokio::test]
async fn kinesis_endpoint_speaks_h2c() -> anyhow::Result<()> {
    use std::io::{Read as _, Write as _};

    let backend = LocalBackend::start().await?;
    let (host, port) = host_and_port(&backend.kinesis_endpoint())?;
    // Plain blocking I/O is fine here: the server does not run on this runtime.
    let mut stream = std::net::TcpStream::connect((host, port))?;
    stream.set_read_timeout(Some(WAIT))?;
    // The client connection preface, then an empty SETTINGS frame.
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
    stream.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0])?;
    // An HTTP/2 server's preface is a SETTINGS frame (type 4) on stream 0.
    let mut header = [0_u8; 9];
    stream.read_exact(&mut header)?;
    assert_eq!(header[3], 0x4, "expected a SETTINGS frame, got header {header:?}");
    assert_eq!(&header[5..9], &[0, 0, 0, 0], "SETTINGS must be on stream 0");
    drop(stream);

    backend.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn requests_fail_after_shutdown() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await?;
    let kinesis = kinesis_without_retries(&backend.kinesis_sdk_config());
    let dynamodb = dynamodb_without_retries(&backend.dynamodb_sdk_config());
    // Open (keep-alive) connections to both, which shutdown must close.
    kinesis.list_streams().send().await?;
    dynamodb.list_tables().send().await?;

    tokio::time::timeout(WAIT, backend.shutdown())
        .await
        .context("shutdown did not complete")?;

    let kinesis_result = kinesis.list_streams().send().await;
    assert!(
        kinesis_result.is_err(),
        "Kinesis answered after shutdown: {kinesis_result:?}"
    );
    let dynamodb_result = dynamodb.list_tables().send().await;
    assert!(
        dynamodb_result.is_err(),
        "DynamoDB answered after shutdown: {dynamodb_result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn dropping_the_backend_stops_it() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await?;
    let addresses = [
        host_and_port(&backend.kinesis_endpoint())?,
        host_and_port(&backend.dynamodb_endpoint())?,
    ];
    drop(backend);

    // Drop only signals; the threads stop soon after. Poll with a bound.
    let deadline = Instant::now() + WAIT;
    for (host, port) in addresses {
        while tokio::net::TcpStream::connect((host, port)).await.is_ok() {
            ensure!(Instant::now() < deadline, "{host}:{port} still accepts connections");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// The backend must serve while the caller's (current-thread) runtime is blocked.
#[tokio::test]
async fn serves_while_the_caller_runtime_is_blocked() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await?;
    let config = backend.kinesis_sdk_config();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime.block_on(async {
                    let kinesis = aws_sdk_kinesis::Client::new(&config);
                    create_stream(&kinesis, "blocked-caller", 1).await?;
                    Ok(())
                })
            });
        let _ = done_tx.send(result);
    });
    // Deliberately block this runtime's only thread.
    let result = done_rx
        .recv_timeout(WAIT)
        .context("the backend made no progress while the caller's runtime was blocked")?;
    result?;
    backend.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn options_reach_the_emulators() -> anyhow::Result<()> {
    let mut options = LocalOptions::default();
    options.region = "eu-west-1".to_owned();
    options.shard_limit = 3;
    options.stream_delay = Duration::from_millis(1500);
    let backend = LocalBackend::start_with(options).await?;
    assert_eq!(backend.region(), "eu-west-1");
    let kinesis = backend.kinesis_client();

    // The shard limit.
    let error = create_stream(&kinesis, "too-big", 4)
        .await
        .expect_err("4 shards exceed a limit of 3");
    match error {
        LocalError::Kinesis { operation, source } => {
            assert_eq!(operation, "CreateStream");
            assert!(
                matches!(*source, aws_sdk_kinesis::Error::LimitExceededException(_)),
                "{source:?}"
            );
        }
        other => bail!("unexpected error {other:?}"),
    }

    // The stream delay: CREATING first, then ACTIVE.
    kinesis
        .create_stream()
        .stream_name("slow")
        .shard_count(1)
        .send()
        .await?;
    let summary = kinesis
        .describe_stream_summary()
        .stream_name("slow")
        .send()
        .await?
        .stream_description_summary
        .context("no summary")?;
    assert_eq!(summary.stream_status, StreamStatus::Creating);
    assert!(summary.stream_arn.contains(":eu-west-1:"), "{}", summary.stream_arn);

    // A second create of the same name is refused with a typed error.
    let error = create_stream(&kinesis, "slow", 1).await.expect_err("the stream exists");
    assert!(
        matches!(
            &error,
            LocalError::Kinesis { source, .. }
                if matches!(**source, aws_sdk_kinesis::Error::ResourceInUseException(_))
        ),
        "{error:?}"
    );

    backend.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_taken_port_is_a_bind_error() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port();

    let mut options = LocalOptions::default();
    options.kinesis_port = port;
    let error = LocalBackend::start_with(options)
        .await
        .expect_err("the Kinesis port is taken");
    assert!(
        matches!(error, LocalError::Bind { service: "kinesis", ref addr, .. } if addr.port() == port),
        "{error:?}"
    );

    // The DynamoDB port taken: Kinesis starts first and must be stopped again.
    let mut options = LocalOptions::default();
    options.dynamodb_port = port;
    let error = LocalBackend::start_with(options)
        .await
        .expect_err("the DynamoDB port is taken");
    assert!(
        matches!(
            error,
            LocalError::Bind {
                service: "dynamodb",
                ..
            }
        ),
        "{error:?}"
    );
    Ok(())
}

#[tokio::test]
async fn data_dir_keeps_state_across_restarts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut options = LocalOptions::default();
    options.data_dir = Some(dir.path().to_path_buf());

    let backend = LocalBackend::start_with(options.clone()).await?;
    let kinesis = backend.kinesis_client();
    let dynamodb = backend.dynamodb_client();
    create_stream(&kinesis, "durable", 1).await?;
    let (shard_id, sequence_number) = put_one(&kinesis, "durable", b"kept").await?;
    create_table(&dynamodb, "durable").await?;
    dynamodb
        .put_item()
        .table_name("durable")
        .item("pk", AttributeValue::S("a".into()))
        .item("value", AttributeValue::S("kept".into()))
        .send()
        .await?;
    backend.shutdown().await;

    let backend = LocalBackend::start_with(options).await?;
    let kinesis = backend.kinesis_client();
    let dynamodb = backend.dynamodb_client();
    let records = read_shard(&kinesis, "durable", &shard_id).await?;
    assert_eq!(records, vec![(sequence_number, b"kept".to_vec())]);
    assert_eq!(
        get_value(&dynamodb, "durable", "a").await?,
        Some(AttributeValue::S("kept".into()))
    );
    backend.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn corrupt_kinesis_state_fails_the_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("kinesis"))?;
    std::fs::write(dir.path().join("kinesis").join("snapshot.bin"), b"not a snapshot")?;
    let mut options = LocalOptions::default();
    options.data_dir = Some(dir.path().to_path_buf());

    let error = LocalBackend::start_with(options)
        .await
        .expect_err("the Kinesis state is corrupt");
    assert!(
        matches!(error, LocalError::Server { service: "kinesis", .. }),
        "{error:?}"
    );
    Ok(())
}

/// `SubscribeToShard` streams through the embedded server, and an open subscription
/// does not hold shutdown.
#[tokio::test]
async fn subscribe_to_shard_streams_records() -> anyhow::Result<()> {
    let backend = LocalBackend::start().await?;
    let kinesis = backend.kinesis_client();
    create_stream(&kinesis, "fan-out", 1).await?;
    let (shard_id, sequence_number) = put_one(&kinesis, "fan-out", b"pushed").await?;

    let stream_arn = kinesis
        .describe_stream_summary()
        .stream_name("fan-out")
        .send()
        .await?
        .stream_description_summary
        .context("no summary")?
        .stream_arn;
    let consumer_arn = kinesis
        .register_stream_consumer()
        .stream_arn(&stream_arn)
        .consumer_name("efo")
        .send()
        .await?
        .consumer
        .context("no consumer")?
        .consumer_arn;

    // The consumer becomes ACTIVE after a fixed delay of ferrokinesis (500 ms).
    let deadline = Instant::now() + WAIT;
    let mut output = loop {
        let attempt = kinesis
            .subscribe_to_shard()
            .consumer_arn(&consumer_arn)
            .shard_id(&shard_id)
            .starting_position(
                StartingPosition::builder()
                    .r#type(ShardIteratorType::TrimHorizon)
                    .build()?,
            )
            .send()
            .await;
        match attempt {
            Ok(output) => break output,
            Err(error) => {
                let error = aws_sdk_kinesis::Error::from(error);
                ensure!(
                    matches!(error, aws_sdk_kinesis::Error::ResourceInUseException(_)) && Instant::now() < deadline,
                    "SubscribeToShard failed: {error:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let mut received = Vec::new();
    while received.is_empty() {
        let event = tokio::time::timeout(WAIT, output.event_stream.recv())
            .await
            .context("no event in time")??
            .context("the event stream ended")?;
        if let aws_sdk_kinesis::types::SubscribeToShardEventStream::SubscribeToShardEvent(event) = event {
            received.extend(
                event
                    .records
                    .into_iter()
                    .map(|record| (record.sequence_number, record.data.into_inner())),
            );
        }
    }
    assert_eq!(received, vec![(sequence_number, b"pushed".to_vec())]);

    // The subscription is still open; shutdown must not wait minutes for it.
    let started = Instant::now();
    tokio::time::timeout(WAIT, backend.shutdown())
        .await
        .context("shutdown did not complete with a subscription open")?;
    eprintln!("shutdown with an open subscription took {:?}", started.elapsed());
    Ok(())
}

/// Kills the child process when dropped, so a failing test leaves nothing behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn serve_binary_announces_endpoints_and_stops_on_sigterm() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_kcl-local"))
            .args([
                "serve",
                "--kinesis-port",
                "0",
                "--dynamodb-port",
                "0",
                "--stream",
                "pre-made=3",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    let stdout = child.0.stdout.take().context("no stdout")?;

    // Read stdout on a thread; the lines arrive on a channel we can await with a bound.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    let (mut kinesis_endpoint, mut dynamodb_endpoint) = (None, None);
    loop {
        let line = tokio::time::timeout(WAIT, line_rx.recv())
            .await
            .context("no `ready` in time")?
            .context("stdout closed before `ready`")??;
        match line.split_once(' ') {
            Some(("kinesis", url)) => kinesis_endpoint = Some(url.to_owned()),
            Some(("dynamodb", url)) => dynamodb_endpoint = Some(url.to_owned()),
            None if line == "ready" => break,
            _ => bail!("unexpected line on stdout: {line:?}"),
        }
    }
    eprintln!("`kcl-local serve` was ready after {:?}", started.elapsed());
    let kinesis_endpoint = kinesis_endpoint.context("no kinesis line")?;
    let dynamodb_endpoint = dynamodb_endpoint.context("no dynamodb line")?;
    for endpoint in [&kinesis_endpoint, &dynamodb_endpoint] {
        let (host, port) = host_and_port(endpoint)?;
        assert_eq!(host, IpAddr::from([127, 0, 0, 1]), "{endpoint}");
        assert_ne!(port, 0, "{endpoint}");
    }

    let kinesis = aws_sdk_kinesis::Client::new(&sdk_config_for_endpoint(&kinesis_endpoint, "us-east-1"));
    let dynamodb = aws_sdk_dynamodb::Client::new(&sdk_config_for_endpoint(&dynamodb_endpoint, "us-east-1"));
    // `--stream pre-made=3` created it, ACTIVE, before `ready`.
    let summary = kinesis.describe_stream_summary().stream_name("pre-made").send().await?;
    let summary = summary.stream_description_summary().context("summary")?;
    assert_eq!(summary.open_shard_count(), 3);
    assert_eq!(summary.stream_status(), &aws_sdk_kinesis::types::StreamStatus::Active);
    create_stream(&kinesis, "from-outside", 1).await?;
    let streams = kinesis.list_streams().send().await?.stream_names;
    assert_eq!(streams, vec!["from-outside".to_owned(), "pre-made".to_owned()]);
    create_table(&dynamodb, "from-outside").await?;
    let tables = dynamodb.list_tables().send().await?.table_names;
    assert_eq!(tables, Some(vec!["from-outside".to_owned()]));

    // SIGTERM: the server must stop cleanly, with success.
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM failed: {status}");
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = child.0.try_wait()? {
            break exit;
        }
        ensure!(Instant::now() < deadline, "kcl-local serve did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "kcl-local serve exited with {exit}");
    Ok(())
}
