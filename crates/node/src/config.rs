//! The node's one typed configuration: a TOML file, then `SOVRA_*` environment
//! overrides, validated once at start with errors that name the bad field.

use serde::{Deserialize, Serialize};
use sovra_types::RegionId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique within the cluster; Raft will know nodes by it. May come from
    /// `SOVRA_NODE_ID` instead (one config file for every container).
    #[serde(default)]
    pub node_id: u64,
    /// The region whose data this node may hold (R1/R2). May come from
    /// `SOVRA_REGION` instead.
    #[serde(default)]
    pub region: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    pub data_dir: PathBuf,
    /// Public gRPC API; port 0 picks a free port (printed at start).
    #[serde(default = "default_grpc")]
    pub grpc_listen: SocketAddr,
    /// Node-to-node API (Raft, forwarded writes): only other nodes call it,
    /// proving membership with the cluster secret. Never the public listener;
    /// keep it on a private network. Port 0 picks a free port.
    #[serde(default = "default_cluster")]
    pub cluster_listen: SocketAddr,
    /// The secret every node of the cluster shares (at least 16 printable
    /// ASCII bytes), or `cluster_secret_file` naming a file holding it. Required
    /// when `join` lists other nodes (and on a bootstrap node others will join);
    /// a node alone gets a random one.
    #[serde(default)]
    pub cluster_secret: Option<String>,
    #[serde(default)]
    pub cluster_secret_file: Option<PathBuf>,
    /// TLS on both listeners: mutual TLS with node identities between nodes,
    /// a server certificate for clients (who add their API key). `false`
    /// serves both in plaintext, for a trusted network only; it must be said:
    /// with no TLS setting at all the node refuses to start.
    #[serde(default)]
    pub tls: Option<bool>,
    /// PEM: this node's certificate (signed by the cluster CA, naming
    /// `node-<id>.sovra` and `node-<id>.<region>.sovra`: `sovra certs node`),
    /// then any intermediates. `{node_id}` in any of the three paths is
    /// replaced by the node's id (one secret mounted on every pod).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM: the certificate's private key.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM: the cluster CA certificate(s) peers' certificates must chain to.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// How often the three files are read again; changed files are used for
    /// new connections without a restart.
    #[serde(default = "default_tls_reload_ms")]
    pub tls_reload_ms: u64,
    /// Most bytes of public requests in flight on this node (each counted
    /// [`crate::limits::COPIES`] times its body, until its answer is sent);
    /// a request past it is answered RESOURCE_EXHAUSTED at once, not queued.
    /// At least 3 x 16 MiB, so the largest message fits.
    #[serde(default = "default_max_inflight_bytes")]
    pub max_inflight_bytes: usize,
    /// Most public requests in flight on this node (health checks aside);
    /// past it, RESOURCE_EXHAUSTED.
    #[serde(default = "default_max_inflight_requests")]
    pub max_inflight_requests: usize,
    /// Most requests one client connection has in flight; more wait for
    /// that connection's earlier ones (HTTP/2 streams beyond twice it are refused).
    #[serde(default = "default_max_requests_per_connection")]
    pub max_requests_per_connection: usize,
    /// Prometheus `/metrics` over HTTP; port 0 picks a free port.
    #[serde(default = "default_metrics")]
    pub metrics_listen: SocketAddr,
    /// Bound on sled's page cache across every database of the node: each
    /// replica's own database gets `cache_capacity_mb / max_replicas`.
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
    /// Most replicas this node holds at once, its meta replica included (the
    /// cache budget's shares); a replica beyond it is reported failed, naming
    /// this field.
    #[serde(default = "default_max_replicas")]
    pub max_replicas: usize,
    /// Threads for index builds and compaction.
    #[serde(default = "default_threads")]
    pub index_threads: usize,
    /// The HNSW engine shards are indexed with: `sovra` (Sovra's own) or
    /// `hnsw_rs` (the second engine, kept to compare against).
    #[serde(default = "default_engine")]
    pub index_engine: String,
    /// Threads for leaf reads (search, get, scroll), at a lower CPU priority
    /// than the runtime; reads beyond them queue. 0: one per core.
    #[serde(default)]
    pub search_threads: usize,
    /// Compact a shard when tombstones reach this share of its slots.
    #[serde(default = "default_ratio")]
    pub compaction_tombstone_ratio: f64,
    #[serde(default = "default_check")]
    pub compaction_check_seconds: u64,
    /// How often the leader of each shard on this node looks for points past
    /// their `expires_at` and erases them through the log (T1: they are never
    /// returned once expired, and are removed within this interval).
    #[serde(default = "default_retention_sweep_ms")]
    pub retention_sweep_ms: u64,
    /// How often each replica checks for erasures to purge from its index,
    /// snapshots and Raft log.
    #[serde(default = "default_purge_check_ms")]
    pub purge_check_ms: u64,
    /// What this node does: `meta` (a replica of the cluster's metadata group:
    /// a voter or learner), `data` (holds shard replicas of its region),
    /// `coordinator` (serves the public API). All three by default.
    #[serde(default = "default_roles")]
    pub roles: Vec<String>,
    /// Only the first node of a new cluster: it starts the meta group alone
    /// and prints the first admin key once. Every other node joins.
    #[serde(default)]
    pub bootstrap: bool,
    /// Cluster addresses (`host:port` of `cluster_listen`) of nodes already in
    /// the cluster. A node announces itself to them on every start, so one
    /// restarted on a new port is found again.
    #[serde(default)]
    pub join: Vec<String>,
    /// The addresses other nodes and clients reach this node at; default: the
    /// bound listener addresses (which must then not be 0.0.0.0).
    #[serde(default)]
    pub advertise_grpc_addr: Option<String>,
    #[serde(default)]
    pub advertise_cluster_addr: Option<String>,
    /// How often this node heartbeats to the meta group.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// A node silent this long is marked down by the meta leader.
    #[serde(default = "default_down_after_ms")]
    pub down_after_ms: u64,
    /// Every public call must carry an API key (`authorization: Bearer ...`).
    /// `false` takes every call as an all-scopes caller: for a trusted
    /// network only, and said loudly at start.
    #[serde(default = "default_auth")]
    pub auth: bool,
    /// A coordinator that has not confirmed its metadata with a quorum of
    /// the meta group for this long refuses every key (UNAVAILABLE), so a
    /// revoked key stops working everywhere within it, partitions included.
    #[serde(default = "default_key_lease_ms")]
    pub key_lease_ms: u64,
    /// How long a shard has to answer a coordinator's request (every replica
    /// tried included).
    #[serde(default = "default_leaf_timeout_ms")]
    pub leaf_timeout_ms: u64,
    /// Ask a second replica of a shard when the first has not answered after
    /// this; 0 = the shard's recent p95 (20 ms until it has enough samples).
    #[serde(default)]
    pub hedge_after_ms: u64,
    #[serde(default)]
    pub raft: RaftConfig,
    /// Tests only, never read from a file: the meta level this node says its
    /// build reads (`JoinReply.meta_level`), standing in for a node of an
    /// older build. `None`: this build's ([`sovra_meta::state::META_LEVEL`]).
    #[serde(skip)]
    pub claim_meta_level: Option<u32>,
}

