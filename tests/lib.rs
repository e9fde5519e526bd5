//! Test harness: starts real nodes in this process on port 0 through
//! `sovra_node::start`, waits for them to report SERVING, and hands out clients.

use sovra_node::{NodeConfig, RunningNode};
use sovra_proto::v1::{
    self, admin_client::AdminClient, collections_client::CollectionsClient, points_client::PointsClient, search_client::SearchClient,
};
use std::time::Duration;
use tonic::transport::Channel;

/// The secret the nodes of a test cluster share.
pub const CLUSTER_SECRET: &str = "sovra-tests-cluster-secret";

pub use sovra_node::dev::{Keyed, keyed};

/// Clients of every public service, presenting one key.
#[derive(Clone)]
pub struct Clients {
    pub collections: CollectionsClient<Keyed>,
    pub points: PointsClient<Keyed>,
    pub search: SearchClient<Keyed>,
    pub admin: AdminClient<Keyed>,
}

impl Clients {
    pub fn new(channel: &Channel, key: &str) -> Self {
        let k = || keyed(channel, key);
        Self {
            collections: CollectionsClient::new(k()),
            points: PointsClient::new(k()),
            search: SearchClient::new(k()),
            admin: AdminClient::new(k()),
        }
    }
}

pub struct TestNode {
    pub node: Option<RunningNode>,
    pub collections: CollectionsClient<Keyed>,
    pub points: PointsClient<Keyed>,
    pub search: SearchClient<Keyed>,
    pub admin: AdminClient<Keyed>,
    pub channel: Channel,
    pub dir: tempfile::TempDir,
    /// The admin key these clients present (the cluster's first).
    pub key: String,
    config: NodeConfig,
}

/// Logs to the test's output when `RUST_LOG` is set (shown for failing tests).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

impl TestNode {
    pub async fn start(region: &str) -> TestNode {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig::local(1, region, dir.path().to_path_buf());
        Self::start_in(dir, config, None).await
    }

    /// Starts a node from `config` (whose data lives in `dir`) and waits for
    /// SERVING; its clients present `key` (default: the first admin key the
    /// node makes as a bootstrap node).
    async fn start_in(dir: tempfile::TempDir, config: NodeConfig, key: Option<String>) -> TestNode {
        let node = sovra_node::start(config.clone()).await.unwrap();
        Self::serving(node, dir, config, key).await
    }

    async fn serving(node: RunningNode, dir: tempfile::TempDir, config: NodeConfig, key: Option<String>) -> TestNode {
        let channel = sovra_node::dev::wait_serving_with(node.grpc_addr, config.tls_ca.as_deref(), Duration::from_secs(60))
            .await
            .unwrap();
        let key = match key {
            Some(k) => k,
            None if !config.auth => String::new(),
            None => node
                .state
                .first_admin_key_within(Duration::from_secs(30))
                .await
                .expect("the bootstrap node's first admin key"),
        };
        let c = Clients::new(&channel, &key);
        TestNode {
            node: Some(node),
            collections: c.collections,
            points: c.points,
            search: c.search,
            admin: c.admin,
            channel,
            dir,
            key,
            config,
        }
    }

    /// Clients of this node presenting `key`.
    pub fn clients(&self, key: &str) -> Clients {
        Clients::new(&self.channel, key)
    }

    /// Makes a key with `scopes` through this node (whose key must be an admin's).
    pub async fn make_key(&mut self, id: &str, scopes: v1::KeyScopes) -> String {
        self.admin
            .create_key(v1::CreateKeyRequest {
                rate: None,
                id: id.into(),
                scopes: Some(scopes),
            })
            .await
            .unwrap()
            .into_inner()
            .key
    }

    /// Stops the node and starts it again on the same data (on new ports).
    /// In one process the stopped node's last Raft tasks may still hold its
    /// store (sled locks the directory) for a moment after `stop` returns, so
    /// the start is retried until it opens, within a deadline.
    pub async fn restart(self) -> TestNode {
        self.restart_after(|_| Ok(())).await
    }

