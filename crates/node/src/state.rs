//! What a running node holds: its view of the cluster's metadata (the meta
//! group's state at some applied index), the replicas meta assigns to it (each
//! a Raft group in [`RaftHost`], each in its own directory), the collections
//! as routing needs them, readiness, and the fatal-error signal.
//!
//! Placement (R1) is recorded in the meta group, chosen by
//! `sovra_meta::place_collection` when a collection is created and checked by
//! the meta state machine itself. [`NodeState::reconcile`] makes the replicas
//! on this node match the view: it opens those assigned here and destroys
//! (deletes the directory of) those no longer assigned.

use crate::config::NodeConfig;
use parking_lot::RwLock;
use sovra_meta::{MetaState, NodeStatus};
use sovra_raft::{AddressBook, ClusterSecret, Faults, LogStore, NodeId, RaftHost};
use sovra_shard::replica::{prune_empty, remove_dir, replica_dir, replica_dirs};
use sovra_shard::{CacheBudget, NodeStore, ReplicaStore, ShardEngine, ShardError};
use sovra_types::{ApiError, CollectionName, CollectionSpec, ErrorCode, PointId, RegionId, RegionShardMap, ShardId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Every shard's recorded replicas (node ids), from the meta view.
    pub replicas: BTreeMap<(RegionId, u32), BTreeSet<NodeId>>,
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

    /// The nodes holding `shard`'s replicas, as recorded in meta.
    pub fn replicas_of(&self, shard: &ShardId) -> BTreeSet<NodeId> {
        self.replicas
            .get(&(shard.region.clone(), shard.number))
            .cloned()
            .unwrap_or_default()
    }

    /// The local replica of `shard`, or UNAVAILABLE saying where to read it.
    pub fn local_or_unavailable(&self, state: &NodeState, shard: &ShardId) -> Result<&Arc<ShardEngine>, ApiError> {
        self.local(shard).ok_or_else(|| match self.failure(shard) {
            Some(why) => ApiError::unavailable(format!(
                "the replica of shard {shard} on node {} failed to open ({why}); read it from another of nodes {:?}",
                state.config.node_id,
                self.replicas_of(shard)
            )),
            None => ApiError::unavailable(format!(
                "shard {shard} has no replica on this node; read it from one of nodes {:?}",
                self.replicas_of(shard)
            )),
        })
    }
}

pub use sovra_meta::View;

/// Where the node keeps its last view, so it restarts with it.
const VIEW_KEY: &str = "meta_view";
/// The receipt key's seed of a node alone with no configured secret.
const RECEIPT_SEED_KEY: &str = "receipt_seed";

/// How long a rewritten replica waits to have a leader and its old position
/// in the log again before it reports its purge (past it, it reports anyway:
/// the purge must end even if its group cannot elect).
const REJOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// The data directory format after this build's: the test-only
/// `sovra-format-next` executable writes it and upgrades a directory of the
/// current format in place, as a real format change would.
pub const NEXT_FORMAT: sovra_shard::catalog::Format = sovra_shard::catalog::Format {
    current: sovra_shard::catalog::FORMAT_VERSION + 1,
    upgrades_from: &[sovra_shard::catalog::FORMAT_VERSION],
};

static FORMAT: std::sync::OnceLock<sovra_shard::catalog::Format> = std::sync::OnceLock::new();

/// The data directory format this process writes.
pub fn node_format() -> sovra_shard::catalog::Format {
    *FORMAT.get().unwrap_or(&sovra_shard::catalog::FORMAT)
}

/// Makes this process write [`NEXT_FORMAT`]: for `sovra-format-next` only,
/// before any node starts.
pub fn use_next_format() {
    let _ = FORMAT.set(NEXT_FORMAT);
}

