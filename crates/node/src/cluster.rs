//! Membership: how a node joins the cluster, stays known, and keeps its view
//! of the metadata; and what the meta leader does for everyone.
//!
//! - **Announce and register** ([`membership_loop`]): on every start a node
//!   announces its cluster address to its `join` seeds (and to every meta node
//!   it knows), which learn it at once, then registers (`RegisterNode`) with its
//!   labels, roles and addresses. Until meta records its current incarnation it
//!   keeps trying; afterwards it heartbeats. So a node restarted on a new port
//!   is found again, even when every voter restarted (their announcements to
//!   one another let them elect before the new addresses are committed).
//! - **View** ([`view_loop`]): a meta-role node reads its own meta replica; any
//!   other node long-polls a meta node (`FetchMeta`). Every newer view is saved
//!   and wakes the reconcile loop ([`reconcile_loop`]).
//! - **Leader duties** ([`leader_loop`]): the meta leader marks nodes that missed
//!   heartbeats down, and keeps the voters (at most five, odd, spread over
//!   regions then zones; `sovra_meta::voters`) and learners (other meta-role
//!   nodes) of the meta group in line with the registered nodes. While the
//!   cluster's meta level is below its build's, it asks every node the level
//!   its build reads and raises the cluster's once all read it ([`level_loop`]).

use crate::state::NodeState;
use sovra_meta::{MetaCommand, MetaState, NodeRecord, NodeStatus, Roles};
use sovra_proto::raft as pb;
use sovra_raft::server::ClusterHandler;
use sovra_raft::{GroupConfig, MetaConfig, MetaGroupId, MetaResponse};
use sovra_types::ApiError;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This node as meta records it.
pub fn record(state: &NodeState, grpc: &str, cluster: &str) -> NodeRecord {
    let c = &state.config;
    NodeRecord {
        id: c.node_id,
        region: state.region.clone(),
        zone: c.zone.clone(),
        roles: Roles {
            meta: c.has_role("meta"),
            data: c.has_role("data"),
            coordinator: c.has_role("coordinator"),
        },
        cluster_addr: cluster.to_string(),
        public_addr: grpc.to_string(),
        status: NodeStatus::Up,
        last_heartbeat_ms: now_ms(),
        incarnation: state.incarnation,
    }
}

/// Whether this node's meta replica is part of a group that has a leader
/// (then writes and reads go through it; otherwise through another meta node).
fn local_meta(state: &NodeState) -> Option<Arc<sovra_raft::MetaReplica>> {
    state.host.meta().filter(|m| m.leader().is_some() && m.sm.last_applied() > 0)
}

/// Cluster addresses to reach a meta node at: meta-role nodes of the view
/// (other than this one), then the join seeds.
fn meta_addresses(state: &NodeState) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = state
        .view()
        .state
        .nodes
        .values()
        .filter(|n| n.roles.meta && n.id != state.config.node_id)
        .map(|n| (n.id, state.host.peers.book.get(n.id).unwrap_or_else(|| n.cluster_addr.clone())))
        .collect();
    // A seed at a known node's address is that node (so fault rules, and
    // the order above, see it by id); an unknown one is tried last.
    let book = state.host.peers.book.entries();
    for a in &state.config.join {
        let uri = sovra_raft::network::uri_of(a);
        match book.iter().find(|(_, b, _)| *b == uri) {
            Some((id, _, _)) if out.iter().any(|(o, _)| o == id) => {}
            Some((id, _, _)) => out.push((*id, a.clone())),
            None => out.push((0, a.clone())),
        }
    }
    out
}

