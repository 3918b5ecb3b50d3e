//! Cluster configuration, read from TOML.
//!
//! One file describes the whole cluster; every node and router reads the same
//! file, so they agree on the regions, the nodes, the shard count and each
//! shard's initial replicas without talking to each other.
//!
//! ```toml
//! cluster_name = "local"
//! shards = 64
//! replication_factor = 3
//! regions = ["eu", "us", "ap"]
//!
//! [[nodes]]
//! id = 1
//! region = "eu"
//! raft_addr = "127.0.0.1:7101"   # Raft transport and node API
//! data_dir = "data/node1"         # optional; default: <data_root>/node<id>
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::types::{NodeId, ShardId};

/// Fewest characters of a secured cluster's read token secret.
pub const READ_TOKEN_SECRET_MIN: usize = 32;
/// The largest shard count a cluster may be bootstrapped with.
pub const SHARDS_MAX: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read cluster config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse cluster config {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid cluster config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Names the cluster in logs and read tokens.
    pub cluster_name: String,
    /// Number of shards (Raft groups), fixed at bootstrap.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Replicas per shard; one per region when it equals the region count.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: u32,
    /// How initial replicas are chosen inside a region, fixed when the
    /// cluster is created (see `cluster::placement`): 2 spreads leaders and
    /// replica sets over a region's nodes; 1, the first scheme, put every
    /// shard preferring a region on the same node of it when regions hold
    /// as many nodes as there are regions. Absent means 1, what every
    /// cluster created before the field was built with (and what a binary
    /// that does not know the field reads a config without it as); new
    /// configs say 2.
    #[serde(default = "default_placement_version")]
    pub placement_version: u32,
    /// Regions in the order used to assign preferred leader regions.
    pub regions: Vec<String>,
    pub nodes: Vec<NodeConfig>,
    /// Where node data goes when a node has no `data_dir`: `<data_root>/node<id>`.
    /// Relative paths are relative to the current directory.
    #[serde(default = "default_data_root")]
    pub data_root: PathBuf,
    #[serde(default)]
    pub raft: RaftTiming,
    /// Overrides of a shard's preferred leader region, by shard id. Shards not
    /// listed take `regions[shard_id % regions.len()]`.
    #[serde(default)]
    pub preferred_regions: BTreeMap<u32, String>,
    /// Routers that `chatstore dev` starts (one per region is typical).
    /// Production routers are started with `chatstore router`.
    #[serde(default)]
    pub routers: Vec<RouterConfig>,
    /// Key for the MAC of read tokens; every router of a cluster must share
    /// it. Without it the cluster name is used, which is fine for development
    /// only.
    #[serde(default)]
    pub read_token_secret: Option<String>,
    /// Run without `[tls]` and `[auth]`: every listener plaintext, every
    /// caller trusted. Only for a trusted private network or a test; a
    /// node or router without TLS and tokens refuses to start otherwise.
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub erasure: ErasureConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub latency: LatencyConfig,
    /// Certificates for TLS on every node and router listener, mutual TLS
    /// between nodes. `chatctl certs init` writes them.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Bearer tokens for callers of the public and admin APIs.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
    /// The folder relative paths in `[tls]` and `[auth]` start from: the
    /// config file's folder (the current directory for inline configs).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// TLS files. Relative paths start at the config file's folder; `{id}` in
/// the node paths is the node's id.
///
/// ```toml
/// [tls]
/// ca = "certs/ca.pem"
/// node_cert = "certs/node-{id}.pem"
/// node_key = "certs/node-{id}.key"
/// router_cert = "certs/router.pem"
/// router_key = "certs/router.key"
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: signs every node, router and admin certificate.
    pub ca: PathBuf,
    pub node_cert: String,
    pub node_key: String,
    pub router_cert: PathBuf,
    pub router_key: PathBuf,
}

/// Token files: one token per line, `#` starts a comment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Tokens of frontend services: the public API.
    pub service_tokens: PathBuf,
    /// Tokens of operators: everything, including admin calls and chat
    /// moderation.
    pub admin_tokens: PathBuf,
}

