//! N replica hosts in one process, each with its own sled store and a real
//! gRPC server on a loopback port 0, sharing one fault plan and address book.

use sovra_raft::server::{ClusterHandler, RaftService, cluster_service};
use sovra_raft::{AddressBook, ClusterSecret, Faults, LogStore, NodeId, RaftHost, RaftSettings};
use sovra_shard::{CacheBudget, ReplicaStore, ShardEngine};
use sovra_types::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// These tests set addresses directly: no joining, no metadata fetches.
pub struct NoMembership;

#[tonic::async_trait]
impl ClusterHandler for NoMembership {
    async fn join(&self, _r: sovra_proto::raft::JoinRequest) -> Result<sovra_proto::raft::JoinReply, tonic::Status> {
        Err(tonic::Status::unimplemented("no membership in these tests"))
    }
    async fn fetch_meta(&self, _r: sovra_proto::raft::FetchMetaRequest) -> Result<sovra_proto::raft::FetchMetaReply, tonic::Status> {
        Err(tonic::Status::unimplemented("no membership in these tests"))
    }
}

pub struct Node {
    pub id: NodeId,
    pub host: Arc<RaftHost>,
    pub _dir: TempDir,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
}

pub struct Cluster {
    pub nodes: Vec<Option<Node>>,
    pub book: AddressBook,
    pub faults: Faults,
    pub spec: CollectionSpec,
}

/// The secret every node of a test cluster shares.
pub fn secret() -> ClusterSecret {
    ClusterSecret::new("test-cluster-secret-0123456789").unwrap()
}

pub fn region() -> RegionId {
    RegionId::parse("eu-west").unwrap()
}

pub fn shard() -> ShardId {
    ShardId {
        collection: CollectionName::parse("people").unwrap(),
        region: region(),
        number: 0,
    }
}

pub fn spec(dim: u32) -> CollectionSpec {
    CollectionSpec {
        name: CollectionName::parse("people").unwrap(),
        dimension: dim,
        metric: Metric::L2,
        hnsw: HnswParams {
            m: 8,
            ef_construction: 32,
            ef_search: 32,
        },
        regions: vec![RegionShards {
            region: region(),
            shard_count: 1,
            split_map: None,
        }],
        replication_factor: 3,
        default_retention_seconds: 0,
        require_lawful_basis: false,
        require_purpose: false,
    }
}

pub fn fast_settings() -> RaftSettings {
    RaftSettings {
        heartbeat_ms: 100,
        election_min_ms: 500,
        election_max_ms: 1000,
        snapshot_after_logs: 10_000,
        keep_logs: 1_000,
        write_timeout: Duration::from_secs(3),
        read_wait: Duration::from_secs(2),
        max_append_bytes: sovra_raft::network::MAX_APPEND_BYTES,
        read_lease: Duration::from_secs(2),
    }
}

pub fn point(id: u64, dim: u32, value: f32) -> PointRecord {
    PointRecord {
        id: PointId::Num(id),
        region: region(),
        vector: (0..dim).map(|i| value + i as f32 * 0.001).collect(),
        subject: format!("s{id}"),
        payload: Default::default(),
        lawful_basis: LawfulBasis::Consent,
        source: "test".into(),
        expires_at_ms: 0,
        consent_at_ms: 0,
    }
}

