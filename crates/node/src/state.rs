//! What a running node holds: its store, the open collections with one engine per
//! shard of the region it serves, readiness, and the fatal-error signal.

use crate::config::NodeConfig;
use parking_lot::RwLock;
use sovra_shard::{NodeStore, ShardEngine, ShardError};
use sovra_types::{ApiError, CollectionName, CollectionSpec, ErrorCode, PointId, RegionId, RegionShardMap, ShardId};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub struct Collection {
    pub spec: Arc<CollectionSpec>,
    /// Every region's shard map, built once when the collection opens: routing
    /// runs for every point of every request.
    pub maps: BTreeMap<RegionId, RegionShardMap>,
    /// Engines of the shards this node holds, by (region, number).
    pub shards: BTreeMap<(RegionId, u32), Arc<ShardEngine>>,
}

impl Collection {
    /// The engine owning `id` in `region`, by the documented hash routing.
    pub fn route(&self, region: &RegionId, id: &PointId) -> Result<&Arc<ShardEngine>, ApiError> {
        let map = self.maps.get(region).ok_or_else(|| self.spec.region_not_spanned(region))?;
        let n = map.shard_for(id);
        self.shards
            .get(&(region.clone(), n))
            .ok_or_else(|| ApiError::unavailable(format!("shard {}/{region}/{n} is not held by this node", self.spec.name)))
    }
}

pub struct NodeState {
    pub config: NodeConfig,
    pub region: RegionId,
    store: NodeStore,
    pool: Arc<rayon::ThreadPool>,
    collections: RwLock<BTreeMap<CollectionName, Arc<Collection>>>,
    /// Serialises create and drop so they never interleave on one name.
    ddl: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    /// Set once on a storage failure; `run` then stops the node.
    fatal: tokio::sync::watch::Sender<Option<String>>,
}

impl NodeState {
    pub fn open(config: NodeConfig) -> Result<Arc<Self>, ShardError> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = NodeStore::open(&config.data_dir.join("db"), config.cache_capacity_mb << 20)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.index_threads)
            .thread_name(|i| format!("sovra-index-{i}"))
            .build()
            .expect("thread pool");
        Ok(Arc::new(Self {
            region: config.region_id(),
            config,
            store,
            pool: Arc::new(pool),
            collections: RwLock::new(BTreeMap::new()),
            ddl: tokio::sync::Mutex::new(()),
            ready: AtomicBool::new(false),
            fatal: tokio::sync::watch::channel(None).0,
        }))
    }

    /// Opens every collection in the catalog and rebuilds its indexes. Blocking.
    pub fn load(&self) -> Result<(), ShardError> {
        for spec in self.store.collections()? {
            let c = self.open_collection(Arc::new(spec))?;
            self.collections.write().insert(c.spec.name.clone(), Arc::new(c));
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    fn open_collection(&self, spec: Arc<CollectionSpec>) -> Result<Collection, ShardError> {
        let mut shards = BTreeMap::new();
        // Only shards of this node's region: a node never opens storage for another
        // region's data (R1/R2).
        for r in spec.regions.iter().filter(|r| r.region == self.region) {
            for number in 0..r.shard_count {
                let id = ShardId {
                    collection: spec.name.clone(),
                    region: r.region.clone(),
                    number,
                };
                let tree = self.store.shard_tree(&id)?;
                let engine = ShardEngine::open(id, spec.clone(), self.store.db().clone(), tree, Some(self.pool.clone()))?;
                shards.insert((r.region.clone(), number), Arc::new(engine));
            }
        }
        let maps = spec
            .regions
            .iter()
            .map(|r| (r.region.clone(), RegionShardMap::even(r.shard_count)))
            .collect();
        Ok(Collection { spec, maps, shards })
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

    pub async fn create(self: &Arc<Self>, spec: CollectionSpec) -> Result<Arc<Collection>, ApiError> {
        self.ensure_ready()?;
        let _ddl = self.ddl.lock().await;
        if self.collections.read().contains_key(&spec.name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("collection {} already exists", spec.name),
            ));
        }
        // One node serves one region for now: every region the collection spans
        // must be this node's, or its data would have nowhere lawful to live.
        if let Some(r) = spec.regions.iter().find(|r| r.region != self.region) {
            return Err(ApiError::precondition(format!(
                "region {} is served by no node of this cluster (it serves: {}); create the collection without it or add a node in {}",
                r.region, self.region, r.region
            )));
        }
        if spec.replication_factor > 1 {
            return Err(ApiError::precondition(format!(
                "replication_factor {} needs {} nodes in region {}; this cluster has 1",
                spec.replication_factor, spec.replication_factor, self.region
            )));
        }
        let this = self.clone();
        let spec = Arc::new(spec);
        let c = tokio::task::spawn_blocking(move || -> Result<Collection, ShardError> {
            this.store.put_collection(&spec)?;
            this.open_collection(spec)
        })
        .await
        .map_err(|e| ApiError::internal(format!("create task failed: {e}")))?
        .map_err(|e| self.storage_failed(e))?;
        let c = Arc::new(c);
        self.collections.write().insert(c.spec.name.clone(), c.clone());
        Ok(c)
    }

    pub async fn drop_collection(self: &Arc<Self>, name: &str) -> Result<usize, ApiError> {
        let c = self.collection(name)?;
        let _ddl = self.ddl.lock().await;
        self.collections.write().remove(&c.spec.name);
        let this = self.clone();
        let name = c.spec.name.clone();
        drop(c);
        tokio::task::spawn_blocking(move || this.store.remove_collection(&name))
            .await
            .map_err(|e| ApiError::internal(format!("drop task failed: {e}")))?
            .map_err(|e| self.storage_failed(e))
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
        tracing::error!(error = %chain, "storage failure; stopping the node");
        self.fatal.send_replace(Some(chain));
        ApiError::unavailable(format!(
            "node {} had a storage failure and is stopping; retry on another node",
            self.config.node_id
        ))
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
}

impl NodeState {
    pub fn flush(&self) -> Result<(), ShardError> {
        self.store.db().flush()?;
        Ok(())
    }
}
