//! The receiving side of `sovra.raft.v1.Raft`: finds the named group on this
//! node and hands the message to its Raft core (or to the host for forwarded
//! writes and read-index requests). Served only on the cluster listener, behind
//! the cluster secret ([`crate::auth`]); a group's messages are taken only from
//! a voter or learner of its current membership.

use crate::host::{AuditReplica, Group, MetaReplica, RaftHost, Replica};
use crate::snapshot;
use crate::types::{GroupConfig, NodeId};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest, VoteResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sovra_proto::raft as pb;
use sovra_proto::raft::raft_server::Raft as RaftRpc;
use sovra_types::{CollectionName, RegionId, ShardCommand, ShardId};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Longest a WaitApplied request may hold its handler.
const MAX_WAIT_APPLIED_MS: u64 = 10_000;

/// The node's side of membership: announcements from other nodes, and the
/// metadata a node without a meta replica asks for.
#[tonic::async_trait]
pub trait ClusterHandler: Send + Sync + 'static {
    async fn join(&self, req: pb::JoinRequest) -> Result<pb::JoinReply, Status>;
    async fn fetch_meta(&self, req: pb::FetchMetaRequest) -> Result<pb::FetchMetaReply, Status>;
}

pub struct RaftService {
    pub host: Arc<RaftHost>,
    pub cluster: Arc<dyn ClusterHandler>,
}

/// The node-to-node service as a cluster listener serves it: every request
/// must carry the cluster secret, and messages may be as large as Raft needs.
pub fn cluster_service(
    svc: RaftService,
    secret: crate::auth::ClusterSecret,
) -> tonic::service::interceptor::InterceptedService<pb::raft_server::RaftServer<RaftService>, crate::auth::RequireSecret> {
    let server = pb::raft_server::RaftServer::new(svc)
        .max_decoding_message_size(crate::network::MAX_RAFT_MESSAGE)
        .max_encoding_message_size(crate::network::MAX_RAFT_MESSAGE);
    tonic::service::interceptor::InterceptedService::new(server, crate::auth::RequireSecret(secret))
}

/// A message that names its sender.
trait Sent {
    fn from(&self) -> NodeId;
}

macro_rules! sent {
    ($($t:ty),*) => {
        $(impl Sent for $t {
            fn from(&self) -> NodeId {
                self.from
            }
        })*
    };
}
sent!(
    pb::RaftRequest,
    pb::ProposeRequest,
    pb::ReadIndexRequest,
    pb::WaitAppliedRequest,
    pb::JoinRequest,
    pb::FetchMetaRequest
);

impl RaftService {
    /// The message, once its sender is the node the connection's certificate
    /// names (over mutual TLS); every membership check after this is about
    /// a proven sender.
    fn proven_sender<T: Sent>(&self, req: Request<T>) -> Result<T, Status> {
        let certs = req.peer_certs();
        let r = req.into_inner();
        crate::tls::speaker_is(certs.as_deref().map(|c| c.as_slice()), r.from(), self.host.tls_on)?;
        Ok(r)
    }
}

/// The replica a message is for.
enum Target {
    Shard(Arc<Group>),
    Meta(Arc<MetaReplica>),
    Audit(Arc<AuditReplica>),
}

fn is_meta(g: &Option<pb::GroupId>) -> bool {
    g.as_ref().is_some_and(|g| g.kind == pb::GroupKind::Meta as i32)
}

fn is_audit(g: &Option<pb::GroupId>) -> bool {
    g.as_ref().is_some_and(|g| g.kind == pb::GroupKind::Audit as i32)
}

fn shard_of(g: Option<pb::GroupId>) -> Result<ShardId, Status> {
    let g = g.ok_or_else(|| Status::invalid_argument("group is required"))?;
    if g.kind != pb::GroupKind::Shard as i32 {
        return Err(Status::invalid_argument(format!("group kind {} is not a shard group", g.kind)));
    }
    Ok(ShardId {
        collection: CollectionName::parse(&g.collection).map_err(|e| Status::invalid_argument(e.message))?,
        region: RegionId::parse(&g.region).map_err(|e| Status::invalid_argument(e.message))?,
        number: g.shard,
    })
}