pub fn upsert(ids: impl IntoIterator<Item = u64>, dim: u32, value: f32) -> ShardCommand {
    ShardCommand::Upsert(ids.into_iter().map(|i| point(i, dim, value)).collect())
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T>(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n) and one shard group over all of them, and
    /// waits for a leader.
    pub async fn start(n: u64, settings: RaftSettings, dim: u32, seed: u64) -> Self {
        let mut c = Cluster {
            nodes: Vec::new(),
            book: AddressBook::default(),
            faults: Faults::seeded(seed),
            spec: spec(dim),
        };
        for id in 1..=n {
            let node = c.start_node(id, settings.clone()).await;
            c.nodes.push(Some(node));
        }
        let members: BTreeSet<NodeId> = (1..=n).collect();
        for node in c.nodes.iter().flatten() {
            let rs = ReplicaStore::open(&node._dir.path().join("replica"), &CacheBudget::new(32 << 20, 1)).unwrap();
            let engine = Arc::new(ShardEngine::open(shard(), Arc::new(c.spec.clone()), &rs, Default::default()).unwrap());
            let log = LogStore::of(&rs);
            node.host.open_group(shard(), engine, log, Some(members.clone())).await.unwrap();
        }
        c.leader().await;
        c
    }

    /// Starts `n` nodes (ids 1..=n) with no group yet.
    pub async fn bare(n: u64, settings: RaftSettings, seed: u64) -> Self {
        let mut c = Cluster {
            nodes: Vec::new(),
            book: AddressBook::default(),
            faults: Faults::seeded(seed),
            spec: spec(4),
        };
        for id in 1..=n {
            let node = c.start_node(id, settings.clone()).await;
            c.nodes.push(Some(node));
        }
        c
    }

    /// Opens node `id`'s meta replica in its own store; `members` initialises
    /// a group never started (the bootstrap node), `None` waits to be added.
    pub async fn open_meta(&self, id: NodeId, members: Option<BTreeSet<NodeId>>) {
        let node = self.node(id);
        let rs = ReplicaStore::open(&node._dir.path().join("meta"), &CacheBudget::new(8 << 20, 1)).unwrap();
        node.host.open_meta(rs, members).await.unwrap();
    }

    /// The meta leader a majority of live nodes agree on.
    pub async fn meta_leader(&self) -> NodeId {
        self.agreed_leader("a meta leader", |n| n.host.meta().and_then(|g| g.leader()))
            .await
    }

    /// The leader that a majority of live nodes name through `of`.
    async fn agreed_leader(&self, what: &str, of: impl Fn(&Node) -> Option<NodeId>) -> NodeId {
        eventually(what, Duration::from_secs(15), async || {
            let mut votes = std::collections::HashMap::new();
            for n in self.live() {
                if let Some(l) = of(n) {
                    *votes.entry(l).or_insert(0) += 1;
                }
            }
            let quorum = self.nodes.len() / 2 + 1;
            votes
                .into_iter()
                .find(|(l, v)| *v >= quorum && self.nodes[(*l - 1) as usize].is_some())
                .map(|(l, _)| l)
        })
        .await
    }

    async fn start_node(&self, id: NodeId, settings: RaftSettings) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let host = RaftHost::new(id, region(), self.book.clone(), self.faults.clone(), settings, secret(), None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.book.set(id, &listener.local_addr().unwrap().to_string());
        let (stop, mut rx) = tokio::sync::watch::channel(false);
        let svc = RaftService {
            host: host.clone(),
            cluster: Arc::new(NoMembership),
        };
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(cluster_service(svc, secret()))
                .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        });
        Node {
            id,
            host,
            _dir: dir,
            server,
            stop,
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes[(id - 1) as usize].as_ref().expect("node is running")
    }

    pub fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().flatten()
    }

    /// The leader that a majority of live nodes agree on.
    pub async fn leader(&self) -> NodeId {
        self.agreed_leader("a leader", |n| n.host.group(&shard()).and_then(|g| g.leader()))
            .await
    }

    /// Stops a node as a crash would look to its peers: its server goes away and
    /// its Raft cores stop.
    pub async fn kill(&mut self, id: NodeId) {
        let node = self.nodes[(id - 1) as usize].take().expect("running");
        node.stop.send_replace(true);
        node.server.abort();
        node.host.shutdown().await;
    }

    pub fn digest(&self, id: NodeId) -> u64 {
        self.node(id).host.group(&shard()).unwrap().engine().digest().unwrap()
    }

    pub fn applied(&self, id: NodeId) -> u64 {
        self.node(id).host.group(&shard()).unwrap().engine().last_applied()
    }

    /// Waits until every live node has the same digest and applied index.
    pub async fn converged(&self, within: Duration) -> u64 {
        eventually("identical digests on every live replica", within, async || {
            let ds: Vec<(u64, u64)> = self.live().map(|n| (self.digest(n.id), self.applied(n.id))).collect();
            ds.windows(2).all(|w| w[0] == w[1]).then(|| ds[0].0)
        })
        .await
    }
}