/// Round-trip times between regions. Documents the deployment; with
/// `simulate = true` (`chatstore dev --geo`, tests, benchmarks) nodes and
/// routers on one host delay their calls to match ([`crate::cluster::latency`]).
///
/// ```toml
/// [latency]
/// simulate = true
/// rtt_ms = { "eu/us" = 80, "us/ap" = 150, "eu/ap" = 200 }
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyConfig {
    pub simulate: bool,
    /// Round trip in milliseconds by `"region/region"`.
    pub rtt_ms: BTreeMap<String, u64>,
}

/// Longest round trip a link may be given.
pub const RTT_MS_MAX: u64 = 10_000;

impl LatencyConfig {
    /// `(region, region, rtt_ms)` for every listed pair; unparsable keys are
    /// left out (validation reports them).
    pub fn pairs(&self) -> Vec<(String, String, u64)> {
        self.rtt_ms
            .iter()
            .filter_map(|(k, v)| {
                let (a, b) = k.split_once('/')?;
                Some((a.to_string(), b.to_string(), *v))
            })
            .collect()
    }

    /// The round trip between two regions (0 within a region or unlisted).
    pub fn rtt(&self, a: &str, b: &str) -> u64 {
        if a == b {
            return 0;
        }
        self.pairs()
            .into_iter()
            .find(|(x, y, _)| (x == a && y == b) || (x == b && y == a))
            .map(|(_, _, rtt)| rtt)
            .unwrap_or(0)
    }
}

/// How self-destructed bodies are erased from disk (node-local; see
/// [`crate::storage::seal`] and [`crate::node::erasure`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ErasureConfig {
    /// Length of one seal epoch. A self-destructed body is unrecoverable from
    /// a running node's data folder within about 2.5 epochs of its expiry.
    /// Shorter epochs erase sooner and rebuild snapshots of shards holding
    /// self-destructing messages more often.
    pub seal_epoch_secs: u64,
}

/// How long a shard keeps dedup records and change records. These are
/// replicated settings: a shard's first leader records them in its bootstrap
/// command, and the shard keeps them (a later edit here applies to shards
/// created after it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How long a resent `Send` is recognised by its client_msg_id.
    pub dedup_window_secs: u64,
    /// How long a chat's changes stay readable by `GetDifference` and
    /// `Watch`; a device whose cursor is older is told to reset.
    pub change_retention_secs: u64,
}

/// Longest dedup window or change retention allowed: ten years.
pub const RETENTION_SECS_MAX: u64 = 10 * 365 * 86_400;

impl Default for RetentionConfig {
    fn default() -> Self {
        let settings = crate::shard::apply::default_settings();
        RetentionConfig {
            dedup_window_secs: settings.dedup_window_ms / 1000,
            change_retention_secs: settings.change_retention_ms / 1000,
        }
    }
}

impl RetentionConfig {
    /// The replicated settings a new shard starts with.
    pub fn shard_settings(&self) -> crate::api::pb::replicated::ShardSettings {
        crate::api::pb::replicated::ShardSettings {
            dedup_window_ms: self.dedup_window_secs * 1000,
            change_retention_ms: self.change_retention_secs * 1000,
            ..crate::shard::apply::default_settings()
        }
    }
}

/// What a node keeps in memory for reads (node-local).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// MiB of recent messages a node keeps in memory across its replicas,
    /// for reads of the newest pages of recently read chats; 0 keeps none.
    /// At most 4 MiB of it per replica.
    pub message_mib: u64,
}

/// Largest message cache allowed: 1 TiB.
pub const MESSAGE_CACHE_MIB_MAX: u64 = 1 << 20;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            message_mib: (crate::storage::MESSAGE_CACHE_BYTES_MAX >> 20) as u64,
        }
    }
}

/// Longest seal epoch allowed: one day.
pub const SEAL_EPOCH_SECS_MAX: u64 = 86_400;

