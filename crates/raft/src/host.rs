//! A node's replicas of many shard groups: created and removed at run time,
//! writes sent to each group's leader (proposed here, or forwarded), reads at
//! `any` (local, optionally waiting for an index) or `linearizable`
//! (read-index through the leader), and a watchdog that restarts a group whose
//! Raft core has stopped.

use crate::audit_sm::AuditStateMachine;
use crate::log_store::LogStore;
use crate::meta_sm::MetaStateMachine;
use crate::metrics as m;
use crate::network::{AddressBook, GroupNetwork, Peers};
use crate::state_machine::ShardStateMachine;
use crate::types::{
    AuditAppended, AuditBatch, AuditConfig, AuditGroupId, GroupConfig, MetaConfig, MetaGroupId, MetaResponse, NodeId, ShardResponse,
    TypeConfig,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{Config, SnapshotPolicy};
use parking_lot::RwLock;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sovra_proto::raft as pb;
use sovra_shard::{ReplicaStore, ShardEngine};
use sovra_types::validate::check_command;
use sovra_types::{ApiError, RegionId, ShardCommand, ShardId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Slack added to the read lease when an erasure waits out a replica.
const LEASE_MARGIN: Duration = Duration::from_millis(200);

/// Timing and log-size knobs of every group on a node.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept below a snapshot for followers only a little behind.
    pub keep_logs: u64,
    /// A write not committed and applied within this is answered UNAVAILABLE.
    pub write_timeout: Duration,
    /// How long a read waits for its replica to reach the index it needs.
    pub read_wait: Duration,
    /// Bound on one AppendEntries message (a single entry is always sent).
    pub max_append_bytes: usize,
    /// A shard replica answers reads at consistency `any` only for this long
    /// after the group's leader last confirmed what was committed (a read
    /// index it has applied), so a replica cut off from its leader stops
    /// answering within it; an erasure's acknowledgement waits it out for
    /// replicas that cannot confirm they applied the erasure. Zero: no lease.
    pub read_lease: Duration,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 150,
            election_min_ms: 800,
            election_max_ms: 1600,
            snapshot_after_logs: 10_000,
            keep_logs: 1_000,
            write_timeout: Duration::from_secs(5),
            read_wait: Duration::from_secs(2),
            max_append_bytes: crate::network::MAX_APPEND_BYTES,
            read_lease: Duration::from_secs(2),
        }
    }
}

impl RaftSettings {
    fn openraft(&self) -> Config {
        Config {
            cluster_name: "sovra".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_logs),
            max_in_snapshot_log_to_keep: self.keep_logs,
            ..Default::default()
        }
    }
}

/// The read level of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLevel {
    /// This replica's state, once it has applied at least `min_index` (0: at once).
    Any { min_index: u64 },
    /// State that reflects every write acknowledged before the read began.
    Linearizable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    pub index: u64,
    pub changed: u64,
}

/// The answer to a committed entry: an ack, or FAILED_PRECONDITION if the
/// shard refused it on apply (recorded there; nothing else changed).
pub fn ack_of(id: &ShardId, index: u64, r: &ShardResponse) -> Result<WriteAck, ApiError> {
    match &r.rejected {
        None => Ok(WriteAck { index, changed: r.changed }),
        Some(why) => Err(ApiError::precondition(format!(
            "shard {id} refused the write on apply (log index {index}): {why}"
        ))),
    }
}

/// Refuses, before it is proposed, a write to a shard a split has fenced (the
/// shard would refuse it on apply anyway).
fn fence_check(g: &Group, cmd: &ShardCommand) -> Result<(), ApiError> {
    if matches!(
        cmd,
        ShardCommand::Upsert(_) | ShardCommand::Delete(_) | ShardCommand::RemoveOptOut { .. }
    ) && let Some(job) = g.engine().split_fence()
    {
        return Err(ApiError::unavailable(sovra_shard::engine::split_refusal(&g.id, &job)));
    }
    Ok(())
}

/// This node's replica of one group of kind `C`.
pub struct Replica<C: GroupConfig> {
    pub id: C::Id,
    raft: RwLock<openraft::Raft<C>>,
    pub sm: C::Sm,
    pub log: LogStore<C>,
    pub restarts: AtomicU64,
    /// Until when this replica may answer `any` reads ([`RaftSettings::read_lease`]).
    lease: parking_lot::Mutex<Lease>,
    /// Whether this replica has seen a membership naming it. Only then does
    /// one that leaves it out mean it was removed: a replica added to a
    /// group replays the group's older memberships while it catches up.
    member_seen: std::sync::atomic::AtomicBool,
    /// Since when this replica stands for no election ([`Self::hold_elections`]).
    elections_held: parking_lot::Mutex<Option<Instant>>,
    /// How many times it was held.
    pub holds: AtomicU64,
}

#[derive(Default)]
struct Lease {
    until: Option<Instant>,
    /// A lease may start only from a read index at or past this: an erasure
    /// at it was confirmed on this replica by its having no lease, so none
    /// may begin from a read index taken before it.
    floor: u64,
}

impl<C: GroupConfig> Replica<C> {
    /// For an entry at `index` this replica has not applied: true (and no
    /// lease will begin from a read index below `index`) when it holds no
    /// valid lease, so it answers no `any` read until it has applied past a
    /// read index taken after `index` was committed.
    pub fn fence_unleased(&self, index: u64) -> bool {
        let mut l = self.lease.lock();
        if l.until.is_some_and(|u| Instant::now() < u) {
            return false;
        }
        l.floor = l.floor.max(index);
        true
    }
}

/// A replica of a shard group.
pub type Group = Replica<TypeConfig>;
/// This node's replica of the meta group (a voter or a learner).
pub type MetaReplica = Replica<MetaConfig>;
/// This node's replica of its region's audit group.
pub type AuditReplica = Replica<AuditConfig>;

impl Group {
    pub fn engine(&self) -> &Arc<ShardEngine> {
        self.sm.engine()
    }
}

impl<C: GroupConfig> Replica<C> {
    /// The current Raft handle (the watchdog may have replaced it).
    pub fn raft(&self) -> openraft::Raft<C> {
        self.raft.read().clone()
    }

    /// The leader this replica knows, or `None`. Never itself unless it
    /// leads now: openraft reports the leader of the last committed vote, and
    /// a restarted former leader's stored vote names itself even after it was
    /// removed from the group while down. Taken at its word, such a node
    /// forwarded every write to itself for ever (found by chaos seed 1: a
    /// meta leader killed just after it moved itself out of the voters came
    /// back believing it led, so its heartbeats never reached meta, meta kept
    /// it down, and it was never added back).
    pub fn leader(&self) -> Option<NodeId> {
        credible_leader(&self.raft().metrics().borrow())
    }