/// Timing and log-size knobs of the shard groups.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// A snapshot is built after this many entries; the log below it is purged.
    pub snapshot_after_logs: u64,
    /// Entries kept below a snapshot for followers only a little behind.
    pub keep_logs: u64,
    /// A write not committed and applied within this is answered UNAVAILABLE.
    pub write_timeout_ms: u64,
    /// How long a read at `any` with a minimum index, or `linearizable`, waits.
    pub read_wait_ms: u64,
    /// A replica answers `any` reads only this long after its leader last
    /// confirmed it current; an erasure waits it out for replicas it cannot
    /// reach. 0 turns the lease off (then a replica cut off from its leader
    /// keeps answering `any` reads, erased points included, until it catches up).
    pub read_lease_ms: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        let d = sovra_raft::RaftSettings::default();
        Self {
            heartbeat_ms: d.heartbeat_ms,
            election_min_ms: d.election_min_ms,
            election_max_ms: d.election_max_ms,
            snapshot_after_logs: d.snapshot_after_logs,
            keep_logs: d.keep_logs,
            write_timeout_ms: d.write_timeout.as_millis() as u64,
            read_wait_ms: d.read_wait.as_millis() as u64,
            read_lease_ms: d.read_lease.as_millis() as u64,
        }
    }
}

