//! Issue 13: the README's worker, built from the `shardwise` facade and the example
//! config file, runs against the embedded backend and processes every record.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shardwise::config_file::AppConfig;
use shardwise::{InitialPositionInStream, ProcessRecordsInput, ProcessorError, RecordProcessor};

#[derive(Debug)]
struct Counter(Arc<AtomicUsize>);

#[shardwise::async_trait]
impl RecordProcessor for Counter {
    async fn process_records(&mut self, input: ProcessRecordsInput) -> Result<(), ProcessorError> {
        self.0.fetch_add(input.records.len(), Ordering::Relaxed);
        input.checkpointer.checkpoint().await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_worker_runs_from_the_example_config_file() -> anyhow::Result<()> {
    let env = kcl_tests::TestEnv::start(2).await?;
    let written = env.put(300, "facade").await?;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/shardwise.toml");
    let text = std::fs::read_to_string(path)?
        .replace("\"my-application\"", &format!("{:?}", kcl_tests::unique("facade-app")))
        .replace("\"my-stream\"", &format!("{:?}", env.stream))
        .replace("initial_position = \"latest\"", "initial_position = \"trim_horizon\"")
        .replace(
            "idle_time_between_reads = \"1s 500ms\"",
            "idle_time_between_reads = \"200ms\"",
        );
    let config = AppConfig::from_toml(&text)?;
    assert_eq!(
        config.application.initial_position,
        InitialPositionInStream::TrimHorizon
    );
    let processed = Arc::new(AtomicUsize::new(0));
    let scheduler = {
        let processed = processed.clone();
        config
            .scheduler_builder_with_clients(env.kinesis.clone(), env.dynamodb.clone())?
            .processor_factory(move |_shard: &str| Counter(processed.clone()))
            .build()?
    };
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    while processed.load(Ordering::Relaxed) < written.len() {
        anyhow::ensure!(Instant::now() < deadline, "not every record was processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.shutdown();
    running.await??;
    assert_eq!(processed.load(Ordering::Relaxed), written.len());
    Ok(())
}
