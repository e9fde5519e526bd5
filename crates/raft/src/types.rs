//! The Raft type configuration of a shard group and the error helpers shared by
//! the storage and network code.

use crate::snapshot::SnapshotFile;
use openraft::{AnyError, EmptyNode, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use sovra_types::ShardCommand;

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

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
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