impl RaftConfig {
    pub fn settings(&self) -> sovra_raft::RaftSettings {
        sovra_raft::RaftSettings {
            heartbeat_ms: self.heartbeat_ms,
            election_min_ms: self.election_min_ms,
            election_max_ms: self.election_max_ms,
            snapshot_after_logs: self.snapshot_after_logs,
            keep_logs: self.keep_logs,
            write_timeout: std::time::Duration::from_millis(self.write_timeout_ms),
            read_wait: std::time::Duration::from_millis(self.read_wait_ms),
            read_lease: std::time::Duration::from_millis(self.read_lease_ms),
            ..Default::default()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be at least 1"));
        }
        if self.election_min_ms <= self.heartbeat_ms * 2 {
            return Err(invalid(
                "raft.election_min_ms",
                format!(
                    "is {}: must exceed twice raft.heartbeat_ms ({})",
                    self.election_min_ms, self.heartbeat_ms
                ),
            ));
        }
        if self.election_max_ms <= self.election_min_ms {
            return Err(invalid("raft.election_max_ms", "must exceed raft.election_min_ms"));
        }
        if self.snapshot_after_logs == 0 {
            return Err(invalid("raft.snapshot_after_logs", "must be at least 1"));
        }
        if self.read_lease_ms > 60_000 {
            return Err(invalid(
                "raft.read_lease_ms",
                format!("is {}: at most 60000 (every erasure may wait it out)", self.read_lease_ms),
            ));
        }
        if self.write_timeout_ms == 0 || self.read_wait_ms == 0 {
            return Err(invalid(
                "raft.write_timeout_ms",
                "write_timeout_ms and read_wait_ms must be at least 1",
            ));
        }
        Ok(())
    }
}

fn default_auth() -> bool {
    true
}
fn default_purge_check_ms() -> u64 {
    // Each purge rebuilds the replica's index: erasures in the same few
    // seconds share one.
    5_000
}
fn default_retention_sweep_ms() -> u64 {
    10_000
}
fn default_key_lease_ms() -> u64 {
    5_000
}
fn default_leaf_timeout_ms() -> u64 {
    2_000
}
fn default_zone() -> String {
    "default".into()
}
fn default_grpc() -> SocketAddr {
    "127.0.0.1:7300".parse().expect("literal")
}
fn default_cluster() -> SocketAddr {
    "127.0.0.1:7400".parse().expect("literal")
}
fn default_max_inflight_bytes() -> usize {
    512 << 20
}
fn default_max_inflight_requests() -> usize {
    1024
}
fn default_max_requests_per_connection() -> usize {
    64
}
fn default_tls_reload_ms() -> u64 {
    5_000
}
fn default_metrics() -> SocketAddr {
    "127.0.0.1:9300".parse().expect("literal")
}
fn default_cache_mb() -> u64 {
    256
}
fn default_roles() -> Vec<String> {
    ROLES.iter().map(|r| r.to_string()).collect()
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_down_after_ms() -> u64 {
    10_000
}
/// Every role a node may have.
pub const ROLES: [&str; 3] = ["meta", "data", "coordinator"];
fn default_max_replicas() -> usize {
    256
}
fn default_engine() -> String {
    sovra_index::IndexEngine::default().name().to_string()
}

fn default_threads() -> usize {
    2
}

impl NodeConfig {
    /// `search_threads`, with 0 resolved to the cores this process may use.
    pub fn search_threads(&self) -> usize {
        match self.search_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}
fn default_ratio() -> f64 {
    0.2
}
fn default_check() -> u64 {
    30
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("cannot read cluster_secret_file {path}")]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, why: why.into() }
}

impl NodeConfig {
    /// A config for tests and `sovra dev`: loopback, free ports.
    pub fn local(node_id: u64, region: &str, data_dir: PathBuf) -> Self {
        Self {
            node_id,
            region: region.into(),
            zone: default_zone(),
            data_dir,
            grpc_listen: "127.0.0.1:0".parse().expect("literal"),
            cluster_listen: "127.0.0.1:0".parse().expect("literal"),
            cluster_secret: None,
            cluster_secret_file: None,
            // Loopback only, in one process or on one machine: tests and
            // tools that want TLS set the files (and `tls`) themselves.
            tls: Some(false),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            tls_reload_ms: default_tls_reload_ms(),
            max_inflight_bytes: default_max_inflight_bytes(),
            max_inflight_requests: default_max_inflight_requests(),
            max_requests_per_connection: default_max_requests_per_connection(),
            metrics_listen: "127.0.0.1:0".parse().expect("literal"),
            cache_capacity_mb: 64,
            max_replicas: 64,
            index_threads: default_threads(),
            index_engine: default_engine(),
            search_threads: 0,
            compaction_tombstone_ratio: default_ratio(),
            compaction_check_seconds: default_check(),
            retention_sweep_ms: default_retention_sweep_ms(),
            purge_check_ms: default_purge_check_ms(),
            roles: default_roles(),
            bootstrap: true,
            join: Vec::new(),
            advertise_grpc_addr: None,
            advertise_cluster_addr: None,
            heartbeat_ms: 200,
            down_after_ms: 5_000,
            auth: true,
            key_lease_ms: default_key_lease_ms(),
            leaf_timeout_ms: default_leaf_timeout_ms(),
            hedge_after_ms: 0,
            raft: RaftConfig::default(),
            claim_meta_level: None,
        }
    }

