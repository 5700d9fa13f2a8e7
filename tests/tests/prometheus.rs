//! Issue 13: the Prometheus endpoint (a test binary of its own: it installs the
//! process's metrics recorder). Scraped during a run, it shows records processed per
//! shard (adding up to what was written) and the leases held.

use std::time::{Duration, Instant};

use kcl_tests::{CheckpointMode, Recorder, TestEnv};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn scrape(address: std::net::SocketAddr) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// The sum of a metric's samples over its series.
fn total(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraping_shows_records_processed_per_shard_and_leases_held() -> anyhow::Result<()> {
    let address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    shardwise::prometheus::install_prometheus(address, Duration::from_secs(60))?;
    let env = TestEnv::start(2).await?;
    let written = env.put(100, "prom").await?;
    let recorder = Recorder::default();
    let scheduler = env
        .scheduler(&recorder, CheckpointMode::EveryBatch)
        .initial_position(kcl_core::InitialPositionInStream::TrimHorizon)
        .build()?;
    let shutdown = scheduler.shutdown_handle();
    let running = tokio::spawn(scheduler.run());
    recorder
        .wait_for_records(written.len(), Duration::from_secs(60))
        .await?;
    // The counter is incremented right after process_records returns.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let body = scrape(address).await?;
        if total(&body, "kcl_records_processed_total") >= written.len() as f64 {
            break body;
        }
        anyhow::ensure!(Instant::now() < deadline, "not every record counted: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        assert!(
            body.contains(&format!(
                "kcl_records_processed_total{{stream=\"{}\",shard_id=\"{shard}\"}}",
                env.stream
            )),
            "{body}"
        );
    }
    assert_eq!(total(&body, "kcl_records_processed_total"), written.len() as f64);
    assert_eq!(total(&body, "kcl_leases_held"), 2.0, "{body}");
    shutdown.shutdown();
    running.await??;
    Ok(())
}
