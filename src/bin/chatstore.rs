//! `chatstore`: runs a node (`node`), the front tier (`router`), or a whole
//! local cluster (`dev`).

/// glibc's allocator spent about a fifth of the write path's CPU in malloc,
/// free and arena-lock contention between threads (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Reach peer ID at ADDR instead of its configured address
        /// (ID=ADDR, repeatable): for proxies in tests and odd networks.
        #[arg(long = "peer-addr", value_parser = parse_id_addr)]
        peer_addrs: Vec<(u64, String)>,
        /// Fault injection: run this node's wall clock MS milliseconds off
        /// (tests of the clock-offset check).
        #[arg(long, hide = true, default_value_t = 0, allow_hyphen_values = true)]
        clock_skew_ms: i64,
    },
    /// Run a router: the public API for one region.
    Router {
        #[arg(long, env = "CHATSTORE_CONFIG")]
        config: PathBuf,
        /// The region this router serves; SESSION and STALE reads stay in it.
        #[arg(long)]
        region: String,
        #[arg(long, default_value = "127.0.0.1:7201")]
        listen: String,
        #[arg(long)]
        metrics: Option<String>,
        /// Reach node ID at ADDR instead of its configured address
        /// (ID=ADDR, repeatable).
        #[arg(long = "node-addr", value_parser = parse_id_addr)]
        node_addrs: Vec<(u64, String)>,
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
        /// Simulate the distance between regions: every call between
        /// regions takes the round trip in the config's `[latency] rtt_ms`.
        #[arg(long)]
        geo: bool,
        /// Put node data under this folder instead of the config's
        /// data_root (nodes with their own data_dir keep it).
        #[arg(long)]
        data_root: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout is for what a person asked for. openraft
    // logs every unreachable peer at WARN, which floods the log while a
    // cluster starts or a node is down; RUST_LOG=openraft=warn brings it back.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,openraft=error,sled=warn,h2=warn,tower=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("start tokio")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Node {
                config,
                id,
                peer_addrs,
                clock_skew_ms,
            } => {
                if clock_skew_ms != 0 {
                    tracing::warn!(
                        clock_skew_ms,
                        "running with a skewed clock (fault injection)"
                    );
                    chatstore::types::set_clock_skew_ms(clock_skew_ms);
                }
                run_node(config, id, peer_addrs).await
            }
            Command::Dev {
                config,
                geo,
                data_root,
            } => run_dev(config, geo, data_root).await,
            Command::Router {
                config,
                region,
                listen,
                metrics,
                node_addrs,
            } => run_router(config, region, listen, metrics, node_addrs).await,
        }
    })
}

fn parse_id_addr(s: &str) -> Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected ID=ADDR, got {s:?}"))?;
    let id = id.parse().map_err(|_| format!("bad node id {id:?}"))?;
    Ok((id, addr.to_string()))
}

async fn run_node(config: PathBuf, id: u64, peer_addrs: Vec<(u64, String)>) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&config)?;
    secured_or_warn(&config)?;
    if let Some(addr) = config.node(NodeId(id)).and_then(|n| n.metrics_addr.clone()) {
        chatstore::metrics::install_exporter(addr.parse().context("metrics_addr")?)?;
    }
    let node =
        chatstore::node::Node::start_with(&config, NodeId(id), peer_addrs.into_iter().collect())
            .await?;
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn run_router(
    config: PathBuf,
    region: String,
    listen: String,
    metrics: Option<String>,
    node_addrs: Vec<(u64, String)>,
) -> anyhow::Result<()> {
    let config = ClusterConfig::load(&config)?;
    secured_or_warn(&config)?;
    if let Some(addr) = metrics {
        chatstore::metrics::install_exporter(addr.parse().context("--metrics")?)?;
    }
    if config.read_token_secret.is_none() {
        tracing::warn!("no read_token_secret in the cluster config: read tokens are signed with the cluster name (development only)");
    }
    let node_addrs = node_addrs.into_iter().collect();
    let router = chatstore::router::Router::with_node_addrs(
        &config,
        &region,
        &config.token_secret(),
        &node_addrs,
    )?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    tracing::info!(%region, addr = %listener.local_addr()?, "router started");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(chatstore::router::serve(router, listener, stop_rx));
    wait_for_signal().await;
    let _ = stop.send(true);
    match tokio::time::timeout(ROUTER_STOP_WAIT, server).await {
        Ok(done) => done??,
        Err(_) => {
            tracing::warn!("connections still open after {ROUTER_STOP_WAIT:?}; stopping anyway")
        }
    }
    Ok(())
}

