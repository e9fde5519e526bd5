//! The sending side of node-to-node traffic: an address book (node id -> gRPC
//! address), one pooled channel per peer shared by every group, and openraft's
//! `RaftNetwork` over the `sovra.raft.v1.Raft` service.
//!
//! Every call has a deadline (openraft's TTL for Raft messages, the caller's for
//! the rest). An AppendEntries that would not fit [`MAX_APPEND_BYTES`] is sent
//! back to openraft as `PayloadTooLarge` with how many entries do fit, so it
//! resends fewer: one message never exceeds the receiver's limit.

use crate::auth::{AttachSecret, ClusterSecret};
use crate::fault::{FaultLayer, FaultService, Faults};
use crate::types::{GroupConfig, NodeId};
use openraft::EmptyNode;
use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sovra_proto::raft as pb;
use sovra_proto::raft::raft_client::RaftClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Largest message a node accepts on the Raft service.
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;
/// Default bound on one AppendEntries payload. openraft 0.9 gives one
/// AppendEntries the heartbeat interval (150 ms) to be sent, appended (with
/// its fsync) and answered, and sends one that timed out again unchanged: a
/// catch-up message of 16 MiB never made it on two loaded cores, and the
/// follower never caught up (`sovra bench move` at 100k points; the cluster
/// test of a long log of large batches). 1 MiB takes a few milliseconds on
/// loopback; a single larger entry (a client batch is at most 8 MiB) is
/// still sent alone.
pub const MAX_APPEND_BYTES: usize = 1 << 20;

/// Node ids to addresses. Static config or a test harness fills it now, the
/// meta group later; a node restarted on a new port is found again as soon as
/// its entry is updated.
#[derive(Clone, Default)]
pub struct AddressBook(Arc<RwLock<HashMap<NodeId, (String, u64)>>>);

/// `addr` as a URI: `host:port` or a full `http://` URI.
/// `addr` without its scheme (`http://` or `https://`), if it has one.
pub fn host_of(addr: &str) -> &str {
    addr.strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr)
}