    /// Reads `path`, applies overrides from `env` (`SOVRA_<FIELD>` in capitals),
    /// and validates. `env` is a parameter so this stays the only reader of the
    /// environment and tests need not touch the process's.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(field: &'static str, v: String) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            v.parse()
                .map_err(|e: T::Err| invalid(field, format!("SOVRA_{} = {v:?}: {e}", field.to_uppercase())))
        }
        if let Some(v) = env("SOVRA_NODE_ID") {
            self.node_id = parse("node_id", v)?;
        } else if let Some(base) = env("SOVRA_NODE_ID_BASE") {
            // A StatefulSet gives its pods one environment: the id is the
            // region's base plus the pod's ordinal (its
            // `apps.kubernetes.io/pod-index` label, by the downward API).
            let ordinal = env("SOVRA_NODE_ORDINAL").ok_or_else(|| {
                invalid(
                    "node_id",
                    "SOVRA_NODE_ID_BASE is set but SOVRA_NODE_ORDINAL (the pod's index) is not",
                )
            })?;
            let (base, ordinal): (u64, u64) = (parse("node_id", base)?, parse("node_id", ordinal)?);
            self.node_id = base
                .checked_add(ordinal)
                .ok_or_else(|| invalid("node_id", "SOVRA_NODE_ID_BASE + SOVRA_NODE_ORDINAL overflows"))?;
        }
        if let Some(v) = env("SOVRA_REGION") {
            self.region = v;
        }
        if let Some(v) = env("SOVRA_ZONE") {
            self.zone = v;
        }
        if let Some(v) = env("SOVRA_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("SOVRA_GRPC_LISTEN") {
            self.grpc_listen = parse("grpc_listen", v)?;
        }
        if let Some(v) = env("SOVRA_CLUSTER_LISTEN") {
            self.cluster_listen = parse("cluster_listen", v)?;
        }
        if let Some(v) = env("SOVRA_CLUSTER_SECRET") {
            self.cluster_secret = Some(v);
        }
        if let Some(v) = env("SOVRA_CLUSTER_SECRET_FILE") {
            self.cluster_secret_file = Some(v.into());
        }
        if let Some(v) = env("SOVRA_TLS") {
            self.tls = Some(parse("tls", v)?);
        }
        if let Some(v) = env("SOVRA_TLS_CERT") {
            self.tls_cert = Some(v.into());
        }
        if let Some(v) = env("SOVRA_TLS_KEY") {
            self.tls_key = Some(v.into());
        }
        if let Some(v) = env("SOVRA_TLS_CA") {
            self.tls_ca = Some(v.into());
        }
        if let Some(v) = env("SOVRA_JOIN") {
            self.join = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(v) = env("SOVRA_BOOTSTRAP") {
            self.bootstrap = parse("bootstrap", v)?;
        }
        // The same environment on every pod: the node whose id this names
        // starts the cluster, every other joins.
        if let Some(v) = env("SOVRA_BOOTSTRAP_NODE") {
            self.bootstrap = parse::<u64>("bootstrap", v)? == self.node_id;
        }
        if let Some(v) = env("SOVRA_ROLES") {
            self.roles = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        if let Some(v) = env("SOVRA_ADVERTISE_GRPC_ADDR") {
            self.advertise_grpc_addr = Some(v);
        }
        if let Some(v) = env("SOVRA_ADVERTISE_CLUSTER_ADDR") {
            self.advertise_cluster_addr = Some(v);
        }
        if let Some(v) = env("SOVRA_METRICS_LISTEN") {
            self.metrics_listen = parse("metrics_listen", v)?;
        }
        if let Some(v) = env("SOVRA_CACHE_CAPACITY_MB") {
            self.cache_capacity_mb = parse("cache_capacity_mb", v)?;
        }
        if let Some(v) = env("SOVRA_MAX_REPLICAS") {
            self.max_replicas = parse("max_replicas", v)?;
        }
        if let Some(v) = env("SOVRA_INDEX_THREADS") {
            self.index_threads = parse("index_threads", v)?;
        }
        if let Some(v) = env("SOVRA_INDEX_ENGINE") {
            self.index_engine = v;
        }
        if let Some(v) = env("SOVRA_SEARCH_THREADS") {
            self.search_threads = parse("search_threads", v)?;
        }
        if let Some(v) = env("SOVRA_AUTH") {
            self.auth = parse("auth", v)?;
        }
        if let Some(v) = env("SOVRA_KEY_LEASE_MS") {
            self.key_lease_ms = parse("key_lease_ms", v)?;
        }
        if let Some(v) = env("SOVRA_LEAF_TIMEOUT_MS") {
            self.leaf_timeout_ms = parse("leaf_timeout_ms", v)?;
        }
        if let Some(v) = env("SOVRA_MAX_INFLIGHT_BYTES") {
            self.max_inflight_bytes = parse("max_inflight_bytes", v)?;
        }
        if let Some(v) = env("SOVRA_MAX_INFLIGHT_REQUESTS") {
            self.max_inflight_requests = parse("max_inflight_requests", v)?;
        }
        if let Some(v) = env("SOVRA_MAX_REQUESTS_PER_CONNECTION") {
            self.max_requests_per_connection = parse("max_requests_per_connection", v)?;
        }
        if let Some(v) = env("SOVRA_TLS_RELOAD_MS") {
            self.tls_reload_ms = parse("tls_reload_ms", v)?;
        }
        if let Some(v) = env("SOVRA_HEDGE_AFTER_MS") {
            self.hedge_after_ms = parse("hedge_after_ms", v)?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be at least 1 (set it in the file or with SOVRA_NODE_ID)"));
        }
        if self.region.is_empty() {
            return Err(invalid("region", "is not set (set it in the file or with SOVRA_REGION)"));
        }
        RegionId::parse(&self.region).map_err(|e| invalid("region", e.message))?;
        if self.zone.is_empty() {
            return Err(invalid("zone", "must not be empty"));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must name a directory"));
        }
        if !(8..=1 << 20).contains(&self.cache_capacity_mb) {
            return Err(invalid(
                "cache_capacity_mb",
                format!("is {}: must be between 8 and 1048576", self.cache_capacity_mb),
            ));
        }
        if !(1..=100_000).contains(&self.max_replicas) {
            return Err(invalid(
                "max_replicas",
                format!("is {}: must be between 1 and 100000", self.max_replicas),
            ));
        }
        if (self.cache_capacity_mb << 10) / (self.max_replicas as u64) < 256 {
            return Err(invalid(
                "cache_capacity_mb",
                format!(
                    "is {} MiB for max_replicas {}: each replica's database needs at least 256 KiB of it",
                    self.cache_capacity_mb, self.max_replicas
                ),
            ));
        }
        if let Err(e) = self.index_engine.parse::<sovra_index::IndexEngine>() {
            return Err(invalid("index_engine", e));
        }
        if !(1..=256).contains(&self.index_threads) {
            return Err(invalid(
                "index_threads",
                format!("is {}: must be between 1 and 256", self.index_threads),
            ));
        }
        if self.search_threads > 256 {
            return Err(invalid(
                "search_threads",
                format!("is {}: must be between 0 (one per core) and 256", self.search_threads),
            ));
        }
        if !(self.compaction_tombstone_ratio > 0.0 && self.compaction_tombstone_ratio <= 1.0) {
            return Err(invalid("compaction_tombstone_ratio", "must be in (0, 1]"));
        }
        if self.purge_check_ms == 0 {
            return Err(invalid("purge_check_ms", "must be at least 1"));
        }
        if self.retention_sweep_ms == 0 {
            return Err(invalid("retention_sweep_ms", "must be at least 1"));
        }
        if self.compaction_check_seconds == 0 {
            return Err(invalid("compaction_check_seconds", "must be at least 1"));
        }
        for r in &self.roles {
            if !ROLES.contains(&r.as_str()) {
                return Err(invalid(
                    "roles",
                    format!("{} is not a role; roles are {}", sovra_types::quote(r), ROLES.join(", ")),
                ));
            }
        }
        if self.roles.is_empty() {
            return Err(invalid("roles", format!("name at least one of {}", ROLES.join(", "))));
        }
        if !self.bootstrap && self.join.is_empty() {
            return Err(invalid(
                "join",
                "is empty and bootstrap is false: list the cluster addresses of nodes to join, or set bootstrap = true on the first node of a new cluster",
            ));
        }
        if self.bootstrap && !self.has_role("meta") {
            return Err(invalid(
                "bootstrap",
                "the bootstrap node starts the meta group: it needs the meta role",
            ));
        }
        if self.heartbeat_ms == 0 || self.down_after_ms <= self.heartbeat_ms * 2 {
            return Err(invalid(
                "down_after_ms",
                format!(
                    "is {}: must exceed twice heartbeat_ms ({}), which must be at least 1",
                    self.down_after_ms, self.heartbeat_ms
                ),
            ));
        }
        for (field, listen, advertise) in [
            ("advertise_grpc_addr", self.grpc_listen, &self.advertise_grpc_addr),
            ("advertise_cluster_addr", self.cluster_listen, &self.advertise_cluster_addr),
        ] {
            if advertise.is_none() && listen.ip().is_unspecified() {
                return Err(invalid(
                    field,
                    format!("is needed: the listener is bound to {listen}, which other nodes cannot dial"),
                ));
            }
        }
        if !(200..=600_000).contains(&self.key_lease_ms) {
            return Err(invalid(
                "key_lease_ms",
                format!("is {}: must be between 200 and 600000", self.key_lease_ms),
            ));
        }
        if !(10..=600_000).contains(&self.leaf_timeout_ms) {
            return Err(invalid(
                "leaf_timeout_ms",
                format!("is {}: must be between 10 and 600000", self.leaf_timeout_ms),
            ));
        }
        if self.hedge_after_ms >= self.leaf_timeout_ms && self.hedge_after_ms != 0 {
            return Err(invalid(
                "hedge_after_ms",
                format!(
                    "is {}: must be below leaf_timeout_ms ({}), or 0 for the shard's p95",
                    self.hedge_after_ms, self.leaf_timeout_ms
                ),
            ));
        }
        self.raft.validate()?;
        let listeners = [
            ("grpc_listen", self.grpc_listen),
            ("cluster_listen", self.cluster_listen),
            ("metrics_listen", self.metrics_listen),
        ];
        for (i, (name, a)) in listeners.iter().enumerate() {
            if a.port() != 0 && listeners[..i].iter().any(|(_, b)| b == a) {
                return Err(invalid(
                    name,
                    format!("is {a}, the same as another listener: each needs its own port"),
                ));
            }
        }
        if self.cluster_secret.is_some() && self.cluster_secret_file.is_some() {
            return Err(invalid("cluster_secret", "set cluster_secret or cluster_secret_file, not both"));
        }
        if let Some(s) = &self.cluster_secret {
            sovra_raft::ClusterSecret::new(s).map_err(|e| invalid("cluster_secret", e.to_string()))?;
        }
        self.tls_files()?;
        let largest = crate::limits::COPIES * (sovra_types::limits::MAX_MESSAGE_BYTES + 5);
        if self.max_inflight_bytes < largest {
            return Err(invalid(
                "max_inflight_bytes",
                format!(
                    "is {}: must be at least {largest} (the largest message, {} bytes, counted {} times)",
                    self.max_inflight_bytes,
                    sovra_types::limits::MAX_MESSAGE_BYTES,
                    crate::limits::COPIES
                ),
            ));
        }
        for (name, v) in [
            ("max_inflight_requests", self.max_inflight_requests),
            ("max_requests_per_connection", self.max_requests_per_connection),
        ] {
            if !(1..=1_000_000).contains(&v) {
                return Err(invalid(name, format!("is {v}: must be between 1 and 1000000")));
            }
        }
        if !(100..=3_600_000).contains(&self.tls_reload_ms) {
            return Err(invalid(
                "tls_reload_ms",
                format!("is {}: must be between 100 and 3600000", self.tls_reload_ms),
            ));
        }
        if !self.join.is_empty() && self.cluster_secret.is_none() && self.cluster_secret_file.is_none() {
            return Err(invalid(
                "cluster_secret",
                "join lists other nodes, so the cluster needs a shared secret: set cluster_secret or cluster_secret_file (the same on every node)",
            ));
        }
        Ok(())
    }

    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }

    /// The cluster secret from the config or its file (read here, at start);
    /// a random one for a node that joins no one (alone, it shares it with no one).
    pub fn cluster_secret(&self) -> Result<sovra_raft::ClusterSecret, ConfigError> {
        if let Some(path) = &self.cluster_secret_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                path: path.clone(),
                source,
            })?;
            return sovra_raft::ClusterSecret::new(text.trim_end_matches(['\n', '\r']))
                .map_err(|e| invalid("cluster_secret_file", format!("{}: {e}", path.display())));
        }
        match &self.cluster_secret {
            Some(s) => sovra_raft::ClusterSecret::new(s).map_err(|e| invalid("cluster_secret", e.to_string())),
            None => Ok(sovra_raft::ClusterSecret::random()),
        }
    }

    /// The TLS files, `{node_id}` filled in; None when `tls = false`.
    pub fn tls_files(&self) -> Result<Option<sovra_raft::tls::TlsFiles>, ConfigError> {
        let set = [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key), ("tls_ca", &self.tls_ca)];
        match self.tls {
            Some(false) => {
                if let Some((name, _)) = set.iter().find(|(_, v)| v.is_some()) {
                    return Err(invalid(
                        "tls",
                        format!("is false but {name} is set: remove {name}, or drop `tls = false` to serve TLS"),
                    ));
                }
                Ok(None)
            }
            Some(true) | None => {
                let missing: Vec<&str> = set.iter().filter(|(_, v)| v.is_none()).map(|(n, _)| *n).collect();
                if missing.len() == 3 && self.tls.is_none() {
                    return Err(invalid(
                        "tls",
                        "no TLS settings: set tls_cert, tls_key and tls_ca (`sovra certs` makes a CA and node certificates), or say `tls = false` to serve plaintext on a trusted network",
                    ));
                }
                if !missing.is_empty() {
                    return Err(invalid(
                        "tls",
                        format!("TLS needs tls_cert, tls_key and tls_ca; missing: {}", missing.join(", ")),
                    ));
                }
                let fill = |p: &Option<PathBuf>| -> PathBuf {
                    PathBuf::from(
                        p.as_ref()
                            .expect("checked above")
                            .to_string_lossy()
                            .replace("{node_id}", &self.node_id.to_string()),
                    )
                };
                Ok(Some(sovra_raft::tls::TlsFiles {
                    cert: fill(&self.tls_cert),
                    key: fill(&self.tls_key),
                    ca: fill(&self.tls_ca),
                }))
            }
        }
    }

    pub fn region_id(&self) -> RegionId {
        RegionId::parse(&self.region).expect("validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file; one that says nothing about TLS says `tls = false`.
    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let tls = if text.contains("tls") { "" } else { "tls = false\n" };
        std::fs::write(f.path(), format!("{text}{tls}")).unwrap();
        f
    }

    #[test]
    fn tls_must_be_configured_or_refused_in_so_many_words() {
        let base = "node_id = 3\nregion = \"uk\"\nbootstrap = true\ndata_dir = \"/tmp/x\"\n";
        let err = NodeConfig::load(write(&format!("{base}tls_reload_ms = 5000\n")).path(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls = false") && err.contains("sovra certs"), "{err}");
        let err = NodeConfig::load(write(&format!("{base}tls_cert = \"/c\"\n")).path(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing: tls_key, tls_ca"), "{err}");
        let err = NodeConfig::load(write(&format!("{base}tls = false\ntls_ca = \"/ca\"\n")).path(), |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_ca is set"), "{err}");
        let f = write(&format!(
            "{base}tls_cert = \"/s/node-{{node_id}}.pem\"\ntls_key = \"/s/node-{{node_id}}-key.pem\"\ntls_ca = \"/s/ca.pem\"\n"
        ));
        let cfg = NodeConfig::load(f.path(), |_| None).unwrap();
        let files = cfg.tls_files().unwrap().unwrap();
        assert_eq!(files.cert, PathBuf::from("/s/node-3.pem"));
        assert_eq!(files.key, PathBuf::from("/s/node-3-key.pem"));
        // From the environment alone, as a pod gets it.
        let env = |k: &str| match k {
            "SOVRA_TLS" => Some("false".to_string()),
            _ => None,
        };
        let cfg = NodeConfig::load(write(&format!("{base}tls_reload_ms = 5000\n")).path(), env).unwrap();
        assert!(cfg.tls_files().unwrap().is_none());
    }

    #[test]
    fn file_then_env_then_validation_naming_the_field() {
        let f = write("node_id = 1\nregion = \"eu-west\"\nbootstrap = true\ndata_dir = \"/tmp/x\"\n");
        let cfg = NodeConfig::load(f.path(), |_| None).unwrap();
        assert_eq!((cfg.node_id, cfg.region.as_str(), cfg.index_threads), (1, "eu-west", 2));

        let env = |k: &str| (k == "SOVRA_REGION").then(|| "us-east".to_string());
        assert_eq!(NodeConfig::load(f.path(), env).unwrap().region, "us-east");

        let env = |k: &str| (k == "SOVRA_REGION").then(|| "US East".to_string());
        let err = NodeConfig::load(f.path(), env).unwrap_err().to_string();
        assert!(err.contains("`region`"), "{err}");

        let env = |k: &str| (k == "SOVRA_INDEX_THREADS").then(|| "many".to_string());
        let err = NodeConfig::load(f.path(), env).unwrap_err().to_string();
        assert!(err.contains("`index_threads`") && err.contains("SOVRA_INDEX_THREADS"), "{err}");

        let f = write("node_id = 0\nregion = \"eu\"\nbootstrap = true\ndata_dir = \"/tmp/x\"\n");
        assert!(NodeConfig::load(f.path(), |_| None).unwrap_err().to_string().contains("`node_id`"));

        // The image's file names neither: they come from the environment,
        // and a missing one is named with its variable.
        let f = write(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/node.toml")).unwrap());
        let env = |k: &str| match k {
            "SOVRA_NODE_ID" => Some("4".to_string()),
            "SOVRA_REGION" => Some("us".to_string()),
            "SOVRA_BOOTSTRAP" => Some("true".to_string()),
            "SOVRA_ADVERTISE_GRPC_ADDR" => Some("us-4:7300".to_string()),
            "SOVRA_ADVERTISE_CLUSTER_ADDR" => Some("us-4:7400".to_string()),
            _ => None,
        };
        let cfg = NodeConfig::load(f.path(), env).unwrap();
        assert_eq!(
            (cfg.node_id, cfg.region.as_str(), cfg.data_dir.as_path()),
            (4, "us", Path::new("/data"))
        );
        let err = NodeConfig::load(f.path(), |_| None).unwrap_err().to_string();
        assert!(err.contains("`node_id`") && err.contains("SOVRA_NODE_ID"), "{err}");
        let env = |k: &str| (k == "SOVRA_NODE_ID").then(|| "4".to_string());
        let err = NodeConfig::load(f.path(), env).unwrap_err().to_string();
        assert!(err.contains("`region`") && err.contains("SOVRA_REGION"), "{err}");
        // A StatefulSet's pods: base + ordinal, and one bootstrap node by id.
        let pod = |ordinal: &'static str| {
            move |k: &str| match k {
                "SOVRA_NODE_ID_BASE" => Some("100".to_string()),
                "SOVRA_NODE_ORDINAL" => Some(ordinal.to_string()),
                "SOVRA_BOOTSTRAP_NODE" => Some("100".to_string()),
                "SOVRA_JOIN" => Some("sovra-uk-0.sovra-uk:7400".to_string()),
                "SOVRA_CLUSTER_SECRET" => Some("a-secret-of-at-least-16".to_string()),
                "SOVRA_REGION" => Some("uk".to_string()),
                "SOVRA_ADVERTISE_GRPC_ADDR" => Some("p:7300".to_string()),
                "SOVRA_ADVERTISE_CLUSTER_ADDR" => Some("p:7400".to_string()),
                _ => None,
            }
        };
        let first = NodeConfig::load(f.path(), pod("0")).unwrap();
        assert_eq!((first.node_id, first.bootstrap), (100, true));
        let third = NodeConfig::load(f.path(), pod("2")).unwrap();
        assert_eq!((third.node_id, third.bootstrap), (102, false));
        let err = NodeConfig::load(f.path(), pod("two")).unwrap_err().to_string();
        assert!(err.contains("`node_id`") && err.contains("two"), "{err}");

        let f = write("node_id = 1\nregion = \"eu\"\ndata_dir = \"/tmp/x\"\nbogus = 1\n");
        let err = NodeConfig::load(f.path(), |_| None).unwrap_err();
        assert!(format!("{:?}", err).contains("bogus"), "{err:?}");
    }
}
