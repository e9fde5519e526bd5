//! The meta group's state and its one way to change: [`MetaState::apply`].
//! Deterministic (no clock, no randomness: times come in commands) and total
//! (a command either applies whole or is refused with a reason, changing
//! nothing). It checks R1 itself: no command may record a replica on a node
//! whose region is not its shard's, so neither a bug in placement nor an
//! operator's move can break the pin.

use crate::placement::ShardKey;
use serde::{Deserialize, Serialize};
use sovra_types::limits::MAX_REPLICATION_FACTOR;
use sovra_types::{CollectionName, CollectionSpec, HashRange, RegionId};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStatus {
    Joining,
    Up,
    Draining,
    Down,
    /// A drain emptied it: no replica is placed on it until it is undrained.
    Drained,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roles {
    pub meta: bool,
    pub data: bool,
    pub coordinator: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Self {
            meta: true,
            data: true,
            coordinator: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// Fixed for the life of the node id: its data is pinned to it (R1).
    pub region: RegionId,
    pub zone: String,
    pub roles: Roles,
    /// Where other nodes reach its cluster API, and clients its public API.
    pub cluster_addr: String,
    pub public_addr: String,
    pub status: NodeStatus,
    /// The caller's clock at the last heartbeat, in Unix milliseconds.
    pub last_heartbeat_ms: u64,
    /// When this run of the node started (its clock, Unix milliseconds): of
    /// two addresses heard for one node, the later incarnation's wins.
    pub incarnation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub range: HashRange,
    /// Nodes holding its replicas, sorted; all of the shard's region.
    pub replicas: Vec<u64>,
    /// The replicas it was created with: they initialise the group together.
    /// A replica added later opens empty and waits to be added by the leader.
    pub founders: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionRecord {
    pub spec: CollectionSpec,
    pub shards: BTreeMap<ShardKey, ShardRecord>,
}

/// To which coordinator regions a region's search results may go. By default
/// (no policy) only its own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPolicy {
    pub results_may_go_to: BTreeSet<RegionId>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub collections: BTreeMap<CollectionName, CollectionRecord>,
    /// Bumped by every change to the shard map (collections, replicas), so
    /// caches of it can tell they are stale.
    pub map_version: u64,
    pub policies: BTreeMap<RegionId, RegionPolicy>,
    /// API keys by id: hashes and scopes, never secrets.
    pub api_keys: BTreeMap<String, crate::keys::ApiKeyRecord>,
    /// Erasure jobs and replicas' purge marks (no personal data).
    pub erasures: crate::erasure::Erasures,
    /// Each region's audit log replicas ([`crate::audit`]).
    pub audit: BTreeMap<RegionId, crate::audit::AuditGroup>,
    /// Operations jobs ([`crate::ops`]).
    pub ops: crate::ops::Ops,
    /// What later meta levels added. Not part of this struct's serde form:
    /// it is written after it ([`MetaExt`]), so a build before levels reads
    /// the state and ignores it, and this build reads such a build's state.
    #[serde(skip)]
    pub ext: MetaExt,
}

/// The meta level of states and logs made by builds before levels existed.
pub const BASE_LEVEL: u32 = 1;
/// The highest meta level this build reads and writes.
pub const META_LEVEL: u32 = RATES_LEVEL;
/// The level that brought per-key rates ([`crate::keys::KeyRate`]).
pub const RATES_LEVEL: u32 = 2;

/// State added after the base level, encoded after [`MetaState`]'s own
/// fields (a later level appends its own record after this one, the same
/// way). Commands that need a level are refused below it, and the level is
/// raised ([`MetaCommand::SetMetaLevel`]) only once every registered node
/// runs a build that reads it: until then an older replica would stop at
/// the first entry it cannot decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaExt {
    /// The cluster's meta level: which commands and fields are in use.
    pub level: u32,
    /// Rates of the keys that have one, by key id.
    pub key_rates: BTreeMap<String, crate::keys::KeyRate>,
}

impl Default for MetaExt {
    fn default() -> Self {
        Self {
            level: BASE_LEVEL,
            key_rates: BTreeMap::new(),
        }
    }
}

impl MetaExt {
    /// Whether this is what a base-level state holds (nothing to write).
    pub fn is_base(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// A node joins, or re-announces itself (new addresses, zone, roles).
    RegisterNode(NodeRecord),
    Heartbeat {
        node: u64,
        at_ms: u64,
    },
    SetNodeStatus {
        node: u64,
        status: NodeStatus,
    },
    /// A collection with the replicas of every shard (from placement).
    CreateCollection {
        spec: CollectionSpec,
        replicas: BTreeMap<ShardKey, Vec<u64>>,
    },
    DropCollection {
        name: CollectionName,
    },
    /// A shard's new replica set (a move, a repair).
    SetReplicas {
        collection: CollectionName,
        shard: ShardKey,
        replicas: Vec<u64>,
    },
    SetRegionPolicy {
        region: RegionId,
        policy: RegionPolicy,
    },
    AddApiKey(crate::keys::ApiKeyRecord),
    RevokeApiKey {
        id: String,
    },
    /// An erasure job starts on these shards of `region`; its replicas are
    /// the shards' replicas as this applies.
    StartErasure {
        job: String,
        kind: crate::erasure::EraseKind,
        collection: CollectionName,
        region: RegionId,
        shards: Vec<u32>,
        at_ms: u64,
    },
    /// The job's erase committed (shard number, log index, points erased)
    /// on every shard, or, with `failed`, did not.
    ErasureCommitted {
        job: String,
        at_ms: u64,
        shards: Vec<(u32, u64, u64)>,
        failed: Option<String>,
    },
    /// A replica purged its shard's erasures through an index.
    ReplicaPurged(crate::erasure::PurgeReport),
    /// A region's audit log replicas (the first set found the group).
    SetAuditReplicas {
        region: RegionId,
        replicas: BTreeSet<u64>,
    },
    /// A region's audit group has a leader: its founders are done.
    AuditFormed {
        region: RegionId,
    },
    /// Starts moving shard `shard`'s replica on `from` to `to` (R1: `to` is
    /// a data node of the shard's region); refused while another job runs
    /// on the shard.
    StartMove {
        job: String,
        collection: CollectionName,
        shard: ShardKey,
        from: u64,
        to: u64,
        at_ms: u64,
    },
    /// The shard's group has replaced `from` by `to`: the shard map follows.
    MoveDone {
        job: String,
        at_ms: u64,
    },
    /// What a running job's last step did (progress for listing).
    OpProgress {
        job: String,
        progress: String,
        at_ms: u64,
    },
    /// Ends a running job as cancelled (before its membership change) or
    /// failed; a drain's or rebalance's running moves with it.
    EndOp {
        job: String,
        failed: Option<String>,
        at_ms: u64,
    },
    /// Starts draining `node`: marked draining, its replicas moved to other
    /// nodes of its region by child moves. Refused when some shard would
    /// have nowhere to go.
    StartDrain {
        job: String,
        node: u64,
        concurrency: u32,
        at_ms: u64,
    },
    /// Starts evening out `region`'s replicas per node (the plan is made as
    /// this applies and kept in the job).
    StartRebalance {
        job: String,
        region: RegionId,
        concurrency: u32,
        at_ms: u64,
    },
    /// Advances running drains and rebalances ([`MetaState::advance_ops`]).
    AdvanceOps {
        at_ms: u64,
    },
    /// A drained node takes replicas again.
    Undrain {
        node: u64,
    },
    /// Starts splitting shard `shard` of `collection` into two new shards on
    /// its nodes (refused while another job or an unfinished erasure job is
    /// on the shard).
    StartSplit {
        job: String,
        collection: CollectionName,
        shard: ShardKey,
        at_ms: u64,
    },
    /// The split's halves hold the fenced parent's final state: the shard map
    /// replaces the parent by them (a new map version).
    SplitDone {
        job: String,
        at_ms: u64,
    },
    /// Starts rebuilding shard `shard` of `collection`, whose group lost its
    /// quorum for good, from node `survivor`'s replica: a new shard (same
    /// range, a new number) on the survivor and other up nodes of its region.
    /// Writes the lost majority had acknowledged after the survivor's last
    /// entry are lost.
    StartRecover {
        job: String,
        collection: CollectionName,
        shard: ShardKey,
        survivor: u64,
        accept_lost_erasures: bool,
        at_ms: u64,
    },
    /// The new shard holds the survivor's state: it replaces the lost one in
    /// the shard map (a new map version).
    RecoverDone {
        job: String,
        at_ms: u64,
    },
    // Commands below need a meta level above the base: a build before levels
    // cannot decode them, so they are proposed only at that level. New
    // commands go after these, never between.
    /// Raises the cluster's meta level (never lowers it). Proposed once
    /// every registered node runs a build of that level, or by the bootstrap
    /// node of a new cluster.
    SetMetaLevel {
        level: u32,
    },
    /// Makes a key with a rate (level 2).
    AddRatedKey {
        key: crate::keys::ApiKeyRecord,
        rate: crate::keys::KeyRate,
    },
    /// Sets or (`None`) clears a key's rate (level 2).
    SetKeyRate {
        id: String,
        rate: Option<crate::keys::KeyRate>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    Done,
    /// The shard map changed; its new version.
    MapVersion(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refused {
    #[error("R1: node {node} is in region {node_region}; a replica of shard {shard} must be on a node of {shard_region}")]
    OffRegion {
        node: u64,
        node_region: RegionId,
        shard: String,
        shard_region: RegionId,
    },
    #[error("node {0} is not registered")]
    UnknownNode(u64),
    #[error("node {node} is registered in region {was}; a node id keeps its region (its data is pinned there): use a new id for {now}")]
    RegionChanged { node: u64, was: RegionId, now: RegionId },
    #[error("node {0} does not have the data role")]
    NotDataNode(u64),
    #[error("shard {shard}: {why}")]
    BadReplicas { shard: String, why: String },
    #[error("collection {0} already exists")]
    CollectionExists(CollectionName),
    #[error("collection {0} does not exist")]
    UnknownCollection(CollectionName),
    #[error("collection {collection} has no shard {shard}")]
    UnknownShard { collection: CollectionName, shard: String },
    #[error("invalid collection spec: {0}")]
    InvalidSpec(String),
    #[error("API key {0} already exists")]
    KeyExists(String),
    #[error("API key {0} does not exist")]
    UnknownKey(String),
    #[error("{0}")]
    Job(#[from] crate::erasure::JobRefused),
    #[error("{0}")]
    Op(String),
}

fn check_concurrency(c: u32) -> Result<u32, Refused> {
    match c {
        0 => Ok(crate::ops::DEFAULT_CONCURRENCY),
        1..=crate::ops::MAX_CONCURRENCY => Ok(c),
        _ => Err(Refused::Op(format!(
            "concurrency {c} is too high: at most {} moves at once",
            crate::ops::MAX_CONCURRENCY
        ))),
    }
}

fn shard_name(c: &CollectionName, k: &ShardKey) -> String {
    format!("{c}/{}/{}", k.0, k.1)
}

impl MetaState {
    /// Refuses what needs meta level `level` below it.
    pub fn need_level(&self, level: u32, what: &str) -> Result<(), Refused> {
        if self.ext.level >= level {
            return Ok(());
        }
        Err(Refused::Op(format!(
            "{what} needs meta level {level}; the cluster is at level {}. The level rises by itself once every registered node runs a build of level {level} or later: a node that runs an older build, or is down and not drained, holds it back (ClusterStatus shows the level)",
            self.ext.level
        )))
    }

    /// Whether `other` differs from this state at most in nodes' heartbeat
    /// times and erasure jobs' progress: what a node derives from its view
    /// (replicas, routing, addresses, keys, policies) is then the same, so
    /// such a change need not be saved or reconciled on every node.
    pub fn same_but_progress(&self, other: &MetaState) -> bool {
        self.map_version == other.map_version
            && self.collections == other.collections
            && self.policies == other.policies
            && self.api_keys == other.api_keys
            && self.ext == other.ext
            && self.audit == other.audit
            && self.ops.running().eq(other.ops.running())
            && self.ops.drained == other.ops.drained
            && self.nodes.len() == other.nodes.len()
            && self.nodes.iter().zip(&other.nodes).all(|((a, x), (b, y))| {
                a == b
                    && NodeRecord {
                        last_heartbeat_ms: y.last_heartbeat_ms,
                        ..x.clone()
                    } == *y
            })
    }

    /// Applies `cmd` whole, or refuses it and changes nothing.
    pub fn apply(&mut self, cmd: MetaCommand) -> Result<Applied, Refused> {
        match cmd {
            MetaCommand::RegisterNode(n) => {
                if let Some(old) = self.nodes.get(&n.id)
                    && old.region != n.region
                {
                    return Err(Refused::RegionChanged {
                        node: n.id,
                        was: old.region.clone(),
                        now: n.region,
                    });
                }
                let mut n = n;
                // A restart does not undo a drain.
                n.status = self.held_status(n.id).unwrap_or(n.status);
                self.nodes.insert(n.id, n);
                Ok(Applied::Done)
            }
            MetaCommand::Heartbeat { node, at_ms } => {
                let held = self.held_status(node);
                let n = self.nodes.get_mut(&node).ok_or(Refused::UnknownNode(node))?;
                n.last_heartbeat_ms = n.last_heartbeat_ms.max(at_ms);
                // A node marked down for missed heartbeats is back; a draining
                // or drained one stays so.
                if n.status == NodeStatus::Down {
                    n.status = held.unwrap_or(NodeStatus::Up);
                }
                Ok(Applied::Done)
            }
            MetaCommand::SetNodeStatus { node, status } => {
                self.nodes.get_mut(&node).ok_or(Refused::UnknownNode(node))?.status = status;
                Ok(Applied::Done)
            }
            MetaCommand::Undrain { node } => {
                if let Some(j) = self.ops.draining(node) {
                    return Err(Refused::Op(format!("job {} is draining node {node}: cancel it instead", j.id)));
                }
                let n = self.nodes.get_mut(&node).ok_or(Refused::UnknownNode(node))?;
                if n.status != NodeStatus::Drained {
                    return Err(Refused::Op(format!("node {node} is not drained (it is {:?})", n.status)));
                }
                n.status = NodeStatus::Up;
                self.ops.drained.remove(&node);
                Ok(Applied::Done)
            }
            MetaCommand::CreateCollection { spec, replicas } => self.create(spec, replicas),
            MetaCommand::DropCollection { name } => {
                self.collections
                    .remove(&name)
                    .ok_or_else(|| Refused::UnknownCollection(name.clone()))?;
                self.erasures.collection_dropped(&name);
                Ok(self.bump())
            }
            MetaCommand::SetReplicas {
                collection,
                shard,
                replicas,
            } => {
                self.shard_record(&collection, &shard)?;
                let replicas = self.check_replicas(&collection, &shard, replicas, None)?;
                self.erasures.replicas_set(&collection, &shard, &replicas);
                let c = self.collections.get_mut(&collection).expect("checked above");
                c.shards.get_mut(&shard).expect("checked above").replicas = replicas;
                Ok(self.bump())
            }
            MetaCommand::SetRegionPolicy { region, policy } => {
                self.policies.insert(region, policy);
                Ok(Applied::Done)
            }
            MetaCommand::AddApiKey(k) => {
                if self.api_keys.contains_key(&k.id) {
                    return Err(Refused::KeyExists(k.id));
                }
                self.api_keys.insert(k.id.clone(), k);
                Ok(Applied::Done)
            }
            MetaCommand::RevokeApiKey { id } => {
                self.api_keys.remove(&id).ok_or_else(|| Refused::UnknownKey(id.clone()))?;
                self.ext.key_rates.remove(&id);
                Ok(Applied::Done)
            }
            MetaCommand::SetMetaLevel { level } => {
                if level > META_LEVEL {
                    return Err(Refused::Op(format!(
                        "meta level {level} is above this build's ({META_LEVEL}): run a build that knows it"
                    )));
                }
                self.ext.level = self.ext.level.max(level);
                Ok(Applied::Done)
            }
            MetaCommand::AddRatedKey { key, rate } => {
                self.need_level(RATES_LEVEL, "a key's rate")?;
                rate.check().map_err(Refused::Op)?;
                if self.api_keys.contains_key(&key.id) {
                    return Err(Refused::KeyExists(key.id));
                }
                self.ext.key_rates.insert(key.id.clone(), rate);
                self.api_keys.insert(key.id.clone(), key);
                Ok(Applied::Done)
            }
            MetaCommand::SetKeyRate { id, rate } => {
                self.need_level(RATES_LEVEL, "a key's rate")?;
                if !self.api_keys.contains_key(&id) {
                    return Err(Refused::UnknownKey(id));
                }
                match rate {
                    Some(r) => {
                        r.check().map_err(Refused::Op)?;
                        self.ext.key_rates.insert(id, r);
                    }
                    None => {
                        self.ext.key_rates.remove(&id);
                    }
                }
                Ok(Applied::Done)
            }
            MetaCommand::StartErasure {
                job,
                kind,
                collection,
                region,
                shards,
                at_ms,
            } => {
                let mut job_shards = BTreeMap::new();
                let mut splits = Vec::new();
                for n in shards {
                    let key = (region.clone(), n);
                    let s = self.shard_record(&collection, &key)?;
                    if let Some((j, _)) = self.ops.split_on(&collection, &key) {
                        splits.push(j.id.clone());
                    }
                    // A group with no quorum commits no erasure, and the
                    // rebuilt one starts from the survivor's state.
                    if let Some((j, _)) = self.ops.recover_on(&collection, &key) {
                        return Err(Refused::Op(format!(
                            "shard {} is being rebuilt after losing its quorum (job {}); erase again once that is done",
                            shard_name(&collection, &key),
                            j.id
                        )));
                    }
                    let mut replicas: BTreeMap<u64, crate::erasure::ReplicaPurge> =
                        s.replicas.iter().map(|&r| (r, crate::erasure::ReplicaPurge::Pending)).collect();
                    // A move's target may already hold (or be about to
                    // receive) the points: it purges too.
                    if let Some((_, m)) = self.ops.running_on(&collection, &key) {
                        replicas.insert(m.to, crate::erasure::ReplicaPurge::Pending);
                    }
                    job_shards.insert(
                        n,
                        crate::erasure::JobShard {
                            index: None,
                            erased: None,
                            replicas,
                        },
                    );
                }
                let erasure = job.clone();
                self.erasures.start(crate::erasure::ErasureJob {
                    id: job,
                    kind,
                    collection,
                    region,
                    requested_at_ms: at_ms,
                    acknowledged_at_ms: None,
                    done_at_ms: None,
                    state: crate::erasure::JobState::Requested,
                    shards: job_shards,
                    seq: 0,
                })?;
                // The erasure goes first: a split of its shard would copy
                // the points it erases into new groups.
                for id in splits {
                    self.end_op(&id, None, at_ms);
                    let text = format!("cancelled: erasure job {erasure} started on the shard; split again once it is done");
                    self.set_progress_of(&id, text, at_ms);
                }
                Ok(Applied::Done)
            }
            MetaCommand::ErasureCommitted {
                job,
                at_ms,
                shards,
                failed,
            } => {
                self.erasures.committed(&job, at_ms, &shards, failed)?;
                Ok(Applied::Done)
            }
            MetaCommand::ReplicaPurged(report) => {
                // A report from a replica no longer in its shard (moved off
                // while it purged) changes nothing: its directory goes.
                let member = self
                    .shard_record(&report.collection, &report.shard)
                    .is_ok_and(|s| s.replicas.contains(&report.node));
                if member {
                    self.erasures.report(report);
                }
                Ok(Applied::Done)
            }
            MetaCommand::SetAuditReplicas { region, replicas } => {
                let name = || format!("audit/{region}");
                if replicas.is_empty() || replicas.len() > crate::audit::AUDIT_REPLICAS {
                    return Err(Refused::BadReplicas {
                        shard: name(),
                        why: format!("{} replicas given; it needs 1 to {}", replicas.len(), crate::audit::AUDIT_REPLICAS),
                    });
                }
                for id in &replicas {
                    let n = self.nodes.get(id).ok_or(Refused::UnknownNode(*id))?;
                    if n.region != region {
                        return Err(Refused::OffRegion {
                            node: *id,
                            node_region: n.region.clone(),
                            shard: name(),
                            shard_region: region.clone(),
                        });
                    }
                    if !n.roles.data {
                        return Err(Refused::NotDataNode(*id));
                    }
                }
                let g = self.audit.entry(region.clone()).or_default();
                if g.founders.is_empty() {
                    g.founders = replicas.clone();
                } else if !g.formed && g.replicas != replicas {
                    return Err(Refused::BadReplicas {
                        shard: name(),
                        why: "the group has not formed yet (no leader reported): its founders cannot change".into(),
                    });
                }
                g.replicas = replicas;
                Ok(Applied::Done)
            }
            MetaCommand::StartMove {
                job,
                collection,
                shard,
                from,
                to,
                at_ms,
            } => {
                let spec = crate::ops::MoveSpec {
                    collection,
                    shard,
                    from,
                    to,
                };
                self.start_move(job, None, spec, at_ms)?;
                Ok(Applied::Done)
            }
            MetaCommand::StartDrain {
                job,
                node,
                concurrency,
                at_ms,
            } => self.start_drain(job, node, concurrency, at_ms),
            MetaCommand::StartRebalance {
                job,
                region,
                concurrency,
                at_ms,
            } => self.start_rebalance(job, region, concurrency, at_ms),
            MetaCommand::AdvanceOps { at_ms } => {
                self.advance_ops(at_ms);
                Ok(Applied::Done)
            }
            MetaCommand::MoveDone { job, at_ms } => {
                let job_rec = self
                    .ops
                    .jobs
                    .get(&job)
                    .cloned()
                    .ok_or_else(|| Refused::Op(format!("no job {job}")))?;
                if job_rec.state == crate::ops::OpState::Done {
                    return Ok(Applied::Done);
                }
                if job_rec.state != crate::ops::OpState::Running {
                    return Err(Refused::Op(format!("job {job} is {}", job_rec.state.as_str())));
                }
                let j = job_rec
                    .as_move()
                    .cloned()
                    .ok_or_else(|| Refused::Op(format!("job {job} is a {}, not a move", job_rec.kind.name())))?;
                let s = self.shard_record(&j.collection, &j.shard)?;
                let mut replicas: Vec<u64> = s.replicas.iter().copied().filter(|&n| n != j.from).collect();
                if !replicas.contains(&j.to) {
                    replicas.push(j.to);
                }
                let replicas = self.check_replicas(&j.collection, &j.shard, replicas, None)?;
                self.erasures.replicas_set(&j.collection, &j.shard, &replicas);
                let c = self.collections.get_mut(&j.collection).expect("checked above");
                c.shards.get_mut(&j.shard).expect("checked above").replicas = replicas;
                let text = format!("node {} replaced node {}", j.to, j.from);
                self.ops.finish(&job, crate::ops::OpState::Done, Some(text), at_ms);
                Ok(self.bump())
            }
            MetaCommand::OpProgress { job, progress, at_ms } => {
                let j = self.ops.jobs.get_mut(&job).ok_or_else(|| Refused::Op(format!("no job {job}")))?;
                if j.state == crate::ops::OpState::Running {
                    j.progress = progress;
                    j.updated_ms = at_ms;
                }
                Ok(Applied::Done)
            }
            MetaCommand::EndOp { job, failed, at_ms } => {
                let j = self.ops.jobs.get(&job).ok_or_else(|| Refused::Op(format!("no job {job}")))?;
                if j.state != crate::ops::OpState::Running {
                    return Err(Refused::Op(format!("job {job} is {} already", j.state.as_str())));
                }
                self.end_op(&job, failed, at_ms);
                Ok(Applied::Done)
            }
            MetaCommand::StartSplit {
                job,
                collection,
                shard,
                at_ms,
            } => self.start_split(job, collection, shard, at_ms),
            MetaCommand::SplitDone { job, at_ms } => self.split_done(&job, at_ms),
            MetaCommand::StartRecover {
                job,
                collection,
                shard,
                survivor,
                accept_lost_erasures,
                at_ms,
            } => self.start_recover(job, collection, shard, survivor, accept_lost_erasures, at_ms),
            MetaCommand::RecoverDone { job, at_ms } => self.recover_done(&job, at_ms),
            MetaCommand::AuditFormed { region } => {
                let g = self.audit.get_mut(&region).ok_or_else(|| Refused::BadReplicas {
                    shard: format!("audit/{region}"),
                    why: "no audit group is placed in this region".into(),
                })?;
                g.formed = true;
                Ok(Applied::Done)
            }
        }
    }

    /// The status a drain holds `node` in, whatever it announces.
    fn held_status(&self, node: u64) -> Option<NodeStatus> {
        if self.ops.draining(node).is_some() {
            Some(NodeStatus::Draining)
        } else if self.ops.drained.contains(&node) {
            Some(NodeStatus::Drained)
        } else {
            None
        }
    }

    /// Records a move (R1 for its target, one move per shard), and makes its
    /// target a replica every unfinished erasure job on the shard waits for.
    pub(crate) fn start_move(&mut self, job: String, parent: Option<String>, m: crate::ops::MoveSpec, at_ms: u64) -> Result<(), Refused> {
        let s = self.shard_record(&m.collection, &m.shard)?;
        let name = shard_name(&m.collection, &m.shard);
        if !s.replicas.contains(&m.from) {
            return Err(Refused::Op(format!("node {} holds no replica of shard {name} to move", m.from)));
        }
        if s.replicas.contains(&m.to) {
            return Err(Refused::Op(format!("node {} already holds a replica of shard {name}", m.to)));
        }
        // R1 for the target, as for any replica.
        let mut with_to: Vec<u64> = s.replicas.iter().copied().filter(|&n| n != m.from).collect();
        with_to.push(m.to);
        self.check_replicas(&m.collection, &m.shard, with_to, None)?;
        if let Some(n) = self.nodes.get(&m.to)
            && n.status != NodeStatus::Up
        {
            return Err(Refused::Op(format!("node {} is {:?}: a move's target must be up", m.to, n.status)));
        }
        if let Some((j, _)) = self.ops.running_on(&m.collection, &m.shard) {
            return Err(Refused::Op(format!("job {} is already moving a replica of shard {name}", j.id)));
        }
        if let Some((j, _)) = self.ops.split_on(&m.collection, &m.shard) {
            return Err(Refused::Op(format!(
                "job {} is splitting shard {name}; move it once that is done",
                j.id
            )));
        }
        if let Some((j, _)) = self.ops.recover_on(&m.collection, &m.shard) {
            return Err(Refused::Op(format!(
                "job {} is rebuilding shard {name}; move it once that is done",
                j.id
            )));
        }
        self.ops.fresh(&job)?;
        self.erasures.replica_added(&m.collection, &m.shard, m.to);
        let progress = "adding the target as a learner".to_string();
        self.ops
            .insert(crate::ops::Job::started(job, crate::ops::JobKind::Move(m), parent, progress, at_ms));
        Ok(())
    }

    fn start_drain(&mut self, job: String, node: u64, concurrency: u32, at_ms: u64) -> Result<Applied, Refused> {
        let n = self.nodes.get(&node).ok_or(Refused::UnknownNode(node))?;
        let region = n.region.clone();
        if let Some(j) = self.ops.draining(node) {
            return Err(Refused::Op(format!("job {} is draining node {node} already", j.id)));
        }
        self.ops.fresh(&job)?;
        let concurrency = check_concurrency(concurrency)?;
        // Refused now, with the shard named, if some replica could go nowhere.
        let plan = crate::rebalance::plan_drain(&region, node, &self.move_candidates(&region), &self.region_shards(&region))
            .map_err(|e| Refused::Op(e.to_string()))?;
        self.ops.drained.remove(&node);
        self.nodes.get_mut(&node).expect("found above").status = NodeStatus::Draining;
        let kind = crate::ops::JobKind::Drain(crate::ops::DrainJob {
            node,
            region,
            concurrency,
            started: 0,
        });
        let progress = format!("{} replicas to move off node {node}", plan.len());
        self.ops.insert(crate::ops::Job::started(job, kind, None, progress, at_ms));
        self.advance_ops(at_ms);
        Ok(Applied::Done)
    }

    fn start_rebalance(&mut self, job: String, region: RegionId, concurrency: u32, at_ms: u64) -> Result<Applied, Refused> {
        if !self.nodes.values().any(|n| n.region == region) {
            return Err(Refused::Op(format!("no node is registered in region {region}")));
        }
        if let Some(j) = self
            .ops
            .running()
            .find(|j| matches!(&j.kind, crate::ops::JobKind::Rebalance(r) if r.region == region))
        {
            return Err(Refused::Op(format!("job {} is rebalancing region {region} already", j.id)));
        }
        self.ops.fresh(&job)?;
        let concurrency = check_concurrency(concurrency)?;
        let plan = self.rebalance_plan(&region);
        let total = plan.len();
        let kind = crate::ops::JobKind::Rebalance(crate::ops::RebalanceJob {
            region,
            concurrency,
            plan,
            next: 0,
            skipped: Vec::new(),
        });
        let progress = format!("0 of {total} moves done");
        self.ops.insert(crate::ops::Job::started(job, kind, None, progress, at_ms));
        self.advance_ops(at_ms);
        Ok(Applied::Done)
    }

    /// Ends a running job (cancelled, or failed with why): a drain's or
    /// rebalance's running moves end with it; a cancelled move's target
    /// leaves the erasure jobs that waited for it (its copy is destroyed); a
    /// drained-to-be node takes replicas again.
    pub(crate) fn end_op(&mut self, id: &str, failed: Option<String>, at_ms: u64) {
        let Some(job) = self.ops.jobs.get(id).cloned() else { return };
        let children: Vec<String> = self
            .ops
            .children(id)
            .filter(|c| c.state == crate::ops::OpState::Running)
            .map(|c| c.id.clone())
            .collect();
        for c in children {
            self.end_op(&c, None, at_ms);
        }
        match &job.kind {
            crate::ops::JobKind::Move(m) => {
                if let Ok(rec) = self.shard_record(&m.collection, &m.shard) {
                    let keep = rec.replicas.clone();
                    self.erasures.replicas_set(&m.collection, &m.shard, &keep);
                }
            }
            crate::ops::JobKind::Drain(d) => {
                if let Some(n) = self.nodes.get_mut(&d.node)
                    && n.status == NodeStatus::Draining
                {
                    n.status = NodeStatus::Up;
                }
            }
            // The halves were only in the job: nodes destroy them once they
            // see it ended, and the parent's leader lifts its fence.
            crate::ops::JobKind::Rebalance(_) | crate::ops::JobKind::Split(_) | crate::ops::JobKind::Recover(_) => {}
        }
        let state = match failed {
            Some(why) => crate::ops::OpState::Failed(why),
            None => crate::ops::OpState::Cancelled,
        };
        self.ops.finish(id, state, None, at_ms);
    }

    fn set_progress_of(&mut self, id: &str, text: String, at_ms: u64) {
        if let Some(j) = self.ops.jobs.get_mut(id) {
            j.progress = text;
            j.updated_ms = at_ms;
        }
    }

    /// The spec `c` has once split `s` is done: its region's map with the
    /// parent's range halved between the halves.
    pub fn spec_after_split(spec: &CollectionSpec, s: &crate::ops::SplitJob) -> Result<CollectionSpec, Refused> {
        let mut spec = spec.clone();
        let name = shard_name(&s.collection, &s.shard);
        let map = spec.shard_map(&s.shard.0).map_err(|e| Refused::Op(e.message))?;
        let after = map.split(s.shard.1, s.low, s.high).ok_or_else(|| Refused::UnknownShard {
            collection: s.collection.clone(),
            shard: name,
        })?;
        let r = spec
            .regions
            .iter_mut()
            .find(|r| r.region == s.shard.0)
            .expect("shard_map found the region");
        r.shard_count = after.len() as u32;
        r.split_map = Some(after);
        Ok(spec)
    }

    fn start_split(&mut self, job: String, collection: CollectionName, shard: ShardKey, at_ms: u64) -> Result<Applied, Refused> {
        let rec = self.shard_record(&collection, &shard)?.clone();
        let name = shard_name(&collection, &shard);
        if let Some((j, _)) = self.ops.running_on(&collection, &shard) {
            return Err(Refused::Op(format!(
                "job {} is moving a replica of shard {name}; split it once that is done",
                j.id
            )));
        }
        if let Some((j, _)) = self.ops.split_on(&collection, &shard) {
            return Err(Refused::Op(format!("job {} is splitting shard {name} already", j.id)));
        }
        if let Some((j, _)) = self.ops.recover_on(&collection, &shard) {
            return Err(Refused::Op(format!(
                "job {} is rebuilding shard {name}; split it once that is done",
                j.id
            )));
        }
        if let Some(e) = self.erasures.unfinished_on(&collection, &shard) {
            return Err(Refused::Op(format!(
                "erasure job {e} is not finished on shard {name} (its replicas have not all purged); split it once that is done"
            )));
        }
        let spec = &self.collections[&collection].spec;
        let count = spec.region(&shard.0).map_or(0, |r| r.shard_count);
        if count >= sovra_types::limits::MAX_SHARDS_PER_REGION {
            return Err(Refused::Op(format!(
                "region {} of collection {collection} has {count} shards, the most a region may have",
                shard.0
            )));
        }
        if rec.range.split().is_none() {
            return Err(Refused::Op(format!("shard {name} owns a single hash: it cannot be split")));
        }
        self.ops.fresh(&job)?;
        // R1 for the halves' replicas, as for any shard's.
        let replicas = self.check_replicas(&collection, &shard, rec.replicas.clone(), None)?;
        let low = self.new_number(&collection, &shard.0);
        let key = (collection.clone(), shard.0.clone());
        let split = crate::ops::SplitJob {
            collection,
            shard,
            low,
            high: low + 1,
            replicas,
        };
        // Refused here, not at the end, if the map cannot take it.
        Self::spec_after_split(spec, &split)?;
        self.ops.next_shard.insert(key, low + 2);
        let progress = format!("opening shards {} and {} on nodes {:?}", split.low, split.high, split.replicas);
        self.ops.insert(crate::ops::Job::started(
            job,
            crate::ops::JobKind::Split(split),
            None,
            progress,
            at_ms,
        ));
        Ok(Applied::Done)
    }

    /// The lowest shard number never used in `region` of `c` (the caller
    /// records the numbers it takes in `ops.next_shard`).
    fn new_number(&self, c: &CollectionName, region: &RegionId) -> u32 {
        let used = self.collections[c]
            .shards
            .keys()
            .filter(|(r, _)| r == region)
            .map(|(_, n)| n + 1)
            .max()
            .unwrap_or(0);
        self.ops
            .next_shard
            .get(&(c.clone(), region.clone()))
            .copied()
            .unwrap_or(0)
            .max(used)
    }

    /// The spec `c` has once recovery `r` is done: the lost shard's range
    /// owned by the new shard.
    pub fn spec_after_recover(spec: &CollectionSpec, r: &crate::ops::RecoverJob) -> Result<CollectionSpec, Refused> {
        let mut spec = spec.clone();
        let map = spec.shard_map(&r.shard.0).map_err(|e| Refused::Op(e.message))?;
        let after = map.renumber(r.shard.1, r.number).ok_or_else(|| Refused::UnknownShard {
            collection: r.collection.clone(),
            shard: shard_name(&r.collection, &r.shard),
        })?;
        let reg = spec
            .regions
            .iter_mut()
            .find(|x| x.region == r.shard.0)
            .expect("shard_map found the region");
        reg.split_map = Some(after);
        Ok(spec)
    }

    fn start_recover(
        &mut self,
        job: String,
        collection: CollectionName,
        shard: ShardKey,
        survivor: u64,
        accept_lost_erasures: bool,
        at_ms: u64,
    ) -> Result<Applied, Refused> {
        let rec = self.shard_record(&collection, &shard)?.clone();
        let name = shard_name(&collection, &shard);
        if !rec.replicas.contains(&survivor) {
            return Err(Refused::Op(format!(
                "node {survivor} holds no replica of shard {name} (its replicas are on nodes {:?})",
                rec.replicas
            )));
        }
        if let Some(j) = self
            .ops
            .running_on(&collection, &shard)
            .map(|(j, _)| j)
            .or_else(|| self.ops.split_on(&collection, &shard).map(|(j, _)| j))
            .or_else(|| self.ops.recover_on(&collection, &shard).map(|(j, _)| j))
        {
            return Err(Refused::Op(format!("job {} runs on shard {name}: cancel it first", j.id)));
        }
        self.ops.fresh(&job)?;
        let spec = self.collections[&collection].spec.clone();
        let rf = spec.replication_factor as usize;
        // The survivor, then up data nodes of the region: zones the new
        // group has not got yet first, then the least loaded.
        let mut replicas = vec![survivor];
        let mut zones: BTreeSet<String> = self.nodes.get(&survivor).map(|n| n.zone.clone()).into_iter().collect();
        let mut candidates = self.move_candidates(&shard.0);
        candidates.retain(|c| c.id != survivor);
        while replicas.len() < rf {
            let pick = (0..candidates.len()).min_by_key(|&i| (zones.contains(&candidates[i].zone), candidates[i].load, candidates[i].id));
            let Some(i) = pick else {
                return Err(Refused::Op(format!(
                    "shard {name} needs {rf} replicas and region {} has only {} up data nodes for it: add nodes to the region first",
                    shard.0,
                    replicas.len()
                )));
            };
            let c = candidates.remove(i);
            zones.insert(c.zone.clone());
            replicas.push(c.id);
        }
        let number = self.new_number(&collection, &shard.0);
        let replicas = self.check_replicas(&collection, &(shard.0.clone(), number), replicas, Some(rf))?;
        let r = crate::ops::RecoverJob {
            collection,
            shard,
            survivor,
            number,
            replicas,
            accept_lost_erasures,
        };
        Self::spec_after_recover(&spec, &r)?;
        self.ops.next_shard.insert((r.collection.clone(), r.shard.0.clone()), number + 1);
        let progress = format!(
            "opening shard {number} on nodes {:?} to rebuild it from node {survivor}",
            r.replicas
        );
        self.ops.insert(crate::ops::Job::started(
            job,
            crate::ops::JobKind::Recover(r),
            None,
            progress,
            at_ms,
        ));
        Ok(Applied::Done)
    }

    fn recover_done(&mut self, job: &str, at_ms: u64) -> Result<Applied, Refused> {
        let Some(rec) = self.job_to_finish(job)? else {
            return Ok(Applied::Done);
        };
        let r = rec
            .as_recover()
            .cloned()
            .ok_or_else(|| Refused::Op(format!("job {job} is a {}, not a recovery", rec.kind.name())))?;
        self.shard_record(&r.collection, &r.shard)?;
        let spec = Self::spec_after_recover(&self.collections[&r.collection].spec, &r)?;
        let text = format!(
            "shard {} rebuilt from node {} as shard {} on nodes {:?}",
            r.shard.1, r.survivor, r.number, r.replicas
        );
        let new = [(r.shard.0.clone(), r.number)];
        Ok(self.replace_shard(&r.collection, &r.shard, spec, &new, &r.replicas, job, text, at_ms))
    }

    /// The running job `job`, to be recorded done; `None` if it is done
    /// already (recording it again changes nothing).
    fn job_to_finish(&self, job: &str) -> Result<Option<crate::ops::Job>, Refused> {
        let rec = self
            .ops
            .jobs
            .get(job)
            .cloned()
            .ok_or_else(|| Refused::Op(format!("no job {job}")))?;
        match rec.state {
            crate::ops::OpState::Done => Ok(None),
            crate::ops::OpState::Running => Ok(Some(rec)),
            _ => Err(Refused::Op(format!("job {job} is {}", rec.state.as_str()))),
        }
    }

    fn split_done(&mut self, job: &str, at_ms: u64) -> Result<Applied, Refused> {
        let Some(rec) = self.job_to_finish(job)? else {
            return Ok(Applied::Done);
        };
        let s = rec
            .as_split()
            .cloned()
            .ok_or_else(|| Refused::Op(format!("job {job} is a {}, not a split", rec.kind.name())))?;
        let parent = self.shard_record(&s.collection, &s.shard)?.clone();
        let spec = Self::spec_after_split(&self.collections[&s.collection].spec, &s)?;
        let text = format!(
            "shard {} replaced by shards {} and {} ({} replicas each)",
            s.shard.1,
            s.low,
            s.high,
            parent.replicas.len()
        );
        Ok(self.replace_shard(&s.collection, &s.shard, spec, &s.halves(), &s.replicas, job, text, at_ms))
    }

    /// Replaces shard `old` of `c` by the shards `new` (their ranges from
    /// `spec`'s map, founded on `replicas`), adopts `spec`, and ends `job`
    /// done: one new map version. Nothing waits on `old`'s replicas any more
    /// (they are destroyed as nodes see the map).
    #[allow(clippy::too_many_arguments)]
    fn replace_shard(
        &mut self,
        c: &CollectionName,
        old: &ShardKey,
        spec: CollectionSpec,
        new: &[ShardKey],
        replicas: &[u64],
        job: &str,
        text: String,
        at_ms: u64,
    ) -> Applied {
        let map = spec.shard_map(&old.0).expect("the spec's own region");
        let coll = self.collections.get_mut(c).expect("checked by the caller");
        coll.shards.remove(old);
        for key in new {
            let range = map.range_of(key.1).expect("the new map has every new shard");
            coll.shards.insert(
                key.clone(),
                ShardRecord {
                    range,
                    replicas: replicas.to_vec(),
                    founders: replicas.to_vec(),
                },
            );
        }
        coll.spec = spec;
        self.erasures.replicas_set(c, old, &[]);
        self.ops.finish(job, crate::ops::OpState::Done, Some(text), at_ms);
        self.bump()
    }

    /// Nodes not yet marked down whose last heartbeat is more than
    /// `timeout_ms` before `now_ms` (the meta leader's clock): the leader
    /// proposes `SetNodeStatus { Down }` for each. A node never heard from
    /// since it registered counts from its registration heartbeat.
    pub fn overdue(&self, now_ms: u64, timeout_ms: u64) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.status != NodeStatus::Down && now_ms.saturating_sub(n.last_heartbeat_ms) > timeout_ms)
            .map(|n| n.id)
            .collect()
    }

    /// Shard `key` of collection `c`, or the refusal naming what is unknown.
    fn shard_record(&self, c: &CollectionName, key: &ShardKey) -> Result<&ShardRecord, Refused> {
        let coll = self.collections.get(c).ok_or_else(|| Refused::UnknownCollection(c.clone()))?;
        coll.shards.get(key).ok_or_else(|| Refused::UnknownShard {
            shard: shard_name(c, key),
            collection: c.clone(),
        })
    }

    fn bump(&mut self) -> Applied {
        self.map_version += 1;
        Applied::MapVersion(self.map_version)
    }

    fn create(&mut self, spec: CollectionSpec, mut replicas: BTreeMap<ShardKey, Vec<u64>>) -> Result<Applied, Refused> {
        spec.validate().map_err(|e| Refused::InvalidSpec(e.message))?;
        if self.collections.contains_key(&spec.name) {
            return Err(Refused::CollectionExists(spec.name));
        }
        let mut shards = BTreeMap::new();
        for r in &spec.regions {
            let map = spec.shard_map(&r.region).map_err(|e| Refused::InvalidSpec(e.message))?;
            for (number, range) in map.shards() {
                let key = (r.region.clone(), number);
                let given = replicas.remove(&key).ok_or_else(|| Refused::BadReplicas {
                    shard: shard_name(&spec.name, &key),
                    why: "no replicas were given for it".into(),
                })?;
                let checked = self.check_replicas(&spec.name, &key, given, Some(spec.replication_factor as usize))?;
                shards.insert(
                    key,
                    ShardRecord {
                        range,
                        founders: checked.clone(),
                        replicas: checked,
                    },
                );
            }
        }
        if let Some(key) = replicas.keys().next() {
            return Err(Refused::UnknownShard {
                shard: shard_name(&spec.name, key),
                collection: spec.name,
            });
        }
        self.collections.insert(spec.name.clone(), CollectionRecord { spec, shards });
        Ok(self.bump())
    }

    /// R1 and the replica rules: registered data nodes of the shard's region,
    /// distinct, as many as `exactly` (or 1 to the maximum). Returns them sorted.
    fn check_replicas(
        &self,
        c: &CollectionName,
        shard: &ShardKey,
        mut replicas: Vec<u64>,
        exactly: Option<usize>,
    ) -> Result<Vec<u64>, Refused> {
        let name = || shard_name(c, shard);
        replicas.sort_unstable();
        let before = replicas.len();
        replicas.dedup();
        if replicas.len() != before {
            return Err(Refused::BadReplicas {
                shard: name(),
                why: "a node is named twice".into(),
            });
        }
        let wrong_count = match exactly {
            Some(n) => replicas.len() != n,
            None => replicas.is_empty() || replicas.len() > MAX_REPLICATION_FACTOR as usize,
        };
        if wrong_count {
            return Err(Refused::BadReplicas {
                shard: name(),
                why: format!(
                    "{} replicas given; it needs {}",
                    replicas.len(),
                    exactly.map_or(format!("1 to {MAX_REPLICATION_FACTOR}"), |n| n.to_string())
                ),
            });
        }
        for id in &replicas {
            let n = self.nodes.get(id).ok_or(Refused::UnknownNode(*id))?;
            if n.region != shard.0 {
                return Err(Refused::OffRegion {
                    node: *id,
                    node_region: n.region.clone(),
                    shard: name(),
                    shard_region: shard.0.clone(),
                });
            }
            if !n.roles.data {
                return Err(Refused::NotDataNode(*id));
            }
        }
        Ok(replicas)
    }
}

#[cfg(test)]
mod tests;