pub fn uri_of(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl AddressBook {
    /// Sets `id`'s address whatever was known.
    pub fn set(&self, id: NodeId, addr: &str) {
        self.0.write().insert(id, (uri_of(addr), u64::MAX));
    }

    /// Sets `id`'s address heard from its run `incarnation`, unless an address
    /// of a later run is known: an announcement from a restarted node is not
    /// undone by older metadata still naming its previous port. Answers
    /// whether it changed.
    pub fn set_newer(&self, id: NodeId, addr: &str, incarnation: u64) -> bool {
        let uri = uri_of(addr);
        let mut book = self.0.write();
        match book.get(&id) {
            Some((a, inc)) if *inc > incarnation || (*inc == incarnation && *a == uri) => false,
            _ => {
                book.insert(id, (uri, incarnation));
                true
            }
        }
    }

    pub fn get(&self, id: NodeId) -> Option<String> {
        self.0.read().get(&id).map(|(a, _)| a.clone())
    }

    /// Every known address with the incarnation it was heard from.
    pub fn entries(&self) -> Vec<(NodeId, String, u64)> {
        let mut v: Vec<_> = self.0.read().iter().map(|(id, (a, inc))| (*id, a.clone(), *inc)).collect();
        v.sort();
        v
    }

    pub fn ids(&self) -> Vec<NodeId> {
        let mut v: Vec<_> = self.0.read().keys().copied().collect();
        v.sort();
        v
    }
}

pub type PeerService = InterceptedService<FaultService<Channel>, AttachSecret>;
pub type PeerClient = RaftClient<PeerService>;

/// The connections of one node to its peers.
#[derive(Clone)]
pub struct Peers {
    pub me: NodeId,
    pub book: AddressBook,
    pub faults: Faults,
    pub max_append_bytes: usize,
    /// Proves to peers that this node is a member of the cluster.
    secret: ClusterSecret,
    /// AppendEntries sent back to openraft to be cut smaller (for metrics and tests).
    pub append_splits: Arc<std::sync::atomic::AtomicU64>,
    /// Mutual TLS to peers (None: plaintext, `tls = false`).
    tls: Option<Arc<crate::tls::TlsState>>,
    /// One channel per peer, with the address and TLS generation it was made for.
    channels: Arc<Mutex<HashMap<NodeId, Pooled>>>,
}

/// A peer's channel: (address, TLS generation, channel).
type Pooled = (String, u64, Channel);

#[derive(Debug, thiserror::Error)]
#[error("node {0} has no known address")]
pub struct NoAddress(pub NodeId);

impl Peers {
    pub fn new(me: NodeId, book: AddressBook, faults: Faults, max_append_bytes: usize, secret: ClusterSecret) -> Self {
        Self {
            me,
            book,
            faults,
            max_append_bytes,
            secret,
            append_splits: Arc::default(),
            tls: None,
            channels: Arc::default(),
        }
    }

    /// Speaks to peers over mutual TLS with this node's certificate.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::TlsState>>) -> Self {
        self.tls = tls;
        self
    }

    /// An endpoint for `addr`, over TLS expecting the certificate to name
    /// `expect` when TLS is on.
    fn endpoint(&self, addr: &str, expect: &str, to: NodeId) -> Result<Endpoint, NoAddress> {
        let Some(tls) = &self.tls else {
            return Endpoint::from_shared(uri_of(addr)).map_err(|_| NoAddress(to));
        };
        Endpoint::from_shared(format!("https://{}", host_of(addr)))
            .and_then(|e| e.tls_config(tls.client_tls(expect)))
            .map_err(|_| NoAddress(to))
    }

    /// A client for whatever node listens at `addr` (a join seed, known by
    /// address only); `to` names it for fault rules (0: unknown).
    pub fn client_at(&self, addr: &str, to: NodeId) -> Result<PeerClient, NoAddress> {
        let expect = if to == 0 {
            crate::tls::CLUSTER_NAME.to_string()
        } else {
            crate::tls::node_name(to)
        };
        let c = self
            .endpoint(addr, &expect, to)?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(self.wrap(c, to))
    }

    /// A client for `to` over the one channel kept per peer (HTTP/2 multiplexes
    /// every group's calls on it). A changed address gets a new channel.
    pub fn client(&self, to: NodeId) -> Result<PeerClient, NoAddress> {
        Ok(self.wrap(self.channel(to)?, to))
    }

    /// The channel to `to` with the fault rules and the cluster secret on it,
    /// for other node-to-node services (the coordinators' `Leaf` calls).
    pub fn service(&self, to: NodeId) -> Result<PeerService, NoAddress> {
        let svc = tower::ServiceBuilder::new()
            .layer(FaultLayer {
                faults: self.faults.clone(),
                from: self.me,
                to,
            })
            .service(self.channel(to)?);
        Ok(InterceptedService::new(svc, AttachSecret(self.secret.clone())))
    }

    fn channel(&self, to: NodeId) -> Result<Channel, NoAddress> {
        let addr = self.book.get(to).ok_or(NoAddress(to))?;
        // A rotated certificate or CA makes every channel again.
        let generation = self.tls.as_ref().map_or(0, |t| t.generation());
        let channel = {
            let mut ch = self.channels.lock();
            match ch.get(&to) {
                Some((a, g, c)) if *a == addr && *g == generation => c.clone(),
                _ => {
                    let c = self
                        .endpoint(&addr, &crate::tls::node_name(to), to)?
                        .connect_timeout(Duration::from_millis(500))
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(5))
                        .keep_alive_timeout(Duration::from_secs(5))
                        .connect_lazy();
                    ch.insert(to, (addr, generation, c.clone()));
                    c
                }
            }
        };
        Ok(channel)
    }

    fn wrap(&self, channel: Channel, to: NodeId) -> PeerClient {
        let svc = tower::ServiceBuilder::new()
            .layer(FaultLayer {
                faults: self.faults.clone(),
                from: self.me,
                to,
            })
            .service(channel);
        RaftClient::with_interceptor(svc, AttachSecret(self.secret.clone()))
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE)
    }
}

/// openraft's factory for one group of kind `C`: clients name the group in
/// every message.
pub struct GroupNetwork<C> {
    pub group: pb::GroupId,
    pub peers: Peers,
    pub _kind: std::marker::PhantomData<fn() -> C>,
}

