//! The Raft type configurations, one per group kind (a shard group, the meta
//! group), the [`GroupConfig`] trait the shared machinery (log store, network,
//! host) is generic over, and the error helpers of the storage code.

use crate::snapshot::SnapshotFile;
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{AnyError, EmptyNode, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use sovra_meta::{Applied, MetaCommand, Refused};
use sovra_proto::raft as pb;
use sovra_types::{RegionId, ShardCommand, ShardId};
use std::fmt::{Debug, Display};
use std::future::Future;

/// What applying one client batch did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardResponse {
    pub changed: u64,
    /// Set when the entry was invalid against the shard and refused on apply
    /// (recorded in the shard's state; nothing else changed).
    pub rejected: Option<String>,
}

openraft::declare_raft_types!(
    /// One shard group: entries carry a validated client batch; nodes are known
    /// only by id (the address book resolves them).
    pub TypeConfig:
        D = ShardCommand,
        R = ShardResponse,
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// What applying a meta command did: applied, or refused whole by the state
/// machine (R1 among the reasons), identically on every replica.
pub type MetaResponse = Result<Applied, Refused>;

openraft::declare_raft_types!(
    /// The meta group: entries carry a [`MetaCommand`]; never vectors,
    /// payloads or subject ids.
    pub MetaConfig:
        D = MetaCommand,
        R = MetaResponse,
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<MetaConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A group-committed batch of audit records: one Raft entry, so one fsync
/// and one round for every call whose record it carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditBatch {
    pub records: Vec<sovra_audit::Record>,
}

/// Where a batch's records landed in the log: the first one's sequence
/// number, and the log's size after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditAppended {
    pub first_seq: u64,
    pub size: u64,
}

openraft::declare_raft_types!(
    /// A region's audit group: entries carry [`AuditBatch`]es; records hold
    /// no vector and no subject id.
    pub AuditConfig:
        D = AuditBatch,
        R = AuditAppended,
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<AuditConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A region's audit group: one per region, on nodes of that region only.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditGroupId(pub RegionId);

impl Display for AuditGroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "audit/{}", self.0)
    }
}

/// The meta group's id: there is one per cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MetaGroupId;

impl Display for MetaGroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("meta")
    }
}

pub type WriteResult<C> = Result<ClientWriteResponse<C>, RaftError<u64, ClientWriteError<u64, EmptyNode>>>;

/// A kind of group the shared Raft machinery runs: its type configuration,
/// how its id is named on the wire, and its state machine.
pub trait GroupConfig:
    openraft::RaftTypeConfig<
        NodeId = u64,
        Node = EmptyNode,
        Entry = openraft::Entry<Self>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
    >
{
    /// The group's id ([`ShardId`], [`MetaGroupId`]).
    type Id: Clone + Debug + Display + PartialEq + Send + Sync + 'static;
    /// The state machine a replica of this kind runs.
    type Sm: openraft::storage::RaftStateMachine<Self> + Clone + Send + Sync + 'static;

    fn group_pb(id: &Self::Id) -> pb::GroupId;

    /// Proposes `d` on `raft` (openraft's `client_write`, named once per kind
    /// so the shared code need not spell out its responder bounds).
    fn write(raft: &openraft::Raft<Self>, d: Self::D) -> impl Future<Output = WriteResult<Self>> + Send;

    /// Whether a replica that has appended `d` must apply it before it
    /// answers another `any` read (an erasure: E1).
    fn fences_reads(_d: &Self::D) -> bool {
        false
    }
}

impl GroupConfig for TypeConfig {
    type Id = ShardId;
    type Sm = crate::state_machine::ShardStateMachine;

    fn group_pb(id: &ShardId) -> pb::GroupId {
        pb::GroupId {
            collection: id.collection.to_string(),
            region: id.region.to_string(),
            shard: id.number,
            kind: pb::GroupKind::Shard as i32,
        }
    }

    async fn write(raft: &openraft::Raft<Self>, d: ShardCommand) -> WriteResult<Self> {
        raft.client_write(d).await
    }

    fn fences_reads(d: &ShardCommand) -> bool {
        matches!(d, ShardCommand::Erase(_))
    }
}

impl GroupConfig for MetaConfig {
    type Id = MetaGroupId;
    type Sm = crate::meta_sm::MetaStateMachine;

    fn group_pb(_: &MetaGroupId) -> pb::GroupId {
        pb::GroupId {
            kind: pb::GroupKind::Meta as i32,
            ..Default::default()
        }
    }

    async fn write(raft: &openraft::Raft<Self>, d: MetaCommand) -> WriteResult<Self> {
        raft.client_write(d).await
    }
}

impl GroupConfig for AuditConfig {
    type Id = AuditGroupId;
    type Sm = crate::audit_sm::AuditStateMachine;

    fn group_pb(id: &AuditGroupId) -> pb::GroupId {
        pb::GroupId {
            region: id.0.to_string(),
            kind: pb::GroupKind::Audit as i32,
            ..Default::default()
        }
    }

    async fn write(raft: &openraft::Raft<Self>, d: AuditBatch) -> WriteResult<Self> {
        raft.client_write(d).await
    }
}

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type MetaRaft = openraft::Raft<MetaConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, EmptyNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, EmptyNode>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type StorageErr = StorageError<NodeId>;

pub(crate) fn io_err(e: impl std::error::Error + 'static, f: fn(AnyError) -> StorageIOError<NodeId>) -> StorageErr {
    StorageErr::IO {
        source: f(AnyError::new(&e)),
    }
}