/// Commits `cmd` in the meta group: through this node's meta replica when it
/// is in a group with a leader, else through the first meta node that takes it.
pub async fn meta_write(state: &NodeState, cmd: MetaCommand) -> Result<(u64, MetaResponse), ApiError> {
    if local_meta(state).is_some() {
        return state.host.meta_write(cmd).await;
    }
    let command = postcard::to_allocvec(&cmd).map_err(|e| ApiError::internal(e.to_string()))?;
    let within = state.host.settings.write_timeout;
    let mut why = Vec::new();
    for (id, addr) in meta_addresses(state) {
        let Ok(mut client) = state.host.peers.client_at(&addr, id) else {
            continue;
        };
        let mut req = tonic::Request::new(pb::ProposeRequest {
            group: Some(MetaConfig::group_pb(&MetaGroupId)),
            from: state.config.node_id,
            command: command.clone(),
        });
        req.set_timeout(within);
        match client.propose(req).await {
            Ok(r) => {
                let r = r.into_inner();
                let response: MetaResponse =
                    postcard::from_bytes(&r.response).map_err(|e| ApiError::internal(format!("meta answer does not decode: {e}")))?;
                return Ok((r.index, response));
            }
            Err(s) => why.push(format!("{addr}: {}", s.message())),
        }
    }
    Err(ApiError::unavailable(format!(
        "no meta node took the change ({}); the meta group may have no quorum, retry",
        if why.is_empty() { "none known".to_string() } else { why.join("; ") }
    )))
}

/// How often the meta leader asks nodes their meta level while the
/// cluster's is below its build's.
const LEVEL_ASK_EVERY: Duration = Duration::from_secs(3);

/// How far ahead of this node's clock an announced incarnation may be.
pub const MAX_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

/// The node's side of `Join` and `FetchMeta`.
pub struct Membership {
    pub state: Arc<NodeState>,
    /// This node's own advertised cluster address (answered to joiners).
    pub cluster_addr: String,
}

#[tonic::async_trait]
impl ClusterHandler for Membership {
    async fn join(&self, req: pb::JoinRequest) -> Result<pb::JoinReply, tonic::Status> {
        if req.from == 0 || req.cluster_addr.is_empty() || req.cluster_addr.len() > 256 {
            return Err(tonic::Status::invalid_argument(
                "join needs the sender's id (>= 1) and cluster address (at most 256 bytes)",
            ));
        }
        // An incarnation is a start time: one far in the future (a bad clock,
        // or a forged announcement) would pin an address no later run could
        // replace.
        if req.incarnation > now_ms() + MAX_CLOCK_SKEW_MS {
            return Err(tonic::Status::invalid_argument(format!(
                "incarnation {} is more than {} s ahead of this node's clock; check the sender's clock",
                req.incarnation,
                MAX_CLOCK_SKEW_MS / 1000
            )));
        }
        if req.from == self.state.config.node_id {
            return Err(tonic::Status::already_exists(format!(
                "node id {} is this node's own id: every node needs its own node_id",
                req.from
            )));
        }
        if self.state.host.peers.book.set_newer(req.from, &req.cluster_addr, req.incarnation) {
            tracing::info!(node = req.from, addr = %req.cluster_addr, "a node announced its address");
        }
        let mut addresses: Vec<pb::NodeAddress> = self
            .state
            .host
            .peers
            .book
            .entries()
            .into_iter()
            .map(|(id, addr, incarnation)| pb::NodeAddress {
                id,
                cluster_addr: addr,
                incarnation,
            })
            .collect();
        addresses.push(pb::NodeAddress {
            id: self.state.config.node_id,
            cluster_addr: self.cluster_addr.clone(),
            incarnation: self.state.incarnation,
        });
        Ok(pb::JoinReply {
            node: self.state.config.node_id,
            addresses,
            meta_level: self.state.meta_level(),
        })
    }

    async fn fetch_meta(&self, req: pb::FetchMetaRequest) -> Result<pb::FetchMetaReply, tonic::Status> {
        let m = self
            .state
            .host
            .meta()
            .filter(|m| m.sm.last_applied() > 0)
            .ok_or_else(|| tonic::Status::unavailable(format!("node {} holds no metadata yet", self.state.config.node_id)))?;
        let reads = req.meta_level.max(sovra_meta::state::BASE_LEVEL);
        let level = m.sm.read(|s| s.ext.level);
        if reads < level {
            return Err(tonic::Status::failed_precondition(format!(
                "the cluster's metadata is at meta level {level}; node {}'s build reads level {reads} only: run a build of this cluster's release or later on it",
                req.from
            )));
        }
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(10_000)));
        let mut rx = m.sm.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > req.after_index)).await;
        if req.confirm {
            // The asker renews its key lease on this answer: it must hold
            // every change committed before the call (a revoked key too).
            self.state
                .host
                .meta_barrier()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("metadata not confirmed with a quorum: {}", e.message)))?;
        }
        let index = m.sm.last_applied();
        let state =
            m.sm.read(sovra_raft::meta_sm::encode_state)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(pb::FetchMetaReply { index, state })
    }
}