    /// Stops this replica standing for election: called when a leader's
    /// append finds it a candidate in a later term than the leader's. It
    /// stood while cut off (openraft 0.9 has no pre-vote), each time in a
    /// higher term, and its log is behind so it cannot win; answered "higher
    /// vote", the leader steps down, and a candidate that went on raising its
    /// term would unseat every leader elected after it too (found by chaos:
    /// meta leaderless for minutes after a partition healed). It still
    /// votes, and stands again once it follows a leader
    /// ([`Self::release_elections`]).
    pub fn hold_elections(&self) {
        let mut held = self.elections_held.lock();
        if held.is_none() {
            self.raft().runtime_config().elect(false);
            *held = Some(Instant::now());
            self.holds.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::ELECTIONS_HELD).increment(1);
            tracing::info!(group = %self.id, "a leader's append found this replica a candidate in a later term; it stands for no election until it follows a leader");
        }
    }

    /// Lets a held replica stand for election again once it follows a leader
    /// (its vote committed to another node), or ten election timeouts after
    /// it was held whatever happened: a group whose other members cannot
    /// elect still needs it. Called on every append it takes and by the
    /// watchdog.
    pub fn release_elections(&self) {
        let mut held = self.elections_held.lock();
        let Some(since) = *held else { return };
        let raft = self.raft();
        let longest = Duration::from_millis(raft.config().election_timeout_max * 10);
        let following = {
            let m = raft.metrics();
            let m = m.borrow();
            m.vote.is_committed() && m.current_leader.is_some_and(|l| l != m.id)
        };
        if following || since.elapsed() >= longest {
            raft.runtime_config().elect(true);
            *held = None;
        }
    }

    /// Waits, up to `within`, until this replica knows a leader (credibly:
    /// see [`Self::leader`]) and has applied through `applied`. False if it
    /// does not by then.
    pub async fn wait_rejoined(&self, applied: u64, within: Duration) -> bool {
        self.raft()
            .wait(Some(within))
            .metrics(
                |m| credible_leader(m).is_some() && m.last_applied.is_some_and(|l| l.index >= applied),
                "the replica rejoins its group",
            )
            .await
            .is_ok()
    }

    /// Whether `node` is a voter or learner of the group's current membership
    /// (every configuration of a joint one), as this replica knows it. A
    /// replica that knows no membership yet (never initialised, waiting for its
    /// first append or snapshot) admits any authenticated cluster node.
    pub fn admits(&self, node: NodeId) -> bool {
        let raft = self.raft();
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let mut nodes = membership.nodes().peekable();
        nodes.peek().is_none() || membership.nodes().any(|(n, _)| *n == node)
    }
}

