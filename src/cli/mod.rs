//! `chatctl`, the cluster CLI. Talks to nodes' node API, and to routers'
//! public API for the data commands and the load generator (`bench`).
//!
//! Exit codes: 0 success, 1 a check found a problem (e.g. `verify` found
//! diverging replicas), 2 a node could not be reached or the call failed.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::api::pb::node::node_api_client::NodeApiClient;
use crate::api::pb::node::{ChatDigestsRequest, NodeStatus, StatusRequest};

#[derive(Parser)]
#[command(name = "chatctl", version, about = "Operate a chatstore cluster")]
pub struct Cli {
    /// Node addresses (host:port), comma-separated.
    #[arg(
        long,
        env = "CHATSTORE_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    pub endpoints: Vec<String>,
    /// Router address (host:port) for the data commands.
    #[arg(
        long,
        env = "CHATSTORE_ROUTER",
        default_value = "127.0.0.1:7201",
        global = true
    )]
    pub router: String,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Nodes and shards: leaders, terms, log and applied indexes.
    Status,
    /// Compare per-chat digests across every replica of every shard.
    Verify,
    /// Send a message (debugging).
    Send {
        #[arg(long)]
        chat: u64,
        #[arg(long)]
        sender: u64,
        /// Idempotency key; random when not given.
        #[arg(long)]
        client_msg_id: Option<u64>,
        body: String,
    },
    /// Show a chat's messages, newest first (debugging).
    History {
        #[arg(long)]
        chat: u64,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Show messages below this seq (0 = from the newest).
        #[arg(long, default_value_t = 0)]
        before: u64,
    },
    /// Inspect or moderate chats.
    #[command(subcommand)]
    Chat(ChatCmd),
    /// Follow a chat's changes as they happen (Ctrl-C to stop).
    Tail {
        #[arg(long)]
        chat: u64,
        /// Start after this pts (0 = from the beginning).
        #[arg(long, default_value_t = 0)]
        from_pts: u64,
    },
    /// Load the routers through the public API and report throughput and
    /// latency percentiles.
    Bench(bench::BenchArgs),
    /// Run `make bench`'s fixed set of benchmarks against a running cluster
    /// and write the results as a markdown section.
    BenchSuite(bench_suite::SuiteArgs),
}

#[derive(Subcommand)]
pub enum ChatCmd {
    /// A chat's last seq, pts, closed state and read cursors.
    Info { chat: u64 },
    /// Close chats: they refuse writes and hide their content from reads.
    Close {
        /// The chat to close (or use --file).
        chat: Option<u64>,
        /// A file of chat ids, one per line (# starts a comment).
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Why, recorded in each chat's log.
        #[arg(long)]
        reason: String,
        /// Show what would be closed and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Reopen closed chats.
    Reopen {
        chat: Option<u64>,
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::Status => status(&cli.endpoints, cli.json).await,
        Cmd::Verify => verify(&cli.endpoints, cli.json).await,
        Cmd::Send {
            chat,
            sender,
            client_msg_id,
            body,
        } => {
            data::send(
                &cli.router,
                chat,
                sender,
                client_msg_id.unwrap_or_else(rand::random),
                body,
                cli.json,
            )
            .await
        }
        Cmd::History {
            chat,
            limit,
            before,
        } => data::history(&cli.router, chat, limit, before, cli.json).await,
        Cmd::Tail { chat, from_pts } => data::tail(&cli.router, chat, from_pts, cli.json).await,
        Cmd::Bench(args) => bench::command(args, &cli.router, cli.json).await,
        Cmd::BenchSuite(args) => {
            bench_suite::command(args, &cli.endpoints, &cli.router, cli.json).await
        }
        Cmd::Chat(ChatCmd::Info { chat }) => data::chat_info(&cli.router, chat, cli.json).await,
        Cmd::Chat(ChatCmd::Close {
            chat,
            file,
            reason,
            dry_run,
        }) => {
            let chats = data::chat_ids(chat, file.as_deref())?;
            data::moderate(&cli.router, &chats, Some(reason), dry_run, cli.json).await
        }
        Cmd::Chat(ChatCmd::Reopen {
            chat,
            file,
            dry_run,
        }) => {
            let chats = data::chat_ids(chat, file.as_deref())?;
            data::moderate(&cli.router, &chats, None, dry_run, cli.json).await
        }
    }
}

mod bench;
mod bench_suite;
mod data;

async fn client(addr: &str) -> anyhow::Result<NodeApiClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("bad endpoint {addr:?}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| {
            format!("cannot reach node at {addr}; is it running? (check --endpoints)")
        })?;
    Ok(NodeApiClient::new(channel))
}