/// Sleeps `d`; true if the node is stopping meanwhile (the loops' tick).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// Node `me`'s `Join` to the node at `addr` (node `to`; 0: known by
/// address only), and its answer.
async fn join(state: &NodeState, addr: &str, to: u64, me: &NodeRecord) -> Result<pb::JoinReply, String> {
    let mut client = state.host.peers.client_at(addr, to).map_err(|e| e.to_string())?;
    let mut req = tonic::Request::new(pb::JoinRequest {
        from: me.id,
        cluster_addr: me.cluster_addr.clone(),
        incarnation: me.incarnation,
    });
    req.set_timeout(Duration::from_secs(2));
    Ok(client.join(req).await.map_err(|s| s.message().to_string())?.into_inner())
}

/// Announces this node to `addr`, learning the addresses it answers.
async fn announce(state: &NodeState, addr: &str, me: &NodeRecord) -> Result<(), String> {
    let r = join(state, addr, 0, me).await?;
    for a in r.addresses {
        if a.id != me.id {
            state.host.peers.book.set_newer(a.id, &a.cluster_addr, a.incarnation);
        }
    }
    Ok(())
}

/// A fresh key secret: 256 bits from the thread's CSPRNG (ChaCha, seeded by
/// the OS), as 64 hex characters.
pub fn new_secret() -> String {
    (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// The id of the key the bootstrap node makes.
pub const FIRST_ADMIN_KEY_ID: &str = "admin1";

/// On the bootstrap node of a cluster with no API key yet: makes the first
/// admin key, records only its hash in meta, and prints it once on stdout.
async fn first_admin_key(state: &NodeState) {
    let secret = new_secret();
    let rec = sovra_meta::keys::ApiKeyRecord {
        id: FIRST_ADMIN_KEY_ID.into(),
        sha256: sovra_meta::keys::hash_secret(&secret),
        scopes: sovra_meta::keys::Scopes::all(),
        created_ms: now_ms(),
    };
    match meta_write(state, MetaCommand::AddApiKey(rec)).await {
        Ok((_, Ok(_))) => {
            let key = sovra_meta::keys::format_key(FIRST_ADMIN_KEY_ID, &secret);
            println!("sovra first admin key (shown once, only its hash is kept; store it now): {key}");
            *state.first_admin_key.lock() = Some(key);
        }
        // An earlier run made it: it was shown then.
        Ok((_, Err(_))) => {}
        Err(e) => tracing::debug!(error = %e.message, "first admin key not recorded yet; retrying"),
    }
}

/// The bootstrap node of a new cluster (its meta replica holds no node yet)
/// starts it at this build's meta level: nobody runs an older build in a
/// cluster that has no node. Until then it refuses other nodes'
/// registrations (`registrations_held`) and does not register itself (this
/// answers false), so no view that holds a node is below the level and a new
/// cluster takes rated keys as soon as it serves.
async fn first_level(state: &NodeState) -> bool {
    use std::sync::atomic::Ordering;
    if !state.host.registrations_held.load(Ordering::Acquire) {
        return true;
    }
    let Some(m) = state.host.meta() else { return false };
    let fresh = m.sm.read(|s| s.nodes.is_empty() && s.ext.level < state.meta_level());
    if fresh {
        match state.host.meta_write(MetaCommand::SetMetaLevel { level: state.meta_level() }).await {
            Ok(_) => tracing::info!(level = state.meta_level(), "a new cluster: meta level set"),
            Err(e) => {
                tracing::debug!(error = %e.message, "meta level not set yet; retrying");
                return false;
            }
        }
    }
    state.host.registrations_held.store(false, Ordering::Release);
    true
}

/// On the meta leader (registered as `me`), while the cluster's meta level
/// is below this build's ([`level_loop`] checks): asks every registered node
/// which level its build reads (its `Join` answer), and raises the level when
/// all of them read this build's. A node that does not answer (down, or
/// unreachable) holds it back, unless it is drained: it might run an older
/// build, which would stop at the first entry of the new level.
async fn raise_level(state: &NodeState, view: &MetaState, me: &NodeRecord, said: &mut String) {
    let want = state.meta_level();
    let mut behind = None;
    for n in view.nodes.values().filter(|n| n.id != me.id) {
        let level = join(state, &n.cluster_addr, n.id, me)
            .await
            .map(|r| r.meta_level.max(sovra_meta::state::BASE_LEVEL));
        match level {
            Ok(l) if l >= want => {}
            Ok(l) => {
                behind = Some(format!("node {} runs a build of meta level {l}", n.id));
                break;
            }
            // A drained node that does not answer holds nothing and is
            // gone: it does not hold the level back (an SRE drains a dead
            // node to let it rise). Should it come back on an older build,
            // it stops at what it cannot read, having nothing to lose.
            Err(_) if view.ops.drained.contains(&n.id) => {}
            Err(e) => {
                behind = Some(format!(
                    "node {} did not say its meta level ({e}); if it is gone for good, drain it",
                    n.id
                ));
                break;
            }
        }
    }
    match behind {
        Some(why) => {
            let text = format!("meta level stays at {} (this build reads {want}): {why}", view.ext.level);
            if *said != text {
                tracing::info!("{text}");
                *said = text;
            }
        }
        None => match state.host.meta_write(MetaCommand::SetMetaLevel { level: want }).await {
            Ok((_, Ok(_))) => tracing::info!(from = view.ext.level, to = want, "every node reads the next meta level: raised"),
            Ok((_, Err(e))) => tracing::warn!(error = %e, "raising the meta level was refused"),
            Err(e) => tracing::warn!(error = %e.message, "raising the meta level failed; will retry"),
        },
    }
}

/// On the meta leader, while the cluster's meta level is below this build's
/// (an upgrade's window): [`raise_level`] every few seconds. A loop of its
/// own, so a node that does not answer delays no other leader duty.
pub async fn level_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut said = String::new();
    loop {
        if stopped(&mut stop, LEVEL_ASK_EVERY).await {
            return;
        }
        let Some(m) = state.host.meta() else { continue };
        if m.leader() != Some(state.config.node_id) || m.sm.read(|s| s.ext.level) >= state.meta_level() {
            continue;
        }
        let view = m.sm.state();
        if let Some(me) = view.nodes.get(&state.config.node_id) {
            raise_level(&state, &view, me, &mut said).await;
        }
    }
}

/// Announce and register until meta records this incarnation; then heartbeat.
pub async fn membership_loop(state: Arc<NodeState>, grpc: String, cluster: String, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis(state.config.heartbeat_ms);
    loop {
        let me = record(&state, &grpc, &cluster);
        let known = state.view().state.nodes.get(&me.id).cloned();
        let registered = known
            .as_ref()
            .is_some_and(|k| k.incarnation == me.incarnation && k.cluster_addr == me.cluster_addr && k.public_addr == me.public_addr);
        if registered {
            if state.config.bootstrap && state.view().state.api_keys.is_empty() {
                first_admin_key(&state).await;
            }
            if let Err(e) = meta_write(
                &state,
                MetaCommand::Heartbeat {
                    node: me.id,
                    at_ms: now_ms(),
                },
            )
            .await
            {
                tracing::debug!(error = %e.message, "heartbeat not taken");
            }
            if stopped(&mut stop, every).await {
                return;
            }
            continue;
        }
        // Announce to everyone who might need the new address.
        let mut targets: BTreeSet<String> = state.config.join.iter().cloned().collect();
        for (id, a) in meta_addresses(&state) {
            if id != 0 {
                targets.insert(sovra_raft::network::host_of(&a).to_string());
            }
        }
        for t in &targets {
            if let Err(e) = announce(&state, t, &me).await {
                tracing::debug!(seed = %t, error = %e, "announce failed");
            }
        }
        if !first_level(&state).await {
            if stopped(&mut stop, Duration::from_millis(100)).await {
                return;
            }
            continue;
        }
        match meta_write(&state, MetaCommand::RegisterNode(me.clone())).await {
            Ok((index, Ok(_))) => {
                tracing::info!(node = me.id, index, "registered with the cluster");
                // Wait for the view to show it before heartbeating.
                let mut rx = state.view_changes();
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|i| *i >= index)).await;
            }
            Ok((_, Err(refused))) => {
                state.stop_with(format!("the cluster refused to register this node: {refused}"));
                return;
            }
            Err(e) => tracing::debug!(error = %e.message, "registration not taken yet; retrying"),
        }
        if stopped(&mut stop, Duration::from_millis(300)).await {
            return;
        }
    }
}

