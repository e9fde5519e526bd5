//! Replication: one Raft machinery (log store, network, host) generic over a
//! group kind ([`types::GroupConfig`]), running every shard group (replicas on
//! different nodes of the shard's region), each region's audit group (on
//! nodes of the region) and the cluster's one meta group.
//!
//! - [`types`]: the type configurations (a shard entry is one client batch, a
//!   meta entry one `MetaCommand`) and the group-kind trait.
//! - [`log_store`]: the Raft log, vote and purge mark on sled, any kind.
//! - [`state_machine`] and [`snapshot`]: the shard engine as the state machine;
//!   snapshots as streamed, digest-checked files, region-checked on install.
//! - [`meta_sm`]: `sovra_meta::MetaState` as the meta group's state machine.
//! - [`audit_sm`]: a region's audit log (`sovra_audit`) as its audit group's
//!   state machine: chained lines, a time index, snapshots checked against
//!   the tree.
//!
//! - [`network`], [`server`]: node-to-node gRPC (`sovra.raft.v1`), one pooled
//!   channel per peer, an address book, bounded AppendEntries.
//! - [`auth`]: the cluster secret every node-to-node request carries.
//! - [`tls`]: certificates with node identities, mutual TLS, reloading.
//! - [`fault`]: drop/delay/partition/isolate rules in a tower layer, for tests.
//! - [`host`]: a node's replicas of many groups: writes to the leader
//!   (forwarded if needed), read levels, the watchdog, per-group metrics.
//!
//! Depends on `sovra-shard` (the engine and replica stores), `sovra-meta` (the
//! meta state) and `sovra-proto` (the node-to-node messages); nothing here
//! knows the public API.

// openraft's StorageError is large and its traits return it: boxing only here
// would not make anything smaller.
#![allow(clippy::result_large_err)]

pub mod audit_sm;
pub mod auth;
pub mod fault;
pub mod host;
pub mod log_store;
pub mod meta_sm;
pub mod metrics;
pub mod network;
pub mod server;
pub mod snapshot;
pub mod state_machine;
pub mod tls;
pub mod types;

pub use auth::ClusterSecret;
pub use fault::{Faults, Rule};
pub use host::{AuditReplica, Group, MetaReplica, RaftHost, RaftSettings, ReadLevel, Replica, WriteAck};
pub use log_store::LogStore;
pub use meta_sm::MetaStateMachine;
pub use network::AddressBook;
pub use state_machine::ShardStateMachine;
pub use types::{
    AuditAppended, AuditBatch, AuditConfig, AuditGroupId, GroupConfig, MetaConfig, MetaGroupId, MetaResponse, NodeId, Raft, TypeConfig,
};
