//! `shardwise-admin`: inspect and operate a Shardwise (or Java KCL) application.
//!
//! ```text
//! shardwise-admin --application APP --stream STREAM leases [--json]
//! shardwise-admin ... workers | lag
//! shardwise-admin ... checkpoint set --shard ID --sequence N [--force]
//! shardwise-admin ... checkpoint reset --shard ID --to trim-horizon|latest [--force]
//! shardwise-admin ... consumers list | register NAME | deregister NAME
//! shardwise-admin ... delete-application --yes
//! ```
//!
//! AWS settings come from the environment as for any AWS tool; `--kinesis-endpoint`
//! and `--dynamodb-endpoint` point it at `kcl-local serve` (or any other endpoint).

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use shardwise::admin::{self, NewCheckpoint};

#[derive(Parser, Debug)]
#[command(
    name = "shardwise-admin",
    version,
    about = "Inspect and operate a Shardwise application"
)]
struct Cli {
    /// The application (its lease table's name).
    #[arg(long, env = "SHARDWISE_APPLICATION__APPLICATION_NAME")]
    application: String,
    /// The stream: required for lag and consumers of a single-stream application; in
    /// a multi-stream one it selects the stream (lag, checkpoint, consumers).
    #[arg(long, env = "SHARDWISE_APPLICATION__STREAM_NAME", default_value = "")]
    stream: String,
    /// A Kinesis endpoint URL instead of AWS's (for example kcl-local serve's).
    #[arg(long)]
    kinesis_endpoint: Option<String>,
    /// A DynamoDB endpoint URL instead of AWS's.
    #[arg(long)]
    dynamodb_endpoint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Every lease: shard, owner, counter, checkpoint, parents and children, state.
    Leases,
    /// Which worker holds which shards.
    Workers,
    /// Per shard, how far the checkpoint is behind the shard's newest record.
    Lag,
    /// Move a shard's checkpoint.
    #[command(subcommand)]
    Checkpoint(CheckpointCommand),
    /// Enhanced fan-out consumers of the stream.
    #[command(subcommand)]
    Consumers(ConsumersCommand),
    /// Delete the application's lease table and leader lock table.
    DeleteApplication {
        /// Confirm: the checkpoints are lost.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCommand {
    /// Checkpoint after a sequence number.
    Set {
        #[arg(long)]
        shard: String,
        #[arg(long)]
        sequence: String,
        /// Also when a worker holds the lease (it then loses it).
        #[arg(long)]
        force: bool,
    },
    /// Start the shard over from the oldest or newest record.
    Reset {
        #[arg(long)]
        shard: String,
        #[arg(long, value_enum)]
        to: ResetTo,
        /// Also when a worker holds the lease (it then loses it).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ResetTo {
    TrimHorizon,
    Latest,
}

#[derive(Subcommand, Debug)]
enum ConsumersCommand {
    /// List them.
    List,
    /// Register one.
    Register { name: String },
    /// Deregister one.
    Deregister { name: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("error: {text}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let aws = shardwise::aws_config::load_defaults(shardwise::aws_config::BehaviorVersion::latest()).await;
    let mut kinesis = aws_sdk_kinesis::config::Builder::from(&aws);
    if let Some(url) = &cli.kinesis_endpoint {
        kinesis = kinesis.endpoint_url(url);
    }
    let kinesis = aws_sdk_kinesis::Client::from_conf(kinesis.build());
    let mut dynamodb = aws_sdk_dynamodb::config::Builder::from(&aws);
    if let Some(url) = &cli.dynamodb_endpoint {
        dynamodb = dynamodb.endpoint_url(url);
    }
    let dynamodb = aws_sdk_dynamodb::Client::from_conf(dynamodb.build());
    let store = shardwise::dynamo::DynamoLeaseStore::new(dynamodb.clone(), cli.application.clone());
    let need_stream = || -> Result<&str, Box<dyn std::error::Error>> {
        if cli.stream.is_empty() {
            Err("--stream is required for this command".into())
        } else {
            Ok(&cli.stream)
        }
    };
    match &cli.command {
        Command::Leases => {
            let rows = admin::leases(&store).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                // A multi-stream table shows each lease's key (stream and shard).
                let width = rows.iter().map(|r| r.lease_key.len()).max().unwrap_or(0).max(24);
                println!(
                    "{:<width$} {:<20} {:>8} {:<12} checkpoint",
                    "shard", "owner", "counter", "state"
                );
                for r in rows {
                    println!(
                        "{:<width$} {:<20} {:>8} {:<12} {}",
                        r.lease_key,
                        r.owner.as_deref().unwrap_or("-"),
                        r.counter,
                        r.state,
                        r.checkpoint
                    );
                }
            }
        }
        Command::Workers => {
            let workers = admin::workers(&store).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&workers)?);
            } else {
                for (worker, shards) in workers {
                    println!("{worker}: {} shards: {}", shards.len(), shards.join(", "));
                }
            }
        }
        Command::Lag => {
            let stream = (!cli.stream.is_empty()).then_some(cli.stream.as_str());
            let lag = admin::lag(&store, &kinesis, stream).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&lag)?);
            } else {
                for l in lag {
                    let behind = l
                        .millis_behind_latest
                        .map_or("finished".to_owned(), |m| format!("{m} ms"));
                    println!("{:<24} {:<24} {behind}", l.stream, l.shard_id);
                }
            }
        }
        Command::Checkpoint(c) => {
            let (shard, to, force) = match c {
                CheckpointCommand::Set { shard, sequence, force } => {
                    (shard, NewCheckpoint::Sequence(sequence.clone()), *force)
                }
                CheckpointCommand::Reset { shard, to, force } => (
                    shard,
                    match to {
                        ResetTo::TrimHorizon => NewCheckpoint::TrimHorizon,
                        ResetTo::Latest => NewCheckpoint::Latest,
                    },
                    *force,
                ),
            };
            let stream = (!cli.stream.is_empty()).then_some(cli.stream.as_str());
            let key = admin::find_lease_key(&store, stream, shard).await?;
            let row = admin::set_checkpoint(&store, &key, to, force).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&row)?);
            } else {
                println!("{}: checkpoint {}", row.lease_key, row.checkpoint);
            }
        }
        Command::Consumers(c) => match c {
            ConsumersCommand::List => {
                let list = admin::consumers(&kinesis, need_stream()?).await?;
                if cli.json {
                    let rows: Vec<_> = list
                        .iter()
                        .map(|(name, arn, status)| json!({"name": name, "arn": arn, "status": status}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&rows)?);
                } else {
                    for (name, arn, status) in list {
                        println!("{name} {status} {arn}");
                    }
                }
            }
            ConsumersCommand::Register { name } | ConsumersCommand::Deregister { name } => {
                let register = matches!(c, ConsumersCommand::Register { .. });
                admin::register_consumer(&kinesis, need_stream()?, name, register).await?;
                if cli.json {
                    println!("{}", json!({"consumer": name, "registered": register}));
                } else {
                    println!("{} {name}", if register { "registered" } else { "deregistered" });
                }
            }
        },
        Command::DeleteApplication { yes } => {
            if !yes {
                return Err("delete-application deletes every checkpoint: pass --yes".into());
            }
            let deleted = admin::delete_application(&dynamodb, &cli.application).await?;
            if cli.json {
                println!("{}", json!({"deleted_tables": deleted}));
            } else {
                println!("deleted: {}", deleted.join(", "));
            }
        }
    }
    Ok(())
}