/// Keeps the node's view current: from its own meta replica when it has one
/// in a group, else by long-polling meta nodes.
pub async fn view_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Some(m) = state.host.meta().filter(|m| m.sm.last_applied() > 0) {
            let index = m.sm.last_applied();
            if index > state.view().index {
                if let Err(e) = state.offer_view(index, m.sm.state()).await {
                    state.stop_with(format!("saving the metadata view failed: {e}"));
                    return;
                }
                continue;
            }
            let mut rx = m.sm.subscribe();
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        }
        let after = state.view().index;
        let mut fetched = false;
        for (id, addr) in meta_addresses(&state) {
            let Ok(mut client) = state.host.peers.client_at(&addr, id) else {
                continue;
            };
            let mut req = tonic::Request::new(pb::FetchMetaRequest {
                from: state.config.node_id,
                after_index: after,
                wait_ms: 1000,
                confirm: false,
                meta_level: state.meta_level(),
            });
            req.set_timeout(Duration::from_secs(3));
            let Ok(r) = client.fetch_meta(req).await else { continue };
            let r = r.into_inner();
            if let Ok(s) = sovra_raft::meta_sm::decode_state::<MetaState>(&r.state) {
                fetched = true;
                if let Err(e) = state.offer_view(r.index, s).await {
                    state.stop_with(format!("saving the metadata view failed: {e}"));
                    return;
                }
                break;
            }
        }
        if stopped(&mut stop, Duration::from_millis(if fetched { 10 } else { 300 })).await {
            return;
        }
    }
}

