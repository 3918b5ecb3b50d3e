//! `chatctl`, the cluster CLI. Talks to nodes' node API, and to routers'
//! public API for the data commands and the load generator (`bench`).
//!
//! Exit codes: 0 success, 1 a check found a problem (e.g. `verify` found
//! diverging replicas), 2 a node could not be reached or the call failed.

use clap::{Parser, Subcommand};

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
    /// The cluster CA (PEM): connect to nodes and routers over TLS.
    #[arg(long, env = "CHATSTORE_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for nodes, which require mutual TLS.
    #[arg(long, env = "CHATSTORE_CERT", global = true)]
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "CHATSTORE_KEY", global = true)]
    pub key: Option<std::path::PathBuf>,
    /// A file whose first line is the bearer token to send (an admin token
    /// for cluster operations and moderation).
    #[arg(long, env = "CHATSTORE_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Nodes (up, down, draining, replicas, leaders) and shard health.
    Status,
    /// Every shard: leader, voters, learners, commit index, lag, and whether
    /// it is quiet (idle, timers stopped).
    Shards,
    /// Compare per-chat digests across every replica of every shard.
    Verify,
    /// Check that a newly started node is up and in this cluster, and clear
    /// its draining mark if it has one, ready for rebalance.
    AddNode {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// Its address, if it is not among --endpoints.
        #[arg(long)]
        addr: Option<String>,
        /// Bring back a node marked draining (drained, or taken out with
        /// remove-node): rebalancing may place replicas there again.
        #[arg(long)]
        undrain: bool,
    },
    /// Move every replica off a node (leaderships too) and wait until it is
    /// empty. The node stays out of rebalancing.
    Drain {
        node: u64,
        #[arg(long)]
        dry_run: bool,
    },
    /// Take a drained node out: refuses while any shard still lists it.
    RemoveNode {
        node: u64,
        #[arg(long)]
        dry_run: bool,
    },
    /// Move one replica of a shard from one node to another (learner,
    /// catch-up, then the old one's vote moves to it).
    MoveReplica {
        shard: u64,
        from: u64,
        to: u64,
        #[arg(long)]
        dry_run: bool,
    },
    /// Hand a shard's leadership to a voter (default: the leader picks a
    /// caught-up voter other than itself, one in the shard's preferred region
    /// first, else the lowest id).
    TransferLeader {
        shard: u64,
        to: Option<u64>,
        #[arg(long)]
        dry_run: bool,
    },
    /// Move replicas off draining nodes, spread them evenly within each
    /// region, delete stale copies, and put leaders in preferred regions.
    Rebalance {
        #[arg(long)]
        dry_run: bool,
    },
    /// Build a snapshot of every replica (or of one shard's replicas).
    Snapshot {
        #[arg(long)]
        shard: Option<u64>,
    },
    /// Snapshot, then purge the Raft log up to the snapshot.
    Compact {
        #[arg(long)]
        shard: Option<u64>,
    },
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
    /// Measure openraft alone in this process (in-memory log, no network,
    /// a state machine that does nothing): the floor under chatstore's writes.
    BenchRaft(raft_floor::RaftFloorArgs),
    /// Certificates and tokens for a cluster.
    #[command(subcommand)]
    Certs(CertsCmd),
}

#[derive(Subcommand)]
pub enum CertsCmd {
    /// Write a CA, a certificate per node, a router and an admin
    /// certificate, and service and admin tokens for a cluster config.
    Init {
        /// The cluster config (node ids and addresses go into certificates).
        #[arg(long, env = "CHATSTORE_CONFIG")]
        config: std::path::PathBuf,
        /// Where to write the files.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Extra DNS names or IPs for the router certificate (repeatable).
        #[arg(long = "router-name")]
        router_names: Vec<String>,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
    /// Write a certificate for one node added to the config after `init`,
    /// signed with the cluster's CA (its ca.pem and ca.key).
    Node {
        /// The cluster config, with the node's [[nodes]] entry.
        #[arg(long, env = "CHATSTORE_CONFIG")]
        config: std::path::PathBuf,
        /// The folder holding ca.pem and ca.key from `certs init`.
        #[arg(long)]
        ca_dir: std::path::PathBuf,
        /// The node's id.
        #[arg(long)]
        id: u64,
        /// Where to write node-<id>.pem and node-<id>.key.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Replace files that exist.
        #[arg(long)]
        force: bool,
    },
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

/// How chatctl reaches the cluster: TLS and a bearer token, if given.
pub struct Access {
    pub tls: Option<crate::security::Tls>,
    pub token: crate::security::BearerToken,
}

static ACCESS: std::sync::OnceLock<Access> = std::sync::OnceLock::new();

/// The process's access settings (none until [`run`] sets them).
pub fn access() -> &'static Access {
    ACCESS.get_or_init(|| Access {
        tls: None,
        token: crate::security::BearerToken::default(),
    })
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let tls = match &cli.ca {
        Some(ca) => Some(crate::security::Tls::from_files(
            ca,
            cli.cert.as_deref(),
            cli.key.as_deref(),
        )?),
        None if cli.cert.is_some() => anyhow::bail!("--cert needs --ca (the cluster CA)"),
        None => None,
    };
    let token = match &cli.token_file {
        Some(f) => crate::security::BearerToken::from_file(f)?,
        None => crate::security::BearerToken::default(),
    };
    let _ = ACCESS.set(Access { tls, token });
    match cli.command {
        Cmd::Certs(CertsCmd::Init {
            config,
            out,
            router_names,
            force,
        }) => certs::init(&config, &out, &router_names, force),
        Cmd::Certs(CertsCmd::Node {
            config,
            ca_dir,
            id,
            out,
            force,
        }) => certs::node(&config, &ca_dir, id, &out, force),
        Cmd::Status => cluster::status(&cli.endpoints, cli.json).await,
        Cmd::Shards => cluster::shards(&cli.endpoints, cli.json).await,
        Cmd::Verify => cluster::verify(&cli.endpoints, cli.json).await,
        Cmd::AddNode { id, addr, undrain } => {
            cluster::add_node(&cli.endpoints, id, addr, undrain, cli.json).await
        }
        Cmd::Drain { node, dry_run } => {
            cluster::drain(&cli.endpoints, node, dry_run, cli.json).await
        }
        Cmd::RemoveNode { node, dry_run } => {
            cluster::remove_node(&cli.endpoints, node, dry_run, cli.json).await
        }
        Cmd::MoveReplica {
            shard,
            from,
            to,
            dry_run,
        } => cluster::move_replica(&cli.endpoints, shard, from, to, dry_run, cli.json).await,
        Cmd::TransferLeader { shard, to, dry_run } => {
            cluster::transfer_leader(&cli.endpoints, shard, to, dry_run, cli.json).await
        }
        Cmd::Rebalance { dry_run } => cluster::rebalance(&cli.endpoints, dry_run, cli.json).await,
        Cmd::Snapshot { shard } => cluster::snapshot(&cli.endpoints, shard, false, cli.json).await,
        Cmd::Compact { shard } => cluster::snapshot(&cli.endpoints, shard, true, cli.json).await,
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
        Cmd::BenchRaft(args) => raft_floor::command(args, cli.json).await,
        Cmd::BenchSuite(args) => {
            bench_suite::command(args, &cli.endpoints, &cli.router, cli.json).await
        }
        Cmd::Chat(ChatCmd::Info { chat }) => {
            let placement = cluster::chat_placement(&cli.endpoints, chat).await;
            data::chat_info(&cli.router, chat, placement, cli.json).await
        }
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
mod certs;
mod cluster;
mod data;
mod ops;
mod raft_floor;