async fn statuses(endpoints: &[String]) -> (Vec<(String, NodeStatus)>, Vec<String>) {
    let mut ok = Vec::new();
    let mut failed = Vec::new();
    for addr in endpoints {
        match client(addr).await {
            Ok(mut c) => match c.status(StatusRequest {}).await {
                Ok(s) => ok.push((addr.clone(), s.into_inner())),
                Err(e) => failed.push(format!("{addr}: {}", e.message())),
            },
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    (ok, failed)
}

#[derive(Serialize)]
struct ShardRow {
    shard: u64,
    leader: u64,
    term: u64,
    replicas: BTreeMap<u64, (u64, u64)>,
}

async fn status(endpoints: &[String], json: bool) -> anyhow::Result<i32> {
    let (nodes, failed) = statuses(endpoints).await;
    let mut rows: BTreeMap<u64, ShardRow> = BTreeMap::new();
    for (_, n) in &nodes {
        for s in &n.shards {
            let row = rows.entry(s.shard_id).or_insert(ShardRow {
                shard: s.shard_id,
                leader: 0,
                term: 0,
                replicas: BTreeMap::new(),
            });
            if s.is_leader || (row.leader == 0 && s.term >= row.term) {
                row.leader = s.leader_node;
                row.term = s.term;
            }
            row.replicas
                .insert(n.node_id, (s.last_log_index, s.applied_index));
        }
    }
    if json {
        let out = serde_json::json!({
            "nodes": nodes.iter().map(|(a, n)| serde_json::json!({"addr": a, "id": n.node_id, "region": n.region, "shards": n.shards.len()})).collect::<Vec<_>>(),
            "unreachable": failed,
            "shards": rows.values().collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<22} {:>6} {:<8} {:>7}", "NODE", "ID", "REGION", "SHARDS");
        for (addr, n) in &nodes {
            println!(
                "{:<22} {:>6} {:<8} {:>7}",
                addr,
                n.node_id,
                n.region,
                n.shards.len()
            );
        }
        for f in &failed {
            println!("{f:<22}  UNREACHABLE");
        }
        println!();
        println!(
            "{:>6} {:>7} {:>6}  REPLICAS (node: last log / applied)",
            "SHARD", "LEADER", "TERM"
        );
        for r in rows.values() {
            let reps: Vec<String> = r
                .replicas
                .iter()
                .map(|(n, (l, a))| format!("{n}: {l}/{a}"))
                .collect();
            let leader = if r.leader == 0 {
                "-".to_string()
            } else {
                r.leader.to_string()
            };
            println!(
                "{:>6} {:>7} {:>6}  {}",
                r.shard,
                leader,
                r.term,
                reps.join("  ")
            );
        }
    }
    Ok(if failed.is_empty() { 0 } else { 2 })
}

async fn verify(endpoints: &[String], json: bool) -> anyhow::Result<i32> {
    let (nodes, failed) = statuses(endpoints).await;
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("error: {f}");
        }
        return Ok(2);
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut shards: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for (addr, n) in &nodes {
        for s in &n.shards {
            shards.entry(s.shard_id).or_default().push(addr);
        }
    }
    for (shard, addrs) in &shards {
        let mut seen: Option<(String, u64, Vec<_>)> = None;
        for addr in addrs {
            let reply = client(addr)
                .await?
                .chat_digests(ChatDigestsRequest { shard_id: *shard })
                .await
                .with_context(|| format!("digests of shard {shard} from {addr}"))?
                .into_inner();
            checked += reply.chats.len();
            match &seen {
                None => seen = Some((addr.to_string(), reply.applied_index, reply.chats)),
                Some((first, applied, chats)) => {
                    if *applied == reply.applied_index && *chats != reply.chats {
                        problems.push(format!(
                            "shard {shard}: {addr} and {first} differ at applied index {applied}"
                        ));
                    } else if *applied != reply.applied_index {
                        problems.push(format!(
                            "shard {shard}: {addr} at applied {} and {first} at {applied} (lagging; run again once writes stop)",
                            reply.applied_index
                        ));
                    }
                }
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"chat_digests_checked": checked, "problems": problems})
        );
    } else if problems.is_empty() {
        println!(
            "ok: {} shards, {checked} chat digests compared, all replicas identical",
            shards.len()
        );
    } else {
        for p in &problems {
            println!("DIVERGED {p}");
        }
    }
    Ok(if problems.is_empty() { 0 } else { 1 })
}
