//! What a running node holds: its store, the open collections with this node's
//! replicas of its region's shards (each a Raft group in [`RaftHost`]),
//! readiness, and the fatal-error signal.
//!
//! Placement (R1): the replicas of shard `n` of region X are `replication_factor`
//! nodes of X taken from the configured node list in id order, starting at
//! position `n mod |X|`. Every node computes the same placement from the same
//! list (the meta group replaces this with recorded placements).

use crate::config::{NodeConfig, PeerConfig};
use parking_lot::RwLock;
use sovra_proto::raft as pb;
use sovra_raft::{AddressBook, ClusterSecret, Faults, LogStore, NodeId, RaftHost};
use sovra_shard::replica::{prune_empty, remove_dir, replica_dir, replica_dirs};
use sovra_shard::{CacheBudget, NodeStore, ReplicaStore, ShardEngine, ShardError};
use sovra_types::{ApiError, CollectionName, CollectionSpec, ErrorCode, PointId, RegionId, RegionShardMap, ShardId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Collection {
    pub spec: Arc<CollectionSpec>,
    /// Every region's shard map, built once when the collection opens: routing
    /// runs for every point of every request.
    pub maps: BTreeMap<RegionId, RegionShardMap>,
    /// This node's replicas, by (region, number).
    pub shards: BTreeMap<(RegionId, u32), Arc<ShardEngine>>,
    /// Replicas placed on this node that could not be opened, with the reason:
    /// the node serves every other shard and reports these as failed.
    pub failed: BTreeMap<(RegionId, u32), String>,
}

impl Collection {
    /// The shard owning `id` in `region`, by the documented hash routing.
    pub fn route(&self, region: &RegionId, id: &PointId) -> Result<ShardId, ApiError> {
        let map = self.maps.get(region).ok_or_else(|| self.spec.region_not_spanned(region))?;
        Ok(ShardId {
            collection: self.spec.name.clone(),
            region: region.clone(),
            number: map.shard_for(id),
        })
    }

    pub fn local(&self, shard: &ShardId) -> Option<&Arc<ShardEngine>> {
        self.shards.get(&(shard.region.clone(), shard.number))
    }

    /// Why this node's replica of `shard` failed to open, if it did.
    pub fn failure(&self, shard: &ShardId) -> Option<&str> {
        self.failed.get(&(shard.region.clone(), shard.number)).map(String::as_str)
    }

    /// The local replica of `shard`, or UNAVAILABLE saying where to read it.
    pub fn local_or_unavailable(&self, state: &NodeState, shard: &ShardId) -> Result<&Arc<ShardEngine>, ApiError> {
        self.local(shard).ok_or_else(|| match self.failure(shard) {
            Some(why) => ApiError::unavailable(format!(
                "the replica of shard {shard} on node {} failed to open ({why}); read it from another of nodes {:?}",
                state.config.node_id,
                state.replicas(&self.spec, shard)
            )),
            None => ApiError::unavailable(format!(
                "shard {shard} has no replica on this node; read it from one of nodes {:?}",
                state.replicas(&self.spec, shard)
            )),
        })
    }
}

/// The replicas of shard `number` among the nodes of its region (sorted ids).
fn placement(region_nodes: &[NodeId], number: u32, replication_factor: u32) -> BTreeSet<NodeId> {
    let n = region_nodes.len();
    (0..(replication_factor as usize).min(n))
        .map(|i| region_nodes[(number as usize + i) % n])
        .collect()
}

pub struct NodeState {
    pub config: NodeConfig,
    pub region: RegionId,
    pub host: Arc<RaftHost>,
    /// Every node of the cluster (this one included), sorted by id.
    cluster: Vec<PeerConfig>,
    store: NodeStore,
    /// Where each replica keeps its own directory and database.
    replicas_root: std::path::PathBuf,
    budget: Arc<CacheBudget>,
    pool: Arc<rayon::ThreadPool>,
    collections: RwLock<BTreeMap<CollectionName, Arc<Collection>>>,
    /// Serialises create and drop so they never interleave on one name.
    ddl: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    /// Set once on a storage failure; `run` then stops the node.
    fatal: tokio::sync::watch::Sender<Option<String>>,
}

impl NodeState {
    pub fn open(config: NodeConfig, faults: Faults, secret: ClusterSecret) -> Result<Arc<Self>, ShardError> {
        std::fs::create_dir_all(&config.data_dir)?;
        if config.data_dir.join("db").exists() {
            // Format 1 kept every replica in one shared database.
            return Err(ShardError::FormatVersion {
                found: 1,
                expected: sovra_shard::catalog::FORMAT_VERSION,
            });
        }
        let budget = CacheBudget::new(config.cache_capacity_mb << 20, config.max_replicas);
        // The node's own database holds only the catalog: a small fixed cache.
        let store = NodeStore::open(&config.data_dir.join("node"), 1 << 20)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.index_threads)
            .thread_name(|i| format!("sovra-index-{i}"))
            .build()
            .expect("thread pool");
        let cluster = config.cluster();
        let book = AddressBook::default();
        for p in &cluster {
            if let Some(a) = &p.addr {
                book.set(p.id, a);
            }
        }
        let region = config.region_id();
        let host = RaftHost::new(config.node_id, region.clone(), book, faults, config.raft.settings(), secret);
        host.set_region_nodes(cluster.iter().filter(|p| p.region == config.region).map(|p| p.id).collect());
        Ok(Arc::new(Self {
            region,
            host,
            cluster,
            replicas_root: config.data_dir.join("replicas"),
            budget,
            config,
            store,
            pool: Arc::new(pool),
            collections: RwLock::new(BTreeMap::new()),
            ddl: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            fatal: tokio::sync::watch::channel(None).0,
        }))
    }

    /// Node ids of `region`, sorted.
    pub fn region_nodes(&self, region: &RegionId) -> Vec<NodeId> {
        self.cluster.iter().filter(|p| p.region == region.as_str()).map(|p| p.id).collect()
    }

    /// The nodes holding replicas of `shard` (its Raft group), by [`placement`].
    pub fn replicas(&self, spec: &CollectionSpec, shard: &ShardId) -> BTreeSet<NodeId> {
        placement(&self.region_nodes(&shard.region), shard.number, spec.replication_factor)
    }

    pub fn peers(&self) -> impl Iterator<Item = &PeerConfig> {
        self.cluster.iter().filter(|p| p.id != self.config.node_id)
    }

    /// Opens every collection in the catalog: rebuilds the indexes, starts the
    /// groups. A replica (or a catalog entry) that cannot be opened is reported
    /// and skipped: the node serves everything else.
    pub async fn load(self: &Arc<Self>) -> anyhow::Result<()> {
        let this = self.clone();
        let entries = tokio::task::spawn_blocking(move || this.store.catalog_entries()).await??;
        self.remove_orphans(&entries)?;
        for (name, entry) in entries {
            match entry {
                Ok(spec) => {
                    let c = self.open_collection(Arc::new(spec)).await;
                    self.collections.write().insert(c.spec.name.clone(), Arc::new(c));
                }
                Err(e) => {
                    tracing::error!(collection = %sovra_types::quote(&name), error = %e, "catalog entry cannot be read; collection not served");
                    metrics::counter!(crate::metrics::COLLECTIONS_UNREADABLE).increment(1);
                }
            }
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Deletes replica directories of collections the catalog does not hold
    /// (a drop cut off between the catalog and the directories).
    fn remove_orphans(&self, entries: &[sovra_shard::catalog::CatalogEntry]) -> Result<(), ShardError> {
        for (collection, _, _, dir) in replica_dirs(&self.replicas_root)? {
            if !entries.iter().any(|(name, _)| *name == collection) {
                tracing::warn!(dir = %dir.display(), "replica of a collection no longer in the catalog; deleting it");
                remove_dir(&dir)?;
            }
        }
        prune_empty(&self.replicas_root);
        Ok(())
    }

    /// The number of replica databases open and the most the budget allows.
    pub fn replica_budget(&self) -> (usize, usize) {
        (self.budget.open(), self.budget.shares())
    }

    /// Opens this node's replicas of `spec`; those that fail are recorded in
    /// `failed` with their reason instead of failing the collection.
    async fn open_collection(self: &Arc<Self>, spec: Arc<CollectionSpec>) -> Collection {
        let mut shards = BTreeMap::new();
        let mut failed = BTreeMap::new();
        // Only shards of this node's region, and of those only the ones placed
        // here: a node never opens storage for another region's data (R1/R2).
        for r in spec.regions.iter().filter(|r| r.region == self.region) {
            for number in 0..r.shard_count {
                let id = ShardId {
                    collection: spec.name.clone(),
                    region: r.region.clone(),
                    number,
                };
                let members = self.replicas(&spec, &id);
                if !members.contains(&self.config.node_id) {
                    continue;
                }
                match self.open_replica(&id, &spec, members).await {
                    Ok(engine) => {
                        shards.insert((r.region.clone(), number), engine);
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        tracing::error!(shard = %id, error = %why, "replica failed to open; serving the others");
                        failed.insert((r.region.clone(), number), why);
                    }
                }
            }
        }
        let maps = spec
            .regions
            .iter()
            .map(|r| (r.region.clone(), RegionShardMap::even(r.shard_count)))
            .collect();
        Collection {
            spec,
            maps,
            shards,
            failed,
        }
    }

    async fn open_replica(
        self: &Arc<Self>,
        id: &ShardId,
        spec: &Arc<CollectionSpec>,
        members: BTreeSet<NodeId>,
    ) -> anyhow::Result<Arc<ShardEngine>> {
        let (this, sid, sp) = (self.clone(), id.clone(), spec.clone());
        let (engine, log) = tokio::task::spawn_blocking(move || -> Result<_, ShardError> {
            let rs = ReplicaStore::open(&replica_dir(&this.replicas_root, &sid), &this.budget)?;
            let engine = ShardEngine::open(sid.clone(), sp, &rs, Some(this.pool.clone()))?;
            Ok((Arc::new(engine), LogStore::of(&rs)))
        })
        .await??;
        self.host.open_group(id.clone(), engine.clone(), log, members).await?;
        Ok(engine)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn ensure_ready(&self) -> Result<(), ApiError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(ApiError::unavailable(
                "node is loading its shards; retry shortly (health reports NOT_SERVING until ready)",
            ))
        }
    }

    pub fn collection(&self, name: &str) -> Result<Arc<Collection>, ApiError> {
        self.ensure_ready()?;
        let name = CollectionName::parse(name)?;
        self.collections
            .read()
            .get(&name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("collection {name} does not exist; create it first")))
    }

    pub fn list(&self) -> Vec<Arc<Collection>> {
        self.collections.read().values().cloned().collect()
    }

    /// Checks a new collection against the cluster: every region served by some
    /// node, and enough nodes there for the replication factor.
    fn check_placeable(&self, spec: &CollectionSpec) -> Result<(), ApiError> {
        let served: BTreeSet<&str> = self.cluster.iter().map(|p| p.region.as_str()).collect();
        for r in &spec.regions {
            let nodes = self.region_nodes(&r.region);
            if nodes.is_empty() {
                return Err(ApiError::precondition(format!(
                    "region {} is served by no node of this cluster (it serves: {}); create the collection without it or add a node in {}",
                    r.region,
                    served.into_iter().collect::<Vec<_>>().join(", "),
                    r.region
                )));
            }
            if (spec.replication_factor as usize) > nodes.len() {
                return Err(ApiError::precondition(format!(
                    "replication_factor {} needs {} nodes in region {}; this cluster has {}",
                    spec.replication_factor,
                    spec.replication_factor,
                    r.region,
                    nodes.len()
                )));
            }
        }
        Ok(())
    }

    /// Creates a collection on every node: the peers first (each opens its own
    /// replicas), then here. A peer that cannot be reached fails the create with
    /// nothing created here; peers that did get it keep it, and a retry with the
    /// same spec completes it (a peer accepts an identical spec again).
    pub async fn create(self: &Arc<Self>, spec: CollectionSpec) -> Result<Arc<Collection>, ApiError> {
        self.ensure_ready()?;
        let _ddl = self.ddl.lock().await;
        if self.collections.read().contains_key(&spec.name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("collection {} already exists", spec.name),
            ));
        }
        self.check_placeable(&spec)?;
        let bytes = postcard::to_allocvec(&spec).map_err(|e| ApiError::internal(e.to_string()))?;
        self.broadcast(
            pb::catalog_request::Change::Create(bytes),
            &format!("create collection {}", spec.name),
        )
        .await?;
        self.create_local(spec).await
    }

    async fn create_local(self: &Arc<Self>, spec: CollectionSpec) -> Result<Arc<Collection>, ApiError> {
        let this = self.clone();
        let spec = Arc::new(spec);
        let s2 = spec.clone();
        tokio::task::spawn_blocking(move || this.store.put_collection(&s2))
            .await
            .map_err(|e| ApiError::internal(format!("create task failed: {e}")))?
            .map_err(|e| self.storage_failed(e))?;
        let c = Arc::new(self.open_collection(spec).await);
        self.collections.write().insert(c.spec.name.clone(), c.clone());
        // It is in the catalog (and on the peers) now; a failed replica is
        // reported like one that failed at start, and a restart retries it.
        if let Some(((region, number), why)) = c.failed.iter().next() {
            return Err(ApiError::internal(format!(
                "collection {} was created, but this node's replica of shard {region}/{number} failed to open ({why}); GetCollection reports it",
                c.spec.name
            )));
        }
        Ok(c)
    }

    /// A peer told us of a collection change.
    pub async fn apply_catalog(self: &Arc<Self>, from: NodeId, change: pb::catalog_request::Change) -> Result<(), tonic::Status> {
        if !self.cluster.iter().any(|p| p.id == from) {
            return Err(tonic::Status::permission_denied(format!(
                "node {from} is not in this node's cluster list"
            )));
        }
        self.ensure_ready().map_err(|e| sovra_proto::status_of(&e))?;
        match change {
            pb::catalog_request::Change::Create(bytes) => {
                let spec: CollectionSpec =
                    postcard::from_bytes(&bytes).map_err(|e| tonic::Status::invalid_argument(format!("spec does not decode: {e}")))?;
                let _ddl = self.ddl.lock().await;
                if let Some(have) = self.collections.read().get(&spec.name) {
                    return if *have.spec == spec {
                        Ok(())
                    } else {
                        Err(tonic::Status::already_exists(format!(
                            "collection {} exists on node {} with another spec",
                            spec.name, self.config.node_id
                        )))
                    };
                }
                self.create_local(spec).await.map(|_| ()).map_err(|e| sovra_proto::status_of(&e))
            }
            pb::catalog_request::Change::Drop(name) => {
                let _ddl = self.ddl.lock().await;
                match self.drop_local(&name).await {
                    Ok(_) => Ok(()),
                    Err(e) if e.code == ErrorCode::NotFound => Ok(()),
                    Err(e) => Err(sovra_proto::status_of(&e)),
                }
            }
        }
    }

    async fn broadcast(&self, change: pb::catalog_request::Change, what: &str) -> Result<(), ApiError> {
        let mut calls = Vec::new();
        for p in self.peers() {
            let id = p.id;
            let client = self.host.peers.client(id);
            let change = change.clone();
            let me = self.config.node_id;
            calls.push(async move {
                let mut client = client.map_err(|e| (id, e.to_string()))?;
                let mut req = tonic::Request::new(pb::CatalogRequest {
                    from: me,
                    change: Some(change),
                });
                req.set_timeout(Duration::from_secs(30));
                client.catalog(req).await.map(|_| ()).map_err(|s| (id, s.message().to_string()))
            });
        }
        let failed: Vec<String> = futures_join(calls)
            .await
            .into_iter()
            .filter_map(|r| r.err())
            .map(|(id, why)| format!("node {id}: {why}"))
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(ApiError::unavailable(format!(
                "{what} did not reach every node ({}); nothing was changed on this node; retry once they are up",
                failed.join("; ")
            )))
        }
    }

    pub async fn drop_collection(self: &Arc<Self>, name: &str) -> Result<usize, ApiError> {
        let c = self.collection(name)?;
        let _ddl = self.ddl.lock().await;
        self.broadcast(
            pb::catalog_request::Change::Drop(c.spec.name.to_string()),
            &format!("drop collection {}", c.spec.name),
        )
        .await?;
        self.drop_local(c.spec.name.as_str()).await
    }

    /// Stops this node's replicas of the collection, removes it from the
    /// catalog, then deletes its replicas' directories (a crash in between
    /// leaves orphans the next start deletes). Answers how many replicas went.
    async fn drop_local(self: &Arc<Self>, name: &str) -> Result<usize, ApiError> {
        let c = self.collection(name)?;
        self.collections.write().remove(&c.spec.name);
        let dropped = c.shards.len();
        for (region, number) in c.shards.keys() {
            let id = ShardId {
                collection: c.spec.name.clone(),
                region: region.clone(),
                number: *number,
            };
            self.host
                .remove_group(&id, false)
                .await
                .map_err(|e| ApiError::internal(format!("stopping replica {id}: {e:#}")))?;
        }
        let this = self.clone();
        let name = c.spec.name.clone();
        drop(c);
        tokio::task::spawn_blocking(move || -> Result<(), ShardError> {
            this.store.remove_collection(&name)?;
            remove_dir(&this.replicas_root.join(name.as_str()))
        })
        .await
        .map_err(|e| ApiError::internal(format!("drop task failed: {e}")))?
        .map_err(|e| self.storage_failed(e))?;
        Ok(dropped)
    }

    /// A storage error means acknowledged state may not be on disk: stop the node
    /// rather than carry on, and tell the client to go elsewhere.
    pub fn storage_failed(&self, e: ShardError) -> ApiError {
        let mut chain = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            chain.push_str(&format!(": {s}"));
            src = s.source();
        }
        self.stop_with(chain);
        ApiError::unavailable(format!(
            "node {} had a storage failure and is stopping; retry on another node",
            self.config.node_id
        ))
    }

    /// Stops the node (`run` sees the reason and exits with status 1).
    pub fn stop_with(&self, reason: String) {
        tracing::error!(error = %reason, "stopping the node");
        self.fatal.send_replace(Some(reason));
    }

    pub fn fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    pub fn engines(&self) -> Vec<Arc<ShardEngine>> {
        self.collections
            .read()
            .values()
            .flat_map(|c| c.shards.values().cloned().collect::<Vec<_>>())
            .collect()
    }

    pub fn flush(&self) -> Result<(), ShardError> {
        self.store.db().flush()?;
        for e in self.engines() {
            e.replica().db().flush()?;
        }
        Ok(())
    }
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F>(fs: Vec<F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("catalog call task panicked"));
    }
    out
}