pub struct NodeState {
    pub config: NodeConfig,
    pub region: RegionId,
    pub host: Arc<RaftHost>,
    /// When this run started (Unix ms): its addresses beat older runs'.
    pub incarnation: u64,
    /// The first admin key, when this (bootstrap) node made it in this run;
    /// printed once, kept for tests.
    pub first_admin_key: parking_lot::Mutex<Option<String>>,
    /// Per-key rate buckets on this node's public API.
    pub key_buckets: crate::ratelimit::KeyBuckets,
    view: RwLock<Arc<View>>,
    view_changed: tokio::sync::watch::Sender<u64>,
    /// Replicas open on this node, and those that failed to open (with why).
    engines: RwLock<BTreeMap<ShardId, Arc<ShardEngine>>>,
    failed: RwLock<BTreeMap<ShardId, String>>,
    /// One reconcile at a time.
    reconciling: tokio::sync::Mutex<()>,
    store: NodeStore,
    /// Where each replica keeps its own directory and database.
    replicas_root: std::path::PathBuf,
    budget: Arc<CacheBudget>,
    /// The engine and build pool every replica's index is made with.
    index: sovra_index::IndexOptions,
    collections: RwLock<BTreeMap<CollectionName, Arc<Collection>>>,
    ready: AtomicBool,
    /// Set once on a storage failure; `run` then stops the node.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// The coordinator (and its leaf), made once the state exists.
    root: std::sync::OnceLock<Arc<sovra_coord::Root>>,
    /// When this node last confirmed its view with a quorum of the meta
    /// group: ms since `started` (+1; 0 = never). The key lease runs from it.
    started: std::time::Instant,
    meta_confirmed: std::sync::atomic::AtomicU64,
    /// Split jobs this node is driving now ([`crate::split`]).
    pub split_drivers: parking_lot::Mutex<BTreeSet<String>>,
    /// Last refresh for an unknown key id (ms since `started`), to bound them.
    unknown_key_refresh: std::sync::atomic::AtomicU64,
    /// Signs erasure receipts (the cluster's key).
    pub receipt_key: crate::receipt::ReceiptKey,
    /// Signs audit checkpoints (the cluster's key, under its own label).
    pub audit_key: crate::receipt::ReceiptKey,
    /// Group-commits every call's audit record.
    pub auditor: crate::audit::Auditor,
    /// Set only by `sovra bench cluster`, to measure what auditing costs in
    /// the same run: calls then write no record. No config or API sets it.
    pub unaudited_for_bench: AtomicBool,
    /// Set only by `sovra bench erasure`, to measure acknowledgements on a
    /// cluster not busy purging: the purge loop waits while it is set.
    pub purges_held: AtomicBool,
}

/// The node as the coordinator and leaf see it (weak: the node owns them).
struct Ctx(std::sync::Weak<NodeState>);

#[tonic::async_trait]
impl sovra_coord::NodeContext for Ctx {
    fn view(&self) -> Arc<View> {
        self.0.upgrade().map(|s| s.view()).unwrap_or_default()
    }

    async fn refresh(&self) {
        if let Some(s) = self.0.upgrade() {
            s.refresh_view().await;
        }
    }

    fn failure(&self, shard: &ShardId) -> Option<String> {
        self.0.upgrade().and_then(|s| s.failed.read().get(shard).cloned())
    }

    fn storage_failed(&self, e: ShardError) -> tonic::Status {
        match self.0.upgrade() {
            Some(s) => sovra_proto::status_of(&s.storage_failed(e)),
            None => tonic::Status::unavailable("the node is stopping"),
        }
    }
}

