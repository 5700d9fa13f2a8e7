//! Issue 13: the `shardwise-admin` binary against `kcl-local`'s servers: `leases
//! --json` and `workers --json` print what the lease table holds; `checkpoint reset`
//! on an owned lease is refused with a non-zero exit.

use kcl_core::{ExtendedSequenceNumber, Lease, LeaseStore as _};

const BIN: &str = env!("CARGO_BIN_EXE_shardwise-admin");

fn admin(backend: &kcl_local::LocalBackend, args: &[&str]) -> std::process::Output {
    let mut all = vec!["--stream", "cli-stream"];
    all.extend_from_slice(args);
    admin_of(backend, "cli-app", &all)
}

/// Runs the binary for `application` against the backend's servers.
fn admin_of(backend: &kcl_local::LocalBackend, application: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(["--application", application])
        .env_remove("SHARDWISE_APPLICATION__STREAM_NAME")
        .arg(format!("--kinesis-endpoint={}", backend.kinesis_endpoint()))
        .arg(format!("--dynamodb-endpoint={}", backend.dynamodb_endpoint()))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_REGION", backend.region())
        .env_remove("AWS_PROFILE")
        .output()
        .expect("runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_and_workers_print_the_table_and_an_owned_lease_is_not_reset() {
    let backend = kcl_local::LocalBackend::start().await.expect("backend");
    let store = kcl_dynamo::DynamoLeaseStore::new(backend.dynamodb_client(), "cli-app");
    store.create_lease_table_if_not_exists().await.expect("table");
    for (shard, owner) in [("shardId-000000000000", Some("w1")), ("shardId-000000000001", None)] {
        let mut lease = Lease::new(shard, ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(store.create_lease_if_not_exists(&lease).await.expect("create"));
        if let Some(owner) = owner {
            assert!(store.take_lease(&mut lease, owner).await.expect("take"));
        }
    }

    let out = admin(&backend, &["leases", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows[0]["shard_id"], "shardId-000000000000");
    assert_eq!(rows[0]["owner"], "w1");
    assert_eq!(rows[0]["state"], "owned");
    assert_eq!(rows[1]["owner"], serde_json::Value::Null);
    assert_eq!(rows[1]["checkpoint"], "TRIM_HORIZON");

    let out = admin(&backend, &["workers", "--json"]);
    let workers: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(workers, serde_json::json!({"w1": ["shardId-000000000000"]}));

    let out = admin(
        &backend,
        &[
            "checkpoint",
            "reset",
            "--shard",
            "shardId-000000000000",
            "--to",
            "latest",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("held by \"w1\""), "{stderr}");
    let out = admin(
        &backend,
        &[
            "checkpoint",
            "reset",
            "--shard",
            "shardId-000000000001",
            "--to",
            "latest",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lease = store
        .get_lease("shardId-000000000001")
        .await
        .expect("read")
        .expect("lease");
    assert_eq!(lease.checkpoint, ExtendedSequenceNumber::LATEST);

    // Fan-out consumers of the stream.
    kcl_local::create_stream(&backend.kinesis_client(), "cli-stream", 1)
        .await
        .expect("stream");
    let out = admin(&backend, &["consumers", "register", "cli-consumer", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = admin(&backend, &["consumers", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list[0]["name"], "cli-consumer", "{list}");
    let out = admin(&backend, &["consumers", "deregister", "cli-consumer"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Deleting the application needs --yes, then removes the lease table.
    assert!(!admin(&backend, &["delete-application"]).status.success());
    let out = admin(&backend, &["delete-application", "--yes", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deleted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(deleted["deleted_tables"][0], "cli-app");
    assert!(store.list_leases().await.is_err(), "the table is gone");
    backend.shutdown().await;
}

/// Multi-stream tables: rows name their stream; a shard id in several streams needs
/// `--stream`; `lag` reads each shard from its own stream without `--stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_stream_table_is_shown_by_stream_and_a_shard_is_named_by_stream_and_id() {
    let backend = kcl_local::LocalBackend::start().await.expect("backend");
    let kinesis = backend.kinesis_client();
    let store = kcl_dynamo::DynamoLeaseStore::new(backend.dynamodb_client(), "multi-app");
    store.create_lease_table_if_not_exists().await.expect("table");
    for stream in ["orders", "audit"] {
        kcl_local::create_stream(&kinesis, stream, 1).await.expect("stream");
        let mut lease = Lease::new(
            format!("000000000000:{stream}:1:shardId-000000000000"),
            ExtendedSequenceNumber::TRIM_HORIZON,
        );
        lease.stream_name = Some(format!("000000000000:{stream}:1"));
        lease.shard_id = Some("shardId-000000000000".to_owned());
        assert!(store.create_lease_if_not_exists(&lease).await.expect("create"));
    }
    let run = |args: &[&str]| admin_of(&backend, "multi-app", args);

    let out = run(&["leases", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows[0]["stream"], "000000000000:audit:1");
    assert_eq!(rows[0]["shard_id"], "shardId-000000000000");
    assert_eq!(rows[1]["lease_key"], "000000000000:orders:1:shardId-000000000000");

    let out = run(&["lag", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lag: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let streams: Vec<&str> = lag
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["stream"].as_str())
        .collect();
    assert_eq!(streams, ["audit", "orders"]);

    let reset = [
        "checkpoint",
        "reset",
        "--shard",
        "shardId-000000000000",
        "--to",
        "latest",
    ];
    let out = run(&reset);
    assert!(!out.status.success(), "ambiguous without --stream");
    assert!(String::from_utf8_lossy(&out.stderr).contains("name the stream"));
    let mut with_stream = vec!["--stream", "orders"];
    with_stream.extend(reset);
    let out = run(&with_stream);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let leases = store.list_leases().await.expect("read");
    let checkpoints: Vec<(String, String)> = leases
        .iter()
        .map(|l| (l.lease_key.clone(), l.checkpoint.to_string()))
        .collect();
    assert!(
        checkpoints.contains(&("000000000000:orders:1:shardId-000000000000".into(), "LATEST".into()))
            && checkpoints.contains(&(
                "000000000000:audit:1:shardId-000000000000".into(),
                "TRIM_HORIZON".into()
            )),
        "{checkpoints:?}"
    );
    backend.shutdown().await;
}