/// The meta group's current state from the first meta node that answers
/// (for a node without a meta replica in the group).
pub async fn fetch_latest(state: &NodeState) -> Option<(u64, MetaState)> {
    fetch(state, false).await
}

/// As [`fetch_latest`], from a meta node that first confirmed a read index
/// with its group's quorum (renews the key lease).
pub async fn fetch_confirmed(state: &NodeState) -> Option<(u64, MetaState)> {
    fetch(state, true).await
}

async fn fetch(state: &NodeState, confirm: bool) -> Option<(u64, MetaState)> {
    for (id, addr) in meta_addresses(state) {
        let Ok(mut client) = state.host.peers.client_at(&addr, id) else {
            continue;
        };
        let mut req = tonic::Request::new(pb::FetchMetaRequest {
            from: state.config.node_id,
            after_index: 0,
            wait_ms: 0,
            confirm,
            meta_level: state.meta_level(),
        });
        req.set_timeout(Duration::from_secs(2));
        let Ok(r) = client.fetch_meta(req).await else { continue };
        let r = r.into_inner();
        if let Ok(s) = sovra_raft::meta_sm::decode_state::<MetaState>(&r.state) {
            return Some((r.index, s));
        }
    }
    None
}

/// Reconciles the node's replicas with every newer view (and every few
/// seconds, to retry what failed for a passing reason).
pub async fn reconcile_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let mut rx = state.view_changes();
    let mut last: Option<Arc<sovra_meta::View>> = None;
    loop {
        let changed = tokio::select! {
            _ = rx.changed() => true,
            _ = tokio::time::sleep(Duration::from_secs(2)) => false,
            _ = stop.wait_for(|s| *s) => return,
        };
        if !state.is_ready() {
            continue;
        }
        let view = state.view();
        // A heartbeat alone changes no replica: skip it (the timer still
        // reconciles every 2 s, to retry what failed for a passing reason).
        if changed && last.as_ref().is_some_and(|l| l.state.same_but_progress(&view.state)) {
            continue;
        }
        state.reconcile().await;
        last = Some(view);
    }
}