impl Default for ErasureConfig {
    fn default() -> Self {
        ErasureConfig {
            seal_epoch_secs: crate::storage::DEFAULT_SEAL_EPOCH.as_secs(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    pub region: String,
    pub listen: String,
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u64,
    pub region: String,
    /// Address of the node's gRPC server (Raft transport and node API).
    pub raft_addr: String,
    /// Address the node advertises to peers; defaults to `raft_addr`.
    #[serde(default)]
    pub advertise_addr: Option<String>,
    #[serde(default)]
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// True (the default) for the nodes that form the initial replica sets
    /// when the cluster is first started. A node added later is listed with
    /// `bootstrap = false`: it starts empty and hosts what `chatctl` moves
    /// onto it. Never change this for a node of a running cluster.
    #[serde(default = "default_true")]
    pub bootstrap: bool,
}

fn default_true() -> bool {
    true
}

/// Longest Raft timeout a config may set (1 hour).
pub const RAFT_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Most entries a config may let pass between snapshots.
pub const SNAPSHOT_EVERY_MAX: u64 = 100_000_000;

/// Raft timing. The defaults are sized for WAN links of up to ~200 ms round
/// trip (DESIGN section 3a): openraft's own defaults lose leader leases across
/// an 80 ms link.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_ms_min: u64,
    pub election_timeout_ms_max: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every_entries: u64,
    /// Entries kept behind a snapshot for followers that are slightly behind.
    pub logs_kept_behind_snapshot: u64,
    pub install_snapshot_timeout_ms: u64,
    /// A shard with no writes for this long, whose followers hold the whole
    /// log, stops its Raft timers until the next write; node-pair pings
    /// stand in for its heartbeats. 0 keeps every shard ticking.
    pub quiesce_after_ms: u64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            heartbeat_ms: 250,
            election_timeout_ms_min: 750,
            election_timeout_ms_max: 1000,
            snapshot_every_entries: 10_000,
            logs_kept_behind_snapshot: 1_000,
            install_snapshot_timeout_ms: 5 * 60 * 1000,
            quiesce_after_ms: 5_000,
        }
    }
}

fn default_shards() -> u32 {
    64
}
fn default_replication_factor() -> u32 {
    3
}
fn default_placement_version() -> u32 {
    1
}
fn default_data_root() -> PathBuf {
    PathBuf::from("data")
}

