//! Multi-process clusters: real `chatstore` node and router processes on
//! loopback, started from the built binary. Every process is killed when the
//! `ProcessCluster` is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chatstore::cluster::ClusterConfig;

use super::{free_port, three_region_config, ConfigOptions};

pub struct ProcessCluster {
    pub config: ClusterConfig,
    pub config_path: PathBuf,
    pub log_dir: PathBuf,
    nodes: BTreeMap<u64, Child>,
    routers: BTreeMap<String, (Child, String)>,
    router_ports: BTreeMap<String, u16>,
    /// Extra arguments per node (e.g. `--peer-addr` for proxies).
    pub node_args: BTreeMap<u64, Vec<String>>,
    /// Extra arguments for every router (e.g. `--node-addr`).
    pub router_args: BTreeMap<String, Vec<String>>,
}

impl ProcessCluster {
    /// Writes a three-region config under `dir` (no process starts yet).
    pub fn new(dir: &Path, opts: &ConfigOptions) -> ProcessCluster {
        let config = three_region_config(&dir.join("data"), opts);
        let config_path = dir.join("cluster.toml");
        std::fs::write(&config_path, config.to_toml()).expect("write config");
        let log_dir = dir.join("logs");
        std::fs::create_dir_all(&log_dir).expect("create log dir");
        ProcessCluster {
            config,
            config_path,
            log_dir,
            nodes: BTreeMap::new(),
            routers: BTreeMap::new(),
            router_ports: BTreeMap::new(),
            node_args: BTreeMap::new(),
            router_args: BTreeMap::new(),
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{name}.log")))
            .expect("open log")
    }

    /// Every configured node's address, comma-separated (chatctl's
    /// `--endpoints`).
    pub fn endpoints(&self) -> String {
        self.config
            .nodes
            .iter()
            .map(|n| n.raft_addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn start_node(&mut self, id: u64) {
        let child = Command::new(env!("CARGO_BIN_EXE_chatstore"))
            .args(["node", "--config"])
            .arg(&self.config_path)
            .args(["--id", &id.to_string()])
            .args(self.node_args.get(&id).cloned().unwrap_or_default())
            .env(
                "RUST_LOG",
                std::env::var("CHATSTORE_TEST_NODE_LOG")
                    .unwrap_or_else(|_| "warn,openraft=error".into()),
            )
            .stdout(Stdio::null())
            .stderr(self.log(&format!("node{id}")))
            .spawn()
            .expect("spawn chatstore node");
        self.nodes.insert(id, child);
    }

    pub fn start_all_nodes(&mut self) {
        for id in 1..=3 {
            self.start_node(id);
        }
    }

    /// The process id of node `id`, if it runs.
    pub fn node_pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id).map(|c| c.id())
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.contains_key(&id)
    }

    /// SIGSTOP (`stop = true`) or SIGCONT a node process.
    pub fn pause_node(&mut self, id: u64, stop: bool) {
        self.assert_still_running(id);
        if let Some(c) = self.nodes.get(&id) {
            let sig = if stop { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status()
                .expect("run kill to pause or resume a node");
            assert!(status.success(), "kill {sig} node {id}: {status}");
        }
    }

    /// Fails the test if node `id`, started by this cluster, has exited on
    /// its own (a panic, or a data folder it could not open after a kill):
    /// a fault aimed at it would hide that.
    pub fn assert_still_running(&mut self, id: u64) {
        if let Some(c) = self.nodes.get_mut(&id) {
            if let Ok(Some(status)) = c.try_wait() {
                panic!("node {id} exited on its own: {status}");
            }
        }
    }

    /// Waits up to `within` for node `id`, started by this cluster, to exit
    /// on its own; its exit status, or None if it still runs.
    pub fn wait_exit(&mut self, id: u64, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            let child = self.nodes.get_mut(&id)?;
            if let Ok(Some(status)) = child.try_wait() {
                self.nodes.remove(&id);
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// SIGKILL.
    pub fn kill_node(&mut self, id: u64) {
        self.assert_still_running(id);
        if let Some(mut c) = self.nodes.remove(&id) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts, on the same port) the router of `region`;
    /// returns its address.
    pub fn start_router(&mut self, region: &str) -> String {
        let port = *self
            .router_ports
            .entry(region.to_string())
            .or_insert_with(free_port);
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_chatstore"))
            .args(["router", "--config"])
            .arg(&self.config_path)
            .args(["--region", region, "--listen", &addr])
            .args(self.router_args.get(region).cloned().unwrap_or_default())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("router-{region}")))
            .spawn()
            .expect("spawn chatstore router");
        self.routers
            .insert(region.to_string(), (child, addr.clone()));
        addr
    }

    /// The router of `region`, started if it is not running.
    /// Starts the router of `region` serving its metrics too; its address
    /// and the metrics listener's.
    pub fn start_router_with_metrics(&mut self, region: &str) -> (String, String) {
        let metrics = format!("127.0.0.1:{}", super::free_port());
        self.router_args
            .insert(region.into(), vec!["--metrics".into(), metrics.clone()]);
        (self.start_router(region), metrics)
    }

    pub fn start_router_if_missing(&mut self, region: &str) -> String {
        match self.routers.get(region) {
            Some((_, addr)) => addr.clone(),
            None => self.start_router(region),
        }
    }

    pub fn kill_router(&mut self, region: &str) {
        if let Some((mut c, _)) = self.routers.remove(region) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.nodes) {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
        for (_, (mut c, _)) in std::mem::take(&mut self.routers) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts the three nodes of a fresh cluster under `dir` and waits until
/// every shard has a leader.
pub async fn start_cluster(dir: &Path, shards: u32) -> (ProcessCluster, super::Client) {
    start_cluster_with(
        dir,
        &ConfigOptions {
            shards,
            ..Default::default()
        },
    )
    .await
}

/// Like [`start_cluster`], with any config options.
pub async fn start_cluster_with(
    dir: &Path,
    opts: &ConfigOptions,
) -> (ProcessCluster, super::Client) {
    let mut cluster = ProcessCluster::new(dir, opts);
    cluster.start_all_nodes();
    let nodes = super::Client::new(&cluster.config);
    nodes
        .wait_leaders(&[1, 2, 3], Duration::from_secs(60))
        .await
        .expect("every shard elects a leader");
    (cluster, nodes)
}

/// Connects to a router, retrying while it starts.
pub async fn router_client(
    addr: &str,
) -> chatstore::api::pb::chat_store_client::ChatStoreClient<tonic::transport::Channel> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).expect("valid address");
    for _ in 0..100 {
        if let Ok(ch) = endpoint.connect().await {
            return chatstore::api::pb::chat_store_client::ChatStoreClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("router at {addr} did not come up");
}