impl NodeState {
    pub fn open(
        config: NodeConfig,
        faults: Faults,
        secret: ClusterSecret,
        tls: Option<Arc<sovra_raft::tls::TlsState>>,
    ) -> Result<Arc<Self>, ShardError> {
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
        let format = node_format();
        let (store, upgraded) = NodeStore::open_as(&config.data_dir.join("node"), 1 << 20, format)?;
        match upgraded {
            Some(from) => tracing::warn!(
                "data directory {} upgraded from format {from} to {}",
                config.data_dir.display(),
                format.current
            ),
            None => tracing::info!("data directory format {}", format.current),
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.index_threads)
            .thread_name(|i| format!("sovra-index-{i}"))
            // Below the runtime, like leaf reads: a follower busy linking a
            // large batch must still answer AppendEntries within a heartbeat
            // interval, or replication stalls (openraft resends, times out).
            .start_handler(|_| sovra_coord::pool::lower_priority())
            .build()
            .expect("thread pool");
        let index_options = sovra_index::IndexOptions {
            engine: config.index_engine.parse().expect("validated with the config"),
            pool: Some(Arc::new(pool)),
        };
        let book = AddressBook::default();
        let view = match store.get_raw(VIEW_KEY)? {
            None => View::default(),
            Some(b) => match sovra_raft::meta_sm::decode_state::<(u64, MetaState)>(&b) {
                Ok((index, state)) => View { index, state },
                Err(e) => {
                    // Only a cache: meta gives it again.
                    tracing::warn!(error = %e, "the saved metadata view does not decode; starting without it");
                    View::default()
                }
            },
        };
        let (receipt_key, audit_key) = if config.cluster_secret.is_some() || config.cluster_secret_file.is_some() {
            (
                crate::receipt::ReceiptKey::from_secret(secret.expose()),
                crate::receipt::ReceiptKey::derived(secret.expose(), crate::receipt::AUDIT_LABEL),
            )
        } else {
            // Alone with a random secret: a seed of its own, kept, so its
            // receipts and checkpoints verify under one key across restarts.
            let seed = match store.get_raw(RECEIPT_SEED_KEY)?.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                Some(seed) => seed,
                None => {
                    let seed: [u8; 32] = rand::random();
                    store.put_raw(RECEIPT_SEED_KEY, &seed)?;
                    seed
                }
            };
            (
                crate::receipt::ReceiptKey::from_seed(seed),
                crate::receipt::ReceiptKey::derived(&seed, crate::receipt::AUDIT_LABEL),
            )
        };
        let region = config.region_id();
        let host = RaftHost::new(config.node_id, region.clone(), book, faults, config.raft.settings(), secret, tls);
        // Until the bootstrap node has settled the meta level of a new
        // cluster (`cluster::first_level`), before its servers take anything.
        host.registrations_held
            .store(config.bootstrap && config.has_role("meta"), std::sync::atomic::Ordering::Release);
        let index = view.index;
        let incarnation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        let this = Arc::new(Self {
            region,
            host,
            incarnation,
            first_admin_key: parking_lot::Mutex::new(None),
            key_buckets: Default::default(),
            view: RwLock::new(Arc::new(View::default())),
            view_changed: tokio::sync::watch::channel(index).0,
            engines: RwLock::new(BTreeMap::new()),
            failed: RwLock::new(BTreeMap::new()),
            reconciling: tokio::sync::Mutex::new(()),
            replicas_root: config.data_dir.join("replicas"),
            budget,
            config,
            store,
            index: index_options,
            collections: RwLock::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            fatal: tokio::sync::watch::channel(None).0,
            root: std::sync::OnceLock::new(),
            started: std::time::Instant::now(),
            meta_confirmed: std::sync::atomic::AtomicU64::new(0),
            split_drivers: Default::default(),
            unknown_key_refresh: std::sync::atomic::AtomicU64::new(0),
            receipt_key,
            audit_key,
            auditor: crate::audit::Auditor::default(),
            unaudited_for_bench: AtomicBool::new(false),
            purges_held: AtomicBool::new(false),
        });
        let ctx: Arc<dyn sovra_coord::NodeContext> = Arc::new(Ctx(Arc::downgrade(&this)));
        let pool = sovra_coord::SearchPool::new(this.config.node_id, this.config.search_threads())?;
        let leaf = Arc::new(sovra_coord::Leaf::new(this.host.clone(), ctx.clone(), pool));
        let cfg = sovra_coord::RootConfig {
            leaf_timeout: std::time::Duration::from_millis(this.config.leaf_timeout_ms),
            hedge_after: (this.config.hedge_after_ms > 0).then(|| std::time::Duration::from_millis(this.config.hedge_after_ms)),
        };
        let _ = this.root.set(sovra_coord::Root::new(leaf, ctx, this.config.zone.clone(), cfg));
        this.apply_view_addresses(&view.state);
        *this.view.write() = Arc::new(view);
        Ok(this)
    }

    /// The first admin key this (bootstrap) node made in this run, once it
    /// has (`None` after `within`, or on a node that makes none).
    pub async fn first_admin_key_within(&self, within: std::time::Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(k) = self.first_admin_key.lock().clone() {
                return Some(k);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// The coordinator of this node.
    pub fn root(&self) -> &Arc<sovra_coord::Root> {
        self.root.get().expect("set when the state is made")
    }

    fn since_start_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Whether this node confirmed its view with meta's quorum within the key lease.
    pub fn lease_held(&self) -> bool {
        let at = self.meta_confirmed.load(Ordering::Acquire);
        at != 0 && self.since_start_ms().saturating_sub(at) <= self.config.key_lease_ms
    }

    /// Milliseconds since the last confirmation (`None`: never).
    pub fn lease_age_ms(&self) -> Option<u64> {
        let at = self.meta_confirmed.load(Ordering::Acquire);
        (at != 0).then(|| self.since_start_ms().saturating_sub(at))
    }

    /// Confirms the view with a quorum of the meta group (a linearizable
    /// read: through this node's meta replica, else a confirmed fetch from a
    /// meta node), takes the state it reads, and renews the key lease from
    /// the moment the confirmation began. False if no quorum answered.
    pub async fn confirm_meta(self: &Arc<Self>) -> bool {
        let began = self.since_start_ms();
        let fresh = match self.host.meta().filter(|m| m.leader().is_some() && m.sm.last_applied() > 0) {
            Some(_) => match self.host.meta_barrier().await {
                Ok(m) => Some((m.sm.last_applied(), m.sm.state())),
                Err(_) => None,
            },
            None => crate::cluster::fetch_confirmed(self).await,
        };
        let Some((index, state)) = fresh else { return false };
        if let Err(e) = self.offer_view(index, state).await {
            self.stop_with(format!("saving the metadata view failed: {e}"));
            return false;
        }
        self.meta_confirmed.fetch_max(began, Ordering::AcqRel);
        true
    }

    /// At most one view refresh per 250 ms for keys this node does not know
    /// (a key made a moment ago elsewhere), so guessing ids costs little.
    pub fn may_refresh_for_unknown_key(&self) -> bool {
        let now = self.since_start_ms();
        let last = self.unknown_key_refresh.load(Ordering::Acquire);
        now.saturating_sub(last) >= 250
            && self
                .unknown_key_refresh
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Public addresses of `region`'s nodes not marked down, for messages
    /// that send a client there.
    pub fn region_addresses(&self, region: &RegionId) -> Vec<String> {
        self.view()
            .state
            .nodes
            .values()
            .filter(|n| n.region == *region && n.status != NodeStatus::Down && n.roles.coordinator)
            .map(|n| n.public_addr.clone())
            .collect()
    }

    /// The nodes holding `shard`'s replicas, as recorded in meta.
    pub fn replicas(&self, spec: &CollectionSpec, shard: &ShardId) -> BTreeSet<NodeId> {
        let v = self.view();
        v.state
            .collections
            .get(&spec.name)
            .and_then(|c| c.shards.get(&(shard.region.clone(), shard.number)))
            .map(|s| s.replicas.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The last metadata view.
    pub fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    /// Wakes on every newer view (its index).
    pub fn view_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.view_changed.subscribe()
    }

    /// Takes `state` at meta index `index` as the view if it is newer than the
    /// one held: saves it, learns addresses from it, and wakes the reconcile loop.
    pub async fn offer_view(self: &Arc<Self>, index: u64, state: MetaState) -> Result<bool, ShardError> {
        if index <= self.view().index {
            return Ok(false);
        }
        // The saved view is what a restart serves from before meta answers: a
        // heartbeat alone changes nothing it is used for, so only other
        // changes are written (otherwise every node would write and flush its
        // whole view on every node's heartbeat).
        let held = self.view();
        let only_heartbeats = held.index > 0 && held.state.same_but_progress(&state);
        let state = if only_heartbeats {
            state
        } else {
            let saved = (index, state);
            let bytes = sovra_raft::meta_sm::encode_state(&saved).map_err(ShardError::Encode)?;
            let this = self.clone();
            tokio::task::spawn_blocking(move || this.store.put_raw(VIEW_KEY, &bytes))
                .await
                .map_err(|e| ShardError::Io(std::io::Error::other(e)))??;
            self.apply_view_addresses(&saved.1);
            saved.1
        };
        {
            let mut v = self.view.write();
            if index <= v.index {
                return Ok(false);
            }
            *v = Arc::new(View { index, state });
        }
        self.view_changed.send_replace(index);
        Ok(true)
    }

    fn apply_view_addresses(&self, state: &MetaState) {
        for n in state.nodes.values() {
            if n.id != self.config.node_id {
                self.host.peers.book.set_newer(n.id, &n.cluster_addr, n.incarnation);
            }
        }
        self.host
            .set_region_nodes(state.nodes.values().filter(|n| n.region == self.region).map(|n| n.id).collect());
    }

    /// Opens the meta replica (meta-role nodes) and, once the node has seen
    /// the metadata, its replicas; then reports ready. A replica that cannot be
    /// opened is reported and skipped: the node serves everything else.
    pub async fn load(self: &Arc<Self>) -> anyhow::Result<()> {
        if self.config.has_role("meta") {
            let dir = self.config.data_dir.join("meta");
            let budget = self.budget.clone();
            let store = tokio::task::spawn_blocking(move || ReplicaStore::open(&dir, &budget)).await??;
            let members = self.config.bootstrap.then(|| BTreeSet::from([self.config.node_id]));
            let meta = self.host.open_meta(store, members).await?;
            let applied = meta.sm.last_applied();
            if applied > 0 {
                self.offer_view(applied, meta.sm.state()).await?;
            }
        }
        let mut changes = self.view_changes();
        // A node serves once its view holds itself: a node that was in the
        // cluster before restarts with its saved view at once (even if meta
        // has no quorum now); a new one waits until its registration is seen.
        let me = self.config.node_id;
        let _ = changes.wait_for(|_| self.view().state.nodes.contains_key(&me)).await;
        self.reconcile().await;
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes this node's replicas match the view: opens the replicas assigned
    /// here, destroys the ones no longer assigned (their directories deleted),
    /// and rebuilds the collections routing reads. Never acts on an empty view.
    pub async fn reconcile(self: &Arc<Self>) {
        let _one = self.reconciling.lock().await;
        let view = self.view();
        if view.index == 0 {
            return;
        }
        let me = self.config.node_id;
        let mut wanted: BTreeMap<ShardId, (Arc<CollectionSpec>, Option<BTreeSet<NodeId>>)> = BTreeMap::new();
        for (name, c) in &view.state.collections {
            let spec = Arc::new(c.spec.clone());
            for ((region, number), shard) in &c.shards {
                // A move's target opens an empty replica for the leader to add.
                let moving_here = view
                    .state
                    .ops
                    .running_on(name, &(region.clone(), *number))
                    .is_some_and(|(_, m)| m.to == me);
                if !shard.replicas.contains(&me) && !moving_here {
                    continue;
                }
                let id = ShardId {
                    collection: name.clone(),
                    region: region.clone(),
                    number: *number,
                };
                // Founders initialise the group together; a replica added later
                // opens empty and waits for the leader to add it.
                let init =
                    (shard.founders.contains(&me) && shard.founders == shard.replicas).then(|| shard.founders.iter().copied().collect());
                wanted.insert(id, (spec.clone(), init));
            }
        }
        // A running recovery's new shard: a new group its nodes found together.
        for (_, r) in view.state.ops.recoveries() {
            if !r.replicas.contains(&me) {
                continue;
            }
            let Some(c) = view.state.collections.get(&r.collection) else {
                continue;
            };
            let Ok(after) = MetaState::spec_after_recover(&c.spec, r) else {
                continue;
            };
            let id = ShardId {
                collection: r.collection.clone(),
                region: r.shard.0.clone(),
                number: r.number,
            };
            wanted.insert(id, (Arc::new(after), Some(r.replicas.iter().copied().collect())));
        }
        // A running split's halves: new groups its nodes found together,
        // validating writes by the map they will route by.
        for (_, split) in view.state.ops.splits() {
            if !split.replicas.contains(&me) {
                continue;
            }
            let Some(c) = view.state.collections.get(&split.collection) else {
                continue;
            };
            let Ok(after) = MetaState::spec_after_split(&c.spec, split) else {
                continue;
            };
            let after = Arc::new(after);
            for (region, number) in split.halves() {
                let id = ShardId {
                    collection: split.collection.clone(),
                    region,
                    number,
                };
                wanted.insert(id, (after.clone(), Some(split.replicas.iter().copied().collect())));
            }
        }
        let open: Vec<ShardId> = self.engines.read().keys().cloned().collect();
        for id in open.iter().filter(|id| !wanted.contains_key(*id)) {
            tracing::info!(shard = %id, "replica no longer assigned to this node; destroying it");
            let engine = self.engines.write().remove(id);
            if let Err(e) = self.host.remove_group(id, true).await {
                tracing::error!(shard = %id, error = %e, "destroying a replica failed");
            }
            drop(engine);
        }
        let failed_gone: Vec<ShardId> = self.failed.read().keys().filter(|id| !wanted.contains_key(*id)).cloned().collect();
        for id in failed_gone {
            self.failed.write().remove(&id);
            let _ = remove_dir(&replica_dir(&self.replicas_root, &id));
        }
        for (id, (spec, init)) in &wanted {
            if self.engines.read().contains_key(id) || self.failed.read().contains_key(id) {
                continue;
            }
            match self.open_replica(id, spec, init.clone()).await {
                Ok(engine) => {
                    self.engines.write().insert(id.clone(), engine);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::error!(shard = %id, error = %why, "replica failed to open; serving the others");
                    self.failed.write().insert(id.clone(), why);
                }
            }
        }
        self.remove_orphans(&wanted);
        self.rebuild_collections(&view);
        self.reconcile_audit(&view).await;
    }

    /// Opens this node's replica of its region's audit log when meta places
    /// one here (founders initialise it, until it has formed), and closes and
    /// deletes it when meta has moved it elsewhere.
    async fn reconcile_audit(&self, view: &View) {
        let me = self.config.node_id;
        let placed = view.state.audit.get(&self.region);
        let assigned = placed.is_some_and(|g| g.replicas.contains(&me));
        let dir = self.config.data_dir.join("audit");
        match (assigned, self.host.audit().is_some()) {
            (true, false) => {
                let init = placed.filter(|g| !g.formed && g.founders.contains(&me)).map(|g| g.founders.clone());
                let budget = self.budget.clone();
                let d = dir.clone();
                let opened = match tokio::task::spawn_blocking(move || ReplicaStore::open(&d, &budget)).await {
                    Ok(Ok(store)) => self.host.open_audit(store, init).await,
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e.into()),
                };
                match opened {
                    Ok(_) => tracing::info!(region = %self.region, "audit replica open"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "audit replica failed to open; will retry"),
                }
            }
            (false, true) if placed.is_some() => {
                tracing::info!("the audit log moved off this node; deleting its replica");
                let a = self.host.audit();
                self.host.close_audit().await;
                if let Some(a) = a {
                    let sm = a.sm.clone();
                    drop(a);
                    let _ = tokio::task::spawn_blocking(move || sm.destroy()).await;
                }
            }
            (false, false) if placed.is_some() && dir.exists() => {
                let _ = remove_dir(&dir);
            }
            _ => {}
        }
    }

    /// Deletes replica directories nothing here is assigned (a drop or a move
    /// cut off by a crash).
    fn remove_orphans(&self, wanted: &BTreeMap<ShardId, (Arc<CollectionSpec>, Option<BTreeSet<NodeId>>)>) {
        let Ok(dirs) = replica_dirs(&self.replicas_root) else { return };
        for (c, r, n, dir) in dirs {
            let known = wanted
                .keys()
                .any(|id| id.collection.as_str() == c && id.region.as_str() == r && id.number.to_string() == n);
            if !known {
                tracing::warn!(dir = %dir.display(), "replica directory not assigned to this node; deleting it");
                let _ = remove_dir(&dir);
            }
        }
        prune_empty(&self.replicas_root);
    }

    fn rebuild_collections(&self, view: &View) {
        let engines = self.engines.read();
        let failed = self.failed.read();
        let mut out = BTreeMap::new();
        for (name, c) in &view.state.collections {
            let spec = Arc::new(c.spec.clone());
            let maps = c
                .spec
                .regions
                .iter()
                .filter_map(|r| Some((r.region.clone(), c.spec.shard_map(&r.region).ok()?)))
                .collect();
            let mut coll = Collection {
                spec,
                maps,
                shards: BTreeMap::new(),
                failed: BTreeMap::new(),
                replicas: BTreeMap::new(),
            };
            for ((region, number), shard) in &c.shards {
                let key = (region.clone(), *number);
                let id = ShardId {
                    collection: name.clone(),
                    region: region.clone(),
                    number: *number,
                };
                if let Some(e) = engines.get(&id) {
                    coll.shards.insert(key.clone(), e.clone());
                }
                if let Some(why) = failed.get(&id) {
                    coll.failed.insert(key.clone(), why.clone());
                }
                coll.replicas.insert(key, shard.replicas.iter().copied().collect());
            }
            out.insert(name.clone(), Arc::new(coll));
        }
        *self.collections.write() = out;
    }

    /// Replica databases open (the meta replica's included) and the budget's shares.
    pub fn replica_budget(&self) -> (usize, usize) {
        (self.budget.open(), self.budget.shares())
    }

    /// The last step of a purge (E2): takes this node's replica of `id` out of
    /// service (its Raft core stopped, every handle on its database dropped),
    /// rewrites its database into fresh files so no removed value stays in
    /// sled's old ones, reopens it (it catches up with its group like any
    /// restarted replica), and records erasures through `through` as purged.
    /// Meanwhile the shard's other replicas serve it. The reconcile loop waits.
    pub async fn rewrite_replica(self: &Arc<Self>, id: &ShardId, through: u64) -> anyhow::Result<()> {
        let one = self.reconciling.lock().await;
        let Some(engine) = self.engines.write().remove(id) else {
            return Ok(()); // no longer held here
        };
        let spec = Arc::new(engine.spec().clone());
        let started = std::time::Instant::now();
        let applied_before = self
            .host
            .group(id)
            .and_then(|g| g.raft().metrics().borrow().last_applied)
            .map_or(0, |l| l.index);
        self.host.remove_group(id, false).await?;
        // Saved (the compacted graph: no erased vector in it), the index is
        // loaded on reopen instead of rebuilt, which keeps the replica's time
        // out of service to the rewrite itself.
        let e = engine.clone();
        if let Err(err) = tokio::task::spawn_blocking(move || e.save_index()).await? {
            tracing::warn!(shard = %id, error = %err, "index not saved before the rewrite; it is rebuilt on reopen");
        }
        self.rebuild_collections(&self.view());
        let store = engine.replica().clone();
        drop(engine);
        let rewritten = tokio::task::spawn_blocking(move || store.rewrite()).await?;
        // Reopened whatever happened: a failed rewrite leaves the old database.
        let reopened = self.open_replica(id, &spec, None).await;
        let engine = match reopened {
            Ok(e) => e,
            Err(e) => {
                self.failed.write().insert(id.clone(), format!("{e:#}"));
                self.rebuild_collections(&self.view());
                return Err(e.context("reopening the replica after its rewrite"));
            }
        };
        self.engines.write().insert(id.clone(), engine.clone());
        self.rebuild_collections(&self.view());
        drop(one);
        let (before, after) = rewritten?;
        // Back in service before the purge is reported: the report lets the
        // shard's next replica go out, and two out at once can leave the
        // shard without a quorum.
        if let Some(g) = self.host.group(id)
            && !g.wait_rejoined(applied_before, REJOIN_WAIT).await
        {
            tracing::warn!(shard = %id, "rewritten replica has not caught up with its group; reporting the purge anyway");
        }
        let e = engine.clone();
        tokio::task::spawn_blocking(move || e.store().set_purged(through)).await??;
        tracing::info!(shard = %id, through, bytes_before = before, bytes_after = after, took = ?started.elapsed(), "replica database rewritten; the erasure is purged");
        Ok(())
    }

    /// The replicas of `id` before this node (by id, the leader last) that
    /// are up and have not reported a purge through `through`: this replica
    /// rewrites its database only once there are none, so a shard has at most
    /// one replica out for its rewrite at a time.
    pub fn rewrite_blocked_by(&self, id: &ShardId, through: u64) -> Vec<NodeId> {
        let v = self.view();
        let Some(shard) = v
            .state
            .collections
            .get(&id.collection)
            .and_then(|c| c.shards.get(&(id.region.clone(), id.number)))
        else {
            return Vec::new();
        };
        let up: Vec<u64> = shard
            .replicas
            .iter()
            .copied()
            .filter(|n| v.state.nodes.get(n).is_some_and(|r| r.status != NodeStatus::Down))
            .collect();
        let leader = self.host.group(id).and_then(|g| g.leader());
        v.state.erasures.behind_before(
            &id.collection,
            &(id.region.clone(), id.number),
            &up,
            self.config.node_id,
            leader,
            through,
        )
    }

    /// Tells the meta group how far this replica of `id` has purged, with
    /// the erasure jobs it applied since its last report; then forgets them.
    /// Nothing to tell: no write.
    pub async fn report_purge(self: &Arc<Self>, id: &ShardId) -> Result<(), ApiError> {
        let Some(engine) = self.engines.read().get(id).cloned() else {
            return Ok(());
        };
        let e = engine.clone();
        let read = tokio::task::spawn_blocking(move || -> Result<_, ShardError> {
            let (_, done) = e.store().purge_state()?;
            Ok((done, e.store().purge_reported()?, e.store().applied_jobs()?))
        })
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
        let (done, reported, jobs) = read.map_err(|e| self.storage_failed(e))?;
        // A job whose erase is not purged yet waits for the purge (its count
        // goes with it); one that removed nothing has nothing to wait for.
        let applied: Vec<(String, u64, u64)> = jobs.into_iter().filter(|(_, index, n)| *index <= done || *n == 0).collect();
        if done <= reported && applied.is_empty() {
            return Ok(());
        }
        let report = sovra_meta::erasure::PurgeReport {
            collection: id.collection.clone(),
            shard: (id.region.clone(), id.number),
            node: self.config.node_id,
            through: done,
            at_ms: crate::service::now_ms(),
            applied: applied.clone(),
        };
        self.meta_change(sovra_meta::MetaCommand::ReplicaPurged(report), "reporting a purge")
            .await?;
        let names: Vec<String> = applied.into_iter().map(|(j, _, _)| j).collect();
        tokio::task::spawn_blocking(move || engine.store().set_reported(done, &names))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| self.storage_failed(e))
    }

    async fn open_replica(
        self: &Arc<Self>,
        id: &ShardId,
        spec: &Arc<CollectionSpec>,
        init: Option<BTreeSet<NodeId>>,
    ) -> anyhow::Result<Arc<ShardEngine>> {
        let (this, sid, sp) = (self.clone(), id.clone(), spec.clone());
        let (engine, log) = tokio::task::spawn_blocking(move || -> Result<_, ShardError> {
            let rs = ReplicaStore::open(&replica_dir(&this.replicas_root, &sid), &this.budget)?;
            let engine = ShardEngine::open(sid.clone(), sp, &rs, this.index.clone())?;
            Ok((Arc::new(engine), LogStore::of(&rs)))
        })
        .await??;
        self.host.open_group(id.clone(), engine.clone(), log, init).await?;
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

    /// As [`Self::collection`], but a name this node's view lacks is looked
    /// up again at the meta group's latest state first, so a collection just
    /// created through another node is found here too.
    pub async fn collection_now(self: &Arc<Self>, name: &str) -> Result<Arc<Collection>, ApiError> {
        match self.collection(name) {
            Err(e) if e.code == ErrorCode::NotFound => {
                self.refresh_view().await;
                self.collection(name)
            }
            other => other,
        }
    }

    /// Brings the view up to the meta group's latest committed state (a
    /// linearizable read through this node's meta replica, else a fetch from
    /// a meta node) and reconciles. Best effort: on failure the view stays.
    pub async fn refresh_view(self: &Arc<Self>) {
        let fresh = match self.host.meta().filter(|m| m.leader().is_some() && m.sm.last_applied() > 0) {
            Some(_) => match self.host.meta_barrier().await {
                Ok(m) => Some((m.sm.last_applied(), m.sm.state())),
                Err(_) => None,
            },
            None => crate::cluster::fetch_latest(self).await,
        };
        if let Some((index, state)) = fresh {
            if let Err(e) = self.offer_view(index, state).await {
                self.stop_with(format!("saving the metadata view failed: {e}"));
                return;
            }
            self.reconcile().await;
        }
    }

    pub fn list(&self) -> Vec<Arc<Collection>> {
        self.collections.read().values().cloned().collect()
    }

    /// Creates a collection: places its replicas (R1: on nodes of each
    /// shard's region, distinct zones first, then least loaded), records them
    /// in meta (whose state machine checks R1 again), and returns once this
    /// node's view and replicas include it.
    pub async fn create(self: &Arc<Self>, spec: CollectionSpec) -> Result<Arc<Collection>, ApiError> {
        self.ensure_ready()?;
        match self.place(&spec) {
            // The view may lag behind nodes that joined through others.
            Err(_) => {
                self.refresh_view().await;
                self.create_placed(spec).await
            }
            Ok(_) => self.create_placed(spec).await,
        }
    }

    async fn create_placed(self: &Arc<Self>, spec: CollectionSpec) -> Result<Arc<Collection>, ApiError> {
        let name = spec.name.clone();
        if self.view().state.collections.contains_key(&name) {
            return Err(ApiError::new(ErrorCode::AlreadyExists, format!("collection {name} already exists")));
        }
        let replicas = self.place(&spec)?;
        let index = self
            .meta_change(
                sovra_meta::MetaCommand::CreateCollection { spec, replicas },
                &format!("create collection {name}"),
            )
            .await?;
        self.caught_up(index).await?;
        let c = self.collection(name.as_str())?;
        if let Some(((region, number), why)) = c.failed.iter().next() {
            return Err(ApiError::internal(format!(
                "collection {name} was created, but this node's replica of shard {region}/{number} failed to open ({why}); GetCollection reports it"
            )));
        }
        Ok(c)
    }

    /// Replicas for every shard of `spec` on the up data nodes of the view.
    fn place(&self, spec: &CollectionSpec) -> Result<BTreeMap<sovra_meta::placement::ShardKey, Vec<NodeId>>, ApiError> {
        let candidates = self.view().state.placement_candidates();
        sovra_meta::place_collection(spec, &candidates).map_err(|e| match &e {
            sovra_meta::PlacementError::TooFewNodes { region, have: 0, .. } => {
                let served: BTreeSet<&str> = candidates.iter().map(|c| c.region.as_str()).collect();
                ApiError::precondition(format!(
                    "region {region} is served by no data node of this cluster (it serves: {}); create the collection without it or add a node in {region}",
                    served.into_iter().collect::<Vec<_>>().join(", ")
                ))
            }
            _ => ApiError::precondition(e.to_string()),
        })
    }

    /// Drops a collection in meta; every node destroys its replicas (deletes
    /// their directories). Answers how many shards the collection had.
    pub async fn drop_collection(self: &Arc<Self>, name: &str) -> Result<usize, ApiError> {
        let c = self.collection_now(name).await?;
        let shards = c.spec.regions.iter().map(|r| r.shard_count as usize).sum();
        let name = c.spec.name.clone();
        drop(c);
        let index = self
            .meta_change(
                sovra_meta::MetaCommand::DropCollection { name: name.clone() },
                &format!("drop collection {name}"),
            )
            .await?;
        self.caught_up(index).await?;
        Ok(shards)
    }

    /// The highest meta level this node's build reads (what it answers
    /// joiners and the meta leader).
    pub fn meta_level(&self) -> u32 {
        self.config.claim_meta_level.unwrap_or(sovra_meta::state::META_LEVEL)
    }

    /// Commits `cmd` in meta (through this node's meta replica, or a meta
    /// node), mapping a refusal to a status that says why.
    pub async fn meta_change(&self, cmd: sovra_meta::MetaCommand, what: &str) -> Result<u64, ApiError> {
        let (index, r) = crate::cluster::meta_write(self, cmd).await?;
        match r {
            Ok(_) => Ok(index),
            Err(sovra_meta::Refused::CollectionExists(n)) => {
                Err(ApiError::new(ErrorCode::AlreadyExists, format!("collection {n} already exists")))
            }
            Err(sovra_meta::Refused::UnknownCollection(n)) => {
                Err(ApiError::not_found(format!("collection {n} does not exist; create it first")))
            }
            Err(sovra_meta::Refused::KeyExists(id)) => Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("API key {id} already exists; choose another id, or revoke it first"),
            )),
            Err(sovra_meta::Refused::UnknownKey(id)) => Err(ApiError::not_found(format!("API key {id} does not exist"))),
            Err(e) => Err(ApiError::precondition(format!("{what} was refused by the cluster metadata: {e}"))),
        }
    }

    /// Waits (within the write timeout) until this node's view reaches meta
    /// index `index` and its replicas are reconciled with it.
    pub async fn caught_up(self: &Arc<Self>, index: u64) -> Result<(), ApiError> {
        let within = self.host.settings.write_timeout;
        let mut rx = self.view_changes();
        if tokio::time::timeout(within, rx.wait_for(|i| *i >= index)).await.is_err() {
            return Err(ApiError::unavailable(format!(
                "the change was committed at meta index {index}, but node {} has not seen it within {} ms; it will apply shortly",
                self.config.node_id,
                within.as_millis()
            )));
        }
        self.reconcile().await;
        Ok(())
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
        self.engines.read().values().cloned().collect()
    }

    /// Saves every replica's index for a fast next start (after Raft stopped, so
    /// nothing applies meanwhile). A replica whose index cannot be saved just
    /// rebuilds next time.
    pub fn save_indexes(&self) {
        for e in self.engines() {
            let started = std::time::Instant::now();
            match e.save_index() {
                Ok(true) => tracing::info!(shard = %e.id(), elapsed = ?started.elapsed(), "saved the index"),
                Ok(false) => {}
                Err(err) => tracing::warn!(shard = %e.id(), error = %err, "saving the index failed; it will be rebuilt on start"),
            }
        }
    }

    pub fn flush(&self) -> Result<(), ShardError> {
        self.store.db().flush()?;
        for e in self.engines() {
            e.replica().db().flush()?;
        }
        Ok(())
    }
}