impl ClusterConfig {
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: ClusterConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source: Box::new(source),
            })?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.validate()?;
        if config.read_token_secret.is_some() && !config.insecure {
            crate::security::warn_if_exposed(path, "the config, which holds read_token_secret,");
        }
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<ClusterConfig, ConfigError> {
        let config: ClusterConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// `path` from the config: relative ones start at the config's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        }
    }

    /// Refuses to run without TLS and tokens unless the config says
    /// `insecure = true`.
    pub fn check_secured(&self) -> Result<(), String> {
        if self.insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        if self.tls.is_none() {
            missing.push("[tls]");
        }
        if self.auth.is_none() {
            missing.push("[auth]");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the config has no {}: refusing to run with plaintext listeners and no caller \
             tokens. Run `chatctl certs init --config <file> --out <dir>` and add what it prints, \
             or set `insecure = true` for a trusted private network or a test",
            missing.join(" and ")
        ))
    }

    /// Refuses a read token secret left as the example configs' placeholder
    /// (anyone can read it in this repository) and a secured config with
    /// none (tokens would be signed with the cluster name, which every client
    /// sees): either signs tokens anyone could forge. A secured config's
    /// secret shorter than [`READ_TOKEN_SECRET_MIN`] is warned about.
    pub fn check_placeholders(&self) -> Result<(), String> {
        if !self.insecure && self.read_token_secret.is_none() {
            return Err(
                "the config has no read_token_secret: read tokens would be signed with \
                        the cluster name. Set one (`chatctl certs init` prints one, or \
                        `openssl rand -hex 32`), the same on every node and router, or set \
                        `insecure = true`"
                    .into(),
            );
        }
        if self
            .read_token_secret
            .as_deref()
            .is_some_and(|s| s.starts_with("REPLACE-ME"))
        {
            return Err(
                "read_token_secret is still the example's placeholder: set a secret of \
                        your own (for example `openssl rand -hex 32`), the same on every node \
                        and router"
                    .into(),
            );
        }
        if let Some(secret) = self.read_token_secret.as_deref().filter(|_| !self.insecure) {
            if secret.trim().len() < READ_TOKEN_SECRET_MIN {
                // Warned, not refused: a cluster running with a shorter one
                // must still restart on this binary, one process at a time.
                tracing::warn!(
                    "read_token_secret has {} characters; use at least {READ_TOKEN_SECRET_MIN} \
                     (for example `openssl rand -hex 32`), or read tokens may be forged",
                    secret.trim().len()
                );
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a cluster config always serializes")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.cluster_name.is_empty() {
            return bad("cluster_name is empty".into());
        }
        if self.shards == 0 || self.shards > SHARDS_MAX {
            return bad(format!(
                "shards = {} (must be 1..={SHARDS_MAX})",
                self.shards
            ));
        }
        if self.regions.is_empty() {
            return bad("no regions".into());
        }
        if !(1..=crate::cluster::placement::PLACEMENT_VERSION).contains(&self.placement_version) {
            return bad(format!(
                "placement_version = {} (must be 1..={})",
                self.placement_version,
                crate::cluster::placement::PLACEMENT_VERSION
            ));
        }
        if !(1..=SEAL_EPOCH_SECS_MAX).contains(&self.erasure.seal_epoch_secs) {
            return bad(format!(
                "erasure.seal_epoch_secs = {} (must be 1..={SEAL_EPOCH_SECS_MAX})",
                self.erasure.seal_epoch_secs
            ));
        }
        for (name, secs) in [
            ("dedup_window_secs", self.retention.dedup_window_secs),
            (
                "change_retention_secs",
                self.retention.change_retention_secs,
            ),
        ] {
            if !(1..=RETENTION_SECS_MAX).contains(&secs) {
                return bad(format!(
                    "retention.{name} = {secs} (must be 1..={RETENTION_SECS_MAX})"
                ));
            }
        }
        if self.cache.message_mib > MESSAGE_CACHE_MIB_MAX {
            return bad(format!(
                "cache.message_mib = {} (must be 0..={MESSAGE_CACHE_MIB_MAX})",
                self.cache.message_mib
            ));
        }
        let regions: BTreeSet<&str> = self.regions.iter().map(String::as_str).collect();
        if regions.len() != self.regions.len() {
            return bad("a region is listed twice".into());
        }
        let mut pairs = BTreeSet::new();
        for (key, rtt) in &self.latency.rtt_ms {
            let Some((a, b)) = key.split_once('/') else {
                return bad(format!(
                    "latency.rtt_ms key {key:?} is not \"region/region\""
                ));
            };
            if a == b || !regions.contains(a) || !regions.contains(b) {
                return bad(format!(
                    "latency.rtt_ms key {key:?} must name two different configured regions"
                ));
            }
            if !pairs.insert((a.min(b), a.max(b))) {
                return bad(format!("latency.rtt_ms lists {a} and {b} twice"));
            }
            if *rtt > RTT_MS_MAX {
                return bad(format!(
                    "latency.rtt_ms {key:?} = {rtt} (at most {RTT_MS_MAX})"
                ));
            }
        }
        let mut ids = BTreeSet::new();
        for n in &self.nodes {
            if n.id == 0 {
                return bad("node id 0 is reserved".into());
            }
            if !ids.insert(n.id) {
                return bad(format!("node id {} is listed twice", n.id));
            }
            if !regions.contains(n.region.as_str()) {
                return bad(format!("node {} is in unknown region {:?}", n.id, n.region));
            }
        }
        // Placement gives every region shards to lead: one without a
        // bootstrap node would leave them led elsewhere for good.
        if let Some(r) = self
            .regions
            .iter()
            .find(|r| !self.nodes.iter().any(|n| n.bootstrap && n.region == **r))
        {
            return bad(format!(
                "region {r:?} has no bootstrap node; every region in `regions` needs one"
            ));
        }
        let rf = self.replication_factor as usize;
        let bootstrap_nodes = self.nodes.iter().filter(|n| n.bootstrap).count();
        if rf == 0 || rf > bootstrap_nodes {
            return bad(format!(
                "replication_factor = {rf} but the config has {bootstrap_nodes} bootstrap nodes"
            ));
        }
        for r in &self.routers {
            if !regions.contains(r.region.as_str()) {
                return bad(format!(
                    "router {} is in unknown region {:?}",
                    r.listen, r.region
                ));
            }
        }
        for (shard, region) in &self.preferred_regions {
            if *shard >= self.shards {
                return bad(format!("preferred_regions names shard {shard} >= shards"));
            }
            if !regions.contains(region.as_str()) {
                return bad(format!(
                    "preferred region {region:?} of shard {shard} is unknown"
                ));
            }
        }
        // Two nodes reached at one address would be one node counted twice:
        // its acknowledgements and votes would make false majorities.
        let mut addrs = BTreeSet::new();
        for n in &self.nodes {
            if !addrs.insert(n.advertised()) {
                return bad(format!(
                    "node {} is reached at {}, as another node is",
                    n.id,
                    n.advertised()
                ));
            }
        }
        let t = &self.raft;
        if t.heartbeat_ms == 0
            || t.election_timeout_ms_max > RAFT_TIMEOUT_MS_MAX
            || t.election_timeout_ms_min <= t.heartbeat_ms.saturating_mul(2)
        {
            return bad(format!(
                "raft.election_timeout_ms_min must exceed 2 x heartbeat_ms, and the election \
                 timeouts stay under {RAFT_TIMEOUT_MS_MAX} ms"
            ));
        }
        if t.election_timeout_ms_max <= t.election_timeout_ms_min {
            return bad("raft.election_timeout_ms_max must exceed election_timeout_ms_min".into());
        }
        if t.snapshot_every_entries == 0 || t.snapshot_every_entries > SNAPSHOT_EVERY_MAX {
            return bad(format!(
                "raft.snapshot_every_entries must be 1 to {SNAPSHOT_EVERY_MAX}"
            ));
        }
        if t.install_snapshot_timeout_ms < t.election_timeout_ms_max
            || t.install_snapshot_timeout_ms > RAFT_TIMEOUT_MS_MAX
        {
            return bad(format!(
                "raft.install_snapshot_timeout_ms must be at least election_timeout_ms_max and \
                 under {RAFT_TIMEOUT_MS_MAX} ms"
            ));
        }
        Ok(())
    }

    /// The secret read tokens are signed with.
    pub fn token_secret(&self) -> Vec<u8> {
        match &self.read_token_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => self.cluster_name.as_bytes().to_vec(),
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id.0)
    }

    pub fn shard_ids(&self) -> impl Iterator<Item = ShardId> {
        (0..self.shards).map(|s| ShardId(s as u64))
    }

    /// The data folder of node `id`.
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        match self.node(id).and_then(|n| n.data_dir.clone()) {
            Some(dir) => dir,
            None => self.data_root.join(format!("node{}", id.0)),
        }
    }
}

