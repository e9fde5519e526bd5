//! The node's one typed configuration: a TOML file, then `SOVRA_*` environment
//! overrides, validated once at start with errors that name the bad field.

use serde::{Deserialize, Serialize};
use sovra_types::RegionId;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique within the cluster; Raft will know nodes by it.
    pub node_id: u64,
    /// The region whose data this node may hold (R1/R2).
    pub region: String,
    #[serde(default = "default_zone")]
    pub zone: String,
    pub data_dir: PathBuf,
    /// Public gRPC API; port 0 picks a free port (printed at start).
    #[serde(default = "default_grpc")]
    pub grpc_listen: SocketAddr,
    /// Prometheus `/metrics` over HTTP; port 0 picks a free port.
    #[serde(default = "default_metrics")]
    pub metrics_listen: SocketAddr,
    /// Bound on sled's page cache.
    #[serde(default = "default_cache_mb")]
    pub cache_capacity_mb: u64,
    /// Threads for index builds and compaction.
    #[serde(default = "default_threads")]
    pub index_threads: usize,
    /// Compact a shard when tombstones reach this share of its slots.
    #[serde(default = "default_ratio")]
    pub compaction_tombstone_ratio: f64,
    #[serde(default = "default_check")]
    pub compaction_check_seconds: u64,
}

fn default_zone() -> String {
    "default".into()
}
fn default_grpc() -> SocketAddr {
    "127.0.0.1:7300".parse().expect("literal")
}
fn default_metrics() -> SocketAddr {
    "127.0.0.1:9300".parse().expect("literal")
}
fn default_cache_mb() -> u64 {
    256
}
fn default_threads() -> usize {
    2
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
            metrics_listen: "127.0.0.1:0".parse().expect("literal"),
            cache_capacity_mb: 64,
            index_threads: default_threads(),
            compaction_tombstone_ratio: default_ratio(),
            compaction_check_seconds: default_check(),
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
        if let Some(v) = env("SOVRA_METRICS_LISTEN") {
            self.metrics_listen = parse("metrics_listen", v)?;
        }
        if let Some(v) = env("SOVRA_CACHE_CAPACITY_MB") {
            self.cache_capacity_mb = parse("cache_capacity_mb", v)?;
        }
        if let Some(v) = env("SOVRA_INDEX_THREADS") {
            self.index_threads = parse("index_threads", v)?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(invalid("node_id", "must be at least 1"));
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
        if !(1..=256).contains(&self.index_threads) {
            return Err(invalid(
                "index_threads",
                format!("is {}: must be between 1 and 256", self.index_threads),
            ));
        }
        if !(self.compaction_tombstone_ratio > 0.0 && self.compaction_tombstone_ratio <= 1.0) {
            return Err(invalid("compaction_tombstone_ratio", "must be in (0, 1]"));
        }
        if self.compaction_check_seconds == 0 {
            return Err(invalid("compaction_check_seconds", "must be at least 1"));
        }
        if self.grpc_listen.port() != 0 && self.grpc_listen == self.metrics_listen {
            return Err(invalid("metrics_listen", "must differ from grpc_listen"));
        }
        Ok(())
    }

    pub fn region_id(&self) -> RegionId {
        RegionId::parse(&self.region).expect("validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn file_then_env_then_validation_naming_the_field() {
        let f = write("node_id = 1\nregion = \"eu-west\"\ndata_dir = \"/tmp/x\"\n");
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

        let f = write("node_id = 0\nregion = \"eu\"\ndata_dir = \"/tmp/x\"\n");
        assert!(NodeConfig::load(f.path(), |_| None).unwrap_err().to_string().contains("`node_id`"));

        let f = write("node_id = 1\nregion = \"eu\"\ndata_dir = \"/tmp/x\"\nbogus = 1\n");
        let err = NodeConfig::load(f.path(), |_| None).unwrap_err();
        assert!(format!("{:?}", err).contains("bogus"), "{err:?}");
    }
}