/// How long a stopping router waits for its clients' calls to finish.
const ROUTER_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

async fn run_dev(
    config_path: PathBuf,
    geo: bool,
    data_root: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut config = ClusterConfig::load(&config_path)?;
    if let Some(root) = data_root {
        config.data_root = root;
    }
    if geo {
        if config.latency.rtt_ms.is_empty() {
            anyhow::bail!(
                "--geo needs round-trip times: add a [latency] rtt_ms table to {}",
                config_path.display()
            );
        }
        config.latency.simulate = true;
    }
    if config.latency.simulate {
        let pairs: Vec<String> = config
            .latency
            .pairs()
            .iter()
            .map(|(a, b, rtt)| format!("{a}-{b} {rtt} ms"))
            .collect();
        println!(
            "simulated round trips between regions: {}",
            pairs.join(", ")
        );
    }
    // One process, one metrics registry: served on the first node's address.
    if let Some(addr) = config.nodes.iter().find_map(|n| n.metrics_addr.clone()) {
        chatstore::metrics::install_exporter(addr.parse().context("metrics_addr")?)?;
        println!("metrics (all nodes and routers of this process): http://{addr}/metrics");
    }
    if config.tls.is_none() || config.auth.is_none() {
        eprintln!(
            "chatstore dev: DEVELOPMENT MODE - {}{}read tokens signed with {}",
            if config.tls.is_none() { "NO TLS, " } else { "" },
            if config.auth.is_none() {
                "NO AUTHENTICATION (any caller may do anything), "
            } else {
                ""
            },
            if config.read_token_secret.is_none() {
                "a well-known key"
            } else {
                "the config's secret"
            }
        );
    }
    let mut nodes = Vec::new();
    for n in &config.nodes {
        nodes.push(chatstore::node::Node::start(&config, NodeId(n.id)).await?);
    }
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut routers = Vec::new();
    let mut router_addrs = Vec::new();
    for r in &config.routers {
        let router = chatstore::router::Router::new(&config, &r.region, &config.token_secret())?;
        let listener = tokio::net::TcpListener::bind(&r.listen)
            .await
            .with_context(|| format!("listen on {}", r.listen))?;
        router_addrs.push((r.region.clone(), listener.local_addr()?));
        routers.push(tokio::spawn(chatstore::router::serve(
            router,
            listener,
            stop_rx.clone(),
        )));
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
    for (region, addr) in &router_addrs {
        println!("  router ({region}) at {addr}");
    }
    if let Some((_, addr)) = router_addrs.first() {
        println!();
        println!("Try:");
        println!("  chatctl --router {addr} send --chat 1 --sender 42 \"hello\"");
        println!("  chatctl --router {addr} history --chat 1");
        println!("  chatctl --router {addr} tail --chat 1");
    }
    println!("Press Ctrl-C to stop; data stays for the next start.");
    wait_for_signal().await;
    let _ = stop.send(true);
    for r in routers {
        if tokio::time::timeout(ROUTER_STOP_WAIT, r).await.is_err() {
            tracing::warn!(
                "a router's connections still open after {ROUTER_STOP_WAIT:?}; stopping anyway"
            );
        }
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

/// Refuses a config without TLS and tokens unless it says `insecure =
/// true`, and then warns on every start.
fn secured_or_warn(config: &ClusterConfig) -> anyhow::Result<()> {
    config.check_secured().map_err(anyhow::Error::msg)?;
    config.check_placeholders().map_err(anyhow::Error::msg)?;
    if config.tls.is_none() {
        tracing::warn!("INSECURE: no [tls] in the config, every listener is plaintext");
        if config.auth.is_some() {
            tracing::warn!("INSECURE: [auth] without [tls]: routers check tokens, but a node's own port takes reads and writes from anyone who can reach it (mutual TLS is what keeps it to routers and peers)");
        }
    }
    if config.auth.is_none() {
        tracing::warn!("INSECURE: no [auth] in the config, every caller is trusted");
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT, then arms a second one to end the process
/// at once (a stop that hangs can still be cut short).
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        eprintln!("a second stop signal: exiting without finishing the stop");
        std::process::exit(130);
    });
}