impl NodeConfig {
    pub fn advertised(&self) -> &str {
        self.advertise_addr.as_deref().unwrap_or(&self.raft_addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configs shipped in `cluster-configs/` (and the one embedded in
    /// the Kubernetes ConfigMap) parse and validate.
    #[test]
    fn shipped_configs_are_valid() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster-configs");
        let mut checked = 0;
        for entry in std::fs::read_dir(&root).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = ClusterConfig::load(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(!c.nodes.is_empty());
                // Local configs say insecure; real ones carry TLS and tokens.
                c.check_secured()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                // A secret to replace is refused until it is replaced.
                let placeholder = std::fs::read_to_string(&path)
                    .unwrap()
                    .contains("REPLACE-ME");
                assert_eq!(
                    c.check_placeholders().is_err(),
                    placeholder,
                    "{}",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked >= 2, "local and multi-host examples");
        // The ConfigMap holds the file as an indented block after
        // `cluster.toml: |`.
        let yaml = std::fs::read_to_string(root.join("k8s/configmap.yaml")).unwrap();
        let block = yaml
            .split("cluster.toml: |\n")
            .nth(1)
            .expect("configmap block");
        let text: String = block
            .lines()
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
            .collect();
        let c = ClusterConfig::from_toml(&text).expect("configmap cluster.toml");
        assert_eq!(c.nodes.len(), 9);
        assert!(c.tls.is_some() && c.auth.is_some() && !c.insecure);
    }

    const CONFIG: &str = r#"
cluster_name = "t"
shards = 8
regions = ["eu", "us", "ap"]
[[nodes]]
id = 1
region = "eu"
raft_addr = "127.0.0.1:1"
[[nodes]]
id = 2
region = "us"
raft_addr = "127.0.0.1:2"
[[nodes]]
id = 3
region = "ap"
raft_addr = "127.0.0.1:3"
"#;

    #[test]
    fn parses_and_round_trips() {
        let c = ClusterConfig::from_toml(CONFIG).unwrap();
        assert_eq!(c.shards, 8);
        assert_eq!(c.raft, RaftTiming::default());
        let again = ClusterConfig::from_toml(&c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    /// A region no bootstrap node is in is refused; a short token secret is
    /// only warned about (a running cluster must restart on this binary).
    #[test]
    fn rejects_a_region_without_a_bootstrap_node() {
        let no_ap = CONFIG.replace("region = \"ap\"", "region = \"us\"");
        let err = ClusterConfig::from_toml(&no_ap).unwrap_err();
        assert!(
            format!("{err:#}").contains("\"ap\" has no bootstrap node"),
            "{err:#}"
        );
        let with_secret = |secret: &str, insecure: bool| {
            let text = format!("read_token_secret = {secret:?}\ninsecure = {insecure}\n{CONFIG}");
            ClusterConfig::from_toml(&text)
                .unwrap()
                .check_placeholders()
        };
        assert!(with_secret("short-secret", false).is_ok());
        assert!(with_secret("REPLACE-ME-and-more-than-32-characters", false).is_err());
    }

    #[test]
    fn rejects_bad_configs() {
        let dup = CONFIG.replace("id = 2", "id = 1");
        assert!(ClusterConfig::from_toml(&dup).is_err());
        let same_addr = CONFIG.replace("127.0.0.1:2", "127.0.0.1:1");
        let err = ClusterConfig::from_toml(&same_addr).unwrap_err();
        assert!(format!("{err:#}").contains("as another node is"), "{err:#}");
        for raft in [
            "snapshot_every_entries = 0",
            "install_snapshot_timeout_ms = 0",
            "heartbeat_ms = 18446744073709551615",
        ] {
            let text = format!("{CONFIG}\n[raft]\n{raft}\n");
            assert!(ClusterConfig::from_toml(&text).is_err(), "{raft}");
        }
        let bad_region = CONFIG.replace("region = \"ap\"", "region = \"mars\"");
        assert!(ClusterConfig::from_toml(&bad_region).is_err());
        let zero = CONFIG.replace("shards = 8", "shards = 0");
        assert!(ClusterConfig::from_toml(&zero).is_err());
        let unknown = format!("{CONFIG}\nbogus = 1\n");
        assert!(ClusterConfig::from_toml(&unknown).is_err());
        let huge_cache = format!(
            "{CONFIG}\n[cache]\nmessage_mib = {}\n",
            MESSAGE_CACHE_MIB_MAX + 1
        );
        let err = ClusterConfig::from_toml(&huge_cache).unwrap_err();
        assert!(format!("{err:#}").contains("cache.message_mib"), "{err:#}");
        let no_cache = format!("{CONFIG}\n[cache]\nmessage_mib = 0\n");
        assert_eq!(
            ClusterConfig::from_toml(&no_cache)
                .unwrap()
                .cache
                .message_mib,
            0
        );
        assert_eq!(
            ClusterConfig::from_toml(CONFIG).unwrap().cache.message_mib,
            256
        );
        let no_dedup = format!("{CONFIG}\n[retention]\ndedup_window_secs = 0\n");
        let err = ClusterConfig::from_toml(&no_dedup).unwrap_err();
        assert!(
            format!("{err:#}").contains("retention.dedup_window_secs"),
            "{err:#}"
        );
        let day = format!("{CONFIG}\n[retention]\nchange_retention_secs = 86400\n");
        let settings = ClusterConfig::from_toml(&day)
            .unwrap()
            .retention
            .shard_settings();
        assert_eq!(settings.change_retention_ms, 86_400_000);
        assert_eq!(
            settings.dedup_window_ms,
            crate::shard::apply::default_settings().dedup_window_ms
        );
    }
}