fn propose_reply<R: Serialize>(index: u64, response: &R) -> Result<Response<pb::ProposeReply>, Status> {
    Ok(Response::new(pb::ProposeReply {
        index,
        response: postcard::to_allocvec(response).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

impl RaftService {
    /// A meta write from another node: a member of the meta group proposes it
    /// here (it believes this node leads; never forwarded again, so no loops);
    /// any other cluster node (a data node registering or heart-beating) has it
    /// passed on to the leader.
    async fn propose_meta(
        &self,
        r: pb::ProposeRequest,
        certs: Option<&[tokio_rustls::rustls::pki_types::CertificateDer<'static>]>,
    ) -> Result<Response<pb::ProposeReply>, Status> {
        let m = self
            .host
            .meta()
            .ok_or_else(|| Status::not_found(format!("node {} runs no meta replica", self.host.me)))?;
        let cmd: sovra_meta::MetaCommand = decode(&r.command)?;
        // A node registers itself, in the region its certificate names (the
        // region its data is pinned to, R1): a valid certificate for one
        // region must not be able to put a record of another in meta. A
        // meta member may pass on another node's registration (forwarding).
        if let sovra_meta::MetaCommand::RegisterNode(n) = &cmd {
            if self.host.registrations_held.load(Ordering::Acquire) {
                return Err(Status::unavailable(format!(
                    "node {} is starting a new cluster and takes registrations in a moment: retry",
                    self.host.me
                )));
            }
            if n.id != r.from && !m.admits(r.from) {
                return Err(Status::permission_denied(format!(
                    "node {} may register only itself, not node {}",
                    r.from, n.id
                )));
            }
            if n.id == r.from {
                crate::tls::speaker_in(certs, n.id, n.region.as_str(), self.host.tls_on)?;
            }
        }
        let (index, response) = if m.admits(r.from) {
            self.host.propose_in(&m, cmd).await?
        } else {
            self.host.meta_write(cmd).await.map_err(|e| sovra_proto::status_of(&e))?
        };
        propose_reply(index, &response)
    }

    /// An audit batch from another node: a member proposes it here (never
    /// forwarded again); any other node (a coordinator whose call touched
    /// this region) has it passed on to the leader. Records hold no vector
    /// or subject id, so any cluster node may send them; only this region's
    /// nodes hold them.
    async fn propose_audit(&self, r: pb::ProposeRequest) -> Result<Response<pb::ProposeReply>, Status> {
        let a = self.audit_replica(r.group, "propose")?;
        let batch: crate::types::AuditBatch = decode(&r.command)?;
        let (index, response) = if a.admits(r.from) {
            self.host.propose_in(&a, batch).await?
        } else {
            self.host
                .audit_write(&self.host.region, batch, &[])
                .await
                .map_err(|e| sovra_proto::status_of(&e))?
        };
        propose_reply(index, &response)
    }

    /// This node's audit replica, when `g` names its region's audit group;
    /// another region's is refused (R2: its records stay in their region).
    fn audit_replica(&self, g: Option<pb::GroupId>, rpc: &'static str) -> Result<Arc<AuditReplica>, Status> {
        let region = g.map(|g| g.region).unwrap_or_default();
        if region != self.host.region.as_str() {
            self.host.residency_refused.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::RESIDENCY_REFUSED, "node" => self.host.me.to_string(), "rpc" => rpc).increment(1);
            return Err(Status::permission_denied(format!(
                "R2: node {} is in region {}; the audit group of region {region:?} is not held here",
                self.host.me, self.host.region
            )));
        }
        self.host
            .audit()
            .ok_or_else(|| Status::not_found(format!("node {} holds no replica of audit/{region} (yet)", self.host.me)))
    }
}

fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    postcard::from_bytes(b).map_err(|e| Status::invalid_argument(format!("payload does not decode: {e}")))
}

fn reply<T: Serialize>(v: &T) -> Result<Response<pb::RaftReply>, Status> {
    Ok(Response::new(pb::RaftReply {
        payload: postcard::to_allocvec(v).map_err(|e| Status::internal(e.to_string()))?,
    }))
}

fn check_member<C: GroupConfig>(r: &Replica<C>, from: NodeId) -> Result<(), Status> {
    if r.admits(from) {
        return Ok(());
    }
    Err(not_member(r, from))
}

fn not_member<C: GroupConfig>(r: &Replica<C>, from: NodeId) -> Status {
    metrics::counter!(crate::metrics::NOT_MEMBER).increment(1);
    Status::permission_denied(format!("node {from} is not a voter or learner of group {}", r.id))
}

/// This replica's vote, when it is above `theirs`: a node removed from the
/// group while it was cut off may still believe it leads, or keep standing
/// for election. Told of the higher vote it steps down (and can then ask a
/// member to take it back), while nothing it sends is taken.
fn higher_vote<C: GroupConfig>(r: &Replica<C>, theirs: &openraft::Vote<NodeId>) -> Option<openraft::Vote<NodeId>> {
    let mine = r.raft().metrics().borrow().vote;
    (mine > *theirs).then_some(mine)
}

async fn append<C: GroupConfig>(r: &Replica<C>, from: NodeId, payload: &[u8]) -> Result<Response<pb::RaftReply>, Status> {
    if !r.admits(from) {
        let theirs = decode::<AppendEntriesRequest<C>>(payload).ok();
        let Some(msg) = theirs else {
            return Err(not_member(r, from));
        };
        if let Some(v) = higher_vote(r, &msg.vote) {
            return reply(&Ok::<_, RaftError<NodeId>>(AppendEntriesResponse::<NodeId>::HigherVote(v)));
        }
        // A leader elected under a later vote than this replica has seen is
        // taken, as Raft takes it, though this replica's (older) membership
        // lacks it: the membership that made it a voter is in the entries it
        // brings. Refusing it left lagging replicas unable ever to learn a
        // change that added the new leader (found by chaos: a meta group
        // stuck with every follower refusing its leader).
        let mine = r.raft().metrics().borrow().vote;
        if !(msg.vote.is_committed() && msg.vote > mine) {
            return Err(not_member(r, from));
        }
        return reply(&r.raft().append_entries(msg).await);
    }
    let msg: AppendEntriesRequest<C> = decode(payload)?;
    let mine = r.raft().metrics().borrow().vote;
    if msg.vote.is_committed() && !mine.is_committed() && mine > msg.vote {
        // A live leader, and this replica a candidate in a later term: it
        // is answered "higher vote" (Raft), and stands no more until it
        // follows a leader.
        r.hold_elections();
    }
    let answer = r.raft().append_entries(msg).await;
    r.release_elections();
    reply(&answer)
}

async fn vote<C: GroupConfig>(r: &Replica<C>, from: NodeId, payload: &[u8]) -> Result<Response<pb::RaftReply>, Status> {
    if !r.admits(from) {
        let theirs = decode::<VoteRequest<NodeId>>(payload).ok();
        return match theirs.and_then(|m| higher_vote(r, &m.vote)) {
            Some(vote) => reply(&Ok::<_, RaftError<NodeId>>(VoteResponse {
                vote,
                vote_granted: false,
                last_log_id: None,
            })),
            None => Err(not_member(r, from)),
        };
    }
    let msg: VoteRequest<NodeId> = decode(payload)?;
    reply(&r.raft().vote(msg).await)
}

async fn install<C: GroupConfig>(r: &Replica<C>, msg: InstallSnapshotRequest<C>) -> Result<Response<pb::RaftReply>, Status> {
    reply(&r.raft().install_snapshot(msg).await)
}

impl RaftService {
    /// The replica `g` names on this node, once `from` is known to be one of
    /// its group's members.
    fn target(&self, g: Option<pb::GroupId>, from: NodeId, rpc: &'static str) -> Result<Target, Status> {
        let t = self.any_target(g, rpc)?;
        match &t {
            Target::Meta(m) => check_member(m, from)?,
            Target::Shard(s) => check_member(s, from)?,
            Target::Audit(a) => check_member(a, from)?,
        }
        Ok(t)
    }

    /// The replica `g` names on this node, whoever asks (the caller checks
    /// membership itself).
    fn any_target(&self, g: Option<pb::GroupId>, rpc: &'static str) -> Result<Target, Status> {
        if is_meta(&g) {
            let m = self
                .host
                .meta()
                .ok_or_else(|| Status::not_found(format!("node {} runs no meta replica", self.host.me)))?;
            return Ok(Target::Meta(m));
        }
        if is_audit(&g) {
            return Ok(Target::Audit(self.audit_replica(g, rpc)?));
        }
        Ok(Target::Shard(self.shard_group(g, rpc)?))
    }

    fn shard_group(&self, g: Option<pb::GroupId>, rpc: &'static str) -> Result<Arc<Group>, Status> {
        let id = shard_of(g)?;
        self.host.check_residency(&id, rpc)?;
        self.host
            .group(&id)
            .ok_or_else(|| Status::not_found(format!("node {} holds no replica of {id} (yet)", self.host.me)))
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let r = self.proven_sender(req)?;
        match self.any_target(r.group, "append_entries")? {
            Target::Shard(g) => append(&g, r.from, &r.payload).await,
            Target::Meta(m) => append(&m, r.from, &r.payload).await,
            Target::Audit(a) => append(&a, r.from, &r.payload).await,
        }
    }

    async fn vote(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let r = self.proven_sender(req)?;
        match self.any_target(r.group, "vote")? {
            Target::Shard(g) => vote(&g, r.from, &r.payload).await,
            Target::Meta(m) => vote(&m, r.from, &r.payload).await,
            Target::Audit(a) => vote(&a, r.from, &r.payload).await,
        }
    }

    async fn install_snapshot(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let r = self.proven_sender(req)?;
        let g = match self.target(r.group, r.from, "install_snapshot")? {
            Target::Meta(m) => return install(&m, decode(&r.payload)?).await,
            Target::Audit(a) => return install(&a, decode(&r.payload)?).await,
            Target::Shard(g) => g,
        };
        let msg: InstallSnapshotRequest<crate::types::TypeConfig> = decode(&r.payload)?;
        // The first chunk carries the header: refuse another region's or
        // another shard's data before a byte of it is written here (R2).
        if msg.offset == 0 {
            let mut cur = std::io::Cursor::new(&msg.data[..]);
            let checked = snapshot::parse_header(&mut cur)
                .map_err(|e| e.to_string())
                .and_then(|h| snapshot::check_header(&h, &g.id, &self.host.region).map_err(|e| e.to_string()));
            if let Err(e) = checked {
                g.sm.stats.snapshots_refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(group = %g.id, from = r.from, error = %e, "snapshot refused");
                return Err(Status::failed_precondition(format!("snapshot refused: {e}")));
            }
        }
        install(&g, msg).await
    }

    async fn propose(&self, req: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeReply>, Status> {
        let certs = req.peer_certs();
        let r = self.proven_sender(req)?;
        if is_meta(&r.group) {
            return self.propose_meta(r, certs.as_deref().map(|c| c.as_slice())).await;
        }
        if is_audit(&r.group) {
            return self.propose_audit(r).await;
        }
        let id = shard_of(r.group)?;
        self.host.check_residency(&id, "propose")?;
        let g = self
            .host
            .group(&id)
            .ok_or_else(|| Status::not_found(format!("node {} holds no replica of {id} (yet)", self.host.me)))?;
        let cmd: ShardCommand = decode(&r.command)?;
        let (index, response) = if g.admits(r.from) {
            // From a replica that believes we lead: propose here or fail, so
            // forwarding never loops between members.
            self.host.propose_local(&g.id, cmd).await?
        } else if self.host.is_region_node(r.from) {
            // From a node of the region without a replica: pass it on to the leader.
            self.host
                .write_committed(&g.id, cmd)
                .await
                .map_err(|e| sovra_proto::status_of(&e))?
        } else {
            return Err(Status::permission_denied(format!(
                "node {} may not write to group {id}: it is not a node of region {}",
                r.from, self.host.region
            )));
        };
        propose_reply(index, &response)
    }

    async fn read_index(&self, req: Request<pb::ReadIndexRequest>) -> Result<Response<pb::ReadIndexReply>, Status> {
        let r = self.proven_sender(req)?;
        let index = match self.target(r.group, r.from, "read_index")? {
            Target::Shard(g) => self.host.read_index_in(&g).await?,
            Target::Meta(m) => self.host.read_index_in(&m).await?,
            Target::Audit(a) => self.host.read_index_in(&a).await?,
        };
        Ok(Response::new(pb::ReadIndexReply { index }))
    }

    async fn wait_applied(&self, req: Request<pb::WaitAppliedRequest>) -> Result<Response<pb::WaitAppliedReply>, Status> {
        let r = self.proven_sender(req)?;
        let within = Duration::from_millis(r.within_ms.min(MAX_WAIT_APPLIED_MS));
        let (applied, fenced) = if is_meta(&r.group) || is_audit(&r.group) {
            match self.target(r.group, r.from, "wait_applied")? {
                Target::Meta(m) => (self.host.wait_applied_in(&m, r.index, within).await, false),
                Target::Audit(a) => (self.host.wait_applied_in(&a, r.index, within).await, false),
                Target::Shard(_) => unreachable!("a meta or audit group id names that replica"),
            }
        } else {
            let id = shard_of(r.group.clone())?;
            self.host.check_residency(&id, "wait_applied")?;
            if let Some(g) = self.host.group(&id) {
                check_member(&g, r.from)?;
            }
            self.host.applied_or_fenced(&id, r.index, within).await
        };
        Ok(Response::new(pb::WaitAppliedReply { applied, fenced }))
    }

    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        Ok(Response::new(self.cluster.join(self.proven_sender(req)?).await?))
    }

    async fn fetch_meta(&self, req: Request<pb::FetchMetaRequest>) -> Result<Response<pb::FetchMetaReply>, Status> {
        Ok(Response::new(self.cluster.fetch_meta(self.proven_sender(req)?).await?))
    }
}
