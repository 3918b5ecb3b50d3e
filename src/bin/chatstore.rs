//! `chatstore`: runs a node (`node`), the front tier (`router`), or a whole
//! local cluster (`dev`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use chatstore::cluster::ClusterConfig;
use chatstore::types::NodeId;

#[derive(Parser)]
#[command(
    name = "chatstore",
    version,
    about = "Geo-distributed, Raft-replicated message store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run node N of a cluster config.
    Node {
        #[arg(long, env = "CHATSTORE_CONFIG")]
        config: PathBuf,
        #[arg(long)]
        id: u64,
    },
    /// Run every node of a config in this process: a local cluster for
    /// development. Data goes under the config's data_root.
    Dev {
        #[arg(
            long,
            env = "CHATSTORE_CONFIG",
            default_value = "cluster-configs/local-3region.toml"
        )]
        config: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=warn,sled=warn,h2=warn,tower=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("start tokio")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Node { config, id } => run_node(config, id).await,
            Command::Dev { config } => run_dev(config).await,
        }
    })
}

async fn run_node(config: PathBuf, id: u64) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&config)?;
    if let Some(addr) = config.node(NodeId(id)).and_then(|n| n.metrics_addr.clone()) {
        chatstore::metrics::install_exporter(addr.parse().context("metrics_addr")?)?;
    }
    let node = chatstore::node::Node::start(&config, NodeId(id)).await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn run_dev(config_path: PathBuf) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&config_path)?;
    let mut nodes = Vec::new();
    for n in &config.nodes {
        nodes.push(chatstore::node::Node::start(&config, NodeId(n.id)).await?);
    }
    println!(
        "chatstore dev cluster {:?} is up ({} shards):",
        config.cluster_name, config.shards
    );
    for n in &nodes {
        println!(
            "  node {} ({}) at {}  data: {}",
            n.id.0,
            n.region,
            n.addr,
            config.data_dir(n.id).display()
        );
    }
    println!("Press Ctrl-C to stop; data stays for the next start.");
    wait_for_signal().await;
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