/// Initialises a group never started before with `members` (every first
/// member does the same with the same members, which openraft allows).
async fn initialize<C: GroupConfig>(raft: &openraft::Raft<C>, members: BTreeSet<NodeId>) -> anyhow::Result<()> {
    if !raft.is_initialized().await? {
        match raft.initialize(members).await {
            Ok(()) | Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub struct RaftHost {
    pub me: NodeId,
    pub region: RegionId,
    pub peers: Peers,
    /// Whether the cluster listener is mutual TLS, so that a message's sender
    /// must be the node its connection's certificate names.
    pub tls_on: bool,
    pub settings: RaftSettings,
    config: Arc<Config>,
    groups: RwLock<BTreeMap<ShardId, Arc<Group>>>,
    meta: RwLock<Option<Arc<MetaReplica>>>,
    audit: RwLock<Option<Arc<AuditReplica>>>,
    /// Per region, the node that last took an audit batch from this one.
    audit_hints: RwLock<BTreeMap<RegionId, NodeId>>,
    /// Nodes of this node's region: they may forward writes to groups they
    /// hold no replica of.
    region_nodes: RwLock<BTreeSet<NodeId>>,
    restarts: AtomicU64,
    /// Cluster messages for another region's shards refused here (R2).
    pub residency_refused: AtomicU64,
    /// Other nodes' registrations are refused (UNAVAILABLE, retried) while
    /// set: the bootstrap node of a new cluster sets the meta level first,
    /// so no view that holds a node is below it.
    pub registrations_held: std::sync::atomic::AtomicBool,
}

impl RaftHost {
    pub fn new(
        me: NodeId,
        region: RegionId,
        book: AddressBook,
        faults: crate::fault::Faults,
        settings: RaftSettings,
        secret: crate::auth::ClusterSecret,
        tls: Option<Arc<crate::tls::TlsState>>,
    ) -> Arc<Self> {
        let config = Arc::new(
            settings
                .openraft()
                .validate()
                .expect("raft settings are validated by the node config"),
        );
        Arc::new(Self {
            me,
            region,
            tls_on: tls.is_some(),
            peers: Peers::new(me, book, faults, settings.max_append_bytes, secret).with_tls(tls),
            settings,
            config,
            groups: RwLock::new(BTreeMap::new()),
            meta: RwLock::new(None),
            audit: RwLock::new(None),
            audit_hints: RwLock::new(BTreeMap::new()),
            region_nodes: RwLock::new(BTreeSet::new()),
            restarts: AtomicU64::new(0),
            residency_refused: AtomicU64::new(0),
            registrations_held: Default::default(),
        })
    }

    /// R2 on the wire: a message carrying (or asking for) a shard's data is
    /// taken only by nodes of the shard's region; any other refuses it and
    /// counts it, before looking at anything else in it.
    pub fn check_residency(&self, shard: &ShardId, rpc: &'static str) -> Result<(), tonic::Status> {
        if shard.region == self.region {
            return Ok(());
        }
        self.residency_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(crate::metrics::RESIDENCY_REFUSED, "node" => self.me.to_string(), "rpc" => rpc).increment(1);
        tracing::warn!(shard = %shard, rpc, "refused a cluster message for another region's shard (R2)");
        Err(tonic::Status::permission_denied(format!(
            "R2: shard {shard} belongs to region {}; node {} is in region {} and takes no message for it",
            shard.region, self.me, self.region
        )))
    }

    pub fn set_region_nodes(&self, nodes: BTreeSet<NodeId>) {
        *self.region_nodes.write() = nodes;
    }

    pub fn is_region_node(&self, n: NodeId) -> bool {
        self.region_nodes.read().contains(&n)
    }

    /// Like [`Self::write`], for a node that may hold no replica of `id`: then
    /// the write goes to the group's `members`, each tried in turn (a member
    /// that is not the leader forwards it on).
    pub async fn write_to(&self, id: &ShardId, members: &BTreeSet<NodeId>, cmd: ShardCommand) -> Result<WriteAck, ApiError> {
        if self.group(id).is_some() {
            return self.write(id, cmd).await;
        }
        let timeout = self.settings.write_timeout;
        let deadline = Instant::now() + timeout;
        let mut why = Vec::new();
        for to in members.iter().cycle() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.forward::<TypeConfig>(*to, id, &cmd, deadline - now).await {
                Ok(answer) => return answer.and_then(|(index, r)| ack_of(id, index, &r)),
                // The writer waits for the split's new shard map instead.
                Err(s) if s.message().contains(sovra_types::SPLIT_REFUSAL) => return Err(ApiError::unavailable(s.message())),
                Err(s) => {
                    why.push(format!("node {to}: {}", s.message()));
                    tokio::time::sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()))).await;
                }
            }
        }
        why.dedup();
        Err(ApiError::unavailable(format!(
            "write to shard {id} was not acknowledged within {} ms; no replica node took it ({})",
            timeout.as_millis(),
            why.into_iter().rev().take(3).collect::<Vec<_>>().join("; ")
        )))
    }

    pub fn group(&self, id: &ShardId) -> Option<Arc<Group>> {
        self.groups.read().get(id).cloned()
    }

    pub fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().values().cloned().collect()
    }

    /// Starts this node's replica of group `id` over `engine` and `log`. With
    /// `members`, a group never started before is initialised with them (every
    /// founding replica does the same, which openraft allows); without, the
    /// replica waits to be added by the group's leader.
    pub async fn open_group(
        &self,
        id: ShardId,
        engine: Arc<ShardEngine>,
        log: LogStore,
        members: Option<BTreeSet<NodeId>>,
    ) -> anyhow::Result<Arc<Group>> {
        anyhow::ensure!(
            id.region == self.region,
            "group {id} is of another region than this node ({})",
            self.region
        );
        if let Some(m) = &members {
            anyhow::ensure!(m.contains(&self.me), "node {} is not a member of group {id}", self.me);
        }
        let dir = engine.replica().snapshot_dir();
        let region = self.region.clone();
        let sm = tokio::task::spawn_blocking(move || ShardStateMachine::open(engine, dir, region)).await??;
        let raft = self.new_raft::<TypeConfig>(&id, &sm, &log).await?;
        if let Some(members) = members {
            initialize(&raft, members).await?;
        }
        // A replica reopened with a membership naming it was a member.
        let named = self.names_me(raft.metrics().borrow().membership_config.membership());
        let g = Arc::new(Group {
            id: id.clone(),
            raft: RwLock::new(raft),
            sm,
            log,
            restarts: AtomicU64::new(0),
            member_seen: named.into(),
            lease: Default::default(),
            elections_held: Default::default(),
            holds: AtomicU64::new(0),
        });
        self.groups.write().insert(id, g.clone());
        Ok(g)
    }

    async fn new_raft<C: GroupConfig>(&self, id: &C::Id, sm: &C::Sm, log: &LogStore<C>) -> anyhow::Result<openraft::Raft<C>> {
        let network = GroupNetwork::<C>::new(id, self.peers.clone());
        Ok(openraft::Raft::new(self.me, self.config.clone(), network, log.clone(), sm.clone()).await?)
    }

    /// Starts this node's replica of the meta group over its own store. With
    /// `members`, a replica never initialised is initialised with them (the
    /// bootstrap node, alone); without, it waits to be added by the leader.
    pub async fn open_meta(&self, store: ReplicaStore, members: Option<BTreeSet<NodeId>>) -> anyhow::Result<Arc<MetaReplica>> {
        let log = LogStore::<MetaConfig>::of(&store);
        let sm = tokio::task::spawn_blocking(move || MetaStateMachine::open(store)).await??;
        let raft = self.new_raft::<MetaConfig>(&MetaGroupId, &sm, &log).await?;
        if let Some(members) = members {
            initialize(&raft, members).await?;
        }
        let g = Arc::new(MetaReplica {
            id: MetaGroupId,
            raft: RwLock::new(raft),
            sm,
            log,
            restarts: AtomicU64::new(0),
            member_seen: Default::default(),
            lease: Default::default(),
            elections_held: Default::default(),
            holds: AtomicU64::new(0),
        });
        *self.meta.write() = Some(g.clone());
        Ok(g)
    }

    /// Starts this node's replica of its region's audit group over its own
    /// store. With `members` (the group's founders, from meta), a replica
    /// never initialised is initialised with them; without, it waits to be
    /// added by the leader.
    pub async fn open_audit(&self, store: ReplicaStore, members: Option<BTreeSet<NodeId>>) -> anyhow::Result<Arc<AuditReplica>> {
        let log = LogStore::<AuditConfig>::of(&store);
        let sm = tokio::task::spawn_blocking(move || AuditStateMachine::open(store)).await??;
        let id = AuditGroupId(self.region.clone());
        let raft = self.new_raft::<AuditConfig>(&id, &sm, &log).await?;
        if let Some(members) = members {
            initialize(&raft, members).await?;
        }
        let g = Arc::new(AuditReplica {
            id,
            raft: RwLock::new(raft),
            sm,
            log,
            restarts: AtomicU64::new(0),
            member_seen: Default::default(),
            lease: Default::default(),
            elections_held: Default::default(),
            holds: AtomicU64::new(0),
        });
        *self.audit.write() = Some(g.clone());
        Ok(g)
    }

    /// This node's audit replica, if it holds one.
    pub fn audit(&self) -> Option<Arc<AuditReplica>> {
        self.audit.read().clone()
    }

    /// Stops this node's audit replica; the caller deletes its directory.
    pub async fn close_audit(&self) {
        let g = self.audit.write().take();
        if let Some(g) = g {
            let _ = g.raft().shutdown().await;
        }
    }

    /// Commits `batch` in this region's audit group: through this node's
    /// replica (forwarded to the leader if need be), or, on a node without
    /// one, through the first of `via` (the group's replicas) that takes it.
    /// Answers once the records are committed and applied on the leader.
    pub async fn audit_write(&self, region: &RegionId, batch: AuditBatch, via: &[NodeId]) -> Result<(u64, AuditAppended), ApiError> {
        let id = AuditGroupId(region.clone());
        if *region == self.region
            && let Some(g) = self.audit()
        {
            return self.write_checked(g, || self.audit(), batch).await;
        }
        let within = self.settings.write_timeout;
        let deadline = Instant::now() + within;
        let mut why = Vec::new();
        // The node that took the last batch first (it leads, or reaches the
        // leader), then the others; each gets its share of the time left, so
        // one slow or cut-off replica cannot spend the whole budget. A batch
        // whose answer was lost may then commit twice (records are
        // at-least-once).
        let hint = self.audit_hints.read().get(region).copied();
        let mut order: Vec<NodeId> = hint.into_iter().filter(|h| via.contains(h)).collect();
        order.extend(via.iter().copied().filter(|n| Some(*n) != hint));
        let count = order.len();
        for (i, n) in order.into_iter().enumerate() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            let share = (remaining / (count - i) as u32).max(Duration::from_millis(500)).min(remaining);
            match self.forward::<AuditConfig>(n, &id, &batch, share).await {
                Ok(answer) => {
                    if answer.is_ok() {
                        self.audit_hints.write().insert(region.clone(), n);
                    }
                    return answer;
                }
                Err(s) => why.push(format!("node {n}: {}", s.message())),
            }
        }
        Err(ApiError::unavailable(format!(
            "no replica of {id} committed the audit records within {} ms ({})",
            within.as_millis(),
            if why.is_empty() {
                "none is known".to_string()
            } else {
                why.join("; ")
            }
        )))
    }

    /// On the meta leader: makes `voters` the meta group's voters and
    /// `learners` its learners ([`Self::set_members_in`]).
    pub async fn meta_set_members(&self, voters: BTreeSet<NodeId>, learners: BTreeSet<NodeId>) -> Result<bool, ApiError> {
        let g = self
            .meta()
            .ok_or_else(|| ApiError::unavailable(format!("node {} runs no meta replica", self.me)))?;
        self.set_members_in(&g, voters, learners).await
    }

    /// On the audit group's leader: makes `voters` its members.
    pub async fn audit_set_members(&self, voters: BTreeSet<NodeId>) -> Result<bool, ApiError> {
        let g = self
            .audit()
            .ok_or_else(|| ApiError::unavailable(format!("node {} holds no audit replica", self.me)))?;
        self.set_members_in(&g, voters, BTreeSet::new()).await
    }

    /// On `g`'s leader: adds `n` as a learner without waiting for it to
    /// catch up (a move watches its progress and promotes it later).
    pub async fn add_learner_in<C: GroupConfig<Responder = openraft::impls::OneshotResponder<C>>>(
        &self,
        g: &Replica<C>,
        n: NodeId,
    ) -> Result<(), ApiError> {
        let within = self.settings.write_timeout;
        let raft = g.raft();
        tokio::time::timeout(within, raft.add_learner(n, openraft::EmptyNode::default(), false))
            .await
            .map_err(|_| ApiError::unavailable(format!("adding node {n} to group {} was not committed in time", g.id)))?
            .map(|_| ())
            .map_err(|e| ApiError::unavailable(format!("adding node {n} to group {} failed: {e}", g.id)))
    }

    /// On `g`'s leader: makes exactly `voters` the group's members, in one
    /// joint-consensus change (members not named are removed).
    pub async fn replace_voters_in<C: GroupConfig<Responder = openraft::impls::OneshotResponder<C>>>(
        &self,
        g: &Replica<C>,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), ApiError> {
        let within = self.settings.write_timeout;
        let raft = g.raft();
        let change = raft.change_membership(openraft::ChangeMembers::ReplaceAllVoters(voters), false);
        tokio::time::timeout(within, change)
            .await
            .map_err(|_| ApiError::unavailable(format!("the membership change of group {} was not committed in time", g.id)))?
            .map(|_| ())
            .map_err(|e| ApiError::unavailable(format!("the membership change of group {} failed: {e}", g.id)))
    }

    /// On `g`'s leader: makes `voters` the group's voters and `learners` its
    /// learners (each added as a learner first, so it catches up before it
    /// counts in a quorum); members in neither are removed. Changes nothing
    /// when the membership already matches. Elsewhere: FAILED_PRECONDITION
    /// naming the leader.
    pub async fn set_members_in<C: GroupConfig<Responder = openraft::impls::OneshotResponder<C>>>(
        &self,
        g: &Replica<C>,
        voters: BTreeSet<NodeId>,
        learners: BTreeSet<NodeId>,
    ) -> Result<bool, ApiError> {
        use openraft::ChangeMembers;
        let raft = g.raft();
        if g.leader() != Some(self.me) {
            return Err(ApiError::precondition(format!(
                "node {} does not lead group {}; {}",
                self.me,
                g.id,
                self.leader_text(g.leader())
            )));
        }
        let current = raft.metrics().borrow().membership_config.membership().clone();
        let have_voters: BTreeSet<NodeId> = current.voter_ids().collect();
        let have_all: BTreeSet<NodeId> = current.nodes().map(|(n, _)| *n).collect();
        let want_all: BTreeSet<NodeId> = voters.union(&learners).copied().collect();
        if have_voters == voters && have_all == want_all && current.get_joint_config().len() == 1 {
            return Ok(false);
        }
        let id = g.id.clone();
        let fail = |e: String| ApiError::unavailable(format!("changing the members of group {id} failed: {e}"));
        let within = self.settings.write_timeout;
        for n in want_all.difference(&have_all) {
            // Blocking: returns once the learner has caught up with the leader.
            tokio::time::timeout(within, raft.add_learner(*n, openraft::EmptyNode::default(), true))
                .await
                .map_err(|_| fail(format!("node {n} did not catch up as a learner within {} ms", within.as_millis())))?
                .map_err(|e| fail(e.to_string()))?;
        }
        if have_voters != voters {
            tokio::time::timeout(
                within,
                raft.change_membership(ChangeMembers::ReplaceAllVoters(voters.clone()), true),
            )
            .await
            .map_err(|_| fail("no quorum to commit the new voters".into()))?
            .map_err(|e| fail(e.to_string()))?;
        }
        let now: BTreeSet<NodeId> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(n, _)| *n)
            .collect();
        let gone: BTreeSet<NodeId> = now.difference(&want_all).copied().collect();
        if !gone.is_empty() {
            tokio::time::timeout(within, raft.change_membership(ChangeMembers::RemoveNodes(gone), false))
                .await
                .map_err(|_| fail("no quorum to remove departed members".into()))?
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(true)
    }

    /// The meta group's voters and learners as this replica knows them.
    pub fn meta_members(&self) -> Option<(BTreeSet<NodeId>, BTreeSet<NodeId>)> {
        let g = self.meta()?;
        let raft = g.raft();
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        Some((membership.voter_ids().collect(), membership.learner_ids().collect()))
    }

    /// This node's meta replica, if it runs one.
    pub fn meta(&self) -> Option<Arc<MetaReplica>> {
        self.meta.read().clone()
    }

    /// Stops the replica; with `destroy`, deletes its log, snapshots and data.
    pub async fn remove_group(&self, id: &ShardId, destroy: bool) -> anyhow::Result<()> {
        let Some(g) = self.groups.write().remove(id) else { return Ok(()) };
        let _ = g.raft().shutdown().await;
        if destroy {
            let g2 = g.clone();
            // The replica's directory holds its data, log and snapshots.
            tokio::task::spawn_blocking(move || g2.sm.destroy()).await??;
            tracing::info!(group = %id, "replica removed; its data is deleted");
        }
        Ok(())
    }

    /// Stops every group (node shutdown).
    pub async fn shutdown(&self) {
        let groups: Vec<_> = std::mem::take(&mut *self.groups.write()).into_values().collect();
        for g in groups {
            let _ = g.raft().shutdown().await;
        }
        let meta = self.meta.write().take();
        if let Some(m) = meta {
            let _ = m.raft().shutdown().await;
        }
        self.close_audit().await;
    }

    fn group_or_unavailable(&self, id: &ShardId) -> Result<Arc<Group>, ApiError> {
        self.group(id)
            .ok_or_else(|| ApiError::unavailable(format!("shard {id} has no replica on node {}", self.me)))
    }

    fn leader_text(&self, leader: Option<NodeId>) -> String {
        match leader {
            None => "no leader is known".into(),
            Some(l) => match self.peers.book.get(l) {
                Some(a) => format!("last known leader: node {l} at {a}"),
                None => format!("last known leader: node {l}"),
            },
        }
    }

    /// Commits `cmd` in group `id` and waits until it is applied on the leader.
    /// A follower forwards it to the leader it knows. Fails UNAVAILABLE, naming
    /// the last known leader, if that does not happen within the write timeout.
    pub async fn write(&self, id: &ShardId, cmd: ShardCommand) -> Result<WriteAck, ApiError> {
        let (index, r) = self.write_committed(id, cmd).await?;
        ack_of(id, index, &r)
    }

    /// As [`Self::write`], answering the committed entry's index and response
    /// (for a node that passes the answer on).
    pub async fn write_committed(&self, id: &ShardId, cmd: ShardCommand) -> Result<(u64, ShardResponse), ApiError> {
        let g = self.group_or_unavailable(id)?;
        // The edge of the log: nothing is proposed or forwarded that the shard
        // would have to refuse.
        check_command(g.engine().spec(), id, &cmd)?;
        fence_check(&g, &cmd)?;
        self.write_checked(g, || self.group(id), cmd).await
    }

    /// Test hook: proposes `cmd` with no edge validation, as an older build or
    /// a bug might have, so tests can prove that apply refuses it totally.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub async fn write_unvalidated(&self, id: &ShardId, cmd: ShardCommand) -> Result<WriteAck, ApiError> {
        let g = self.group_or_unavailable(id)?;
        let (index, r) = self.write_checked(g, || self.group(id), cmd).await?;
        ack_of(id, index, &r)
    }

    /// Commits `cmd` in the meta group (proposed here if this node leads it,
    /// else forwarded to the leader) and answers the state machine's verdict.
    pub async fn meta_write(&self, cmd: sovra_meta::MetaCommand) -> Result<(u64, MetaResponse), ApiError> {
        let g = self
            .meta()
            .ok_or_else(|| ApiError::unavailable(format!("node {} runs no meta replica", self.me)))?;
        self.write_checked(g, || self.meta(), cmd).await
    }

    /// Proposes `cmd` through `g` (forwarded to the leader if `g` does not
    /// lead) until it commits or the write timeout passes. `current` finds
    /// this node's replica of the group again: when `g`'s core has stopped
    /// (taken out of service for an erasure rewrite, removed, or failed and
    /// waiting for the watchdog) the write goes on through the replica that
    /// replaced it or, while there is none, through the group's other members.
    async fn write_checked<C: GroupConfig>(
        &self,
        g: Arc<Replica<C>>,
        current: impl Fn() -> Option<Arc<Replica<C>>>,
        cmd: C::D,
    ) -> Result<(u64, C::R), ApiError>
    where
        C::D: Clone + Serialize,
        C::R: DeserializeOwned,
    {
        let mut g = g;
        let id = g.id.clone();
        let timeout = self.settings.write_timeout;
        let deadline = Instant::now() + timeout;
        let mut leader = g.leader();
        let mut why = String::from("no leader was elected");
        // Turns through the other members while this node's replica is out
        // of service.
        let mut turn = 0usize;
        while Instant::now() < deadline {
            let remaining = deadline - Instant::now();
            let raft = g.raft();
            let mut rx = raft.metrics();
            let (current_leader, stopped) = {
                let gone = rx.has_changed().is_err();
                let m = rx.borrow_and_update();
                (
                    credible_leader(&m),
                    gone || m.running_state.is_err() || m.state == openraft::ServerState::Shutdown,
                )
            };
            if stopped {
                if let Some(n) = current()
                    && !Arc::ptr_eq(&n, &g)
                {
                    g = n;
                    continue;
                }
                // Only here: the members the stopped replica last knew.
                let others: Vec<NodeId> = rx
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .filter(|n| *n != self.me)
                    .collect();
                if others.is_empty() {
                    why = format!("this node's replica of {id} is out of service and no other member is known");
                    tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                    continue;
                }
                let to = others[turn % others.len()];
                turn += 1;
                match self.forward::<C>(to, &id, &cmd, remaining.min(Duration::from_secs(2))).await {
                    Ok(answer) => {
                        metrics::counter!(m::FORWARDED_WRITES).increment(1);
                        return answer;
                    }
                    Err(s) => {
                        why = format!(
                            "this node's replica is out of service (its Raft core stopped) and node {to} did not take the write: {}",
                            s.message()
                        );
                        tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                    }
                }
                continue;
            }
            leader = current_leader.or(leader);
            match current_leader {
                Some(l) if l == self.me => match tokio::time::timeout(remaining, C::write(&raft, cmd.clone())).await {
                    Ok(Ok(r)) => return Ok((r.log_id.index, r.data)),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                        leader = f.leader_id.or(leader);
                        why = "leadership moved while proposing".into();
                    }
                    Ok(Err(e)) => {
                        // Stopped mid-write (the entry may still commit:
                        // retrying is safe, writes are idempotent by id).
                        why = format!("this replica's Raft core stopped while proposing ({e})");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => {
                        why = "the leader could not reach a quorum; the write may still commit later (retrying is safe: writes are idempotent by id)".into();
                        break;
                    }
                },
                Some(l) => match self.forward::<C>(l, &id, &cmd, remaining).await {
                    Ok(answer) => {
                        metrics::counter!(m::FORWARDED_WRITES).increment(1);
                        return answer;
                    }
                    Err(s) => {
                        why = format!("forwarding to node {l} failed: {}", s.message());
                        tokio::time::sleep(Duration::from_millis(50).min(remaining)).await;
                    }
                },
                None => {
                    why = "no leader was elected".into();
                    let _ = tokio::time::timeout(remaining.min(Duration::from_millis(200)), rx.changed()).await;
                }
            }
        }
        Err(ApiError::unavailable(format!(
            "write to group {id} was not acknowledged within {} ms: {why}; {}",
            timeout.as_millis(),
            self.leader_text(leader)
        )))
    }

    /// Sends `cmd` to node `to`. The outer error means "not taken there, try
    /// again or elsewhere"; the inner result is the group's definitive answer
    /// (an ack, a refusal by validation, or a rejection on apply).
    async fn forward<C: GroupConfig>(
        &self,
        to: NodeId,
        id: &C::Id,
        cmd: &C::D,
        within: Duration,
    ) -> Result<Result<(u64, C::R), ApiError>, tonic::Status>
    where
        C::D: Serialize,
        C::R: DeserializeOwned,
    {
        let mut client = self.peers.client(to).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let command = postcard::to_allocvec(cmd).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut req = tonic::Request::new(pb::ProposeRequest {
            group: Some(C::group_pb(id)),
            from: self.me,
            command,
        });
        req.set_timeout(within);
        let r = match tokio::time::timeout(within, client.propose(req)).await {
            Err(_) => return Err(tonic::Status::deadline_exceeded("no answer from the leader in time")),
            // The receiver's edge validation refused it: retrying cannot help.
            Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => {
                return Ok(Err(ApiError::invalid(format!("node {to} refused the write: {}", s.message()))));
            }
            Ok(r) => r?.into_inner(),
        };
        let response: C::R = postcard::from_bytes(&r.response)
            .map_err(|e| tonic::Status::internal(format!("node {to} answered a response that does not decode: {e}")))?;
        Ok(Ok((r.index, response)))
    }

    /// The leader's side of a forwarded write: validate, propose here, never
    /// forward again. Answers the committed entry's response (which says if it
    /// was refused on apply).
    pub async fn propose_local(&self, id: &ShardId, cmd: ShardCommand) -> Result<(u64, ShardResponse), tonic::Status> {
        let g = self
            .group(id)
            .ok_or_else(|| tonic::Status::not_found(format!("no replica of {id} here")))?;
        check_command(g.engine().spec(), id, &cmd).map_err(|e| tonic::Status::invalid_argument(e.message))?;
        fence_check(&g, &cmd).map_err(|e| tonic::Status::unavailable(e.message))?;
        self.propose_in(&g, cmd).await
    }

    /// Proposes on `g` here, never forwarding (the other side of a forward).
    pub async fn propose_in<C: GroupConfig>(&self, g: &Replica<C>, cmd: C::D) -> Result<(u64, C::R), tonic::Status> {
        let id = &g.id;
        match tokio::time::timeout(self.settings.write_timeout, C::write(&g.raft(), cmd)).await {
            Ok(Ok(r)) => Ok((r.log_id.index, r.data)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(tonic::Status::failed_precondition(format!(
                "node {} is not the leader of {id}; {}",
                self.me,
                self.leader_text(f.leader_id)
            ))),
            Ok(Err(e)) => Err(tonic::Status::unavailable(e.to_string())),
            Err(_) => Err(tonic::Status::unavailable("not committed in time: no quorum reachable")),
        }
    }

    /// The leader's read index: confirms leadership with a quorum and waits
    /// until the leader has applied everything committed before.
    pub async fn read_index_local(&self, id: &ShardId) -> Result<u64, tonic::Status> {
        let g = self
            .group(id)
            .ok_or_else(|| tonic::Status::not_found(format!("no replica of {id} here")))?;
        self.read_index_in(&g).await
    }

    pub async fn read_index_in<C: GroupConfig>(&self, g: &Replica<C>) -> Result<u64, tonic::Status> {
        match tokio::time::timeout(self.settings.read_wait, g.raft().ensure_linearizable()).await {
            Ok(Ok(l)) => Ok(l.map_or(0, |l| l.index)),
            Ok(Err(e)) => Err(tonic::Status::failed_precondition(format!("{e}; {}", self.leader_text(g.leader())))),
            Err(_) => Err(tonic::Status::unavailable("leadership not confirmed in time")),
        }
    }

    /// Returns once this node's replica of `id` may answer a read at `level`:
    /// at `any`, once it holds a read lease (and has applied `min_index`).
    pub async fn read_barrier(&self, id: &ShardId, level: ReadLevel) -> Result<(), ApiError> {
        let g = self.group_or_unavailable(id)?;
        if let ReadLevel::Any { min_index } = level {
            self.ensure_lease(&g).await?;
            // An erasure appended here is applied before this replica answers:
            // its acknowledgement counted on that (`applied_or_fenced`).
            let fence = g.log.stats.fence.load(std::sync::atomic::Ordering::Acquire);
            return self
                .barrier_in(
                    &g,
                    ReadLevel::Any {
                        min_index: min_index.max(fence),
                    },
                )
                .await;
        }
        self.barrier_in(&g, level).await
    }

    /// A replica answers `any` reads only while its lease holds: renewed by a
    /// read index the leader confirmed (a quorum heartbeat) and this replica
    /// applied, valid for `read_lease` from when this replica asked (its own
    /// clock, so no clocks are compared). Any read index confirmed after an
    /// erasure committed is at or past it, so a replica whose lease began
    /// before the erasure loses it at most `read_lease` after the commit.
    async fn ensure_lease(&self, g: &Group) -> Result<(), ApiError> {
        let lease = self.settings.read_lease;
        if lease.is_zero() {
            return Ok(());
        }
        if g.lease.lock().until.is_some_and(|until| Instant::now() < until) {
            return Ok(());
        }
        let asked = Instant::now();
        let id = &g.id;
        let cut_off = |why: String| {
            ApiError::unavailable(format!(
                "the replica of shard {id} on node {} cannot confirm it is current ({why}); it answers no read until its leader confirms it: another replica may answer",
                self.me
            ))
        };
        let index = self.leader_read_index(g).await.map_err(|e| match e {
            (Some(l), s) => cut_off(format!("leader {l}: {}", s.message())),
            (None, _) => cut_off("its group has no leader now".into()),
        })?;
        self.barrier_in(g, ReadLevel::Any { min_index: index }).await?;
        let mut l = g.lease.lock();
        if index < l.floor {
            // An erasure past this read index was confirmed here meanwhile
            // on the strength of this replica holding no lease.
            return Err(cut_off(format!(
                "an erasure at log index {} was confirmed while it renewed its lease; retry",
                l.floor
            )));
        }
        let until = asked + lease;
        if l.until.is_none_or(|u| u < until) {
            l.until = Some(until);
        }
        Ok(())
    }

    /// Waits up to `within` for this node's replica of `id` to apply the
    /// erasure at `index` or append it; answers what it applied and whether,
    /// short of it, the replica is fenced: it answers no read that could miss
    /// the entry, because it has appended it (it applies it before its next
    /// `any` read), is not open (never opened, out for a rewrite or a
    /// restart: a new one starts leaseless) or holds no lease (one begins only
    /// from a read index taken after this, past the entry).
    pub async fn applied_or_fenced(&self, id: &ShardId, index: u64, within: Duration) -> (u64, bool) {
        let Some(g) = self.group(id) else { return (0, true) };
        let fence = &g.log.stats.fence;
        let applied_of = |m: &openraft::RaftMetrics<NodeId, openraft::EmptyNode>| m.last_applied.map_or(0, |l| l.index);
        // Appended is enough for an erasure: this replica then applies it
        // before answering another `any` read (`read_barrier`).
        let _ = g
            .raft()
            .wait(Some(within))
            .metrics(
                |m| applied_of(m) >= index || fence.load(std::sync::atomic::Ordering::Acquire) >= index,
                "erasure appended or applied",
            )
            .await;
        let applied = applied_of(&g.raft().metrics().borrow());
        let fenced = applied < index
            && (fence.load(std::sync::atomic::Ordering::Acquire) >= index
                || self.group(id).is_none_or(|now| !Arc::ptr_eq(&now, &g))
                || g.fence_unleased(index));
        (applied, fenced)
    }

    /// Waits up to `within` for `g` to apply `index`; answers what it has applied.
    pub async fn wait_applied_in<C: GroupConfig>(&self, g: &Replica<C>, index: u64, within: Duration) -> u64 {
        let raft = g.raft();
        let _ = raft.wait(Some(within)).applied_index_at_least(Some(index), "wait applied").await;
        raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
    }

    /// E2 on this replica, for erasures applied and not yet purged (the
    /// store's purge state, so a purge cut off by a restart is done again):
    /// rebuilds the index without their tombstones, builds a snapshot at or
    /// past the last erasure (which replaces and deletes the older snapshot
    /// files), then purges the Raft log through that snapshot, so the
    /// erasure's entry and every entry that wrote the erased points are gone
    /// from the log store. Returns the index purged through, `None` when
    /// nothing was due. The caller then rewrites the replica's database (sled
    /// keeps removed values in its files) and only then records the purge
    /// (`ShardStore::set_purged`), so a purge cut off anywhere is done again.
    /// `compacted`: the index was compacted after the erasure through this
    /// index already (in this run), so it is not rebuilt again.
    pub async fn purge_erasures(&self, g: &Group, compacted: Option<u64>) -> Result<Option<u64>, String> {
        let engine = g.engine().clone();
        let e = engine.clone();
        let (pending, done) = tokio::task::spawn_blocking(move || e.store().purge_state())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if pending <= done {
            return Ok(None);
        }
        let started = Instant::now();
        // Nothing to drop from the index: compacted past this erasure already
        // in this run, or holding no tombstone at all (a snapshot install
        // rebuilt it from records past the erasure).
        let dropped = if compacted.is_some_and(|c| c >= pending) || engine.stats().tombstones == 0 {
            0
        } else {
            let e = engine.clone();
            tokio::task::spawn_blocking(move || e.compact())
                .await
                .map_err(|e| e.to_string())?
                .tombstones_dropped
        };
        let raft = g.raft();
        let within = self.settings.write_timeout;
        let snapshot_index = |m: &openraft::RaftMetrics<NodeId, openraft::EmptyNode>| m.snapshot.map_or(0, |l| l.index);
        let first_time = dropped > 0 || snapshot_index(&raft.metrics().borrow()) < pending;
        if snapshot_index(&raft.metrics().borrow()) < pending {
            raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
            raft.wait(Some(within))
                .metrics(|m| snapshot_index(m) >= pending, "purge: snapshot past the erasure")
                .await
                .map_err(|e| format!("no snapshot past index {pending} yet: {e}"))?;
        }
        let upto = snapshot_index(&raft.metrics().borrow());
        raft.trigger().purge_log(upto).await.map_err(|e| e.to_string())?;
        raft.wait(Some(within))
            .metrics(|m| m.purged.map_or(0, |l| l.index) >= pending, "purge: log through the erasure")
            .await
            .map_err(|e| format!("the log is not purged through index {pending} yet (a follower may still need it): {e}"))?;
        // Said once: a replica waiting its turn to rewrite comes back here
        // with nothing left to do but the rewrite.
        if !first_time {
            return Ok(Some(pending));
        }
        tracing::info!(
            shard = %g.id,
            through = pending,
            snapshot = upto,
            tombstones_dropped = dropped,
            took = ?started.elapsed(),
            "erasures purged from the index, snapshots and log"
        );
        Ok(Some(pending))
    }

    /// After a write at `index` (an erasure) committed on shard `id`: asks every
    /// replica in `members` to confirm it applied it; for those that do not
    /// within `read_wait`, waits until `read_lease` has passed since
    /// `committed` (they can answer no read after that without having applied
    /// it). Returns the replicas waited out.
    pub async fn confirm_applied(&self, id: &ShardId, members: &BTreeSet<NodeId>, index: u64, committed: Instant) -> Vec<NodeId> {
        let within = self.settings.read_wait;
        let asks = members.iter().map(|&n| async move {
            // A fenced replica (see `applied_or_fenced`) need not be waited out.
            let ok = if n == self.me {
                let (applied, fenced) = self.applied_or_fenced(id, index, within).await;
                fenced || applied >= index
            } else {
                self.remote_wait_applied(n, TypeConfig::group_pb(id), index, within)
                    .await
                    .is_ok_and(|r| r.fenced || r.applied >= index)
            };
            (n, ok)
        });
        let unconfirmed: Vec<NodeId> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(|(n, ok)| (!ok).then_some(n))
            .collect();
        if !unconfirmed.is_empty() {
            // A small margin over the lease for the time between the replica
            // asking for its read index and the leader answering it.
            let until = committed + self.settings.read_lease + LEASE_MARGIN;
            tokio::time::sleep_until(until.into()).await;
        }
        unconfirmed
    }

    async fn remote_wait_applied(
        &self,
        to: NodeId,
        group: pb::GroupId,
        index: u64,
        within: Duration,
    ) -> Result<pb::WaitAppliedReply, tonic::Status> {
        let mut client = self.peers.client(to).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(pb::WaitAppliedRequest {
            group: Some(group),
            from: self.me,
            index,
            within_ms: within.as_millis() as u64,
        });
        let budget = within + Duration::from_millis(500);
        req.set_timeout(budget);
        let r = tokio::time::timeout(budget, client.wait_applied(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer in time"))??;
        Ok(r.into_inner())
    }

    /// Returns once this node's meta replica reflects every change committed
    /// before the call (a linearizable read of the cluster's metadata).
    pub async fn meta_barrier(&self) -> Result<Arc<MetaReplica>, ApiError> {
        let g = self
            .meta()
            .ok_or_else(|| ApiError::unavailable(format!("node {} runs no meta replica", self.me)))?;
        self.barrier_in(&g, ReadLevel::Linearizable).await?;
        Ok(g)
    }

    /// Returns once this node's audit replica reflects every record committed
    /// before the call.
    pub async fn audit_barrier(&self) -> Result<Arc<AuditReplica>, ApiError> {
        let g = self
            .audit()
            .ok_or_else(|| ApiError::precondition(format!("node {} holds no replica of its region's audit log", self.me)))?;
        self.barrier_in(&g, ReadLevel::Linearizable).await?;
        Ok(g)
    }

    async fn barrier_in<C: GroupConfig>(&self, g: &Replica<C>, level: ReadLevel) -> Result<(), ApiError> {
        let id = &g.id;
        let wait = self.settings.read_wait;
        let need = match level {
            ReadLevel::Any { min_index: 0 } => return Ok(()),
            ReadLevel::Any { min_index } => min_index,
            ReadLevel::Linearizable => self.leader_read_index(g).await.map_err(|e| match e {
                (Some(l), s) => ApiError::unavailable(format!(
                    "linearizable read of shard {id} failed: the leader did not confirm a read index ({}); {}",
                    s.message(),
                    self.leader_text(Some(l))
                )),
                (None, _) => ApiError::unavailable(format!(
                    "linearizable read of shard {id} failed: the group has no leader now; retry, or read with consistency any"
                )),
            })?,
        };
        let applied = g.raft().metrics().borrow().last_applied.map_or(0, |l| l.index);
        if applied >= need {
            return Ok(());
        }
        match g.raft().wait(Some(wait)).applied_index_at_least(Some(need), "read barrier").await {
            Ok(_) => Ok(()),
            Err(_) => {
                let applied = g.raft().metrics().borrow().last_applied.map_or(0, |l| l.index);
                Err(ApiError::unavailable(format!(
                    "the replica of shard {id} on node {} has applied index {applied}, below the {need} this read needs, after waiting {} ms; retry, or read with consistency linearizable",
                    self.me,
                    wait.as_millis()
                )))
            }
        }
    }

    /// A read index from `g`'s leader (this node or another), within the
    /// read wait. With no leader known (just after a start or an election) it
    /// waits for one. A leader that answers it does not lead or hold the group
    /// any more (a move took its replica away: the group has none until its
    /// others' election timeout) is followed by waiting for the next leader
    /// and asking it once; a leader that cannot be reached fails at once, so
    /// the coordinator tries another replica. The error names the leader
    /// asked last (`None`: none was known).
    async fn leader_read_index<C: GroupConfig>(&self, g: &Replica<C>) -> Result<u64, (Option<NodeId>, tonic::Status)> {
        let start = Instant::now();
        let left = |start: Instant| self.settings.read_wait.saturating_sub(start.elapsed());
        let next_leader = |not: Option<NodeId>| async move {
            g.raft()
                .wait(Some(left(start)))
                .metrics(|m| m.current_leader.is_some() && m.current_leader != not, "a read index: a leader")
                .await
                .ok()
                .and_then(|m| m.current_leader)
        };
        let ask = |l: NodeId| async move {
            if l == self.me {
                self.read_index_in(g).await
            } else {
                self.remote_read_index(l, C::group_pb(&g.id), left(start)).await
            }
        };
        let first = match g.leader() {
            Some(l) => l,
            None => next_leader(None).await.ok_or((None, tonic::Status::unavailable("no leader")))?,
        };
        match ask(first).await {
            Ok(i) => Ok(i),
            Err(s) if matches!(s.code(), tonic::Code::NotFound | tonic::Code::FailedPrecondition) => {
                let Some(next) = next_leader(Some(first)).await else {
                    return Err((Some(first), s));
                };
                ask(next).await.map_err(|s| (Some(next), s))
            }
            Err(s) => Err((Some(first), s)),
        }
    }

    async fn remote_read_index(&self, to: NodeId, group: pb::GroupId, within: Duration) -> Result<u64, tonic::Status> {
        let mut client = self.peers.client(to).map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(pb::ReadIndexRequest {
            group: Some(group),
            from: self.me,
        });
        req.set_timeout(within);
        let r = tokio::time::timeout(within, client.read_index(req))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no answer from the leader in time"))??;
        Ok(r.into_inner().index)
    }

    /// One pass of the watchdog: restarts groups whose Raft core has stopped
    /// (a fatal error, or openraft #2116's race on small machines) and removes
    /// replicas that a membership change took out of their group.
    pub async fn watchdog_pass(&self) {
        self.meta_watchdog_pass().await;
        if let Some(m) = self.meta() {
            m.release_elections();
        }
        if let Some(a) = self.audit() {
            a.release_elections();
        }
        for g in self.groups() {
            g.release_elections();
            let raft = g.raft();
            let mut rx = raft.metrics();
            let core_gone = rx.has_changed().is_err();
            let (fatal, membership) = {
                let mm = rx.borrow_and_update();
                (mm.running_state.clone().err(), mm.membership_config.clone())
            };
            if core_gone || fatal.is_some() {
                if self.group(&g.id).is_none() {
                    continue; // removed meanwhile: its stop was intended
                }
                tracing::error!(group = %g.id, fatal = ?fatal, "raft core stopped; restarting it");
                let _ = raft.shutdown().await;
                let sm = g.sm.clone();
                let reopened = tokio::task::spawn_blocking(move || sm.recover()).await;
                if !matches!(reopened, Ok(Ok(()))) {
                    tracing::error!(group = %g.id, "state machine could not be reopened; will retry");
                    continue;
                }
                if self.restart_core(&g).await {
                    metrics::counter!(m::WATCHDOG_RESTARTS, &m::group_labels(&g.id)).increment(1);
                }
                continue;
            }
            if self.names_me(membership.membership()) {
                g.member_seen.store(true, Ordering::Relaxed);
            } else if membership.log_id().is_some() && g.member_seen.load(Ordering::Relaxed) {
                tracing::info!(group = %g.id, "this replica is no longer a member; deleting it");
                if let Err(e) = self.remove_group(&g.id, true).await {
                    tracing::error!(group = %g.id, error = %e, "removing a departed replica failed");
                }
            }
        }
    }

    /// Whether `m` has this node as a voter or a learner.
    fn names_me(&self, m: &openraft::Membership<NodeId, openraft::EmptyNode>) -> bool {
        m.voter_ids().any(|v| v == self.me) || m.learner_ids().any(|v| v == self.me)
    }

    /// Replaces `g`'s stopped Raft core with a new one over the same storage.
    async fn restart_core<C: GroupConfig>(&self, g: &Replica<C>) -> bool {
        match self.new_raft::<C>(&g.id, &g.sm, &g.log).await {
            Ok(r) => {
                *g.raft.write() = r;
                g.restarts.fetch_add(1, Ordering::Relaxed);
                self.restarts.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(group = %g.id, error = %e, "raft core restart failed; will retry");
                false
            }
        }
    }

    /// The watchdog's pass over the meta and audit replicas: restarts a
    /// core that stopped (the audit state machine reloaded from disk first).
    async fn meta_watchdog_pass(&self) {
        if let Some(g) = self.meta()
            && self.core_stopped(&g, "meta").await
            && self.restart_core(&g).await
        {
            metrics::counter!(m::WATCHDOG_RESTARTS, "group" => "meta").increment(1);
        }
        if let Some(g) = self.audit()
            && self.core_stopped(&g, "audit").await
        {
            let sm = g.sm.clone();
            let reopened = tokio::task::spawn_blocking(move || sm.recover()).await;
            if matches!(reopened, Ok(Ok(()))) && self.restart_core(&g).await {
                metrics::counter!(m::WATCHDOG_RESTARTS, "group" => "audit").increment(1);
            }
        }
    }

    /// Whether `g`'s core has stopped (then shut down, for a restart).
    async fn core_stopped<C: GroupConfig>(&self, g: &Replica<C>, what: &str) -> bool {
        let raft = g.raft();
        let mut rx = raft.metrics();
        let core_gone = rx.has_changed().is_err();
        let fatal = rx.borrow_and_update().running_state.clone().err();
        if core_gone || fatal.is_some() {
            tracing::error!(group = what, fatal = ?fatal, "raft core stopped; restarting it");
            let _ = raft.shutdown().await;
            return true;
        }
        false
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Runs the watchdog until `stop` says so.
    pub async fn run_watchdog(self: Arc<Self>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            self.watchdog_pass().await;
        }
    }

    /// Sets the per-group gauges on the metrics recorder.
    pub fn export_metrics(&self) {
        for g in self.groups() {
            let labels = m::group_labels(&g.id);
            let raft = g.raft();
            let mm = raft.metrics().borrow().clone();
            metrics::gauge!(m::TERM, &labels).set(mm.current_term as f64);
            metrics::gauge!(m::LEADER, &labels).set(mm.current_leader.map_or(-1.0, |l| l as f64));
            metrics::gauge!(m::IS_LEADER, &labels).set(f64::from(u8::from(mm.current_leader == Some(self.me))));
            metrics::gauge!(m::COMMIT_INDEX, &labels).set(g.log.stats.committed.load(Ordering::Relaxed) as f64);
            metrics::gauge!(m::APPLIED_INDEX, &labels).set(mm.last_applied.map_or(0, |l| l.index) as f64);
            metrics::gauge!(m::LAST_LOG_INDEX, &labels).set(mm.last_log_index.unwrap_or(0) as f64);
            let s = &g.sm.stats;
            metrics::counter!(m::SNAPSHOTS_BUILT, &labels).absolute(s.snapshots_built.load(Ordering::Relaxed));
            metrics::counter!(m::SNAPSHOTS_INSTALLED, &labels).absolute(s.snapshots_installed.load(Ordering::Relaxed));
            metrics::counter!(m::SNAPSHOTS_REFUSED, &labels).absolute(s.snapshots_refused.load(Ordering::Relaxed));
            metrics::counter!(m::PURGES, &labels).absolute(g.log.stats.purges.load(Ordering::Relaxed));
        }
    }
}

/// `current_leader` of `m`, unless it names this replica while it does not lead.
fn credible_leader<N: openraft::Node>(m: &openraft::RaftMetrics<NodeId, N>) -> Option<NodeId> {
    match m.current_leader {
        Some(l) if l == m.id && m.state != openraft::ServerState::Leader => None,
        l => l,
    }
}