/// The meta leader's duties: nodes that missed heartbeats are marked down;
/// voters and learners follow the registered meta-role nodes.
pub async fn leader_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let down_after = state.config.down_after_ms;
    // The term this node leads in, and since when.
    let mut led_since: Option<(u64, std::time::Instant)> = None;
    loop {
        if stopped(&mut stop, Duration::from_millis(state.config.heartbeat_ms)).await {
            return;
        }
        let Some(m) = state.host.meta() else { continue };
        if m.leader() != Some(state.config.node_id) {
            led_since = None;
            continue;
        }
        // A new leader first gives every node a whole down_after to reach
        // it: heartbeats sent while the group had no leader were never
        // committed, so the recorded ones are old. Judged at once, a leader
        // elected after a few seconds without one marked every other node
        // down and shrank the voters to itself (found by chaos: meta went to
        // a single voter while all seven nodes ran).
        let term = m.raft().metrics().borrow().current_term;
        let since = match led_since {
            Some((t, at)) if t == term => at,
            _ => {
                let now = std::time::Instant::now();
                led_since = Some((term, now));
                now
            }
        };
        let settled = since.elapsed() >= Duration::from_millis(down_after);
        let view = m.sm.state();
        // Until the leader itself is registered, the view is missing a meta
        // node (this one): voters chosen from it could drop the only voter.
        if !view.nodes.contains_key(&state.config.node_id) {
            continue;
        }
        for id in view.overdue(now_ms(), down_after) {
            if id == state.config.node_id || !settled {
                continue;
            }
            tracing::warn!(node = id, "node missed its heartbeats; marking it down");
            let _ = state
                .host
                .meta_write(MetaCommand::SetNodeStatus {
                    node: id,
                    status: NodeStatus::Down,
                })
                .await;
        }
        // Drains and rebalances advance by a command every replica applies
        // alike; proposed only when it would change something (tried on a
        // copy, made only while one runs).
        let now = now_ms();
        let parents = view.ops.running().any(|j| j.as_move().is_none());
        if parents
            && view.clone().advance_ops(now)
            && let Err(e) = state.host.meta_write(MetaCommand::AdvanceOps { at_ms: now }).await
        {
            tracing::warn!(error = %e.message, "advancing operations jobs failed; will retry");
        }
        // The leader is up, whatever meta last recorded: a leader restarted
        // after being marked down chose voters without itself, committed the
        // change and left the group leaderless (found by chaos: kill the meta
        // leader). Its own heartbeat corrects the record soon after.
        let mut nodes = view.nodes.clone();
        if let Some(me) = nodes.get_mut(&state.config.node_id)
            && me.status == NodeStatus::Down
        {
            me.status = NodeStatus::Up;
        }
        let voters = sovra_meta::voters::choose_voters(nodes.values());
        // Never fewer than three voters where three meta nodes exist: with
        // most nodes down, keeping the old voters costs nothing (no change
        // commits without a majority of them anyway) and a lone voter would
        // hold the only copy of the metadata.
        let meta_nodes = nodes.values().filter(|n| n.roles.meta).count();
        if voters.is_empty() || (voters.len() < 3 && meta_nodes >= 3) {
            continue;
        }
        let learners: BTreeSet<u64> = nodes
            .values()
            .filter(|n| n.roles.meta && n.status != NodeStatus::Down && !voters.contains(&n.id))
            .map(|n| n.id)
            .collect();
        match state.host.meta_set_members(voters.clone(), learners).await {
            Ok(true) => tracing::info!(voters = ?voters, "meta group membership changed"),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e.message, "meta membership change did not complete; will retry"),
        }
    }
}

/// Renews the key lease: confirms the view with meta's quorum four times per
/// lease, so a healthy node never lets it lapse and a cut-off one does.
pub async fn lease_loop(state: Arc<NodeState>, mut stop: watch::Receiver<bool>) {
    let every = Duration::from_millis((state.config.key_lease_ms / 4).max(50));
    let mut changes = state.view_changes();
    tokio::select! {
        _ = changes.wait_for(|i| *i > 0) => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    loop {
        if !state.confirm_meta().await {
            tracing::debug!("metadata not confirmed with a quorum; the key lease is running down");
        }
        if stopped(&mut stop, every).await {
            return;
        }
    }
}