impl<C: GroupConfig> GroupNetwork<C> {
    pub fn new(id: &C::Id, peers: Peers) -> Self {
        Self {
            group: C::group_pb(id),
            peers,
            _kind: std::marker::PhantomData,
        }
    }
}

impl<C: GroupConfig> RaftNetworkFactory<C> for GroupNetwork<C> {
    type Network = GroupClient<C>;

    async fn new_client(&mut self, target: NodeId, _node: &EmptyNode) -> Self::Network {
        GroupClient {
            target,
            group: self.group.clone(),
            peers: self.peers.clone(),
            _kind: std::marker::PhantomData,
        }
    }
}

pub struct GroupClient<C> {
    target: NodeId,
    group: pb::GroupId,
    peers: Peers,
    _kind: std::marker::PhantomData<fn() -> C>,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, EmptyNode, RaftError<NodeId, E>>;

fn encode<T: Serialize, E: std::error::Error>(v: &T) -> Result<Vec<u8>, RPCError<NodeId, EmptyNode, E>> {
    postcard::to_allocvec(v).map_err(|e| RPCError::Network(NetworkError::new(&e)))
}

fn status_to_rpc<E: std::error::Error>(s: tonic::Status) -> RPCError<NodeId, EmptyNode, E> {
    // Anything but a clean answer means "not now": openraft backs off and retries.
    RPCError::Unreachable(Unreachable::new(&s))
}

impl<C: GroupConfig> GroupClient<C> {
    async fn call<Req, Resp, E>(
        &self,
        method: fn(PeerClient, tonic::Request<pb::RaftRequest>) -> RaftCall,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, EmptyNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = encode(req)?;
        self.send(method, payload, ttl).await
    }

    async fn send<Resp, E>(
        &self,
        method: fn(PeerClient, tonic::Request<pb::RaftRequest>) -> RaftCall,
        payload: Vec<u8>,
        ttl: Duration,
    ) -> Result<Resp, RPCError<NodeId, EmptyNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self
            .peers
            .client(self.target)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut req = tonic::Request::new(pb::RaftRequest {
            group: Some(self.group.clone()),
            from: self.peers.me,
            payload,
        });
        req.set_timeout(ttl);
        let started = Instant::now();
        let reply = match tokio::time::timeout(ttl, method(client, req)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(status_to_rpc(s)),
            Err(_) => {
                return Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no reply from node {} within {ttl:?}", self.target),
                ))));
            }
        };
        metrics::histogram!(crate::metrics::RPC_SECONDS).record(started.elapsed().as_secs_f64());
        let r: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

pub type RaftCall = Pin<Box<dyn Future<Output = Result<tonic::Response<pb::RaftReply>, tonic::Status>> + Send>>;
use std::future::Future;
use std::pin::Pin;

fn append_call(mut c: PeerClient, r: tonic::Request<pb::RaftRequest>) -> RaftCall {
    Box::pin(async move { c.append_entries(r).await })
}
fn vote_call(mut c: PeerClient, r: tonic::Request<pb::RaftRequest>) -> RaftCall {
    Box::pin(async move { c.vote(r).await })
}
fn snapshot_call(mut c: PeerClient, r: tonic::Request<pb::RaftRequest>) -> RaftCall {
    Box::pin(async move { c.install_snapshot(r).await })
}

impl<C: GroupConfig> RaftNetwork<C> for GroupClient<C> {
    async fn append_entries(&mut self, rpc: AppendEntriesRequest<C>, option: RPCOption) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        let payload = encode(&rpc)?;
        let max = self.peers.max_append_bytes;
        if payload.len() > max && rpc.entries.len() > 1 {
            // Count how many leading entries fit; always at least one.
            let mut size = payload.len()
                - rpc
                    .entries
                    .iter()
                    .map(|e| postcard::to_allocvec(e).map_or(0, |b| b.len()))
                    .sum::<usize>();
            let mut fit = 0u64;
            for e in &rpc.entries {
                size += postcard::to_allocvec(e).map_or(0, |b| b.len());
                if size > max && fit > 0 {
                    break;
                }
                fit += 1;
            }
            self.peers.append_splits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        self.send(append_call, payload, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(snapshot_call, &rpc, option.hard_ttl()).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.call(vote_call, &rpc, option.hard_ttl()).await
    }
}