    /// As [`Self::restart`], running `offline` on the stopped node's config
    /// first (retried like the start, while the store is still held).
    pub async fn restart_after(mut self, offline: impl Fn(&NodeConfig) -> anyhow::Result<()>) -> TestNode {
        self.node.take().unwrap().stop().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) = offline(&self.config) {
            assert!(
                std::time::Instant::now() < deadline,
                "offline step on node {} failed: {e:#}",
                self.config.node_id
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let node = loop {
            match sovra_node::start(self.config.clone()).await {
                Ok(node) => break node,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("restart of node {} failed: {e:#}", self.config.node_id),
            }
        };
        Self::serving(node, self.dir, self.config, Some(self.key)).await
    }

    /// Restarts the node with `tweak` applied to its config first.
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut NodeConfig)) -> TestNode {
        tweak(&mut self.config);
        self.restart().await
    }

    /// Restarts the node with `join` as its seeds (the current cluster
    /// addresses of others, when theirs changed too).
    pub async fn restart_joining(mut self, join: Vec<String>) -> TestNode {
        self.config.join = join;
        self.restart().await
    }

    /// Starts node `id` of `region` joining the cluster through `seeds`; its
    /// clients present `key`.
    pub async fn join(id: u64, region: &str, seeds: Vec<String>, key: &str) -> TestNode {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::local(id, region, dir.path().to_path_buf());
        cfg.cluster_secret = Some(CLUSTER_SECRET.into());
        cfg.zone = format!("zone-{id}");
        cfg.bootstrap = false;
        cfg.join = seeds;
        Self::start_in(dir, cfg, Some(key.to_string())).await
    }

    /// This node's cluster address, for another's `join`.
    pub fn cluster_addr(&self) -> String {
        self.node().cluster_addr.to_string()
    }

    /// Starts one node per `(id, region)`: the first bootstraps the cluster,
    /// the others join it; returns once all serve and see one another.
    pub async fn start_cluster(nodes: &[(u64, &str)]) -> Vec<TestNode> {
        Self::start_cluster_with(nodes, |_| {}).await
    }

    /// As [`Self::start_cluster`], with `tweak` applied to every config.
    pub async fn start_cluster_with(nodes: &[(u64, &str)], tweak: impl Fn(&mut NodeConfig)) -> Vec<TestNode> {
        Self::start_cluster_faults(nodes, tweak, Default::default()).await
    }

    /// As [`Self::start_cluster_with`], every node-to-node call passing through
    /// `faults` (shared, switchable at run time).
    pub async fn start_cluster_faults(nodes: &[(u64, &str)], tweak: impl Fn(&mut NodeConfig), faults: sovra_raft::Faults) -> Vec<TestNode> {
        init_logs();
        let mut dirs = Vec::new();
        let mut configs = Vec::new();
        for (id, region) in nodes {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = NodeConfig::local(*id, region, dir.path().to_path_buf());
            cfg.cluster_secret = Some(CLUSTER_SECRET.into());
            cfg.zone = format!("zone-{id}");
            tweak(&mut cfg);
            configs.push(cfg);
            dirs.push(dir);
        }
        let running = sovra_node::run::start_joined(configs, faults, Duration::from_secs(60))
            .await
            .unwrap();
        let mut out: Vec<TestNode> = Vec::new();
        for (node, dir) in running.into_iter().zip(dirs) {
            let config = node.state.config.clone();
            // Every node's clients present the bootstrap node's admin key.
            let key = out.first().map(|n| n.key.clone());
            out.push(Self::serving(node, dir, config, key).await);
        }
        out
    }

    pub fn node(&self) -> &RunningNode {
        self.node.as_ref().expect("running")
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        self.node.take().unwrap().stop().await.unwrap();
        self.dir
    }
}

pub fn spec(name: &str, dim: u32, metric: v1::Metric, region: &str) -> v1::CollectionSpec {
    v1::CollectionSpec {
        name: name.into(),
        dimension: dim,
        metric: metric as i32,
        regions: vec![v1::RegionShards {
            region: region.into(),
            shard_count: 3,
        }],
        ..Default::default()
    }
}

/// Polls `f` until it returns `Some`, or panics naming `what` at the deadline.
pub async fn eventually<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn num(n: u64) -> v1::PointId {
    v1::PointId {
        kind: Some(v1::point_id::Kind::Num(n)),
    }
}

pub fn point(id: u64, vector: Vec<f32>, region: &str) -> v1::Point {
    v1::Point {
        id: Some(num(id)),
        vector,
        subject: format!("s{id}"),
        region: region.into(),
        lawful_basis: v1::LawfulBasis::Consent as i32,
        ..Default::default()
    }
}

pub fn ids_of(r: &v1::SearchResponse) -> Vec<u64> {
    r.hits
        .iter()
        .map(
            |h| match h.point.as_ref().and_then(|p| p.id.as_ref()).and_then(|i| i.kind.clone()) {
                Some(v1::point_id::Kind::Num(n)) => n,
                other => panic!("unexpected id {other:?}"),
            },
        )
        .collect()
}

/// Every line of `region`'s audit log, exported through `n` in pages of
/// `limit` records (0: the server's default).
pub async fn audit_export(n: &TestNode, region: &str, limit: u32) -> Vec<String> {
    let mut c = v1::audit_client::AuditClient::new(keyed(&n.channel, &n.key));
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = c
            .export_audit(v1::ExportAuditRequest {
                region: region.into(),
                from_seq: from,
                limit,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.lines);
        from = page.next_seq;
        if !page.more {
            return out;
        }
    }
}
